"""Run directories and the hand-off between stages.

    runs/<run>/world/                 the synthetic world's files (generated on first use, seeded)
    runs/<run>/<stage>/final/         the stage's HF checkpoint, read by the next stage
    runs/<run>/<stage>/checkpoints/   resumable training state (an earlier run's: checkpoints.earlier/)
    runs/<run>/<stage>/config.yaml    the resolved config of the last launch
    runs/<run>/<stage>/metrics.jsonl  every logged metric, one JSON object per line
    runs/<run>/prefs/                 collected rankings (train.jsonl, eval.jsonl) and world_data.json

A final/ records what each stage of its chain learned from the world (`pipeline_world_data` in config.json),
collected preferences do so in world_data.json, and the next stage checks that against the run's world
(check_world_lineage).

This module is the one place that knows the layout; stages and the Makefile go through it.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml

from data.world import WorldConfig, write_world
from pipeline.checkpoint import LAUNCH_RECORDS, CheckpointError, check_not_past, checkpoint_config, checkpoint_step, \
    latest_checkpoint, list_checkpoints, model_source, require_checkpoint, write_text_atomic
from pipeline.config import ConfigError, FieldError, load_config, save_config

# what was learned from the run's world: beside collected preferences (prefs/), and in a stage's checkpoints/
# for the run they belong to (start_checkpoints)
WORLD_DATA_FILE = "world_data.json"
# in a stage's checkpoints/: what the run they belong to started from (start_checkpoints)
STARTS_FROM_FILE = "starts_from.json"

# the stages in pipeline order (make builds each from the ones before it)
STAGE_ORDER = ("pretrain", "sft", "prefs", "rm", "ppo")

# which stage's final/ each stage starts from by default
UPSTREAM = {"pretrain": None, "sft": "pretrain", "rm": "sft", "ppo": "sft"}


@dataclass
class StageConfig:
    """Fields every stage shares. Each stage's config dataclass extends this."""

    run_name: str = ""
    """Pipeline run: outputs go to runs_dir/run_name/<stage>/, and W&B groups the stages by this name.
    Empty: the recipe's name (the config file's directory, e.g. `tiny`)."""
    runs_dir: str = "runs"
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    """The synthetic world (sizes, noise); a recipe points every stage at one world.yaml."""
    init_from: str = ""
    """Checkpoint to start from: a path or hub id. Empty: the upstream stage's final/ in this run."""
    resume: bool = False
    """Continue from the newest checkpoint in checkpoints/ instead of starting over."""
    trust_remote_code: bool = False
    """Allow model code shipped with a hub checkpoint. Off: only architectures transformers ships are loaded."""
    wandb_project: str = "rlhf-pipeline"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision of the training passes (weights and optimizer stay fp32). auto: bf16 or fp16 where
    `accelerate launch` asks for it (--mixed_precision or its config file; its "no", the default of every
    accelerate config, counts as no preference), else bf16 where the hardware runs it natively (a CUDA GPU with
    bf16, or a CPU with AVX512-BF16 or AMX: ~1.3x faster steps on a 2-core EPYC), else fp32. fp32 forces fp32."""

    def __post_init__(self):
        check_run_name(self.run_name)
        check_runs_dir(self.runs_dir, self.run_name)
        if not 0 <= self.seed < 2 ** 32:  # numpy's range, which the Trainer seeds (SFT stopped with its traceback)
            raise FieldError("seed", f"must be in [0, 2**32), got {self.seed}")


RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_runs_dir(runs_dir: str, run_name: str) -> None:
    """The run's directory must be one that can be made: a file on its way (runs_dir=Makefile, /dev/null/x) failed
    with a NotADirectoryError traceback where the first stage wrote its world."""
    runs = Path(runs_dir)
    for path in (runs / run_name, *(runs / run_name).parents):
        if path.exists():  # the nearest that exists: all below it are made
            if not path.is_dir():
                key = "run_name" if run_name and path == runs / run_name else "runs_dir"
                raise FieldError(key, f"{path} is not a directory; the run's outputs go in {runs / run_name}")
            return


def check_run_name(name: str) -> None:
    """A run name is a directory under runs_dir and part of W&B artifact names, which take only these characters.
    Empty: not chosen yet (the recipe's name)."""
    if name and (not RUN_NAME.fullmatch(name) or name in (".", "..")):
        raise FieldError("run_name", f"{name!r}: use letters, digits, '-', '_' and '.' only (it names the run's "
                                     f"directory and its W&B artifacts)")


def resolve_precision(cfg: StageConfig) -> str:
    """cfg.precision made concrete: "bf16", "fp16" or "fp32"."""
    if cfg.precision != "auto":
        return cfg.precision
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher in ("bf16", "fp16"):
        return launcher
    if torch.cuda.is_available():
        # emulated bf16 (T4, V100) is slower than fp32
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    native_cpu_bf16 = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                       or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return "bf16" if native_cpu_bf16 else "fp32"


def accelerate_precision(cfg: StageConfig) -> str:
    """resolve_precision as accelerate's `mixed_precision` names it ("no" for fp32)."""
    precision = resolve_precision(cfg)
    return "no" if precision == "fp32" else precision


@dataclass
class StagePaths:
    root: Path

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def launch_records(self) -> tuple[Path, Path]:
        """What save_final copies into final/: this launch's config.yaml and metrics.jsonl."""
        return self.config_file, self.metrics_file

    def of_final(self, name: str) -> Path:
        """The stage's `name` (config.yaml or metrics.jsonl) as the launch that wrote final/ left it: its copy in
        final/ (collected preferences, which have no final/, keep theirs beside the rankings), else the stage's
        own (an output saved before the copies were kept)."""
        for copy in (self.final / LAUNCH_RECORDS[name], self.root / LAUNCH_RECORDS[name]):
            if copy.is_file():
                return copy
        return self.root / name


def run_dir(cfg: StageConfig) -> Path:
    return Path(cfg.runs_dir) / cfg.run_name


def stage_paths(cfg: StageConfig, stage: str) -> StagePaths:
    return StagePaths(run_dir(cfg) / stage)


def model_path(cfg: StageConfig, key: str, default_stage: str, allowed_stages: tuple[str, ...], needed_by: str) -> str:
    """The model the config key `key` names (a local checkpoint or a hub id), else `default_stage`'s final/ in this
    run, which must exist. A local one is refused here, before any data or model loads, if another stage made it."""
    value = functools.reduce(getattr, key.split("."), cfg)  # a dotted key reads its section's field
    path = model_source(value, key) if value else str(stage_paths(cfg, default_stage).final)
    if not value or Path(path).exists():
        require_checkpoint(path, allowed_stages, needed_by, config_key=key)
    return path


def init_checkpoint(cfg: StageConfig, stage: str, allowed_stages: tuple[str, ...]) -> str:
    """Where `stage` starts from: `init_from` if set, else the upstream stage's final/."""
    return model_path(cfg, "init_from", UPSTREAM[stage], allowed_stages, stage)


def world_dir(cfg: StageConfig) -> Path:
    """The run's synthetic world, written on first use (deterministic from the world config), and written again
    when the config's world settings change: said, since a later stage of the run then refuses upstreams that
    learned from the old one (check_world_lineage)."""
    world = run_dir(cfg) / "world"
    made_with = world / "world_config.json"
    if made_with.is_file() and WorldConfig.from_json(made_with.read_text()) != cfg.world:
        recipe = os.environ.get("RECIPE")
        print(f"note: rewriting {world} for this config's world settings, which differ from those it was made "
              f"with (a changed world.yaml; or a run made with another recipe than {recipe or 'this one'}: then "
              f"pass that one's RECIPE=, which writes the run's own world back)", file=sys.stderr)
    return write_world(world, cfg.world)


def learned_world_data(world: Path | None, *specs, annotator: bool = False) -> dict[str, str] | None:
    """What a stage learns from in the run's world: fingerprints of world.json (the entities and facts), of each
    split a `world:<split>` dataset spec names and, for rankings, of the annotator's noise. None when no spec is
    the world's: a stage that only evaluates on it learns nothing from it."""
    splits = [spec.path.strip()[len("world:"):] for spec in specs if spec.path.strip().startswith("world:")]
    if world is None or not splits:
        return None
    return world_fingerprints(world, ["world", *splits, *(["annotator"] if annotator else [])])


def world_fingerprints(world: Path, names: list[str]) -> dict[str, str]:
    """name -> fingerprint: "world" is world.json, "annotator" its noise setting, any other name a split's file."""
    def fingerprint(name: str) -> str:
        if name == "annotator":
            config = WorldConfig.from_json((world / "world_config.json").read_text())
            return f"temperature {config.annotator_temperature}"
        file = world / ("world.json" if name == "world" else f"{name}.jsonl")
        return hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file.is_file() else "missing"

    return {name: fingerprint(name) for name in names}



def world_lineage(stage: str, learned: dict[str, str] | None, *upstreams: str | Path) -> dict | None:
    """What an output records for save_final (or prefs/world_data.json): for each stage of the chain that made
    it, what that stage learned from the world. The upstreams' records plus this stage's own `learned`."""
    chain: dict[str, dict[str, str]] = {}
    for upstream in upstreams:
        chain.update(recorded_world_data(upstream)[0] or {})
    if learned:
        chain[stage] = learned
    return chain or None


def recorded_world_data(output: str | Path) -> tuple[dict | None, str | None]:
    """(an output's lineage record, the stage that made it): from a final/ checkpoint's config.json, or from
    collected preferences' world_data.json. (None, None) where nothing is recorded (an outside model)."""
    output = Path(output)
    config = checkpoint_config(output)
    if config is not None:
        return config.get("pipeline_world_data"), config.get("pipeline_stage")
    if (output / WORLD_DATA_FILE).is_file():
        return json.loads((output / WORLD_DATA_FILE).read_text()), "prefs"
    return None, None


def check_world_lineage(cfg: StageConfig, upstream: str | Path, world: Path | None, needed_by: str,
                        config_key: str = "init_from") -> None:
    """Refuse an upstream output (a final/ checkpoint, collected preferences) made, at any stage of its chain,
    from another version of the run's world than the run holds now.

    The run's world is rewritten when its config (or the generator) changes, but a finished stage is not: the
    Makefile reruns nothing whose output exists. Without this check the next stage would quietly build on a
    model of the old world. The message names the earliest stale stage: rebuilding it rebuilds the rest.
    An upstream named in the config (`config_key` is set) only gets a warning: naming it is taken as meaning it.
    Outputs without a record (outside models) pass.
    """
    chain, made_by = recorded_world_data(upstream)
    if world is None or not chain:
        return
    stale = {}
    for stage, learned in chain.items():
        changed = [name for name, value in world_fingerprints(world, list(learned)).items() if value != learned[name]]
        if changed:
            stale[stage] = changed
    if not stale:
        return
    first = min(stale, key=lambda stage: STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER))
    what = ", ".join({"world": "world.json", "annotator": "the annotator's noise"}.get(n, f"{n}.jsonl")
                     for n in stale[first])
    whose = "learned" if first == made_by else f"was built on a {first} stage that learned"
    problem = (f"{needed_by}: {upstream} {whose} from a world that has changed since ({what} in {world}): the world "
               f"config or the world generator differs (or this run was made with another recipe: pass its RECIPE=)")
    if getattr(cfg, config_key, None):
        print(f"warning: {problem}. Using it, since {config_key} names it.", file=sys.stderr)
        return
    recipe = os.environ.get("RECIPE") or "<recipe>"  # the Makefile exports it; a direct launch does not
    raise CheckpointError(f"{problem}. Rebuild from there: `make {first} RECIPE={recipe} RUN={cfg.run_name}` (the "
                          f"later stages follow), or start a new run with RUN=<name>"
                          + (f", or set {config_key}={upstream} to use it anyway." if config_key else "."))


def start_checkpoints(checkpoints: Path, resume_from: str | Path | None, lineage: dict | None, stage: str,
                      is_main_process: bool, starts_from: dict[str, str] | None = None) -> None:
    """Keep a stage's checkpoints/ to one run: the one it is training now.

    Resuming (`resume_from` is a checkpoint): refuse if the checkpoints learned from another version of the world
    than the run holds now (`lineage`, as world_lineage gives it), or started from other inputs than the run's
    now (`starts_from`: name -> an upstream's output_id, or a fingerprint of the data): continuing would mix the
    two, e.g. SFT steps of an old pretrain model continued on a rebuilt one's final/ and RM.
    Starting fresh: the main process moves an earlier run's checkpoints aside, to `checkpoints.earlier/`, with
    the stage's metrics.jsonl, and records `lineage` for the check above. Left in place, their higher step
    numbers would outrank the new run's: pruning would delete the new checkpoints, and a later resume would pick
    the old run's. Moved, not deleted: a fresh start that should have been a resume loses nothing. Of two earlier
    runs (a second fresh start), the one that got further is kept. Resuming from checkpoints moved back puts
    their metrics.jsonl back in the stage's directory."""
    record, starts_record = Path(checkpoints) / WORLD_DATA_FILE, Path(checkpoints) / STARTS_FROM_FILE
    metrics, kept_metrics = Path(checkpoints).parent / "metrics.jsonl", Path(checkpoints) / "metrics.jsonl"
    if resume_from is not None:
        if is_main_process and kept_metrics.is_file():  # checkpoints.earlier/ moved back to continue that run
            os.replace(kept_metrics, metrics)
        # the named inputs first: a changed data file also changes what the world check compares
        saved_starts = json.loads(starts_record.read_text()) if starts_record.is_file() else {}
        changed = [name for name, value in (starts_from or {}).items() if name in saved_starts
                   and saved_starts[name] != value]
        if changed:
            then_and_now = "; ".join(f"{name}: {saved_starts[name]} then, {starts_from[name]} now" for name in changed)
            raise CheckpointError(
                f"{stage}: {resume_from} continues a run that started from other inputs than this one would "
                f"({then_and_now}): an upstream stage was run again, or its data changed, since. Resuming would "
                f"mix the two: start {stage} over, without resume=true (RESUME=1).")
        if record.is_file():  # checkpoints written before this record existed pass unchecked
            saved = json.loads(record.read_text()) or {}
            lineage = lineage or {}
            changed = [s for s in STAGE_ORDER if saved.get(s) != lineage.get(s)]
            if changed:
                raise CheckpointError(
                    f"{stage}: {resume_from} learned from another version of the world than the run holds now (what "
                    f"its {', '.join(changed)} stage learned from has changed). Resuming would mix the two: run "
                    f"{stage} without resume=true to start over.")
        return
    if not is_main_process:
        return
    checkpoints = Path(checkpoints)
    # an earlier run's checkpoints; not the .tmp- directory of a save that was killed (atomic_dir)
    if checkpoints.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in checkpoints.iterdir()):
        kept = checkpoints.with_name(f"{checkpoints.name}.earlier")
        if _newest_step(kept) > _newest_step(checkpoints):  # a restart that got less far than the run kept there
            shutil.rmtree(checkpoints)
            print(f"[{stage}] starting fresh: the checkpoints of a shorter earlier start deleted; {kept} keeps "
                  f"those of the run that got furthest")
        else:
            shutil.rmtree(kept, ignore_errors=True)
            checkpoints.rename(kept)
            if metrics.is_file():
                os.replace(metrics, kept / metrics.name)
            print(f"[{stage}] starting fresh: an earlier run's checkpoints (and its metrics.jsonl) moved to {kept} "
                  f"(to continue that run instead, move that directory back to {checkpoints} and pass resume=true)")
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps(lineage) + "\n")
    write_text_atomic(starts_record, json.dumps(starts_from or {}) + "\n")


def checkpoint_to_resume(cfg: StageConfig, checkpoints: Path, stage: str, is_main_process: bool,
                         max_steps: int | None = None) -> Path | None:
    """With resume=true, the newest training checkpoint; saying so when there is none (the run starts fresh).
    With `max_steps` (the config key's), one already past it is refused (check_not_past)."""
    if not cfg.resume:
        return None
    found = latest_checkpoint(checkpoints)
    if found is None and is_main_process:
        print(f"[{stage}] resume=true but no checkpoint in {checkpoints}: starting fresh")
    if found is not None and max_steps is not None:
        check_not_past(found, max_steps, "max_steps")
    return found


def _newest_step(checkpoints: Path) -> int:
    """The highest step saved in a checkpoints/ directory, or -1."""
    found = list_checkpoints(checkpoints)
    return checkpoint_step(found[-1]) if found else -1


def distributed_launch() -> str | None:
    """What `accelerate launch` set up beyond DDP: "FSDP", "DeepSpeed ZeRO-<stage>", or None (DDP, one process).
    Read from the launcher's environment, so a stage can check before it builds anything."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage is None and config_file:  # a DeepSpeed JSON config names the stage itself
        try:
            stage = str(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", ""))
        except (OSError, ValueError, AttributeError):
            stage = None
    return f"DeepSpeed ZeRO-{stage}" if stage else "DeepSpeed"


def weights_sharded() -> str | None:
    """The launch, if it spreads the weights over the ranks (FSDP, ZeRO-3): no rank then holds the whole model."""
    launch = distributed_launch()
    return launch if launch in ("FSDP", "DeepSpeed ZeRO-3") else None


def whole_weights_unsaved() -> str | None:
    """Under FSDP or ZeRO-3, what would make the Trainer's final save write no whole weights (None: it writes
    them). It then keeps only a warning and shards, and final/ would be a config without a model. Read from the
    launcher's environment (and a DeepSpeed JSON config), so SFT refuses before it trains."""
    launch = weights_sharded()
    if launch == "FSDP":
        # accelerate's default when the config names none: FULL_STATE_DICT under FSDP 1, SHARDED under FSDP 2
        default = "FULL_STATE_DICT" if os.environ.get("FSDP_VERSION", "1") == "1" else "SHARDED_STATE_DICT"
        kind = os.environ.get("FSDP_STATE_DICT_TYPE") or default
        if kind.upper() != "FULL_STATE_DICT":
            return f"fsdp_state_dict_type is {kind}: set fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config"
    elif launch == "DeepSpeed ZeRO-3":
        gather = None
        if config_file := os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            try:
                gather = json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get(
                    "stage3_gather_16bit_weights_on_model_save")
            except (OSError, ValueError, AttributeError):
                gather = None
        if gather in (None, "auto"):  # accelerate fills it from zero3_save_16bit_model (default false)
            gather = os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() == "true"
        if gather is not True:
            return ("ZeRO-3 gathers no 16-bit weights on save: set zero3_save_16bit_model: true in the accelerate "
                    "config (stage3_gather_16bit_weights_on_model_save: true in a DeepSpeed JSON config)")
    return None


def require_ddp(stage: str) -> None:
    """Pretraining, collection, the RM and PPO run their own loops with the whole model on every rank: they sample,
    evaluate and save outside the Trainer (which would hang or use one shard under FSDP / ZeRO-3), and do not set
    DeepSpeed's engine up. Refuse any other launch before anything is built."""
    launch = distributed_launch()
    if launch:
        raise ConfigError(f"{stage} runs in one process or under DDP (configs/accelerate/ddp.yaml), not under "
                          f"{launch}: it samples, evaluates and saves with the whole model on each process, in its "
                          f"own loop. Of the stages, only SFT (the Trainer's loop) runs under FSDP and DeepSpeed.")


TRAINING_INTERRUPTED = ("interrupted (a training stage continues from its newest checkpoint with resume=true, or "
                        "make ... RESUME=1)")


def run_main(main, interrupted: str = TRAINING_INTERRUPTED) -> None:
    """A command's entry point: bad input (a config key, a data file, a checkpoint) ends the process with its
    message instead of a traceback, and Ctrl-C with `interrupted` (the training stages': how to resume). Tests
    call main() itself and see the exception."""
    from data.loading import DataError

    try:
        main()
    except (ConfigError, CheckpointError, DataError, FloatingPointError) as e:  # the last: a NaN/inf loss stop
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:  # checkpoints are written atomically: the newest complete one is there to resume
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)


def config_keys_help(config: object, prefix: str = "") -> list[str]:
    """`key=default` of every field of a config dataclass instance, a nested dataclass's as dotted keys."""
    items = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            items += config_keys_help(value, f"{prefix}{f.name}.")
        else:  # as written in YAML (null, true, '')
            items.append(f"{prefix}{f.name}={yaml.safe_dump(value, default_flow_style=True, width=1000).strip()}"
                         .removesuffix("\n..."))
    return items


def parse_stage_args(config_cls: type, argv: list[str] | None, description: str, command: str, recipe_file: str):
    """`--config FILE key=value ...` -> a config dataclass. Bad keys exit with a message, not a traceback.
    `command`: what `python -m` runs (stages.sft); `recipe_file`: the recipe YAML it reads (sft.yaml), for --help."""
    lines = [""]
    for item in config_keys_help(config_cls()):  # packed a line at a time, never split inside an item
        lines[-1:] = [lines[-1] + "  " + item] if len(lines[-1]) + 2 + len(item) <= 118 or not lines[-1] \
            else [lines[-1], "  " + item]
    keys = "\n".join(lines)
    parser = argparse.ArgumentParser(
        prog=f"python -m {command}", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (YAML or key=value; dotted for nested keys), with their defaults:\n{keys}")
    parser.add_argument("--config", help=f"YAML config, e.g. configs/tiny/{recipe_file}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    args = parser.parse_args(argv)
    if not args.config:  # legal (every setting has a default), but rarely meant
        print("note: no --config given: every setting not overridden is its default (run 'default'); a recipe's "
              f"config is e.g. --config configs/tiny/{recipe_file}", file=sys.stderr)
    return load_stage_config(config_cls, args.config, args.overrides)


def load_stage_config(config_cls: type, config_path: str | None, overrides: list[str]):
    """The YAML with its overrides, checked by `config_cls`, its run named; exits with a message on errors."""
    try:
        cfg = load_config(config_cls, config_path, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    name_run_after_recipe(cfg, config_path)
    refuse_ranks_that_run_alone()
    return cfg


def refuse_ranks_that_run_alone() -> None:
    """A multi-GPU launch (--multi_gpu, cpu_ddp.yaml) on a machine without GPUs and without ACCELERATE_USE_CPU=1
    starts its processes, but accelerate makes each a run of its own: two rank-0 runs would train side by side
    and write the same checkpoints. Exit before anything is built."""
    from accelerate.utils import parse_flag_from_env

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and not parse_flag_from_env("ACCELERATE_USE_CPU") and not torch.accelerator.is_available():
        sys.exit(f"error: launched as {world_size} processes (WORLD_SIZE={world_size}), but accelerate found no "
                 "GPU for them and made each a run of its own, which would write the same files. On a CPU-only "
                 "machine set ACCELERATE_USE_CPU=1 (gloo DDP, configs/accelerate/cpu_ddp.yaml).")


def name_run_after_recipe(cfg: StageConfig, config_path: str | None) -> None:
    """An unset run_name becomes the recipe's name: the config file's directory (`tiny`), or "default"."""
    if cfg.run_name:
        return
    cfg.run_name = Path(config_path).resolve().parent.name if config_path else "default"
    try:
        check_run_name(cfg.run_name)
        check_runs_dir(cfg.runs_dir, cfg.run_name)
    except ConfigError as e:
        sys.exit(f"config error: {e} (taken from the config's directory; set run_name=...)")


def write_resolved_config(cfg: StageConfig, paths: StagePaths) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.config_file)


def end_stage(accelerator) -> None:
    """Finish trackers, tear down the process group, and (under several processes) leave at once.

    gloo's process group can block forever in its destructor, waiting on a peer that has already exited (seen
    under DDP on CPU, about one finished run in thirty: the main thread stuck as main()'s locals, the DDP model
    holding the group, were freed). Everything a stage keeps is written by now, so every rank leaves right after
    the last barrier without running destructors (os._exit), and a finished run always returns.
    """
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if several:
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
