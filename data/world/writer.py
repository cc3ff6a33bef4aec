"""Generating all world files and writing them atomically to a directory."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from .annotator import Annotator
from .config import WorldConfig
from .corpus import pretraining_corpus
from .entities import World
from .judge import GoldJudge
from .splits import make_prompt_splits, sft_demos, static_ranked_set

CONFIG_FILE = "world_config.json"
GENERATOR_FILE = "generator.txt"  # which version of this package's code wrote the world
WORLD_FILE = "world.json"
JSONL_SPLITS = ("pretrain", "sft_train", "sft_eval", "pref_prompts", "ppo_prompts", "eval_prompts",
                "prefs_static")


def generate_world(config: WorldConfig) -> tuple[World, dict[str, list[dict]]]:
    """The world and every JSONL split's rows. Each part has its own seeded stream, so
    changing one split's size leaves the others' randomness untouched where possible."""
    world = World.from_seed(config.seed, config.n_entities, config.n_words)
    judge = GoldJudge(world)

    def rng(purpose: str) -> random.Random:
        return random.Random(f"{purpose}/{config.seed}")

    splits = make_prompt_splits(world, config, rng("splits"))
    annotator = Annotator(judge, config.annotator_temperature, seed=config.seed)
    # question-answer text in the corpus: training questions only (the eval split's are withheld)
    qa_pairs = [(c.prompt, judge.good_response(c.prompt)) for c in splits.sft_train + splits.pref + splits.ppo]
    rows = {
        "pretrain": [{"text": t} for t in pretraining_corpus(world, config.corpus_chars, rng("corpus"), qa_pairs)],
        "sft_train": sft_demos(judge, splits.sft_train, config.demo_noise, rng("sft"), config.demo_habit,
                               rng("habit")),
        # Held-out demos are always clean: they measure how well the good behaviour is learned.
        "sft_eval": sft_demos(judge, splits.sft_eval, 0.0, rng("sft_eval")),
        "pref_prompts": _prompt_rows(splits.pref),
        "ppo_prompts": _prompt_rows(splits.ppo),
        "eval_prompts": _prompt_rows(splits.eval),
        "prefs_static": static_ranked_set(judge, annotator, splits.pref, config.responses_per_prompt,
                                          rng("prefs")),
    }
    return world, rows


def _prompt_rows(candidates) -> list[dict]:
    return [{"prompt": c.prompt, "family": c.family} for c in candidates]


def write_world(out_dir: str | Path, config: WorldConfig | None = None) -> Path:
    """Write the world files for `config` into `out_dir` and return its path.

    Returns at once if `out_dir` already holds a world made with the same config. The files
    are written into a temporary directory beside `out_dir` and renamed into place, so a
    reader never sees a half-written world. An existing world made with another config is
    replaced; a non-empty directory that is not a world is left alone (FileExistsError).
    """
    config = config or WorldConfig()
    out = Path(out_dir)
    if _holds_world(out, config):
        return out
    if out.exists() and not (out / CONFIG_FILE).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a world directory (no {CONFIG_FILE}); "
                              f"refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        world, rows = generate_world(config)
        (staging / WORLD_FILE).write_text(world.to_json(), encoding="utf-8")
        for split, split_rows in rows.items():
            write_jsonl(staging / f"{split}.jsonl", split_rows)
        (staging / GENERATOR_FILE).write_text(generator_fingerprint() + "\n", encoding="utf-8")
        # Written last: its presence marks a complete world.
        (staging / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
        _move_into_place(staging, out, config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")


def generator_fingerprint() -> str:
    """A hash of the world package's source: a world written by other code is rewritten. Where the new code makes
    the same files, the stages trained on them stay valid (their lineage compares the files, not this)."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def _holds_world(out: Path, config: WorldConfig) -> bool:
    try:
        return (WorldConfig.from_json((out / CONFIG_FILE).read_text(encoding="utf-8")) == config
                and (out / GENERATOR_FILE).read_text(encoding="utf-8").strip() == generator_fingerprint())
    except (OSError, ValueError, TypeError):
        return False


def _move_into_place(staging: Path, out: Path, config: WorldConfig) -> None:
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / "world")
    try:
        os.rename(staging, out)
    except OSError:
        # Another process finished the same world first: theirs is as good as ours.
        if not _holds_world(out, config):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
