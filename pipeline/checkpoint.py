"""Checkpoints: atomic writes, the final HF checkpoint of a stage, and resumable training state.

A stage's `final/` is a plain Hugging Face checkpoint (safetensors + config + tokenizer with its chat
template). The stage that made it is recorded in the model config (`pipeline_stage`), so a later stage can
refuse a checkpoint from the wrong stage with a clear message instead of failing deep inside training.

Training state (optimizer, scheduler, RNG, counters) is saved with `torch.save` and read back with
`weights_only=True`: tensors and plain containers only, never arbitrary pickles.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from pipeline.config import ConfigError

hf_logging.disable_progress_bar()  # one progress bar per stage is enough; saving shards needs none

CHECKPOINT_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or was made by a stage that cannot be used here."""


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename: a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success rename it to `target`.

    A crash mid-write leaves only a `.tmp-*` directory, never a half-written `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # what a killed earlier save of this target left behind (one process writes a target at a time)
    for leftover in [*target.parent.glob(f".tmp-{target.name}-*"), *target.parent.glob(f".old-{target.name}-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def replace_dir(staging: str | Path, target: str | Path) -> None:
    """Put a finished `staging` directory in `target`'s place by two renames: a reader sees the old or the new one.
    A kill in the instant between them leaves neither (the stage then counts as not run and runs again); the
    next save of `target` clears what it left."""
    staging, target = Path(staging), Path(target)
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def parameter_fingerprint(model: Any, values_per_parameter: int | None = None) -> str:
    """A hash of every parameter's name and values: equal on all DDP ranks when they hold the same weights. With
    `values_per_parameter`, of each one's first values only: cheap at any size (weights_id)."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in sorted(unwrap(model).named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().reshape(-1)[:values_per_parameter].float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def unwrap(model: Any) -> Any:
    """The bare model behind DDP/accelerate wrappers."""
    return model.module if hasattr(model, "module") else model


DEFAULT_MAX_NEW_TOKENS = 128  # as `make chat`


# What a stage's final/ keeps of the launch that wrote it, beside the weights: the resolved config (dated when
# that launch started) and its metrics so far. A later launch of the stage rewrites the stage's own config.yaml
# and metrics.jsonl at its start, and may never finish: what reads about a final/ reads these copies.
LAUNCH_RECORDS = {"config.yaml": "pipeline_config.yaml", "metrics.jsonl": "pipeline_metrics.jsonl"}


def save_final(model: Any, tokenizer: Any, final_dir: str | Path, stage: str, world_data: dict | None = None,
               launch_records: tuple[Path, ...] = (), **config_extra: Any) -> Path:
    """Write the stage's HF checkpoint atomically; `config_extra` lands in config.json (e.g. RM reward stats).

    `world_data`: what each stage of its chain learned from the run's world (pipeline.runs.world_lineage), so a
    later stage can tell whether the world changed since. None also clears a record inherited from the upstream.
    `launch_records`: the stage's config.yaml and metrics.jsonl, copied in with their dates (LAUNCH_RECORDS)."""
    model = mark_final(model, stage, world_data, **config_extra)
    with atomic_dir(final_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        copy_launch_records(tmp, launch_records)
    return Path(final_dir)


def copy_launch_records(final_dir: Path, launch_records: tuple[Path, ...]) -> None:
    """Copy a stage's config.yaml and metrics.jsonl into the final/ being written, with their dates."""
    for record in map(Path, launch_records):
        if record.is_file():
            shutil.copy2(record, Path(final_dir) / LAUNCH_RECORDS[record.name])


def mark_final(model: Any, stage: str, world_data: dict | None = None, **config_extra: Any) -> Any:
    """Record in the model's config what save_final records: the stage, its world lineage, `config_extra`, and the
    id of its weights (a later stage's checkpoints record the id of the final/ they started from: output_id)."""
    model = unwrap(model)
    model.config.pipeline_stage = stage
    model.config.pipeline_output_id = weights_id(model)
    model.config.pipeline_world_data = world_data
    for key, value in config_extra.items():
        setattr(model.config, key, value)
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.max_new_tokens is None:
        # a plain generate() would stop at transformers' default of 20 tokens in all, mid-reply. Not max_length:
        # transformers then warns at every generate(max_new_tokens=...). Half the context at most, so a prompt of
        # up to the other half leaves the reply within the model's positions.
        context = getattr(model.config, "max_position_embeddings", None) or 2 * DEFAULT_MAX_NEW_TOKENS
        generation.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, context // 2)
        generation.max_length = None  # one a hub model (or an earlier final/) set would still make it warn
    return model


def mark_in_training(model: Any, stage: str, world_data: dict | None) -> None:
    """Record in the config of a model a stage trains that the stage is making it, with the stage's lineage, so its
    training checkpoints say so: loaded from an upstream final/, it carried that final/'s stage (an RM checkpoint
    was refused as "made by the 'sft' stage") and id (output_id named every SFT checkpoint as the pretrained
    final/). No id: a checkpoint is named by its path."""
    config = unwrap(model).config
    config.pipeline_stage, config.pipeline_output_id, config.pipeline_world_data = stage, None, world_data


def checkpoint_stage(path: str | Path) -> str | None:
    """The pipeline stage recorded in a checkpoint's config.json, or None for outside checkpoints."""
    return (checkpoint_config(path) or {}).get("pipeline_stage")


def weights_id(model: Any) -> str:
    """An id of a model's weights: the fingerprint of each parameter's first 1024 values (training moves nearly
    every value). A final/ saved again unchanged (a stage resumed at its last step) keeps its id; a retrained one
    gets another. Sharded parameters (FSDP, ZeRO-3), whose local values are not the weights, give a random id."""
    import uuid

    if any(type(p.data) is not torch.Tensor or p.numel() == 0 for p in model.parameters()):  # DTensor, ZeRO-3
        return uuid.uuid4().hex[:16]
    return parameter_fingerprint(model, values_per_parameter=1024)


def output_id(path: str | Path) -> str:
    """What names the checkpoint a stage starts from, for its resume check: a final/'s weights id (mark_final),
    else the local directory (resolved: ./m and /abs/m are one) or hub id."""
    recorded = (checkpoint_config(path) or {}).get("pipeline_output_id")
    return str(recorded or (Path(path).resolve() if Path(path).exists() else path))


def checkpoint_config(path: str | Path) -> dict | None:
    """A local checkpoint's config.json, or None where there is none (a hub id, a directory without one)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None


@contextlib.contextmanager
def loading_from(path: str | Path, needed_by: str) -> Iterator[None]:
    """Around a `from_pretrained`: its OSError (a mistyped local path, which it then takes for a hub id; a hub id
    it cannot fetch; a directory without the files) or ValueError (files it cannot read, a tokenizer that needs
    sentencepiece) or SafetensorError (a weights file cut short) becomes a CheckpointError naming the path."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:
        where = "" if Path(path).exists() else " (no such local path, so it was looked up as a hub id)"
        # an OSError's first line says it (the rest is hub advice); a ValueError's fix may come later (custom code
        # asks for trust_remote_code on its third line)
        said = str(e).strip().splitlines()[0] if isinstance(e, OSError) else str(e).strip()
        hint = " Set trust_remote_code: true in the config if you trust this code." \
            if "trust_remote_code" in said else ""
        raise CheckpointError(f"{needed_by}: cannot load {path}{where}: {said}{hint}") from e


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub model id, 'name' or 'owner/name' (a path like runs/x/final does not)."""
    return bool(_HUB_ID.fullmatch(name))


def model_source(path: str, config_key: str) -> str:
    """A model named by a config key: an existing local directory, or else a hub id. Anything else is a mistyped
    path, refused here under its key rather than by from_pretrained as a malformed hub id."""
    if not Path(path).exists() and not is_hub_id(path):
        raise ConfigError(f"key '{config_key}': {path} does not exist (and is not a hub id, 'name' or 'owner/name')")
    return path


def require_checkpoint(path: str | Path, allowed_stages: tuple[str, ...], needed_by: str,
                       config_key: str = "init_from") -> Path:
    """Check that a local checkpoint exists and comes from one of `allowed_stages` (outside ones pass)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{needed_by}: checkpoint {path} does not exist. Run the earlier stage first "
                              f"(the Makefile does this for you), or set {config_key} to a checkpoint path.")
    if not (path / "config.json").exists():
        inside = " Its model is in model/: name that directory." if (path / "model" / "config.json").exists() else ""
        raise CheckpointError(f"{needed_by}: {path} has no config.json; it is not a Hugging Face checkpoint.{inside}")
    stage = checkpoint_stage(path)
    if stage is not None and stage not in allowed_stages:
        raise CheckpointError(f"{needed_by}: checkpoint {path} was made by the '{stage}' stage, but "
                              f"{needed_by} needs one from: {', '.join(allowed_stages)}.")
    return path


# ---- resumable training state -------------------------------------------------------------------------

def rng_state() -> dict:
    # numpy's state is stored as a tensor so that `weights_only=True` can read it back
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    cached], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # dropout (e.g. LoRA's) on a GPU draws from this process's device's generator
        # The main process saves its own, and every rank restores it to its device, as with the CPU generator: exact
        # where ranks draw alike (pretraining, PPO); RM ranks, whose rankings differ in size, resume on rank 0's.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_python_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # saved before: every device's generator as the main process saw them (its own first)
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # this rank's device


def _as_python_state(state: Any) -> tuple:
    # torch.save turns the tuple-of-tuples from random.getstate() into lists on some paths
    version, internal, gauss = state
    return version, tuple(internal), gauss


def save_training_checkpoint(checkpoints_dir: str | Path, step: int, model: Any, tokenizer: Any, state: dict,
                             keep_last: int = 2, extra_models: dict[str, Any] | None = None) -> Path:
    """Save weights (safetensors), tokenizer and training state for `step`; prune to the newest `keep_last`
    (at least this one: resume needs it).

    `extra_models` ({name: model}) are saved beside `model/` as `<name>/` (e.g. PPO's critic).
    """
    checkpoints_dir = Path(checkpoints_dir)
    target = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    with atomic_dir(target) as tmp:
        unwrap(model).save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        for name, extra in (extra_models or {}).items():
            unwrap(extra).save_pretrained(tmp / name, safe_serialization=True)
        torch.save({**state, "step": step, "rng": rng_state()}, tmp / "training_state.pt")
    for old in list_checkpoints(checkpoints_dir)[:-max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)
    # the half-written copies a killed run left of later steps this run may never reach again (full-size each)
    for leftover in checkpoints_dir.glob(f".tmp-{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return target


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint directory holds, from its name: ours are step_N, the Trainer's (SFT) checkpoint-N.
    None for anything else (the .tmp- directory of a save that was killed, a file)."""
    match = re.fullmatch(rf"(?:{CHECKPOINT_PREFIX}|checkpoint-)(\d+)", path.name)
    return int(match[1]) if match and path.is_dir() else None


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """A checkpoints/ directory's checkpoints, oldest step first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.exists():
        return []
    return sorted((p for p in checkpoints_dir.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step)


def check_not_past(checkpoint: str | Path, last_step: int, key: str) -> None:
    """Refuse to resume from a checkpoint beyond this run's last step (`last_step`, set by config `key`): the run
    would train nothing and save the checkpoint's model, trained further than `key` says, as its final/."""
    step = checkpoint_step(Path(checkpoint))
    if step is not None and step > last_step:
        raise ConfigError(f"key '{key}': this run ends at step {last_step}, but {checkpoint} is at step {step} "
                          f"already (resuming would save that model as final/). Raise {key} to reach step {step} or "
                          "more to resume, or start over without resume=true")


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def scaler_state(scaler: Any) -> dict:
    """fp16 loss scaling's state for a training checkpoint (nothing without fp16): a resumed run that started
    again from 2^16 would skip steps finding its scale anew."""
    return {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}


def restore_scaler(scaler: Any, state: dict) -> None:
    if scaler is not None and scaler.is_enabled() and "scaler" in state:
        scaler.load_state_dict(state["scaler"])


def resume_settings(cfg: Any, keys: tuple[str, ...], processes: int) -> dict:
    """The settings through which a step number maps to the data it read and to its place in the schedule (or, for
    a section such as `model`, which the checkpoint's own weights decide on resume). A training checkpoint
    records them (state["settings"]); a run resuming from it must share them. A section counts by its plain
    fields, as dotted keys."""
    import dataclasses

    def plain(value: Any) -> Any:  # what torch.load(weights_only=True) reads back
        return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)

    settings = {}
    for key in keys:
        value = getattr(cfg, key)
        if dataclasses.is_dataclass(value):
            settings.update({f"{key}.{f.name}": plain(getattr(value, f.name)) for f in dataclasses.fields(value)})
        else:
            settings[key] = plain(value)
    return {**settings, "processes": processes}


def load_training_state(checkpoint: str | Path, settings: dict | None = None) -> dict:
    """Read training state back (tensors and plain containers only) and restore the RNG streams. With `settings`
    (resume_settings now), refuse a checkpoint saved under others: the resumed run would silently read other data
    than the interrupted one would have (more processes, a larger batch) or follow another schedule."""
    path = Path(checkpoint) / "training_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read training state {path}: {e}") from None
    check_resume_settings(checkpoint, state.get("settings"), settings)
    set_rng_state(state["rng"])
    return state


def check_resume_settings(checkpoint: str | Path, saved: dict | None, settings: dict | None) -> None:
    """Refuse to resume from `checkpoint`, saved under the resume_settings `saved`, with other `settings` now
    (checkpoints from before settings were recorded pass)."""
    saved = saved or {}
    changed = [key for key in settings or {} if key in saved and saved[key] != settings[key]]
    if changed:
        what = "; ".join(f"{'the number of processes' if key == 'processes' else f'key {key!r}'} was {saved[key]} "
                         f"there, {settings[key]} now" for key in changed)
        raise ConfigError(f"cannot resume from {checkpoint}: {what}. The resumed run would read other data at its "
                          f"steps, follow another schedule, or have the restored state overrule the new value: set "
                          f"them back to resume, or start over without resume=true.")
