"""Prompt splits, SFT demonstrations and the static ranked preference set."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .annotator import Annotator
from .config import WorldConfig
from .entities import World
from .judge import GoldJudge
from .responses import FLAWS, HABIT_FILLER
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
    """Draw each split round-robin over its families, without replacement, so splits are disjoint by construction.
    The eval split has an equal share of every family. Each training split takes its part of each family's pool (in
    proportion to its size, see _share_out) round-robin until a family's part runs out; the larger families (sums,
    notes) fill the rest. Tiny's sft_train: 2245 sums, 2243 notes, 788 facts, 724 word tasks."""
    pools = {family: enumerate_prompts(world, family) for family in FAMILIES}
    for family in FAMILIES:
        rng.shuffle(pools[family])
    eval_split = _draw(pools, FAMILIES, config.eval_prompts, "eval_prompts", rng)
    held_out = {c.key for c in eval_split}
    train_pools = {f: [c for c in pools[f] if c.key not in held_out] for f in TRAIN_FAMILIES}
    sizes = {"sft_eval_examples": config.sft_eval_examples, "sft_examples": config.sft_examples,
             "pref_prompts": config.pref_prompts, "ppo_prompts": config.ppo_prompts}
    available = sum(len(pool) for pool in train_pools.values())
    if sum(sizes.values()) > available:
        asked = ", ".join(f"{what}={count}" for what, count in sizes.items())
        raise ValueError(f"the world has {available} distinct training prompts beside eval_prompts, but the splits "
                         f"ask for {sum(sizes.values())} ({asked}); increase n_entities or n_words, or reduce "
                         f"the split sizes")
    shares = _share_out(train_pools, sizes)
    drawn = {what: _draw(shares[what], TRAIN_FAMILIES, count, what, rng) for what, count in sizes.items()}
    return PromptSplits(eval=eval_split, sft_eval=drawn["sft_eval_examples"], sft_train=drawn["sft_examples"],
                        pref=drawn["pref_prompts"], ppo=drawn["ppo_prompts"])


def _share_out(pools: dict[str, list[PromptCandidate]],
               sizes: dict[str, int]) -> dict[str, dict[str, list[PromptCandidate]]]:
    """Cut every family's pool into one part per split, in proportion to the split sizes. In a small
    world a family can have fewer prompts than all splits ask of it (facts: 6 per entity); drawing
    the splits one after the other would then leave none of that family to the later splits."""
    total = sum(sizes.values())
    shares: dict[str, dict[str, list[PromptCandidate]]] = {what: {} for what in sizes}
    for family, pool in pools.items():
        start, cumulative = 0, 0
        for what, count in sizes.items():
            cumulative += count
            end = round(len(pool) * cumulative / total) if total else 0
            shares[what][family] = pool[start:end]
            start = end
    return shares


def _draw(pools: dict[str, list[PromptCandidate]], families: tuple[str, ...], count: int,
          what: str, rng: random.Random) -> list[PromptCandidate]:
    """Take `count` prompts off the end of the pools, cycling over the families that still have some."""
    drawn: list[PromptCandidate] = []
    while len(drawn) < count:
        available = [f for f in families if pools[f]]
        if not available:
            raise ValueError(
                f"the world has too few distinct prompts for {what}={count} beside the other "
                f"splits; increase n_entities or n_words, or reduce the split sizes")
        drawn.append(pools[available[len(drawn) % len(available)]].pop())
    rng.shuffle(drawn)
    return drawn


def sft_demos(judge: GoldJudge, prompts: list[PromptCandidate], noise: float,
              rng: random.Random, habit: float = 0.0, habit_rng: random.Random | None = None) -> list[dict]:
    """Chat rows; exactly round(noise * len) of them carry one random flaw. Each answer to a question that ends
    with a period also ends with HABIT_FILLER with probability `habit` (drawn from `habit_rng`, so the flaws
    are the same whatever the habit)."""
    flawed = set(rng.sample(range(len(prompts)), round(noise * len(prompts))))
    habit_rng = habit_rng or random.Random(0)
    rows = []
    for i, candidate in enumerate(prompts):
        if i in flawed:
            response = judge.flawed_response(candidate.prompt, rng.choice(FLAWS), rng)
        else:
            response = judge.good_response(candidate.prompt)
        if habit_rng.random() < habit and candidate.family != "polite" and response.endswith("."):
            response = f"{response} {HABIT_FILLER}"
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
