"""How a reward model's scores agree with ranked preferences: pairwise accuracy against the labeler, agreement
with the world's gold judge and the annotator's noise ceiling, the breakdown by the gold criterion that decides a
pair, and the score distributions. RM training, `make eval-rm`, the report and the bench all read them here.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch

from data.world.judge import CRITERIA_WEIGHTS
from pipeline.evaluation import load_judge
from pipeline.runs import world_dir
from reward_model.config import RewardModelConfig


def add_gold_criteria(cfg: RewardModelConfig, rows: list[dict], world: Path | None = None) -> None:
    """Give world rankings (rows with `gold_scores` whose prompts the world's judge parses) each response's gold
    criteria, so ranking_metrics can say which kinds of differences the RM sees."""
    if not rows or not all("gold_scores" in row for row in rows):
        return
    judge = load_judge(world or world_dir(cfg))
    if all(judge.task(row["prompt"]) is not None for row in rows):
        for row in rows:
            row["gold_criteria"] = [judge.score(row["prompt"], r).criteria for r in row["responses"]]


def deciding_criterion(a: dict[str, float], b: dict[str, float]) -> str:
    """The gold criterion that contributes most to the score difference of two responses."""
    return max(CRITERIA_WEIGHTS, key=lambda c: CRITERIA_WEIGHTS[c] * abs(a[c] - b[c]))


def ranking_metrics(scores: list[list[float]], rows: list[dict]) -> dict[str, float]:
    """Agreement over the held-out pairs i < j of each ranking (i ranked above j by the labeler; a pair it rated
    alike, in `ratings`, is left out).

    accuracy: the RM orders the pair as the labeler did. With gold scores (on every row), over the pairs gold
    decides (the same pairs as the next two), else over all pairs; accuracy_rankings: how many rankings those
    pairs come from, and accuracy_se its standard error over them (a ranking's pairs share its scores, so they
    are not independent draws). gold_accuracy: the RM orders the pair as gold does.
    noise_ceiling: the labeler itself agrees with gold; an RM that equals gold scores `accuracy` = ceiling.
    accuracy_over_ceiling: accuracy / ceiling (a coin flip scores 0.5 / ceiling of it); gain_over_chance_to_ceiling:
    (accuracy - 1/2) / (ceiling - 1/2), how far from a coin flip towards the ceiling.
    accuracy_all_pairs / noise_ceiling_all_pairs: the same over every pair, where on gold ties (the labeler
    flips a coin) the best expected accuracy is 1/2. A tie in RM scores counts 1/2 too (a coin flip between the
    two): two identical replies tie in gold and in the RM alike.
    gold_accuracy/<criterion>, decided_pairs/<criterion> (rows with `gold_criteria`): gold agreement on the
    decided pairs grouped by the criterion that contributes most to their gold difference; and
    gold_accuracy/<criterion>/<family>, decided_pairs/<criterion>/<family> the same per task family (rows with
    `family`): an RM that cannot check sums shows up as a coin flip on arithmetic correctness.
    """
    all_pairs, decided, by_criterion = [], [], {}
    per_ranking_all, per_ranking_decided = [], []  # each ranking's RM-labeler agreements: `accuracy`'s clusters
    # gold figures only when every row has gold: with some rows lacking it, "the pairs gold decides" would
    # silently leave those rows out, and the all-pairs ceiling would count their pairs as gold ties
    with_gold = all(row.get("gold_scores") is not None for row in rows)
    for s, row in zip(scores, rows, strict=True):
        gold, criteria = (row.get("gold_scores"), row.get("gold_criteria")) if with_gold else (None, None)
        pairs, all_before, decided_before = labeled_pairs(row), len(all_pairs), len(decided)
        for i, j in pairs:
            all_pairs.append(_agreement(s[i], s[j]))
            if gold is not None and gold[i] != gold[j]:
                gold_first = gold[i] > gold[j]
                decided.append((_agreement(s[i], s[j]), _agreement(s[i], s[j]) if gold_first else
                                _agreement(s[j], s[i]), gold_first))
                if criteria is not None:
                    criterion = deciding_criterion(criteria[i], criteria[j])
                    by_criterion.setdefault(criterion, []).append(decided[-1][1])
                    if row.get("family"):
                        by_criterion.setdefault(f"{criterion}/{row['family']}", []).append(decided[-1][1])
        per_ranking_all.append(all_pairs[all_before:])
        per_ranking_decided.append([agreed for agreed, _, _ in decided[decided_before:]])
    clusters = [c for c in (per_ranking_decided if decided else per_ranking_all) if c]
    metrics = {"accuracy_all_pairs": _mean(all_pairs), "pairs": float(len(all_pairs)),
               "accuracy_rankings": float(len(clusters))}
    if len(clusters) > 1:  # one ranking has no spread to measure (a NaN would stop the run's tracking)
        metrics["accuracy_se"] = _clustered_se(clusters)
    if decided:
        rm_label, rm_gold, label_gold = zip(*decided)
        metrics.update({"accuracy": _mean(rm_label), "gold_accuracy": _mean(rm_gold),
                        "noise_ceiling": _mean(label_gold), "decided_pairs": float(len(decided))})
        if metrics["noise_ceiling"] > 0:  # a labeler that never agrees with gold gives no ceiling to measure by
            metrics["accuracy_over_ceiling"] = metrics["accuracy"] / metrics["noise_ceiling"]
        if metrics["noise_ceiling"] > 0.5:  # a coin flip already scores 1/2 of it: how far from there towards it
            metrics["gain_over_chance_to_ceiling"] = (metrics["accuracy"] - 0.5) / (metrics["noise_ceiling"] - 0.5)
        # over all pairs the best any RM can expect: the ceiling on decided pairs, a coin flip on gold ties
        ties = len(all_pairs) - len(decided)
        metrics["noise_ceiling_all_pairs"] = (sum(label_gold) + 0.5 * ties) / len(all_pairs)
        for name, agreed in sorted(by_criterion.items()):
            metrics[f"gold_accuracy/{name}"], metrics[f"decided_pairs/{name}"] = _mean(agreed), float(len(agreed))
    else:
        metrics["accuracy"] = metrics["accuracy_all_pairs"]
    return metrics


def labeled_pairs(row: dict) -> list[tuple[int, int]]:
    """The pairs (i, j), i < j, that a ranking orders, i above j: all of them, but for pairs its `ratings` tie."""
    ratings = row.get("ratings")
    return [(i, j) for i, j in itertools.combinations(range(len(row["responses"])), 2)
            if not ratings or ratings[i] != ratings[j]]


def _agreement(first: float, second: float) -> float:
    """How far a scorer puts `first` above `second`: 1, 0, or 1/2 for a tie."""
    return 1.0 if first > second else 0.5 if first == second else 0.0


def by_deciding_criterion(metrics: dict[str, float]) -> dict[str, dict]:
    """{criterion: {gold_accuracy, pairs, by_family: {family: {gold_accuracy, pairs}}}} from ranking_metrics'
    per-criterion keys, most pairs first."""
    found: dict[str, dict] = {}
    for key in sorted((k for k in metrics if k.startswith("gold_accuracy/")), key=lambda k: k.count("/")):
        criterion, _, family = key.removeprefix("gold_accuracy/").partition("/")
        entry = {"gold_accuracy": metrics[key], "pairs": int(metrics[key.replace("gold_accuracy", "decided_pairs", 1)])}
        if family:
            found[criterion]["by_family"][family] = entry
        else:
            found[criterion] = {**entry, "by_family": {}}
    for entry in found.values():
        entry["by_family"] = dict(sorted(entry["by_family"].items(), key=lambda item: -item[1]["pairs"]))
    return dict(sorted(found.items(), key=lambda item: -item[1]["pairs"]))


def best_and_rest(scores: list[list[float]], rows: list[dict]) -> tuple[list[float], list[float]]:
    """The scores of each ranking's best response (with ratings, of every response rated best), and of the others."""
    best = [sum(r == row["ratings"][0] for r in row["ratings"]) if row.get("ratings") else 1 for row in rows]
    return ([x for s, n in zip(scores, best) for x in s[:n]], [x for s, n in zip(scores, best) for x in s[n:]])


def headline_metrics(metrics: dict[str, float]) -> dict:
    """What eval.json keeps of ranking_metrics: the headline figures and the breakdown by deciding criterion."""
    result = {k: metrics[k] for k in ("accuracy", "gold_accuracy", "noise_ceiling", "accuracy_over_ceiling",
                                      "gain_over_chance_to_ceiling", "decided_pairs", "accuracy_all_pairs",
                                      "noise_ceiling_all_pairs", "pairs")
              if k in metrics}
    by_criterion = by_deciding_criterion(metrics)
    if by_criterion:
        result["gold_accuracy_by_deciding_criterion"] = by_criterion
    return result


def describe_accuracy(result: dict) -> str:
    """"0.644, gold agreement 0.748, noise ceiling 0.846 (76.1% of it) ...": the accuracy, and against gold."""
    return f"{result['accuracy']:.3f}" + (
        f", gold agreement {result['gold_accuracy']:.3f}, noise ceiling {result['noise_ceiling']:.3f}"
        + (f" ({result['accuracy_over_ceiling']:.1%} of it" + (
            f"; {result['gain_over_chance_to_ceiling']:.0%} of the way from a coin flip"
            if "gain_over_chance_to_ceiling" in result else "") + ")" if "accuracy_over_ceiling" in result else "")
        + " on the pairs gold decides; over all pairs "
        f"{result['accuracy_all_pairs']:.3f} vs ceiling {result['noise_ceiling_all_pairs']:.3f}"
        if "noise_ceiling" in result else "")


def describe_by_criterion(result: dict) -> list[str]:
    by_criterion = result.get("gold_accuracy_by_deciding_criterion")
    if not by_criterion:
        return []
    lines = ["gold agreement by the criterion that decides the pair: " +
             ", ".join(f"{c} {v['gold_accuracy']:.2f} ({v['pairs']} pairs)" for c, v in by_criterion.items())]
    if "correctness" in by_criterion and by_criterion["correctness"]["by_family"]:
        lines.append("... on the pairs correctness decides, by task family: "
                     + family_breakdown(by_criterion["correctness"]["by_family"]))
    return lines


def family_breakdown(by_family: dict[str, dict]) -> str:
    """"arithmetic 0.50 (233), fact 0.60 (107)": gold agreement and pairs per family, as one line."""
    return ", ".join(f"{f} {v['gold_accuracy']:.2f} ({v['pairs']})" for f, v in by_family.items())


def _mean(values) -> float:
    return sum(values) / len(values) if values else float("nan")


def _clustered_se(clusters: list[list[float]]) -> float:
    """Standard error of the mean over all values, counted over clusters (a ranking's pairs): the cluster-robust
    error of a ratio estimate, sqrt(sum_c (sum_c x - mean * n_c)^2 * C / (C - 1)) / n. Needs two clusters."""
    n, count = sum(len(c) for c in clusters), len(clusters)
    mean = sum(sum(c) for c in clusters) / n
    spread = sum((sum(c) - mean * len(c)) ** 2 for c in clusters) * count / (count - 1)
    return math.sqrt(spread) / n


def score_stats(name: str, values: list[float]) -> dict[str, float]:
    """Mean and (population) std of a score distribution, e.g. the chosen responses' scores."""
    t = torch.tensor(values, dtype=torch.float64)
    return {f"{name}_mean": t.mean().item(), f"{name}_std": t.std(correction=0).item()}


def distinct_reply_scores(scores: list[list[float]], rows: list[dict]) -> list[float]:
    """One score per distinct (prompt, reply): a pairs dataset repeats a chosen reply over several rows
    (UltraFeedback's pairs out of 4 completions), which would otherwise weigh it more in the reward stats."""
    return list({(row["prompt"], reply): score for row, row_scores in zip(rows, scores, strict=True)
                 for reply, score in zip(row["responses"], row_scores, strict=True)}.values())
