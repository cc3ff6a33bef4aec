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
from pipeline.runs import PREFS_WORLD_DATA, StageConfig, check_world_lineage, learned_world_data, world_fingerprints


def micro_world(seed: int = 0) -> WorldConfig:
    return dataclasses.replace(load_config(WorldConfig, MICRO / "world.yaml"), seed=seed)


def fake_checkpoint(path: Path, stage: str, world_data: dict | None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "pipeline_stage": stage,
                                                  "pipeline_world_data": world_data}))
    return path


def test_a_changed_world_file_refuses_the_run_checkpoint_and_warns_for_a_named_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECIPE", "micro")
    cfg = StageConfig(runs_dir=str(tmp_path), run_name="r")
    named = StageConfig(runs_dir=str(tmp_path), run_name="r", init_from=str(tmp_path / "r" / "pretrain" / "final"))
    world = write_world(tmp_path / "r" / "world", micro_world())
    learned = learned_world_data(world, DatasetSpec(path="world:pretrain"), DatasetSpec(path=str(tmp_path / "x.jsonl")))
    assert set(learned) == {"world", "pretrain"}  # a local file is not the world's
    # a stage that trains on outside data and only evaluates on the world learned nothing from it
    assert learned_world_data(world, DatasetSpec(path="HuggingFaceH4/ultrachat_200k")) is None
    pretrain = fake_checkpoint(tmp_path / "r" / "pretrain" / "final", "pretrain", learned)
    outside = fake_checkpoint(tmp_path / "hub_model", "pretrain", None)

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
    assert str(pretrain) in message and "(pretrain.jsonl in" in message \
        and "make pretrain RECIPE=micro RUN=r" in message and f"set init_from={pretrain}" in message

    check_world_lineage(named, pretrain, world, "sft")
    assert "warning:" in capsys.readouterr().err


def test_preferences_ranked_with_other_annotator_noise_are_refused(tmp_path):
    cfg = StageConfig(runs_dir=str(tmp_path), run_name="r")
    world = write_world(tmp_path / "r" / "world", micro_world())
    prefs = tmp_path / "r" / "prefs"
    prefs.mkdir()
    learned = learned_world_data(world, DatasetSpec(path="world:pref_prompts"), annotator=True)
    (prefs / PREFS_WORLD_DATA).write_text(json.dumps(learned))
    check_world_lineage(cfg, prefs, world, "rm", config_key="")

    noisier = dataclasses.replace(micro_world(), annotator_temperature=0.5)  # changes no prompt and no fact
    write_world(world, noisier)
    assert world_fingerprints(world, ["world", "pref_prompts"]) == {k: learned[k] for k in ("world", "pref_prompts")}
    with pytest.raises(CheckpointError, match="the annotator's noise") as error:
        check_world_lineage(cfg, prefs, world, "rm", config_key="")
    assert "make prefs RECIPE=" in str(error.value) and "to use it anyway" not in str(error.value)


def test_outputs_record_the_world_they_learned_from(micro_rm):
    run = micro_rm.parent.parent
    world = run / "world"
    prefs = world_fingerprints(world, ["world", "pref_prompts", "annotator"])
    assert json.loads((run / "prefs" / PREFS_WORLD_DATA).read_text()) == prefs
    for stage, names in {"pretrain": ["world", "pretrain"], "sft": ["world", "sft_train"]}.items():
        recorded = json.loads((run / stage / "final" / "config.json").read_text())["pipeline_world_data"]
        assert recorded == world_fingerprints(world, names), stage
    # the RM learned from the preferences, and so from what they were made of
    assert json.loads((run / "rm" / "final" / "config.json").read_text())["pipeline_world_data"] == prefs


def stale_run(tmp_path: Path, copies: dict[str, Path]) -> Path:
    """A run whose finished stages (copied from the micro run) learned from the seed-0 world, while the run's
    world is now written from seed 1."""
    runs = tmp_path / "runs"
    for name, source in copies.items():
        shutil.copytree(source, runs / "r" / name)
    write_world(runs / "r" / "world", micro_world(seed=1))
    return runs


@pytest.mark.parametrize("stage", ["sft", "prefs", "rm", "rm_prefs", "ppo", "ppo_rm"])
def test_each_stage_refuses_an_upstream_made_from_another_world(stage, micro_rm, tmp_path, monkeypatch):
    from reward_model.collect import main as collect
    from reward_model.train import main as train_rm
    from stages.ppo.ppo import main as ppo
    from stages.sft.sft import main as sft

    micro = micro_rm.parent.parent
    main, config, copies, upstream = {
        "sft": (sft, "sft.yaml", {"pretrain/final": micro / "pretrain" / "final"}, "pretrain"),
        "prefs": (collect, "rm.yaml", {"sft/final": micro / "sft" / "final"}, "sft"),
        "rm": (train_rm, "rm.yaml", {"sft/final": micro / "sft" / "final", "prefs": micro / "prefs"}, "sft"),
        "rm_prefs": (train_rm, "rm.yaml", {"sft/final": micro / "sft" / "final", "prefs": micro / "prefs"}, "prefs"),
        "ppo": (ppo, "ppo.yaml", {"sft/final": micro / "sft" / "final", "rm/final": micro_rm}, "sft"),
        "ppo_rm": (ppo, "ppo.yaml", {"sft/final": micro / "sft" / "final", "rm/final": micro_rm}, "rm"),
    }[stage]
    runs = stale_run(tmp_path, copies)
    # naming the SFT checkpoint in init_from accepts it (a warning), so the next check is the one that stops
    named = [f"init_from={runs / 'r' / 'sft' / 'final'}"] if stage in ("ppo_rm", "rm_prefs") else []
    monkeypatch.setenv("RECIPE", "micro")
    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests' Accelerators fixed a precision
    with pytest.raises(CheckpointError) as error:
        main(["--config", str(MICRO / config), f"runs_dir={runs}", "run_name=r", "world.seed=1", *named])
    assert f"make {upstream} RECIPE=micro RUN=r" in str(error.value) and "world.json" in str(error.value)
    assert not (runs / "r" / stage.split("_")[0] / "final").exists()

