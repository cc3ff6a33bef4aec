"""World lineage: a stage's final/ records the world files it learned from, and a later stage refuses an upstream
checkpoint of its run made from another version of the world (the world is rewritten when its config changes,
a finished stage is not)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from conftest import MICRO
from data.loading import DatasetSpec
from data.world import WorldConfig, write_world
from pipeline.checkpoint import CheckpointError
from pipeline.config import ConfigError, load_config
from pipeline.runs import WORLD_DATA_FILE, StageConfig, check_world_lineage, learned_world_data, world_fingerprints, \
    world_lineage


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
    world = write_world(tmp_path / "r" / "world", micro_world())
    learned = learned_world_data(world, DatasetSpec(path="world:pretrain"), DatasetSpec(path=str(tmp_path / "x.jsonl")))
    assert set(learned) == {"world", "pretrain"}  # a local file is not the world's
    # a stage that trains on outside data and only evaluates on the world learned nothing from it
    assert learned_world_data(world, DatasetSpec(path="HuggingFaceH4/ultrachat_200k")) is None
    pretrain = fake_checkpoint(tmp_path / "r" / "pretrain" / "final", "pretrain", world_lineage("pretrain", learned))
    sft_learned = learned_world_data(world, DatasetSpec(path="world:sft_train"))
    sft = fake_checkpoint(tmp_path / "r" / "sft" / "final", "sft", world_lineage("sft", sft_learned, pretrain))
    assert set(json.loads((sft / "config.json").read_text())["pipeline_world_data"]) == {"pretrain", "sft"}
    outside = fake_checkpoint(tmp_path / "hub_model", "pretrain", None)

    for checkpoint in (pretrain, sft, outside):  # same world, or no record: passes
        check_world_lineage(cfg, checkpoint, world, "next")
    sft_split = world / "sft_train.jsonl"
    sft_split.write_text(sft_split.read_text() + sft_split.read_text().splitlines()[0] + "\n")
    check_world_lineage(cfg, pretrain, world, "sft")  # a split pretraining did not learn from
    with pytest.raises(CheckpointError) as error:
        check_world_lineage(cfg, sft, world, "ppo")
    assert f"{sft} learned from" in str(error.value) and "make sft RECIPE=micro RUN=r" in str(error.value)

    corpus = world / "pretrain.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"text": "One more line."}) + "\n")
    with pytest.raises(CheckpointError) as error:
        check_world_lineage(cfg, pretrain, world, "sft")
    message = str(error.value)
    assert f"{pretrain} learned from" in message and "(pretrain.jsonl in" in message \
        and "make pretrain RECIPE=micro RUN=r" in message and f"set init_from={pretrain}" in message
    with pytest.raises(CheckpointError) as error:  # the earliest stale stage is the one to rebuild
        check_world_lineage(cfg, sft, world, "ppo")
    assert f"{sft} was built on a pretrain stage that learned" in str(error.value) \
        and "make pretrain RECIPE=micro RUN=r" in str(error.value)

    named = StageConfig(runs_dir=str(tmp_path), run_name="r", init_from=str(pretrain))
    check_world_lineage(named, pretrain, world, "sft")
    err = capsys.readouterr().err
    assert f"warning: sft: {pretrain} learned from a world that has changed" in err \
        and "Using it, since init_from names it." in err


def test_preferences_ranked_with_other_annotator_noise_are_refused(tmp_path):
    cfg = StageConfig(runs_dir=str(tmp_path), run_name="r")
    world = write_world(tmp_path / "r" / "world", micro_world())
    prefs = tmp_path / "r" / "prefs"
    prefs.mkdir()
    learned = learned_world_data(world, DatasetSpec(path="world:pref_prompts"), annotator=True)
    (prefs / WORLD_DATA_FILE).write_text(json.dumps(world_lineage("prefs", learned)))
    check_world_lineage(cfg, prefs, world, "rm", config_key="")

    noisier = dataclasses.replace(micro_world(), annotator_temperature=0.5)  # changes no prompt and no fact
    write_world(world, noisier)
    assert world_fingerprints(world, ["world", "pref_prompts"]) == {k: learned[k] for k in ("world", "pref_prompts")}
    with pytest.raises(CheckpointError, match="the annotator's noise") as error:
        check_world_lineage(cfg, prefs, world, "rm", config_key="")
    assert "make prefs RECIPE=" in str(error.value) and "to use it anyway" not in str(error.value)


def test_outputs_record_the_chain_that_made_them(micro_rm):
    run = micro_rm.parent.parent
    world = run / "world"

    def recorded(stage: str) -> dict:
        if stage == "prefs":
            return json.loads((run / "prefs" / WORLD_DATA_FILE).read_text())
        return json.loads((run / stage / "final" / "config.json").read_text())["pipeline_world_data"]

    learned = {"pretrain": world_fingerprints(world, ["world", "pretrain"]),
               "sft": world_fingerprints(world, ["world", "sft_train"]),
               "prefs": world_fingerprints(world, ["world", "pref_prompts", "annotator"])}
    assert recorded("pretrain") == {"pretrain": learned["pretrain"]}
    assert recorded("sft") == {"pretrain": learned["pretrain"], "sft": learned["sft"]}
    assert recorded("prefs") == learned
    assert recorded("rm") == learned  # the RM learned from the preferences and the SFT backbone, nothing of its own


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
    # the stage, its config, the finished outputs copied into the run, and which of them its check refuses
    main, config, copies, refused = {
        "sft": (sft, "sft.yaml", {"pretrain/final": micro / "pretrain" / "final"}, "pretrain/final"),
        "prefs": (collect, "rm.yaml", {"sft/final": micro / "sft" / "final"}, "sft/final"),
        "rm": (train_rm, "rm.yaml", {"sft/final": micro / "sft" / "final", "prefs": micro / "prefs"}, "sft/final"),
        "rm_prefs": (train_rm, "rm.yaml", {"sft/final": micro / "sft" / "final", "prefs": micro / "prefs"}, "prefs"),
        "ppo": (ppo, "ppo.yaml", {"sft/final": micro / "sft" / "final", "rm/final": micro_rm}, "sft/final"),
        "ppo_rm": (ppo, "ppo.yaml", {"sft/final": micro / "sft" / "final", "rm/final": micro_rm}, "rm/final"),
    }[stage]
    runs = stale_run(tmp_path, copies)
    # naming the SFT checkpoint in init_from accepts it (a warning), so the next check is the one that stops
    named = [f"init_from={runs / 'r' / 'sft' / 'final'}"] if stage in ("ppo_rm", "rm_prefs") else []
    monkeypatch.setenv("RECIPE", "micro")
    with pytest.raises(CheckpointError) as error:
        main(["--config", str(MICRO / config), f"runs_dir={runs}", "run_name=r", "world.seed=1", *named])
    message = str(error.value)
    # a new seed changes every world file, so the chain is stale from pretraining on, and that is rebuilt first
    whose = "learned" if refused == "pretrain/final" else "was built on a pretrain stage that learned"
    assert f"{runs / 'r' / refused} {whose} from a world that has changed" in message
    assert "world.json" in message and "make pretrain RECIPE=micro RUN=r" in message
    assert not (runs / "r" / stage.split("_")[0] / "final").exists()



def test_a_fresh_start_moves_an_earlier_runs_checkpoints_aside_and_a_resume_checks_their_world(tmp_path, capsys):
    from pipeline.checkpoint import latest_checkpoint, list_checkpoints, save_training_checkpoint
    from pipeline.runs import start_checkpoints
    from transformers import LlamaConfig, LlamaForCausalLM

    class NoTokenizer:  # the checkpoints' step numbers are what this test is about
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)

    checkpoints = tmp_path / "pretrain" / "checkpoints"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    old_world = {"pretrain": {"world": "aaaa", "pretrain": "bbbb"}}
    new_world = {"pretrain": {"world": "aaaa", "pretrain": "cccc"}}

    def save(step: int) -> Path:
        return save_training_checkpoint(checkpoints, step, model, NoTokenizer(), {}, keep_last=2)

    start_checkpoints(checkpoints, None, old_world, "pretrain", is_main_process=True)
    for step in (40, 80, 120):
        save(step)
    earlier = list_checkpoints(checkpoints)
    # a fresh start: the earlier run's higher steps no longer outrank (and prune away) the new run's first save
    start_checkpoints(checkpoints, None, new_world, "pretrain", is_main_process=True)
    assert "moved to" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(checkpoints.with_name("checkpoints.earlier"))] == [p.name for p in earlier]
    first = save(40)
    assert latest_checkpoint(checkpoints) == first and first.exists()

    shutil.rmtree(checkpoints.with_name("checkpoints.earlier"))
    shutil.rmtree(first)
    (checkpoints / ".tmp-step_00000080-123").mkdir()  # a save that was killed is no earlier run
    start_checkpoints(checkpoints, None, new_world, "pretrain", is_main_process=True)
    assert not checkpoints.with_name("checkpoints.earlier").exists()
    first = save(40)

    start_checkpoints(checkpoints, first, new_world, "pretrain", is_main_process=True)  # same world: resumes
    with pytest.raises(CheckpointError) as error:
        start_checkpoints(checkpoints, first, old_world, "pretrain", is_main_process=True)
    assert f"pretrain: {first} learned from another version of the world" in str(error.value)
    assert "its pretrain stage learned from has changed" in str(error.value)
    assert "without resume=true" in str(error.value)


def test_a_forgotten_resume_loses_neither_the_metrics_nor_the_longest_runs_checkpoints(tmp_path, monkeypatch):
    """A fresh start truncated metrics.jsonl, and a second one deleted the long run kept in checkpoints.earlier/."""
    from pipeline.runs import start_checkpoints
    from pipeline.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    stage_dir = tmp_path / "pretrain"
    checkpoints, earlier, metrics = stage_dir / "checkpoints", stage_dir / "checkpoints.earlier", stage_dir / "metrics.jsonl"
    world = {"pretrain": {"world": "aaaa"}}

    def run(steps: list[int], resume_from=None, start_step=0):
        start_checkpoints(checkpoints, resume_from, world, "pretrain", is_main_process=True)
        tracker = Tracker(StageConfig(), "pretrain", metrics, start_step=start_step)
        for step in steps:
            (checkpoints / f"step_{step:08d}").mkdir()
            tracker.log({"train/loss": 1.0 / step}, step=step, console=False)

    run([100, 200, 300])  # the long run, killed at step 300
    run([100])  # resume=true forgotten
    assert sorted(p.name for p in earlier.iterdir() if p.is_dir()) == ["step_00000100", "step_00000200",
                                                                       "step_00000300"]
    assert [json.loads(line)["step"] for line in (earlier / "metrics.jsonl").read_text().splitlines()] == [100, 200, 300]
    run([100])  # forgotten again: the shorter restart goes, the long run stays
    assert sorted(p.name for p in earlier.iterdir() if p.is_dir())[-1] == "step_00000300"

    shutil.rmtree(checkpoints)
    earlier.rename(checkpoints)  # as the message says: move it back and resume
    run([400], resume_from=checkpoints / "step_00000300", start_step=300)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [100, 200, 300, 400]


def test_a_resumed_stage_refuses_checkpoints_that_learned_from_another_world(micro_pretrain, tmp_path, monkeypatch):
    from stages.pretrain.pretrain import main as pretrain

    assert (micro_pretrain.parent / "checkpoints" / WORLD_DATA_FILE).is_file()
    runs = stale_run(tmp_path, {"pretrain": micro_pretrain.parent})
    shutil.rmtree(runs / "r" / "pretrain" / "final")  # interrupted before the end: only its checkpoints are left
    kept = sorted(p.name for p in (runs / "r" / "pretrain" / "checkpoints").iterdir())
    with pytest.raises(CheckpointError) as error:
        pretrain(["--config", str(MICRO / "pretrain.yaml"), f"runs_dir={runs}", "run_name=r", "world.seed=1",
                  "resume=true"])
    assert "learned from another version of the world" in str(error.value)
    assert "its pretrain stage" in str(error.value)
    # nothing was trained or removed
    assert sorted(p.name for p in (runs / "r" / "pretrain" / "checkpoints").iterdir()) == kept
    assert not (runs / "r" / "pretrain" / "final").exists()


def test_a_fresh_start_that_fails_on_its_input_leaves_the_earlier_checkpoints_in_place(micro_sft, tmp_path):
    from stages.ppo.ppo import main as ppo

    earlier = tmp_path / "r" / "ppo" / "checkpoints" / "step_00000002"
    earlier.mkdir(parents=True)
    with pytest.raises(ConfigError, match="key 'reward_model': .*no-such-rm"):
        ppo(["--config", str(MICRO / "ppo.yaml"), f"runs_dir={tmp_path}", "run_name=r", f"init_from={micro_sft}",
             f"reward_model={tmp_path / 'no-such-rm'}"])
    assert earlier.is_dir()


def test_a_resume_refuses_checkpoints_that_started_from_an_upstream_run_again_since(micro_rm, tmp_path, monkeypatch):
    """SFT checkpoints of an old pretrain model were continued on a rebuilt one without a word; RM checkpoints
    on recollected preferences."""
    from conftest import run_stage
    from pipeline.checkpoint import mark_final
    from reward_model.train import main as train_rm
    from stages.sft.sft import main as sft
    from transformers import LlamaConfig, LlamaForCausalLM

    import torch

    monkeypatch.setenv("WANDB_MODE", "disabled")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    first = mark_final(model, "sft").config.pipeline_output_id
    assert mark_final(model, "sft").config.pipeline_output_id == first  # saved again unchanged: the same id
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3  # trained on
    assert mark_final(model, "sft").config.pipeline_output_id != first

    from pipeline.checkpoint import output_id

    outside = tmp_path / "outside-model"
    outside.mkdir()
    assert output_id(outside) == output_id(f"{tmp_path}/./outside-model") == str(outside.resolve())  # as typed
    assert output_id("some-org/some-model") == "some-org/some-model"

    micro = micro_rm.parents[1]
    runs = tmp_path / "runs"
    shutil.copytree(micro, runs / "r", ignore=shutil.ignore_patterns("ppo"))
    for stage in ("sft", "rm"):
        assert json.loads((runs / "r" / stage / "checkpoints" / "starts_from.json").read_text())

    # pretrain run again since (a new final/ with its own id)
    config_file = runs / "r" / "pretrain" / "final" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "pipeline_output_id": "rebuilt"}))
    kept = sorted(p.name for p in (runs / "r" / "sft" / "checkpoints").iterdir())
    with pytest.raises(CheckpointError) as error:
        run_stage(sft, "sft.yaml", runs, "resume=true", run_name="r")
    assert "continues a run that started from other inputs than this one would" in str(error.value)
    assert f"init checkpoint: {config['pipeline_output_id']} then, rebuilt now" in str(error.value)
    assert "without resume=true" in str(error.value)
    assert sorted(p.name for p in (runs / "r" / "sft" / "checkpoints").iterdir()) == kept

    # preferences collected again: other rankings (the SFT model the RM starts from is unchanged)
    train = runs / "r" / "prefs" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(CheckpointError) as error:
        run_stage(train_rm, "rm.yaml", runs, "resume=true", run_name="r")
    assert "(rankings: " in str(error.value) and "init checkpoint" not in str(error.value)


def test_a_world_written_again_for_other_settings_says_so_and_names_the_recipe(tmp_path, monkeypatch, capsys):
    """`make sft RUN=x` without the RECIPE the run was made with rewrote the run's world without a word."""
    from pipeline.runs import world_dir

    monkeypatch.setenv("RECIPE", "tiny")
    cfg = StageConfig(run_name="x", runs_dir=str(tmp_path), world=micro_world(seed=0))
    world_dir(cfg)
    world_dir(cfg)  # the same settings: nothing to say
    assert "rewriting" not in capsys.readouterr().err
    world_dir(dataclasses.replace(cfg, world=micro_world(seed=1)))
    err = capsys.readouterr().err
    assert f"rewriting {tmp_path / 'x' / 'world'}" in err and "another recipe than tiny" in err
    assert json.loads((tmp_path / "x" / "world" / "world_config.json").read_text())["seed"] == 1


def test_training_checkpoints_are_marked_as_their_own_stage(micro_pretrain, micro_sft, micro_rm, micro_runs):
    """Training checkpoints kept the marks of the final/ their model was loaded from: an RM checkpoint named as
    PPO's reward_model was refused as "made by the 'sft' stage", and every SFT checkpoint carried the pretrained
    final/'s id, so a resume could not tell a start from one of them from a start from that final/."""
    from pipeline.checkpoint import checkpoint_stage, output_id, require_checkpoint
    from pipeline.runs import recorded_world_data

    run = micro_runs / "micro"
    for stage, pattern in (("pretrain", "step_*/model"), ("sft", "checkpoint-*"), ("rm", "step_*/model")):
        found = sorted((run / stage / "checkpoints").glob(pattern))
        assert found, stage
        for checkpoint in found:
            assert checkpoint_stage(checkpoint) == stage, checkpoint
            assert output_id(checkpoint) == str(checkpoint.resolve())
            assert recorded_world_data(checkpoint)[0] == recorded_world_data(run / stage / "final")[0]
    assert require_checkpoint(found[0], ("rm",), "ppo", "reward_model") == found[0]
