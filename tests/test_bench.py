"""`make bench` as a smoke run (--quick): every benchmark runs to its row of the table. Speeds are the
benchmark's to report, not a test's to assert; what is asserted is that each one measured something."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from conftest import REPO


def test_quick_bench_runs_every_benchmark_and_prints_its_rows():
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "pipeline.bench", "--quick"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"-?[\d,]+(\.\d+)?", cells[2]):
            rows[(cells[0], cells[1])] = (float(cells[2].replace(",", "")), cells[4], cells[5])
    measured = {benchmark for benchmark, _ in rows}
    assert {"pretrain (tiny)", "rm (tiny, K=4)", "ppo rollout (tiny)", "ppo step (tiny)"} <= measured, run.stdout
    lines = run.stdout.splitlines()  # (the RM bench, run in-process, prints its progress above)
    heading = lines[next(i for i, line in enumerate(lines) if line.startswith("| benchmark ")) - 1]
    assert heading.startswith("Benchmarks of the tiny recipe")  # whatever RECIPE make was given
    for (benchmark, metric), (value, precision, _) in rows.items():
        assert math.isfinite(value) and value > 0, (benchmark, metric, value)
        assert precision in ("fp32", "bf16", "fp16"), (benchmark, metric, precision)  # each row names its own
    # the comparisons hold like for like: the same greedy tokens from both samplers
    assert rows[("ppo rollout (tiny)", "our sampler / model.generate (greedy)")][2] == "same tokens"
    # --quick times one steady PPO step (it said "mean of steps 2-2")
    assert "configs/tiny/ppo.yaml, step 2," in rows[("ppo step (tiny)", "generation (sampling)")][2]


def test_an_unknown_bench_in_only_is_refused_before_any_runs(capsys):
    """A typo at the end of --only ran the benches before it for nothing and ended in a KeyError, with no table."""
    import pytest

    from pipeline.bench import main

    with pytest.raises(SystemExit) as stop:
        main(["--only", "rm,ppx"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--only: unknown bench 'ppx'" in err and "[bench] rm" not in err


def test_the_table_says_it_measures_the_tiny_recipe_and_each_rows_precision(monkeypatch, capsys):
    """`make bench RECIPE=micro` measured tiny without saying so, and PPO's rows named no precision (or two)."""
    from pipeline import bench

    row = {"benchmark": "ppo step (tiny)", "metric": "update (PPO epochs)", "value": 1.5, "unit": "s/step",
           "precision": "bf16", "note": "configs/tiny/ppo.yaml, step 2"}
    monkeypatch.setattr(bench, "BENCHES", {"ppo": lambda quick: [row]})
    bench.main(["--only", "ppo", "--quick"])
    heading, header, _, line = capsys.readouterr().out.splitlines()
    assert heading.startswith("Benchmarks of the tiny recipe (configs/tiny/") and "whatever RECIPE" in heading
    assert "smoke run, not a measurement" in heading
    assert [c.strip() for c in header.strip("|").split("|")] == ["benchmark", "metric", "value", "unit", "precision",
                                                                  "note"]
    assert [c.strip() for c in line.strip("|").split("|")][4] == "bf16"


def test_a_ppo_step_note_names_the_steps_it_averages():
    from stages.ppo.bench_ppo import describe_steps

    assert describe_steps([2]) == "step 2"  # --quick: was "mean of steps 2-2"
    assert describe_steps([2, 3, 4]) == "mean of steps 2-4"
