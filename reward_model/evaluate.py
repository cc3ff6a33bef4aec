"""Held-out evaluation of a reward model on ranked preferences: `make eval-rm [ARGS="--data ..."]`.

    python -m reward_model.evaluate --config configs/tiny/rm.yaml                  # the run's RM, its held-out set
    python -m reward_model.evaluate --config configs/tiny/rm.yaml --reward-model ~/rms/mine \\
        --data Anthropic/hh-rlhf --split test --max-rows 2000

By default the run's `rm/final` is scored on the rankings its training held out (the same split, so the figures
equal the end of `make rm`). `--data` names any preference dataset instead, in every form RM training reads
(ranked lists, rated lists, pairs, chats; see the README's Data section). Each response is scored once; printed
are the pairwise accuracy against the data's order (pairs rated alike left out), the score distributions of the
best responses and the rest, and, where every ranking has gold scores (the world's), gold agreement, the
annotator's noise ceiling and the breakdown by the criterion that decides a pair. The figures go to
runs/<run>/eval/rm-<label>.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.loading import DatasetSpec, load_dataset_for
from pipeline.evaluate import default_device, load_run_config
from pipeline.runs import run_dir, run_main, stage_paths, world_dir
from reward_model.config import RewardModelConfig
from reward_model.scoring import RewardScorer
from reward_model.train import (add_gold_criteria, best_and_rest, describe_accuracy, describe_by_criterion,
                                headline_metrics, load_rankings, ranking_metrics, score_rankings, score_stats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's RM config, e.g. configs/tiny/rm.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config (run_name=..., ...)")
    parser.add_argument("--reward-model", metavar="PATH", help="an RM checkpoint (default: the run's rm/final)")
    parser.add_argument("--data", help="a preference dataset: local file or directory, or hub id (default: the "
                                       "rankings the run's RM training held out)")
    parser.add_argument("--split", default="test", help="with --data: the split (default: test)")
    parser.add_argument("--max-rows", type=int, default=None, help="with --data: read at most this many rows")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="JSON output file (default: runs/<run>/eval/rm-<label>.json)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_run_config(args.config, args.overrides)
    if not isinstance(cfg, RewardModelConfig):
        raise SystemExit(f"--config {args.config}: expected the run's RM config (configs/<recipe>/rm.yaml)")

    rm_path = args.reward_model or str(stage_paths(cfg, "rm").final)
    if not args.reward_model and not (Path(rm_path) / "config.json").exists():
        raise SystemExit(f"no reward model in run '{cfg.run_name}': {rm_path} does not exist. Train it first "
                         f"(make rm), or pass --reward-model path/to/checkpoint.")
    if args.data:
        spec = DatasetSpec(path=args.data, split=args.split, max_rows=args.max_rows)
        rows, source = [dict(r) for r in load_dataset_for(spec, "preferences", world_dir=world_dir(cfg))], args.data
    else:
        _, rows, source = load_rankings(cfg)
        source = f"the held-out rankings of {source}"
    add_gold_criteria(cfg, rows)
    device = default_device()
    scorer = RewardScorer(rm_path, device, cfg.trust_remote_code, needed_by="eval-rm")
    print(f"[eval-rm] {rm_path}: {len(rows):,} rankings from {source}", flush=True)
    scores = score_rankings(scorer.model, scorer.tokenizer, rows, scorer.max_length, args.batch_size, device)

    result = headline_metrics(ranking_metrics(scores, rows))
    best, rest = best_and_rest(scores, rows)
    result.update({**score_stats("best", best), **score_stats("rest", rest)})
    print(f"[eval-rm] pairwise accuracy {describe_accuracy(result)} over {int(result['pairs']):,} pairs")
    print(f"[eval-rm] scores: best responses {result['best_mean']:.3f} +- {result['best_std']:.3f}, "
          f"the rest {result['rest_mean']:.3f} +- {result['rest_std']:.3f}")
    for line in describe_by_criterion(result):
        print(f"[eval-rm] {line}")
    label = Path(rm_path.rstrip("/")).name if args.reward_model else "rm"
    out = Path(args.out) if args.out else run_dir(cfg) / "eval" / f"rm-{label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"reward_model": rm_path, "data": source, "rankings": len(rows), **result,
              "scores": [{"prompt": row["prompt"], "responses": row["responses"], "scores": s}
                         for row, s in zip(rows, scores)]}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[eval-rm] figures and every score in {out}")
    return report


if __name__ == "__main__":
    run_main(main)
