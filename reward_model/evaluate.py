"""Held-out evaluation of a reward model on ranked preferences: `make eval-rm [ARGS="--data ..."]`.

    python -m reward_model.evaluate --config configs/tiny/rm.yaml                  # the run's RM, its held-out set
    python -m reward_model.evaluate --config configs/tiny/rm.yaml --reward-model ~/rms/mine \\
        --data Anthropic/hh-rlhf --split test --max-rows 2000
    python -m reward_model.evaluate --config configs/tiny/rm.yaml --data rated.jsonl --column prompt=instruction

By default the run's `rm/final` is scored on the rankings its training held out (the same split, so the figures
equal the end of `make rm`). `--data` names any preference dataset instead, in every form RM training reads
(ranked lists, rated lists, pairs, chats; see the README's Data section). Each response is scored once; printed
are the pairwise accuracy against the data's order (pairs rated alike left out), the score distributions of the
best responses and the rest, and, where every ranking has gold scores (the world's), gold agreement, the
annotator's noise ceiling and the breakdown by the criterion that decides a pair. The figures go to
runs/<run>/eval/rm-<label>.json (rm-<label>-on-<data>.json with --data).

The held-out rankings are those of the RM training this run made, split with the settings it ran with (its
resolved config.yaml), in the run's world as it is: an evaluation never rewrites the world.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from data.loading import DataError, DatasetSpec, load_dataset_for
from pipeline.checkpoint import checkpoint_config, write_text_atomic
from pipeline.config import load_config
from pipeline.evaluate import RUN_KEYS, at_least_one, check_output, default_device, load_run_config, \
    resolve_checkpoint, run_world
from pipeline.runs import StageConfig, run_dir, run_main, stage_paths
from reward_model.config import RewardModelConfig
from reward_model.scoring import RewardScorer
from reward_model.metrics import (add_gold_criteria, best_and_rest, describe_accuracy, describe_by_criterion,
                                   headline_metrics, ranking_metrics, score_stats)
from reward_model.train import held_out_fingerprint, load_rankings, score_rankings


def file_part(text: str) -> str:
    """`text` as part of a file name: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def held_out_rankings(cfg: StageConfig) -> tuple[list[dict], str]:
    """The rankings the run's RM training held out (with gold criteria where the world judges them) and where they
    came from: split with the settings it ran with (its resolved config.yaml), in the run's world as it is."""
    trained_config = stage_paths(cfg, "rm").of_final("config.yaml")  # the launch that wrote rm/final
    if not trained_config.exists():
        raise DataError(str(trained_config), f"no RM training in run '{cfg.run_name}' to take held-out rankings "
                                             "from (this file does not exist): train it (make rm), or pass --data")
    overrides = [f"runs_dir={cfg.runs_dir}", f"run_name={cfg.run_name}"]
    recorded = yaml.safe_load(trained_config.read_text()) or {}
    if recorded.get("eval_data") is not None and recorded.get("train_data") is None:
        overrides.append("eval_data=null")  # an RM trained before eval_data was refused without train_data ignored it
    trained = load_config(RewardModelConfig, trained_config, overrides)
    world = run_world(trained)
    _, rows, source = load_rankings(trained, world=world)
    final = stage_paths(cfg, "rm").final
    trained_on = (checkpoint_config(final) or {}).get("rm_held_out_prompts")
    if trained_on and trained_on != held_out_fingerprint(rows):
        again = "Train the RM again (make rm), or pass --data"
        if trained.train_data is None:
            raise DataError(str(Path(source) / "eval.jsonl"), f"collected again since {final} trained, holding out "
                                                               f"other prompts now, some of which the RM trained on. "
                                                               f"{again}")
        if trained.eval_data is None:  # train_data split again: the held-out part now has prompts it trained on
            raise DataError(trained.train_data.path, f"changed since {final} trained: split again, it holds out other "
                                                     f"prompts now, some of which the RM trained on. {again}")
        raise DataError(trained.eval_data.path, f"changed since {final} trained on train_data and was evaluated on "
                                                f"it: its figures would not be the ones training gave. {again}")
    add_gold_criteria(trained, rows, world=world)
    return rows, trained.eval_data.path if trained.eval_data is not None else source  # a held-out file of its own


RM_DATA_FLAGS = {"eval_data.path": "--data", "eval_data.split": "--split", "eval_data.name": "--name",
                 "eval_data.columns": "--column", "eval_data.max_rows": "--max-rows"}
"""The held-out data keys whose job eval-rm's flags do (the run's own held-out rankings are its default)."""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the run's RM config, e.g. configs/tiny/rm.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the keys that locate the run and its world (run_name=...)")
    parser.add_argument("--reward-model", metavar="PATH", default="rm",
                        help="an RM checkpoint directory or hub id (default: the run's rm/final)")
    parser.add_argument("--data", help="a preference dataset: local file or directory, or hub id (default: the "
                                       "rankings the run's RM training held out)")
    parser.add_argument("--split", default=None, help="with --data: the split (default: test)")
    parser.add_argument("--name", default=None, help="with --data: the hub dataset's config name")
    parser.add_argument("--column", action="append", default=[], metavar="SCHEMA=SOURCE",
                        help="with --data: read a schema column from another column, e.g. --column prompt=instruction")
    parser.add_argument("--max-rows", type=at_least_one, default=None,
                        help="with --data: read at most this many rows")
    parser.add_argument("--batch-size", type=at_least_one, default=None,
                        help="default: the config's eval_batch_size")
    parser.add_argument("--out", help="JSON output file (default: runs/<run>/eval/rm-<label>[-on-<data>[-<name>][-<split>][-first<N>]].json)")
    args = parser.parse_intermixed_args(argv)
    # without --data the run's held-out rankings are read as its RM training split them: these would be dropped
    given = [flag for flag, given in (("--split", args.split is not None), ("--name", args.name is not None),
                                      ("--column", bool(args.column)), ("--max-rows", args.max_rows is not None))
             if given]
    if given and not args.data:
        parser.error(f"{', '.join(given)}: only with --data (the run's held-out rankings are read whole)")
    if args.split is None:
        args.split = "test"
    check_output(args.out)
    # eval_batch_size is read: it is --batch-size's default
    cfg = load_run_config(args.config, args.overrides, "eval-rm", (*RUN_KEYS, "world", "eval_batch_size"),
                          RM_DATA_FLAGS)
    if not isinstance(cfg, RewardModelConfig):
        raise SystemExit(f"--config {args.config}: expected the run's RM config (configs/<recipe>/rm.yaml)")

    # the RM first: a wrong checkpoint fails before any data is read
    rm_path, label = resolve_checkpoint(cfg, args.reward_model, flag="--reward-model",
                                        also="" if args.data else " --data path-or-hub-id")
    device = default_device()
    scorer = RewardScorer(rm_path, device, cfg.trust_remote_code, needed_by="eval-rm")
    if args.data:
        columns = dict(item.split("=", 1) for item in args.column if "=" in item)
        if len(columns) != len(args.column):
            raise SystemExit(f"--column: expected SCHEMA=SOURCE (e.g. prompt=instruction), got {args.column}")
        spec = DatasetSpec(path=args.data, name=args.name, split=args.split, columns=columns, max_rows=args.max_rows)
        world = run_world(cfg) if args.data.startswith("world:") else None
        rows = [dict(r) for r in load_dataset_for(spec, "preferences", world_dir=world)]
        source = args.data
        # the whole path or hub id: runs/a/prefs/eval.jsonl and runs/b/prefs/eval.jsonl are two files
        name = "".join([f"-on-{file_part(args.data).strip('-')}",
                        f"-{file_part(args.name)}" if args.name else "",
                        f"-{file_part(args.split)}" if args.split != "test" else "",
                        f"-first{args.max_rows}" if args.max_rows else ""])
        if all(row.get("gold_scores") for row in rows):  # world rankings: the judge names each pair's criterion
            add_gold_criteria(cfg, rows, world=run_world(cfg))
    else:
        rows, source = held_out_rankings(cfg)
        source, name = f"the held-out rankings of {source}", ""
    if not rows:
        raise SystemExit(f"eval-rm: no rankings in {source}")
    print(f"[eval-rm] {rm_path}: {len(rows):,} rankings from {source}", flush=True)
    scores = score_rankings(scorer.model, scorer.tokenizer, rows, scorer.max_length,
                            args.batch_size or cfg.eval_batch_size, device)

    result = headline_metrics(ranking_metrics(scores, rows))
    best, rest = best_and_rest(scores, rows)
    result.update({**score_stats("best", best), **score_stats("rest", rest)})
    print(f"[eval-rm] pairwise accuracy {describe_accuracy(result)} over {int(result['pairs']):,} pairs")
    print(f"[eval-rm] scores: best responses {result['best_mean']:.3f} +- {result['best_std']:.3f}, "
          f"the rest {result['rest_mean']:.3f} +- {result['rest_std']:.3f}")
    for line in describe_by_criterion(result):
        print(f"[eval-rm] {line}")
    report = {"reward_model": rm_path, "data": source, "rankings": len(rows), **result,
              "scores": [{"prompt": row["prompt"], "responses": row["responses"], "scores": s}
                         for row, s in zip(rows, scores)]}
    out = Path(args.out) if args.out else run_dir(cfg) / "eval" / f"rm-{label}{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    print(f"[eval-rm] figures and every score in {out}")
    return report


if __name__ == "__main__":
    run_main(main, interrupted="interrupted")
