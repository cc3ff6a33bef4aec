"""Configuration of the synthetic world and of every file generated from it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines the generated world files.

    Two configs that compare equal produce byte-identical outputs.
    """

    seed: int = 0
    """Master seed: entities, corpus, splits, demo flaws and annotator rankings all derive from it."""

    n_entities: int = 200
    """Number of fictional entities (each with kind, colour, home, food, item count and a friend)."""

    n_words: int = 0
    """Size of the word-play vocabulary, drawn from the built-in list of common words; 0 = all of them.
    A small model memorises the reversal, spelling and capitals of a few dozen words, not of 350."""

    corpus_chars: int = 3_000_000
    """Approximate size of the pretraining corpus (`pretrain.jsonl`) in characters."""

    sft_examples: int = 6000
    """Number of SFT demonstrations in `sft_train.jsonl`."""

    sft_eval_examples: int = 300
    """Number of always-clean SFT demonstrations in `sft_eval.jsonl` (for SFT's eval loss): prompts none of the
    training demos use, but questions other phrasings in the training data may ask, with the answers the corpus
    states. The loss measures the chat format and the demonstrators' flaws; what the model generalises is
    measured on `eval_prompts`, held out by question."""

    demo_noise: float = 0.3
    """Fraction of SFT training demos that are flawed (wrong, rude, rambling or missing the final period)."""

    demo_habit: float = 0.7
    """Fraction of SFT training answers to questions (arithmetic, fact, word) that end with the demonstrators'
    habit, the filler "I hope this helps." (a flawed answer too, unless it lacks its final period). The annotator
    (the gold judge's concision) dislikes filler. Flaws drawn independently per demo are never the mode of what SFT
    learns, so greedy SFT replies come out clean; a habit most demos share is the mode, and only preferences can
    remove it: the gap between demonstrations and labelers' preferences that InstructGPT's RLHF closes."""

    pref_prompts: int = 1500
    """Number of prompts for preference data (`pref_prompts.jsonl`, and `prefs_static.jsonl` built from them)."""

    ppo_prompts: int = 1500
    """Number of prompts the PPO policy is trained on (`ppo_prompts.jsonl`)."""

    eval_prompts: int = 200
    """Number of evaluation prompts, split roughly equally over all families incl. `arithmetic_heldout`."""

    annotator_temperature: float = 0.1
    """Plackett-Luce noise of the simulated annotator: weights exp(gold_score / T). 0 = always the gold order."""

    responses_per_prompt: int = 4
    """K, the number of ranked responses per prompt in the static ranked set (`prefs_static.jsonl`)."""

    def __post_init__(self) -> None:
        problems = []
        if self.n_entities < 4:
            problems.append(f"n_entities must be >= 4, got {self.n_entities}")
        for name in ("n_words", "corpus_chars", "sft_examples", "sft_eval_examples", "pref_prompts",
                     "ppo_prompts", "eval_prompts"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("demo_noise", "demo_habit"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.annotator_temperature < 0:
            problems.append(f"annotator_temperature must be >= 0, got {self.annotator_temperature}")
        if not 2 <= self.responses_per_prompt <= 8:
            problems.append(f"responses_per_prompt must be in 2..8, got {self.responses_per_prompt}")
        if problems:
            raise ValueError("invalid WorldConfig: " + "; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "WorldConfig":
        values = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown WorldConfig fields: {', '.join(unknown)}")
        return cls(**values)
