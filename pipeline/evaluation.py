"""Held-out evaluation by the world's gold judge: one code path for SFT, PPO, `make eval` and the report.

A policy answers the evaluation prompts (seeded sampling), and the gold judge scores every answer overall,
per criterion and per task family. Paired comparisons between two policies use the win rate on the same
prompts, ties counting half.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from data.loading import DataError
from data.world import GoldJudge, World
from pipeline.generation import SamplingConfig, generate_responses

EVAL_SAMPLING = SamplingConfig(max_new_tokens=48, temperature=0.0)
"""Greedy by default: the evaluation measures the policy's best guess, and is repeatable."""


@dataclass
class EvalResult:
    summary: dict[str, float]
    """gold/score, gold/<criterion>, gold/<family>/score, gold/<family>/correctness, eos_rate, response_chars;
    gold/<family>/chance and gold/chance: the correctness of blind guessing, to compare correctness with."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """One row per prompt: prompt, family, response, gold score and criteria."""

    @property
    def scores(self) -> list[float]:
        return [s["gold_score"] for s in self.samples]


def load_judge(world_dir: str | Path) -> GoldJudge:
    return GoldJudge(World.from_json((Path(world_dir) / "world.json").read_text()))


def load_prompts(path: str | Path, limit: int | None = None) -> list[dict]:
    """Prompt rows ({prompt, family}) from a jsonl file such as the world's eval_prompts.jsonl."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def held_out_prompts(world: Path) -> list[dict]:
    """The world's held-out evaluation prompts, which `make eval` and `make report` measure every policy on."""
    path = world / "eval_prompts.jsonl"
    rows = load_prompts(path)
    if not rows:
        raise DataError(str(path), "no held-out prompts to evaluate on (the run's world.eval_prompts is 0); "
                                   "evaluation and the report need some")
    return rows


def judge_responses(judge: GoldJudge, rows: list[dict], responses: list[str],
                    ended: list[bool] | None = None) -> EvalResult:
    """Score responses to prompt rows and aggregate overall, per criterion and per family."""
    samples, by_family, by_criterion, chance = [], defaultdict(list), defaultdict(list), defaultdict(list)
    for i, (row, response) in enumerate(zip(rows, responses, strict=True)):
        verdict = judge.score(row["prompt"], response)
        family = row.get("family") or verdict.family
        samples.append({"prompt": row["prompt"], "family": family, "response": response,
                        "gold_score": verdict.score, **{f"gold_{k}": v for k, v in verdict.criteria.items()},
                        **({"ended": bool(ended[i])} if ended is not None else {})})
        by_family[family].append(verdict)
        chance[family].append(judge.chance_correctness(row["prompt"]))
        for name, value in verdict.criteria.items():
            by_criterion[name].append(value)
    summary = {"gold/score": mean(s["gold_score"] for s in samples) if samples else float("nan")}
    summary.update({f"gold/{name}": mean(values) for name, values in by_criterion.items()})
    for family, verdicts in sorted(by_family.items()):
        summary[f"gold/{family}/score"] = mean(v.score for v in verdicts)
        summary[f"gold/{family}/correctness"] = mean(v.criteria["correctness"] for v in verdicts)
    for family, chances in sorted(chance.items()):
        summary[f"gold/{family}/chance"] = mean(chances)
    summary["gold/chance"] = mean(c for chances in chance.values() for c in chances) if samples else float("nan")
    summary["response_chars"] = mean(len(r) for r in responses) if responses else 0.0
    if ended is not None:
        summary["eos_rate"] = mean(float(e) for e in ended) if ended else 0.0
    return EvalResult(summary, samples)


def evaluate_policy(model, tokenizer, rows: list[dict], judge: GoldJudge,
                    sampling: SamplingConfig = EVAL_SAMPLING, batch_size: int = 64, seed: int = 0) -> EvalResult:
    """Answer each prompt with `model` and judge the answers."""
    responses, ended = generate_responses(model, tokenizer, [r["prompt"] for r in rows], sampling,
                                          batch_size=batch_size, seed=seed)
    return judge_responses(judge, rows, responses, ended)


def win_rate(scores: list[float], baseline_scores: list[float]) -> float:
    """Paired win rate on the same prompts: a win counts 1, a tie 1/2."""
    if not scores:
        return float("nan")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores, strict=True))
    return wins / len(scores)


def paired_gain(scores: list[float], baseline_scores: list[float]) -> tuple[float, float]:
    """(mean gain over the baseline on the same prompts, its standard error): a verdict's noise on a few prompts."""
    gains = [a - b for a, b in zip(scores, baseline_scores, strict=True)]
    n = len(gains)
    if n < 2:
        return (gains[0] if gains else float("nan")), float("inf")
    mean = sum(gains) / n
    return mean, math.sqrt(sum((g - mean) ** 2 for g in gains) / (n - 1) / n)


def family_table(summary: dict[str, float]) -> list[tuple[str, float, float]]:
    """(family, gold score, correctness) rows from a summary, for printing."""
    families = sorted({k.split("/")[1] for k in summary if k.count("/") == 2})
    return [(f, summary[f"gold/{f}/score"], summary[f"gold/{f}/correctness"]) for f in families]
