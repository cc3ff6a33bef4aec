"""Prompt splits, SFT demonstrations and the static ranked preference set."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .annotator import Annotator
from .config import WorldConfig
from .entities import World
from .judge import GoldJudge
from .responses import FLAWS
from .tasks import FAMILIES, TRAIN_FAMILIES, PromptCandidate, enumerate_prompts


@dataclass(frozen=True)
class PromptSplits:
    """Pairwise disjoint prompt sets. `eval` also shares no underlying question with the
    others: every phrasing of an eval question is withheld from the training splits."""

    eval: list[PromptCandidate]
    sft_eval: list[PromptCandidate]
    sft_train: list[PromptCandidate]
    pref: list[PromptCandidate]
    ppo: list[PromptCandidate]


def make_prompt_splits(world: World, config: WorldConfig, rng: random.Random) -> PromptSplits:
    """Draw each split round-robin over its families, without replacement, so splits are
    disjoint by construction and families are (roughly) equally represented."""
    pools = {family: enumerate_prompts(world, family) for family in FAMILIES}
    for family in FAMILIES:
        rng.shuffle(pools[family])
    eval_split = _draw(pools, FAMILIES, config.eval_prompts, "eval_prompts", rng)
    held_out = {c.key for c in eval_split}
    train_pools = {f: [c for c in pools[f] if c.key not in held_out] for f in TRAIN_FAMILIES}
    return PromptSplits(
        eval=eval_split,
        sft_eval=_draw(train_pools, TRAIN_FAMILIES, config.sft_eval_examples, "sft_eval_examples", rng),
        sft_train=_draw(train_pools, TRAIN_FAMILIES, config.sft_examples, "sft_examples", rng),
        pref=_draw(train_pools, TRAIN_FAMILIES, config.pref_prompts, "pref_prompts", rng),
        ppo=_draw(train_pools, TRAIN_FAMILIES, config.ppo_prompts, "ppo_prompts", rng),
    )


def _draw(pools: dict[str, list[PromptCandidate]], families: tuple[str, ...], count: int,
          what: str, rng: random.Random) -> list[PromptCandidate]:
    """Take `count` prompts off the end of the pools, cycling over the families that still have some."""
    drawn: list[PromptCandidate] = []
    while len(drawn) < count:
        available = [f for f in families if pools[f]]
        if not available:
            raise ValueError(
                f"the world has too few distinct prompts for {what}={count} after the earlier "
                f"splits; increase n_entities or reduce the split sizes")
        drawn.append(pools[available[len(drawn) % len(available)]].pop())
    rng.shuffle(drawn)
    return drawn


def sft_demos(judge: GoldJudge, prompts: list[PromptCandidate], noise: float,
              rng: random.Random) -> list[dict]:
    """Chat rows; exactly round(noise * len) of them carry one random flaw."""
    flawed = set(rng.sample(range(len(prompts)), round(noise * len(prompts))))
    rows = []
    for i, candidate in enumerate(prompts):
        if i in flawed:
            response = judge.flawed_response(candidate.prompt, rng.choice(FLAWS), rng)
        else:
            response = judge.good_response(candidate.prompt)
        rows.append(chat_row(candidate, response))
    return rows


def chat_row(candidate: PromptCandidate, response: str) -> dict:
    return {
        "messages": [{"role": "user", "content": candidate.prompt},
                     {"role": "assistant", "content": response}],
        "family": candidate.family,
    }


def static_ranked_set(judge: GoldJudge, annotator: Annotator, prompts: list[PromptCandidate],
                      k: int, rng: random.Random) -> list[dict]:
    """For each prompt: the good response plus k-1 distinct flawed ones, ranked by the annotator."""
    rows = []
    for candidate in prompts:
        responses = candidate_responses(judge, candidate.prompt, k, rng)
        order = annotator.rank(candidate.prompt, responses)
        ranked = [responses[i] for i in order]
        rows.append({
            "prompt": candidate.prompt,
            "responses": ranked,
            "gold_scores": [judge.score(candidate.prompt, r).score for r in ranked],
            "family": candidate.family,
        })
    return rows


def candidate_responses(judge: GoldJudge, prompt: str, k: int, rng: random.Random) -> list[str]:
    """k distinct strings: the good response and flawed ones (each flaw once before any repeats),
    shuffled so the annotator's tie-breaking by index favours no variant."""
    responses = [judge.good_response(prompt)]
    flaws = rng.sample(FLAWS, min(k - 1, len(FLAWS)))
    attempts = 0
    while len(responses) < k:
        attempts += 1
        if attempts > 100:
            raise ValueError(f"cannot make {k} distinct responses for prompt {prompt!r}")
        flaw = flaws.pop() if flaws else rng.choice(FLAWS)
        response = judge.flawed_response(prompt, flaw, rng)
        if response not in responses:
            responses.append(response)
    rng.shuffle(responses)
    return responses
