"""World lineage: a stage's final/ records the world files it learned from, and a later stage refuses an upstream
checkpoint of its run made from another version of the world (the world is rewritten when its config changes,
a finished stage is not)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

from conftest import MICRO
from data.loading import DatasetSpec
from data.world import WorldConfig, write_world
from pipeline.checkpoint import CheckpointError
from pipeline.config import load_config
from pipeline.runs import WORLD_DATA_KEY, StageConfig, check_world_lineage, world_data_hashes, world_lineage


def micro_world(seed: int = 0) -> WorldConfig:
    return dataclasses.replace(load_config(WorldConfig, MICRO / "world.yaml"), seed=seed)


def fake_checkpoint(path: Path, stage: str, lineage: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "pipeline_stage": stage, **lineage}))
    return path


def test_a_changed_world_file_refuses_the_run_checkpoint_and_warns_for_a_named_one(tmp_path, capsys):
    cfg = StageConfig(runs_dir=str(tmp_path), run_name="r")
    named = StageConfig(runs_dir=str(tmp_path), run_name="r", init_from=str(tmp_path / "r" / "pretrain" / "final"))
    world = write_world(tmp_path / "r" / "world", micro_world())
    lineage = world_lineage(world, DatasetSpec(path="world:pretrain"), DatasetSpec(path=str(tmp_path / "x.jsonl")))
    assert set(lineage[WORLD_DATA_KEY]) == {"world", "pretrain"}  # a local file is not the world's
    pretrain = fake_checkpoint(tmp_path / "r" / "pretrain" / "final", "pretrain", lineage)
    outside = fake_checkpoint(tmp_path / "hub_model", "pretrain", {})

    check_world_lineage(cfg, pretrain, world, "sft")  # same world: passes
    check_world_lineage(cfg, outside, world, "sft")   # no record: passes
    sft_split = world / "sft_train.jsonl"
    sft_split.write_text(sft_split.read_text() + sft_split.read_text().splitlines()[0] + "\n")
    check_world_lineage(cfg, pretrain, world, "sft")  # a split it did not learn from

    corpus = world / "pretrain.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"text": "One more line."}) + "\n")
    with pytest.raises(CheckpointError) as error:
        check_world_lineage(cfg, pretrain, world, "sft")
    message = str(error.value)
    assert str(pretrain) in message and "(pretrain.jsonl in" in message and "make pretrain RUN=r" in message \
        and f"set init_from={pretrain}" in message

    check_world_lineage(named, pretrain, world, "sft")
    assert "warning:" in capsys.readouterr().err


def test_finals_record_the_world_they_learned_from(micro_rm):
    run = micro_rm.parent.parent
    world = run / "world"
    for stage, splits in {"pretrain": ["pretrain"], "sft": ["sft_train"], "rm": ["pref_prompts"]}.items():
        recorded = json.loads((run / stage / "final" / "config.json").read_text())[WORLD_DATA_KEY]
        assert recorded == world_data_hashes(world, splits), stage


def stale_run(tmp_path: Path, copies: dict[str, Path]) -> Path:
    """A run whose finished stages (copied from the micro run) learned from the seed-0 world, while the run's
    world is now written from seed 1."""
    runs = tmp_path / "runs"
    for name, source in copies.items():
        shutil.copytree(source, runs / "r" / name)
    write_world(runs / "r" / "world", micro_world(seed=1))
    return runs


@pytest.mark.parametrize("stage", ["sft", "prefs", "rm", "ppo", "ppo_rm"])
def test_each_stage_refuses_an_upstream_made_from_another_world(stage, micro_rm, tmp_path):
    from reward_model.collect import main as collect
    from reward_model.train import main as train_rm
    from stages.ppo.ppo import main as ppo
    from stages.sft.sft import main as sft

    micro = micro_rm.parent.parent
    main, config, copies, upstream = {
        "sft": (sft, "sft.yaml", {"pretrain/final": micro / "pretrain" / "final"}, "pretrain"),
        "prefs": (collect, "rm.yaml", {"sft/final": micro / "sft" / "final"}, "sft"),
        "rm": (train_rm, "rm.yaml", {"sft/final": micro / "sft" / "final", "prefs": micro / "prefs"}, "sft"),
        "ppo": (ppo, "ppo.yaml", {"sft/final": micro / "sft" / "final", "rm/final": micro_rm}, "sft"),
        "ppo_rm": (ppo, "ppo.yaml", {"sft/final": micro / "sft" / "final", "rm/final": micro_rm}, "rm"),
    }[stage]
    runs = stale_run(tmp_path, copies)
    # naming the SFT checkpoint in init_from accepts it (a warning), so the RM's check is the one that stops
    named = [f"init_from={runs / 'r' / 'sft' / 'final'}"] if stage == "ppo_rm" else []
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests' Accelerators fixed a precision
    with pytest.raises(CheckpointError) as error:
        main(["--config", str(MICRO / config), f"runs_dir={runs}", "run_name=r", "world.seed=1", *named])
    assert f"make {upstream} RUN=r" in str(error.value) and "world.json" in str(error.value)
    assert not (runs / "r" / stage.split("_")[0] / "final").exists()

