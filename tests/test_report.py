"""`make report` and `make eval` on the micro pipeline: every section and plot, figures equal to a separate
evaluation of the same checkpoints, evaluation of an outside checkpoint by path, and "not run yet" sections."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import MICRO, run_stage
from pipeline import evaluate, report
from pipeline.evaluation import EvalResult, win_rate
from pipeline.checkpoint import CheckpointError

SECTIONS = ("## At a glance", "## Pretrain", "## SFT", "## Reward model", "## PPO", "## Samples", "## Run facts")
PLOTS = ("pretrain_loss", "gold_by_family", "rm_scores", "ppo_proxy_vs_gold", "ppo_rollouts")


def ensure_micro_ppo(micro_runs: Path) -> Path:
    """PPO on the micro recipe into the shared micro run, once per session (other test files call this too)."""
    final = micro_runs / "micro" / "ppo" / "final"
    if not (final / "config.json").exists():
        from stages.ppo.ppo import main

        run_stage(main, "ppo.yaml", micro_runs)
    return final


@pytest.fixture(scope="session")
def micro_ppo(micro_sft, micro_rm, micro_runs) -> Path:
    return ensure_micro_ppo(micro_runs)


def run_args(runs_dir: Path, run_name: str = "micro") -> list[str]:
    # as the Makefile calls the tools: the recipe's ppo.yaml names the world
    return ["--config", str(MICRO / "ppo.yaml"), f"runs_dir={runs_dir}", f"run_name={run_name}"]


@pytest.fixture(scope="module")
def micro_report(micro_pretrain, micro_ppo, micro_runs) -> Path:
    return report.main(run_args(micro_runs))


def report_figures(micro_report: Path) -> dict:
    return json.loads((micro_report.parent / "report" / "report.json").read_text())


def test_report_has_every_section_and_its_plots_render(micro_report):
    text = micro_report.read_text()
    positions = [text.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)
    assert "not run yet" not in text.lower()
    assert "`make eval STAGE=<stage>` gives the same numbers." in text  # the defaults: no flags to add
    assert "or empty, scores -1, PPO's `missing_eos_penalty`" in text  # the micro recipe's
    for name in PLOTS:
        png = micro_report.parent / "report" / f"{name}.png"
        assert f"](report/{name}.png)" in text  # linked relative to report.md, so any Markdown viewer finds it
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 250
            im.load()  # decodes every pixel
            assert len(set(im.convert("L").getdata())) > 10  # drawn on, not a blank canvas
    # reads well in a terminal: pipe tables are aligned (every row of a table has the same width)
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= 8
    for table in tables:
        assert len({len(row) for row in table}) == 1, table
    figures = report_figures(micro_report)
    assert set(figures["policies"]) == {"pretrain", "sft", "ppo"}
    assert 0.0 <= figures["win_rate_vs_sft"] <= 1.0 and figures["kl_to_sft"]["exact"] >= 0.0
    assert 0.0 <= figures["rm"]["accuracy"] <= 1.0 and figures["rm"]["rankings"] > 0
    assert figures["pretrain"]["val_loss"] > 0 and figures["pretrain"]["tokens_seen"] > 0
    # every stage that trains shows its training time: pretrain and PPO recorded theirs only in W&B's summary
    times = {stage: (after_setup, training) for stage, after_setup, training, _ in figures["times"]}
    assert all(float(times[stage][1]) > 0 for stage in ("pretrain", "sft", "rm", "ppo")), times
    assert "| stage    | wall time after setup (s) | training (s) |" in text  # not a launch's whole wall time
    # Run facts say what `precision: auto` took on this machine: the run's figures depend on it
    from pipeline.runs import StageConfig, resolve_precision

    auto = resolve_precision(StageConfig())
    assert f"| precision: auto is | {'bf16 autocast' if auto == 'bf16' else auto}" in text
    # the samples show each model's answer to the same prompt
    first = figures["samples"][0]
    assert f"**1. {first['prompt']}**" in text and set(first) == {"prompt", "pretrain", "sft", "ppo"}


def test_report_figures_equal_a_separate_eval_of_the_same_checkpoints(micro_report, micro_runs):
    figures = report_figures(micro_report)
    separate = {}
    for stage in ("pretrain", "sft", "ppo"):
        result = evaluate.main(run_args(micro_runs) + ["--stage", stage, "--rm"])
        written = json.loads((micro_runs / "micro" / "eval" / f"{stage}.json").read_text())
        assert written["summary"] == result["summary"]
        assert result["summary"] == pytest.approx(figures["policies"][stage], abs=1e-9), stage
        assert result["prompts"] == figures["prompts"] == 20
        separate[stage] = EvalResult(result["summary"], result["samples"])
    # the comparisons read the per-prompt scores the right way round: PPO against SFT, SFT against pretrained
    wins = [1.0 if p > s else 0.5 if p == s else 0.0 for p, s in zip(separate["ppo"].scores, separate["sft"].scores)]
    assert figures["win_rate_vs_sft"] == pytest.approx(sum(wins) / len(wins))
    glance = {line.split("|")[1].strip(): line for line in micro_report.read_text().splitlines()
              if line.startswith("| SFT ") or line.startswith("| PPO ")}
    assert report.compare_verdict(separate["sft"].scores, separate["pretrain"].scores, "pretrained") in glance["SFT"]
    assert report.ppo_verdict(separate["ppo"], separate["sft"]) in glance["PPO"]


def test_kl_to_reference_is_the_policys_kl_from_the_reference_over_its_reply_tokens(micro_ppo, micro_sft,
                                                                                   monkeypatch):
    """Recomputed one prompt at a time (no padding) with torch's own KL: catches a reversed KL, padding or tokens
    after the end of a reply counted, or logits read one position off."""
    from torch.distributions import Categorical, kl_divergence
    from transformers import AutoModelForCausalLM

    from pipeline.generation import SamplingConfig, chat_prompt, stop_token_ids
    from pipeline.tokenizer import load_tokenizer

    policy, reference = (AutoModelForCausalLM.from_pretrained(path).eval() for path in (micro_ppo, micro_sft))
    tokenizer = load_tokenizer(str(micro_ppo))
    prompts = ["What is 12 plus 30?", "Please write a brief thank-you note to your friend for the lovely bread."]
    sampled = []

    def recording_sample(*args, **kwargs):
        sampled.append(real_sample(*args, **kwargs))
        return sampled[-1]

    real_sample = report.sample
    monkeypatch.setattr(report, "sample", recording_sample)
    temperature = 0.7
    with torch.no_grad():
        kl = report.kl_to_reference(policy, reference, tokenizer, prompts,
                                    SamplingConfig(max_new_tokens=8, temperature=temperature), seed=0, batch_size=2)
        stops = stop_token_ids(policy, tokenizer)
        exact, k1 = [], []
        for prompt, reply in zip(prompts, torch.cat(sampled).tolist(), strict=True):
            ends = [i for i, token in enumerate(reply) if token in stops]
            if ends:
                reply = reply[:ends[0] + 1]  # the reply ends with its stop token; pads follow
            else:
                while reply and reply[-1] == tokenizer.pad_token_id:
                    reply = reply[:-1]
            prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
            ids = torch.tensor([prompt_ids + reply])
            p, q = (model(ids).logits[0, len(prompt_ids) - 1:-1] / temperature for model in (policy, reference))
            exact.append(kl_divergence(Categorical(logits=p), Categorical(logits=q)).sum().item())
            taken = torch.tensor(reply)[:, None]
            k1.append((p.log_softmax(-1).gather(-1, taken) - q.log_softmax(-1).gather(-1, taken)).sum().item())
    assert kl["responses"] == 2 and kl["exact"] > 1e-3  # PPO moved the policy, so the direction matters
    assert kl["exact"] == pytest.approx(sum(exact) / 2, rel=1e-4)
    assert kl["k1"] == pytest.approx(sum(k1) / 2, rel=1e-4, abs=1e-6)


def test_eval_of_an_outside_checkpoint_given_by_path(micro_report, micro_runs, tmp_path, capsys):
    # an HF causal LM this project did not make: no pipeline_stage in its config, no chat template
    outside = tmp_path / "outside-lm"
    shutil.copytree(micro_runs / "micro" / "sft" / "final", outside)
    config = json.loads((outside / "config.json").read_text())
    del config["pipeline_stage"]
    (outside / "config.json").write_text(json.dumps(config))
    (outside / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((outside / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (outside / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    out = tmp_path / "outside.json"
    result = evaluate.main(run_args(micro_runs) + ["--stage", str(outside), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| gold score" in printed and "| arithmetic_heldout" in printed
    # our chat template was added, so it answers exactly as the SFT checkpoint it was copied from
    sft = {k: v for k, v in report_figures(micro_report)["policies"]["sft"].items() if k != "rm/score"}
    assert result["summary"] == pytest.approx(sft, abs=1e-9)
    assert json.loads(out.read_text())["label"] == "outside-lm"

    # default output: runs/<run>/eval/<directory name>.json; a --limit look has its own file beside it
    evaluate.main(run_args(micro_runs) + ["--stage", str(outside), "--limit", "3"])
    written = json.loads((micro_runs / "micro" / "eval" / "outside-lm-first3.json").read_text())
    assert written["prompts"] == 3 and len(written["samples"]) == 3
    assert not (micro_runs / "micro" / "eval" / "outside-lm.json").exists()
    evaluate.main(run_args(micro_runs) + ["--stage", str(outside), "--limit", "100000"])  # more than there are
    assert not (micro_runs / "micro" / "eval" / "outside-lm-first100000.json").exists()
    assert json.loads((micro_runs / "micro" / "eval" / "outside-lm.json").read_text())["prompts"] > 3
    # a sampled look keeps its own file too, beside the greedy one
    evaluate.main(run_args(micro_runs) + ["--stage", str(outside), "--limit", "3", "--temperature", "0.7"])
    assert json.loads((micro_runs / "micro" / "eval" / "outside-lm-temperature0.7-first3.json").read_text())[
        "sampling"]["temperature"] == 0.7


def test_eval_files_are_named_by_where_the_checkpoint_sits_and_how_it_sampled(tmp_path):
    """Another run's ppo/final wrote over this run's ppo.json, and every training checkpoint over model.json."""
    from pipeline.evaluation import EVAL_SAMPLING
    from pipeline.generation import SamplingConfig
    from pipeline.runs import StageConfig

    runs = tmp_path / "runs"
    cfg = StageConfig(runs_dir=str(runs), run_name="tiny")
    assert evaluate.checkpoint_label(cfg, runs / "tiny" / "ppo" / "final") == "ppo"
    assert evaluate.checkpoint_label(cfg, runs / "exp2" / "ppo" / "final") == "exp2--ppo"
    step = runs / "tiny" / "pretrain" / "checkpoints" / "step_00000480" / "model"
    assert evaluate.checkpoint_label(cfg, step) == "pretrain--step_00000480"
    assert evaluate.checkpoint_label(cfg, tmp_path / "elsewhere" / "final") == "elsewhere"
    (tmp_path / "elsewhere" / "ppo" / "final").mkdir(parents=True)
    runs.mkdir()
    (runs / "linked").symlink_to(tmp_path / "elsewhere")  # a run directory that is a link to another disk
    assert evaluate.checkpoint_label(cfg, runs / "linked" / "ppo" / "final") == "linked--ppo"
    assert evaluate.sampling_label(EVAL_SAMPLING) == ""
    assert evaluate.sampling_label(SamplingConfig(max_new_tokens=8, temperature=0.7)) == \
        "-max_new_tokens8-temperature0.7"


def test_eval_names_what_is_missing_or_wrong(micro_rm, micro_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MAKELEVEL", raising=False)
    with pytest.raises(SystemExit, match=r"no 'ppo' checkpoint in run 'empty': \S*empty/ppo/final does not exist.*make ppo"
                                         r".*or pass --stage path/to/checkpoint\.$"):
        evaluate.main(run_args(tmp_path, "empty") + ["--stage", "ppo"])
    monkeypatch.setenv("MAKELEVEL", "1")  # `make eval STAGE=ppo`: the advice is in make's terms
    with pytest.raises(SystemExit, match=r"or pass STAGE=path/to/checkpoint\.$"):
        evaluate.main(run_args(tmp_path, "empty") + ["--stage", "ppo"])
    monkeypatch.delenv("MAKELEVEL")
    nowhere = re.escape(str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match=rf"--stage {nowhere}: expected .*; {nowhere} does not exist"):
        evaluate.main(run_args(micro_runs) + ["--stage", str(tmp_path / "nowhere")])
    training_checkpoint = tmp_path / "step_00000040"  # its model sits in model/
    (training_checkpoint / "model").mkdir(parents=True)
    (training_checkpoint / "model" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"no config.json\) \(a training checkpoint keeps its model in model/"):
        evaluate.main(run_args(micro_runs) + ["--stage", str(training_checkpoint)])
    # a reward model is no policy (main raises; on the command line run_main turns it into the message)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(micro_rm))} was made by the 'rm' stage"):
        evaluate.main(run_args(micro_runs) + ["--stage", str(micro_rm)])
    with pytest.raises(SystemExit, match="unknown key 'max_stepz'"):
        evaluate.main(run_args(micro_runs) + ["max_stepz=3", "--stage", "sft"])
    # flags out of range stop at once (a batch of 0 ended in a traceback, and -3 new tokens scored empty replies)
    for flag, value in (("--batch-size", "0"), ("--max-new-tokens", "-3")):
        with pytest.raises(SystemExit) as error:
            evaluate.main(run_args(micro_runs) + ["--stage", "sft", flag, value])
        assert error.value.code == 2 and f"{flag}: expected 1 or more, got {value}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=rf"--out {tmp_path}: is a directory; name a JSON file"):
        evaluate.main(run_args(micro_runs) + ["--stage", "sft", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as error:  # crashed in sampling; then named by its config key, not the flag
        evaluate.main(run_args(micro_runs) + ["--stage", "sft", "--temperature", "nan"])
    assert error.value.code == 2 and "--temperature: must be 0 (greedy)" in capsys.readouterr().err
    # a model directory with no tokenizer: transformers built an empty one, every answer was empty and scored 0
    sft_final = micro_runs / "micro" / "sft" / "final"
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(sft_final / name, bare / name)
    with pytest.raises(CheckpointError, match=rf"no tokenizer files in {re.escape(str(bare))}"):
        evaluate.main(run_args(micro_runs) + ["--stage", str(bare), "--limit", "1"])
    # --reward-model asks for RM scores by itself (it was ignored without --rm), and 'rm' names the run's RM,
    # whose absence says how to train it (it was looked up as a hub id)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "world").symlink_to(micro_runs / "micro" / "world")
    with pytest.raises(SystemExit, match=r"no 'rm' checkpoint in run 'fresh': .*make rm"):
        evaluate.main(run_args(tmp_path, "fresh") + ["--stage", str(sft_final), "--reward-model", "rm"])
    assert evaluate.resolve_checkpoint(None, "my-rm", "--reward-model") == ("my-rm", "my-rm")  # a bare hub id
    scored = evaluate.main(run_args(micro_runs) + ["--stage", "sft", "--reward-model", "rm", "--limit", "2",
                                                   "--out", str(tmp_path / "scored.json")])
    assert scored["reward_model"] == str(micro_rm) and "rm/score" in scored["summary"]


def test_report_of_a_partial_run_says_what_has_not_run(micro_sft, micro_runs, tmp_path, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for part in ("world", "pretrain", "sft"):
        (partial / part).symlink_to(micro_runs / "micro" / part)
    with pytest.raises(SystemExit) as error:  # showed all but one sample
        report.main(run_args(tmp_path, "partial") + ["--samples", "-1"])
    assert error.value.code == 2 and "--samples: expected 0 (none) or more, got -1" in capsys.readouterr().err
    text = report.main(run_args(tmp_path, "partial") + ["--limit", "5"]).read_text()
    for heading in SECTIONS:
        assert heading in text
    # the eval that gives these numbers again takes the report's flags (it named only --batch-size)
    assert '`make eval STAGE=<stage> ARGS="--limit 5"` gives the same numbers.' in text
    rm_section = text[text.index("## Reward model"):text.index("## PPO")]
    ppo_section = text[text.index("## PPO"):text.index("## Samples")]
    assert "Not run yet: rm/final is missing. Run `make rm`" in rm_section
    assert "Not run yet: ppo/final is missing. Run `make ppo`" in ppo_section
    # on 5 prompts a verdict either way must be beyond the noise (compare_verdict, tested below)
    assert re.search(r"\| (better than pretrained|worse than pretrained|within noise of pretrained "
                     r"\(gain [+-]\d\.\d{3} ± \d\.\d{3} over 5 prompts\))\s*\|", text)
    assert (partial / "report" / "gold_by_family.png").exists()
    assert not (partial / "report" / "ppo_proxy_vs_gold.png").exists()


def test_a_later_launch_that_has_not_finished_leaves_what_the_report_reads_of_final(micro_ppo, micro_runs, tmp_path):
    """A fresh launch rewrites its stage's config.yaml and metrics.jsonl at its start: the report and `make eval`
    read them about a final/ that launch never wrote (another RM, other reward shaping, an aborted curve)."""
    import yaml

    from pipeline.runs import stage_paths

    later = tmp_path / "later"
    later.mkdir()
    for part in ("world", "sft", "rm"):
        (later / part).symlink_to(micro_runs / "micro" / part)
    for part in ("pretrain", "prefs", "ppo"):
        shutil.copytree(micro_runs / "micro" / part, later / part, symlinks=True)
    ppo, pretrain = later / "ppo", later / "pretrain"
    assert (ppo / "final" / "pipeline_config.yaml").read_text() == (ppo / "config.yaml").read_text()
    trained = yaml.safe_load((ppo / "config.yaml").read_text())
    # the later launch: other settings, and a metrics file cut mid-line by a kill
    (ppo / "config.yaml").write_text(yaml.safe_dump({**trained, "missing_eos_penalty": -3.0,
                                                     "reward_model": str(tmp_path / "nowhere"),
                                                     "sampling": {**trained["sampling"], "temperature": 0.3}}))
    (pretrain / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/lo')
    # a re-collection of preferences cut off while sampling: the rankings are still the earlier collection's
    (later / "prefs" / "config.yaml").write_text("seed: 99\n")

    cfg = evaluate.load_run_config(str(MICRO / "ppo.yaml"), [f"runs_dir={tmp_path}", "run_name=later"])
    settings = evaluate.run_ppo_settings(cfg)
    assert settings.missing_eos_penalty == trained["missing_eos_penalty"] != -3.0
    # read the same through another stage's config (--config is any stage YAML of the run)
    other = evaluate.load_run_config(str(MICRO / "sft.yaml"), [f"runs_dir={tmp_path}", "run_name=later"])
    assert evaluate.run_ppo_settings(other) == settings
    assert settings.sampling.temperature == trained["sampling"]["temperature"] != 0.3
    assert evaluate.run_reward_model(cfg) == (trained["reward_model"] or str(later / "rm" / "final"))
    curve = report.read_metrics(stage_paths(cfg, "pretrain").of_final("metrics.jsonl"))
    assert any("eval/loss" in r for r in curve) and not any(r.get("train/loss") == 9.0 for r in curve)
    assert report.read_metrics(pretrain / "metrics.jsonl") == [{"step": 1, "train/loss": 9.0}]  # the cut line skipped
    times = {row[0]: row for row in report.stage_times(cfg)}
    assert float(times["pretrain"][1]) > 0 and float(times["ppo"][1]) > 0  # from the finished launch's start
    assert float(times["prefs"][1]) > 0  # was negative: from the cut-off collection's start to the earlier rankings
    assert stage_paths(cfg, "prefs").of_final("config.yaml").read_text() != "seed: 99\n"


def test_a_change_is_as_precise_as_the_figures_it_compares():
    assert report.change(22.9, 17.6) == "+5.3"  # shown as 17.6 and 22.9, it read +5.250
    assert report.change(0.75, 0.5) == "+0.250"
    assert report.change(30.0, 10.5) == "+19.5" and report.change(None, 0.5) == "-"


def test_a_verdict_is_given_only_beyond_two_standard_errors_of_the_paired_gains():
    """A micro run's handful of prompts called SFT "better than pretrained" on a gain of one lucky prompt."""
    assert report.compare_verdict([0.9, 0.8, 0.85, 0.9], [0.5, 0.4, 0.5, 0.45], "SFT") == "better than SFT"
    assert report.compare_verdict([0.1, 0.2, 0.1, 0.15], [0.5, 0.4, 0.5, 0.45], "SFT") == "worse than SFT"
    assert report.compare_verdict([0.9, 0.1, 0.5], [0.5, 0.5, 0.4], "SFT") == \
        "within noise of SFT (gain +0.033 ± 0.467 over 3 prompts)"
    assert report.compare_verdict([0.7], [0.5], "SFT").startswith("within noise")  # one prompt: no spread to judge
    assert win_rate([1.0, 0.0, 0.5], [0.0, 1.0, 0.5]) == 0.5 and win_rate([1.0, 1.0], [0.0, 0.5]) == 1.0
    # the RM: a coin's two standard errors over the held-out rankings (tiny: 0.662 over 150 is no luck)
    assert report.rm_verdict(0.662, 150) == "above chance"
    assert report.rm_verdict(0.75, 4) == "within noise of chance (±0.500 over 4 rankings)"
    assert report.rm_verdict(0.3, 150) == "below chance"
    assert report.rm_verdict(0.75, 1, gold_decided=True) == \
        "within noise of chance (±1.000 over 1 ranking with gold-decided pairs)"
    # PPO: "RM up" only beyond the RM scores' own paired noise (any rise in the mean was called over-optimisation)
    from types import SimpleNamespace

    def run(gold, rm):
        return SimpleNamespace(scores=gold, samples=[{"rm_score": r} for r in rm])

    sft = run([0.5, 0.4, 0.5, 0.45], [0.0, 0.1, 0.0, 0.2])
    assert report.ppo_verdict(run([0.1, 0.2, 0.1, 0.15], [1.0, 1.1, 0.9, 1.2]), sft) == \
        "RM up, gold down: over-optimised?"
    assert report.ppo_verdict(run([0.1, 0.2, 0.1, 0.15], [0.9, -0.8, 0.0, 0.2]), sft) == "worse than SFT"  # noise
    assert report.ppo_verdict(run([0.9, 0.1, 0.5, 0.3], [1.0, 1.1, 0.9, 1.2]), sft).startswith(
        "RM up, gold not: over-optimised? (within noise of SFT")
    assert report.ppo_verdict(run([0.9, 0.8, 0.85, 0.9], [1.0, 1.1, 0.9, 1.2]), sft) == "better than SFT"


def test_the_rm_verdict_names_the_rankings_it_counts(tmp_path):
    """"within noise of chance (±1.000 over 1 rankings)" beside "held-out rankings 4": the noise counts only the
    rankings that hold a pair gold decides, and the verdict did not say so."""
    measured = {"accuracy": 0.75, "gold_accuracy": 0.5, "noise_ceiling": 1.0, "rankings": 4, "accuracy_rankings": 1.0,
                "decided_pairs": 2.0, "source": str(tmp_path / "eval.jsonl")}
    lines, glance = report.rm_section(None, measured, None, None, tmp_path)
    assert glance[0][2] == "within noise of chance (±1.000 over 1 ranking with gold-decided pairs)"
    assert "| held-out rankings                           |     4 |" in lines[2]
    # without gold, accuracy counts every labelled pair: every ranking holding one
    no_gold = {"accuracy": 0.75, "rankings": 4, "accuracy_rankings": 4.0, "source": measured["source"]}
    assert report.rm_section(None, no_gold, None, None, tmp_path)[1][0][2] == \
        "within noise of chance (±0.500 over 4 rankings)"


def test_the_pretrain_tokens_per_second_is_the_median_of_an_even_count(tmp_path):
    """The median of 12 windows was the upper middle one (1,544 where the median is 1,409)."""
    from pipeline.runs import StageConfig

    cfg = StageConfig(run_name="t", runs_dir=str(tmp_path))
    final = tmp_path / "t" / "pretrain" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    records = [{"step": step, "perf/tokens_per_sec": rate} for step, rate in enumerate([1544.0, 900.0, 1274.0, 2000.0])]
    facts = {}
    lines, _ = report.pretrain_section(cfg, records, None, tmp_path, facts)
    assert facts["pretrain"]["tokens_per_sec_median"] == 1409.0
    assert "| tokens/s (median)            | 1,409 |" in lines[0]


@pytest.mark.parametrize("command, override, message", [
    ("evaluate", "sampling.temperature=1.5", r"'sampling.temperature'; use --temperature"),
    ("evaluate", "sampling.max_new_tokens=4", r"'sampling.max_new_tokens'; use --max-new-tokens"),
    ("evaluate", "eval_prompts=3", r"'eval_prompts'; use --limit"),
    ("evaluate", "sampling.top_p=0.5", r"use --top-p"),
    ("evaluate", "kl_horizon=5", r"'kl_horizon'; it reads only run_name, runs_dir, trust_remote_code, seed, world"),
    ("report", "sampling.top_k=5", r"'sampling.top_k'; use --top-k"),
    ("report", "sampling=x.yaml", r"'sampling'; use --temperature / --max-new-tokens / --top-p / --top-k"),
    ("chat", "seed=1", r"'seed'; use --seed"),
    ("chat", "sampling.temperature=0", r"use --temperature"),
    ("eval-rm", "eval_data.split=test", r"'eval_data.split'; use --split"),
    ("eval-rm", "seed=3", r"'seed'; it reads only run_name, runs_dir, trust_remote_code, world, eval_batch_size"),
])
def test_an_override_the_command_does_not_read_is_refused_naming_its_flag(command, override, message, tmp_path):
    """`make eval ARGS="sampling.temperature=1.5 eval_prompts=3"` evaluated greedily on every prompt: the stage
    YAML's class accepts every stage key, and these commands take sampling and limits from their flags."""
    from pipeline import chat
    from reward_model import evaluate as evaluate_rm

    main, config = {"evaluate": (evaluate.main, "ppo.yaml"), "report": (report.main, "ppo.yaml"),
                    "chat": (chat.main, "ppo.yaml"), "eval-rm": (evaluate_rm.main, "rm.yaml")}[command]
    with pytest.raises(SystemExit, match=f"override '{re.escape(override)}': {command} does not use .*{message}"):
        main(["--config", str(MICRO / config), f"runs_dir={tmp_path}", "run_name=nothing", override])
    # a key of no stage is the config loader's to name, with the nearest key
    with pytest.raises(SystemExit, match="unknown key 'run_nam'"):
        main(["--config", str(MICRO / config), f"runs_dir={tmp_path}", "run_nam=x"])


def test_eval_rm_refuses_the_data_flags_without_data(tmp_path, capsys):
    """`make eval-rm ARGS="--max-rows 1 --split validation"` without --data scored the run's held-out rankings whole,
    dropping the flags."""
    from reward_model import evaluate as evaluate_rm

    with pytest.raises(SystemExit):
        evaluate_rm.main(["--config", str(MICRO / "rm.yaml"), f"runs_dir={tmp_path}", "--max-rows", "1",
                          "--split", "validation", "--column", "prompt=foo"])
    assert "--split, --column, --max-rows: only with --data" in capsys.readouterr().err
