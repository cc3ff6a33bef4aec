"""Held-out evaluation of one checkpoint: `make eval STAGE=sft|ppo|pretrain|path/to/checkpoint`.

    python -m pipeline.evaluate --config configs/tiny/ppo.yaml run_name=tiny --stage sft
    python -m pipeline.evaluate --config configs/tiny/ppo.yaml --stage ~/models/my-lm --rm --limit 50

The checkpoint answers the run's held-out world prompts (`eval_prompts.jsonl`), greedily by default, and the
gold judge scores every answer overall, per criterion and per task family. The table goes to stdout and the
figures (with every prompt, answer and verdict) to a JSON file: runs/<run>/eval/<stage or directory>.json
(`-first<N>` added with `--limit`).

Any Hugging Face causal LM directory works, not only this project's: its tokenizer is given our chat
template (and role tokens) if it has none. `--rm` also scores the answers with the run's reward model.

This module is also the evaluation `make report` uses (`evaluate_checkpoint`, with the same prompts, seed and
sampling), so the report's figures equal a separate `make eval` of the same checkpoint.

Config: the stage YAML the Makefile hands over (configs/<recipe>/ppo.yaml) is read by that stage's own
config class (chosen by the file name, see STAGE_CONFIGS), so every key in it and every `key=value` override
is checked as usual. Only the run's shared settings (run_name, runs_dir, seed, world, trust_remote_code) are
used here, and an override of any other key is refused; what to evaluate and how to sample are `--flags`. RM
scores (`--rm`) are shaped as the run's PPO shaped its rewards, with the settings its ppo/final was trained with (`run_ppo_settings`).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from data.world.judge import CRITERIA_WEIGHTS
from pipeline.checkpoint import is_hub_id, write_text_atomic
from pipeline.evaluation import EVAL_SAMPLING, EvalResult, evaluate_policy, family_table, held_out_prompts, load_judge
from pipeline.generation import SamplingConfig
from pipeline.config import ConfigError, FieldError, is_config_key, load_config
from pipeline.runs import StageConfig, load_stage_config, run_dir, run_main, stage_paths, world_dir
from pipeline.tokenizer import check_chat_prompts

STAGE_CONFIGS = {
    "pretrain": "stages.pretrain.pretrain:PretrainConfig",
    "sft": "stages.sft.sft:SFTStageConfig",
    "rm": "reward_model.config:RewardModelConfig",
    "ppo": "stages.ppo.config:PPOStageConfig",
}
"""The config class that reads a stage YAML, by file name (configs/<recipe>/<name>.yaml). Other names are
read as a bare StageConfig, so they may hold only the shared keys."""

POLICY_STAGE_NAMES = ("pretrain", "sft", "ppo")
CRITERIA = tuple(CRITERIA_WEIGHTS)
"""The gold judge's criteria, in the order tables show them (the judge's own order)."""


# ---- the run's config and the command line, shared by evaluate, report and chat ----------------------------

def config_class(config_path: str | None) -> type:
    target = STAGE_CONFIGS.get(Path(config_path).stem) if config_path else None
    if target is None:
        return StageConfig
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def load_run_config(config_path: str | None, overrides: list[str], command: str = "",
                    used_keys: tuple[str, ...] = (), flags: dict[str, str] | None = None) -> StageConfig:
    """The stage YAML (checked by its stage's config class) with overrides; exits with a message on errors. With
    `command`, an override of a key it does not read (not in `used_keys`) is refused (refuse_unused_overrides)."""
    if command:
        refuse_unused_overrides(config_path, overrides, command, used_keys, flags)
    return load_stage_config(config_class(config_path), config_path, overrides)


RUN_KEYS = ("run_name", "runs_dir", "trust_remote_code")
"""Config keys that locate the run (and allow its checkpoints' code): every command reading a run uses them."""

SAMPLING_FLAGS = {"sampling.temperature": "--temperature", "sampling.max_new_tokens": "--max-new-tokens",
                  "sampling.top_p": "--top-p", "sampling.top_k": "--top-k"}
EVAL_FLAGS = {**SAMPLING_FLAGS, "eval_prompts": "--limit", "eval_batch_size": "--batch-size"}
"""Stage keys whose job a flag does in evaluate and report: an override of the key would be ignored."""


def refuse_unused_overrides(config_path: str | None, overrides: list[str], command: str, used_keys: tuple[str, ...],
                            flags: dict[str, str] | None = None) -> None:
    """Exit naming the first override of a key `command` does not read (and the flag that does its job, if any):
    the stage YAML's class accepts every stage key, so `sampling.temperature=1.5` passed its checks and was ignored.
    `used_keys`: the keys read (a section's name covers its dotted keys); `flags`: dotted key -> flag."""
    flags = flags or {}
    for item in overrides:
        key = item.partition("=")[0]
        if any(key == used or key.startswith(used + ".") for used in used_keys):
            continue
        # a whole section (sampling=...) names the flags of all its keys
        instead = [flag for name, flag in flags.items() if name == key or name.startswith(key + ".")]
        if instead:
            sys.exit(f"override '{item}': {command} does not use the config key '{key}'; use {' / '.join(instead)} "
                     f"instead")
        if is_config_key(config_class(config_path), key):  # else unknown: loading names it, and the nearest key
            sys.exit(f"override '{item}': {command} does not use the config key '{key}'; it reads only "
                     f"{', '.join(used_keys)}")


def shared_config(cfg: StageConfig) -> StageConfig:
    """Only the fields every stage shares (what the report's W&B run records as its config)."""
    return StageConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(StageConfig)})


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a stage YAML naming the run's world, e.g. configs/tiny/ppo.yaml")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the keys that locate the run (run_name=...); others are refused")
    parser.add_argument("--stage", default="ppo",
                        help="pretrain, sft or ppo (that stage's final/ in this run), or a checkpoint path")


def add_sampling_arguments(parser: argparse.ArgumentParser, defaults: SamplingConfig) -> None:
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="0: off")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="1.0: off")
    parser.add_argument("--max-new-tokens", type=at_least_one, default=defaults.max_new_tokens)


def sampling_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> SamplingConfig:
    """The sampling flags as a SamplingConfig; a value it refuses is named by its flag (--top-p), not its key."""
    try:
        return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p)
    except FieldError as e:
        parser.error(f"{', '.join('--' + key.replace('_', '-') for key in e.keys)}: {e.problem}")


def describe_sampling(sampling: SamplingConfig) -> str:
    how = "greedy" if sampling.temperature <= 0 else f"temperature {sampling.temperature:g}" + (
        f", top-k {sampling.top_k}" if sampling.top_k else "") + (
        f", top-p {sampling.top_p:g}" if sampling.top_p < 1 else "")
    return f"{how}, at most {sampling.max_new_tokens} new tokens"


def run_world(cfg: StageConfig) -> Path:
    """The run's world as its stages saw it. A world already in the run is used as is, even when the config's
    world settings differ (it is never regenerated over); a run without one gets it written."""
    from data.world import WorldConfig

    existing = run_dir(cfg) / "world"
    if not (existing / "world_config.json").exists():
        return world_dir(cfg)
    if WorldConfig.from_json((existing / "world_config.json").read_text()) != cfg.world:
        print(f"note: {existing} was made with other world settings than the config's; using the run's world",
              file=sys.stderr)
    return existing


# ---- checkpoints ---------------------------------------------------------------------------------------------

def resolve_checkpoint(cfg: StageConfig, stage_or_path: str, flag: str = "--stage", also: str = "") -> tuple[str, str]:
    """(checkpoint path or hub id, a short label): a stage name means that stage's final/ in this run. `flag`:
    the command-line option that named it, for messages; `also`: what else a checkpoint from outside the run
    needs (eval-rm: `--data`, rankings to score it on)."""
    if stage_or_path in POLICY_STAGE_NAMES or stage_or_path == "rm":
        final = stage_paths(cfg, stage_or_path).final
        if not (final / "config.json").exists():
            given = f"{flag} path/to/checkpoint{also}"
            if "MAKELEVEL" in os.environ:  # run by make (make eval, make eval-rm): options go in its variables
                given = "STAGE=path/to/checkpoint" if flag == "--stage" else f'ARGS="{given}"'
            sys.exit(f"no '{stage_or_path}' checkpoint in run '{cfg.run_name}': {final} does not exist. Train it "
                     f"first (make {stage_or_path} RECIPE={os.environ.get('RECIPE') or '<recipe>'} RUN={cfg.run_name}), "
                     f"or pass {given}.")
        return str(final), stage_or_path
    path = Path(stage_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            inner = " (a training checkpoint keeps its model in model/: pass that)" \
                if (path / "model" / "config.json").exists() else ""
            sys.exit(f"{flag} {stage_or_path}: {path} is not a Hugging Face checkpoint directory (no config.json)"
                     + inner)
        return str(path), checkpoint_label(cfg, path)
    # 'owner/name'; a bare 'name' too, but for --stage, where a bare word is a mistyped stage name
    if is_hub_id(stage_or_path) and ("/" in stage_or_path or flag != "--stage"):
        return stage_or_path, stage_or_path.replace("/", "--")
    stages = f"one of {', '.join(POLICY_STAGE_NAMES)} or " if flag == "--stage" else ""
    sys.exit(f"{flag} {stage_or_path}: expected {stages}an existing checkpoint directory; {path} does not exist")


def checkpoint_label(cfg: StageConfig, path: Path) -> str:
    """A checkpoint directory's label, which names its output file: where it sits under runs/ ('ppo' for this
    run's ppo/final, 'exp2--ppo' for another run's, 'pretrain--step_00000480' for a training checkpoint), else
    its own name (so two checkpoints outside runs/ with one name share a file: name it with --out)."""
    # as given first (a run directory may be a link to elsewhere), then with links resolved
    for place in (lambda p: Path(os.path.abspath(p)), lambda p: Path(p).resolve()):
        where = place(path)
        for base in (place(run_dir(cfg)), place(cfg.runs_dir)):
            if where.is_relative_to(base):
                parts = [p for p in where.relative_to(base).parts if p not in ("final", "model", "checkpoints")]
                if parts:
                    return "--".join(parts)
    return path.parent.name if path.name == "final" else path.name


def sampling_label(sampling: SamplingConfig, default: SamplingConfig = EVAL_SAMPLING) -> str:
    """'' for the default sampling, else its settings that differ ('-temperature0.7-max_new_tokens8'): a sampled
    or cut-short look keeps its own file beside the default evaluation."""
    return "".join(f"-{key}{format(value, '.12g') if isinstance(value, float) else value}"
                   for key, value in dataclasses.asdict(sampling).items() if value != getattr(default, key))


def run_ppo_settings(cfg: StageConfig) -> StageConfig:
    """The settings the run's PPO trained with (the resolved config of the launch that wrote ppo/final; before it
    finished, of the latest launch): its RM, its rollout sampling and how it shaped rewards. Before PPO has
    started: `cfg` when it is the recipe's PPO config, else PPO's defaults."""
    from stages.ppo.config import PPOStageConfig

    config_file = stage_paths(cfg, "ppo").of_final("config.yaml")
    fallback = cfg if isinstance(cfg, PPOStageConfig) else \
        PPOStageConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(StageConfig)})
    if not config_file.exists():
        return fallback
    try:
        return load_config(PPOStageConfig, config_file, [f"runs_dir={cfg.runs_dir}", f"run_name={cfg.run_name}"])
    except ConfigError as e:  # written by another version of the stage: the recipe's settings stand in
        print(f"note: {config_file} does not read as today's PPO config ({e}); using the recipe's settings instead",
              file=sys.stderr)
        return fallback


def run_reward_model(cfg: StageConfig, ppo_settings: StageConfig | None = None) -> str:
    """The RM the run's PPO optimised: its `reward_model` (`ppo_settings`: run_ppo_settings(cfg), if read
    already), else runs/<run>/rm/final."""
    return (ppo_settings or run_ppo_settings(cfg)).reward_model or str(stage_paths(cfg, "rm").final)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(path: str, trust_remote_code: bool = False, device: torch.device | str = "cpu",
                needed_by: str = "evaluate"):
    """(model, tokenizer) of a policy checkpoint, ready to answer in the chat format."""
    from pipeline.model import load_causal_lm, set_special_token_ids
    from pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(path, trust_remote_code)
    model = load_causal_lm(path, needed_by, trust_remote_code, tokenizer=tokenizer)
    set_special_token_ids(model, tokenizer)
    return model.to(device).eval(), tokenizer


# ---- the evaluation ------------------------------------------------------------------------------------------

def evaluate_checkpoint(model, tokenizer, rows: list[dict], judge, sampling: SamplingConfig = EVAL_SAMPLING,
                        seed: int = 0, batch_size: int = 64, scorer=None, reward: StageConfig | None = None,
                        ) -> EvalResult:
    """The held-out evaluation of `make eval`, `make report` and PPO's own: gold judge, and the RM too when given.

    With a `scorer` (reward_model.scoring.RewardScorer) the summary gains `rm/score` and each sample its
    `rm_score`: normalised by the RM's mean and std over SFT samples, and scored as PPO's config `reward` rewards
    (when it is one): a reply cut at the length cap, or empty, gets its `missing_eos_penalty` (the RM would read
    the first as a finished turn, and never saw the second); then `reward_clip`.
    """
    result = evaluate_policy(model, tokenizer, rows, judge, sampling, batch_size=batch_size, seed=seed)
    if scorer is not None and result.samples:
        scores = scorer.score([s["prompt"] for s in result.samples], [s["response"] for s in result.samples],
                              batch_size=batch_size, normalize=True, max_length=getattr(reward, "rm_max_length", 0))
        if hasattr(reward, "missing_eos_penalty"):
            from stages.ppo.ppo_math import answered, shape_scores

            ended = torch.tensor([s["ended"] for s in result.samples], device=scores.device)
            finished = answered(ended, [s["response"] for s in result.samples])
            scores = shape_scores(scores, finished, reward.missing_eos_penalty, reward.reward_clip)
        for sample, score in zip(result.samples, scores.tolist()):
            sample["rm_score"] = score
        result.summary["rm/score"] = scores.mean().item()
    return result


def family_counts(result: EvalResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in result.samples:
        counts[sample["family"]] = counts.get(sample["family"], 0) + 1
    return counts


# ---- tables that read well in a terminal and in a Markdown viewer ------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.{digits}f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """An aligned pipe table. `align` has one letter per column: l(eft) or r(ight); default: text left,
    numbers right."""
    cells = [[fmt(v) if not isinstance(v, str) else v for v in row] for row in rows]
    cells = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in cells]
    if align is None:
        align = "".join("r" if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) else "l"
                        for i in range(len(columns)))
    widths = [max(len(columns[i]), 3, *(len(row[i]) for row in cells)) for i in range(len(columns))]

    def line(values: list[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if a == "r" else v.ljust(w)
                                 for v, w, a in zip(values, widths, align)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(columns), rule, *(line(row) for row in cells)])


def eval_tables(result: EvalResult) -> str:
    """The summary table (overall, criteria, EOS rate, length, RM) and the per-family table of one evaluation."""
    s = result.summary
    rows = [["gold score", s["gold/score"]]]
    rows += [[f"  {name}", s[f"gold/{name}"]] for name in CRITERIA if f"gold/{name}" in s]
    rows += [["EOS rate", s.get("eos_rate")], ["response chars", s.get("response_chars")]]
    if "rm/score" in s:
        rows.append(["RM score (normalised)", s["rm/score"]])
    counts = family_counts(result)
    families = [[family, counts.get(family, 0), score, correct, s.get(f"gold/{family}/chance")]
                for family, score, correct in family_table(s)]
    return (markdown_table(["metric", "value"], rows) + "\n\n"
            + markdown_table(["family", "prompts", "gold score", "correctness", "chance"], families))


def int_at_least(lowest: int, meaning: str = ""):
    """An argparse type for a count of `lowest` or more (`meaning`: what `lowest` means, e.g. "all"); argparse
    names the flag in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {lowest}{f' ({meaning})' if meaning else ''} or more, "
                                             f"got {value}")
        return value
    return parse


at_least_one, limit_count = int_at_least(1), int_at_least(0, "all")
EVAL_BATCH_SIZE = 64  # prompts per generate batch: sampled (not greedy) answers depend on it


def check_output(path: str | None) -> None:
    """Refuse an --out that is a directory before any work, rather than after it."""
    if path and Path(path).is_dir():
        raise SystemExit(f"--out {path}: is a directory; name a JSON file")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    add_sampling_arguments(parser, EVAL_SAMPLING)
    parser.add_argument("--limit", type=limit_count, default=0, help="evaluate the first N prompts only (0: all)")
    parser.add_argument("--batch-size", type=at_least_one, default=EVAL_BATCH_SIZE)
    parser.add_argument("--rm", action="store_true",
                        help="also score the answers with the run's reward model (the one its PPO optimised)")
    parser.add_argument("--reward-model", metavar="PATH",
                        help="score with this reward model (a path, hub id, or 'rm': the run's) instead; implies --rm")
    parser.add_argument("--out", help="JSON output file "
                                      "(default: runs/<run>/eval/<label>[-<sampling>][-first<N>].json; the label "
                                      "is the stage, or where the checkpoint sits under runs/, e.g. "
                                      "exp2--ppo, pretrain--step_00000480; <sampling>: settings that are not "
                                      "the default, e.g. -temperature0.7)")
    args = parser.parse_intermixed_args(argv)
    check_output(args.out)
    cfg = load_run_config(args.config, args.overrides, "evaluate", (*RUN_KEYS, "seed", "world"), EVAL_FLAGS)
    sampling = sampling_from_args(args, parser)

    path, label = resolve_checkpoint(cfg, args.stage)
    world = run_world(cfg)
    rows = held_out_prompts(world)
    limited = 0 < args.limit < len(rows)
    rows = rows[:args.limit] if limited else rows
    device = default_device()
    scorer, rm_path, ppo_settings = None, None, run_ppo_settings(cfg)
    if args.rm or args.reward_model:  # naming a reward model asks for its scores
        from reward_model.scoring import RewardScorer

        configured = run_reward_model(cfg, ppo_settings)
        # a given one checked as eval-rm checks it; the run's own by its stage name (a missing one says how to
        # train it); another the run's PPO named, as PPO took it
        if args.reward_model or configured == str(stage_paths(cfg, "rm").final):
            rm_path, _ = resolve_checkpoint(cfg, args.reward_model or "rm", "--reward-model")
        else:
            rm_path = configured
        scorer = RewardScorer(rm_path, device, cfg.trust_remote_code, needed_by="evaluate --rm")
    model, tokenizer = load_policy(path, cfg.trust_remote_code, device, "evaluate")
    named = path if args.stage == path else f"{path} (--stage {args.stage})"
    check_chat_prompts(tokenizer, named, [(rows, str(world / "eval_prompts.jsonl"))])
    print(f"[eval] {path}: {len(rows)} held-out prompts of {world}, {describe_sampling(sampling)}, seed {cfg.seed}",
          flush=True)
    result = evaluate_checkpoint(model, tokenizer, rows, load_judge(world), sampling, cfg.seed, args.batch_size, scorer,
                                 reward=ppo_settings)

    print(f"\nHeld-out evaluation of {label} ({path}) on {len(rows)} prompts\n")
    print(eval_tables(result))
    # a quick look at the first N prompts keeps its own file: it must not replace a full evaluation
    default_name = f"{label}{sampling_label(sampling)}{f'-first{len(rows)}' if limited else ''}.json"
    out = Path(args.out) if args.out else run_dir(cfg) / "eval" / default_name
    report = {"checkpoint": path, "label": label, "prompts": len(rows), "seed": cfg.seed,
              "sampling": dataclasses.asdict(sampling), "reward_model": rm_path,
              "summary": result.summary, "samples": result.samples}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=1) + "\n")
    print(f"\n[eval] figures and every answer in {out}")
    return report


if __name__ == "__main__":
    run_main(main, interrupted="interrupted")
