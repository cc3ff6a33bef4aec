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
        if len(cells) >= 4 and re.fullmatch(r"-?[\d,]+(\.\d+)?", cells[2]):
            rows[(cells[0], cells[1])] = (float(cells[2].replace(",", "")), cells[4] if len(cells) > 4 else "")
    measured = {benchmark for benchmark, _ in rows}
    assert {"pretrain (tiny)", "rm (tiny, K=4)", "ppo rollout", "ppo step"} <= measured, run.stdout
    for (benchmark, metric), (value, _) in rows.items():
        assert math.isfinite(value) and value > 0, (benchmark, metric, value)
    # the comparisons hold like for like: the same greedy tokens from both samplers
    assert rows[("ppo rollout", "our sampler / model.generate (greedy)")][1] == "same tokens"


def test_an_unknown_bench_in_only_is_refused_before_any_runs(capsys):
    """A typo at the end of --only ran the benches before it for nothing and ended in a KeyError, with no table."""
    import pytest

    from pipeline.bench import main

    with pytest.raises(SystemExit) as stop:
        main(["--only", "rm,ppx"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--only: unknown bench 'ppx'" in err and "[bench] rm" not in err
