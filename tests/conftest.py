"""Shared fixtures: one micro pipeline (pretrain -> sft -> prefs -> rm) trained once per test session.

Stages run in-process through their `main(argv)`, exactly as `python -m stages.X` would run them, on the
`micro` recipe (a tiny model, a few steps). Later fixtures reuse earlier outputs, so the chain costs seconds.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "configs" / "micro"
CPU_DDP_LAUNCH = ["--config_file", str(REPO / "configs" / "accelerate" / "cpu_ddp.yaml")]  # with ACCELERATE_USE_CPU=1

# tests never talk to W&B unless a test opts in (the W&B test sets WANDB_MODE=offline itself)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test starts with no accelerate state (after the session fixtures it uses, which are set up first)."""
    reset_accelerate()
    yield
    reset_accelerate()


def reset_accelerate() -> None:
    """Forget the accelerate state: a stage run in-process fixes the precision for the process, and a later stage
    asking for another one failed."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run_in_own_group(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` from the repo root in its own process group; on timeout kill the launcher and every process
    under it, so a hung rank never outlives the test (torch's launcher starts each rank in a session of its own,
    out of reach of the group)."""
    import psutil

    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        ranks = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for rank in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(command[:8])} ... did not finish within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def launch_two_ranks(module: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module args` as two DDP ranks on the CPU (gloo), as the README shows, W&B off. With its own
    config file: not the machine's default accelerate config (a GPU box's mixed_precision: fp16 would apply)."""
    import sys

    command = [sys.executable, "-m", "accelerate.commands.launch", *CPU_DDP_LAUNCH,
               "--main_process_port", str(free_port()), "-m", module, *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    return run_in_own_group(command, env, timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_stage(main, config: str, runs_dir: Path, *overrides: str, run_name: str = "micro",
              recipe: Path = MICRO) -> None:
    """Run a stage's main() on a recipe's config (micro unless told) with runs under `runs_dir`, in a fresh
    accelerate state (the session fixtures run one stage after another inside one test's setup)."""
    reset_accelerate()
    main(["--config", str(recipe / config), f"runs_dir={runs_dir}", f"run_name={run_name}", *overrides])


def learnt_positions_checkpoints(tokenizer_source: Path, out: Path) -> tuple[Path, Path]:
    """An untrained tiny GPT-2 policy (an `sft` final/) and an RM made from it (an `rm` final/, random head), built
    through the model spec with `tokenizer_source`'s tokenizer. Their positions are learnt absolute embeddings: the
    micro recipe's Llama has RoPE, which sees relative positions only, so there a padded row scores the same with
    wrong position ids."""
    from pipeline.checkpoint import save_final
    from pipeline.model import ModelSpec, build_causal_lm, load_scalar_model
    from pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_source), keep_pad=True)
    policy = build_causal_lm(ModelSpec(architecture="gpt2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
                             tokenizer)
    save_final(policy, tokenizer, out / "gpt2_policy", "sft")
    save_final(load_scalar_model(str(out / "gpt2_policy"), "test", tokenizer), tokenizer, out / "gpt2_rm", "rm")
    return out / "gpt2_policy", out / "gpt2_rm"


@pytest.fixture(scope="session")
def micro_runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def micro_pretrain(micro_runs) -> Path:
    from stages.pretrain.pretrain import main

    run_stage(main, "pretrain.yaml", micro_runs)
    return micro_runs / "micro" / "pretrain" / "final"


@pytest.fixture(scope="session")
def micro_sft(micro_pretrain, micro_runs) -> Path:
    from stages.sft.sft import main

    run_stage(main, "sft.yaml", micro_runs)
    return micro_runs / "micro" / "sft" / "final"


@pytest.fixture(scope="session")
def micro_prefs(micro_sft, micro_runs) -> Path:
    from reward_model.collect import main

    run_stage(main, "rm.yaml", micro_runs)
    return micro_runs / "micro" / "prefs"


@pytest.fixture(scope="session")
def micro_rm(micro_prefs, micro_runs) -> Path:
    from reward_model.train import main

    run_stage(main, "rm.yaml", micro_runs)
    return micro_runs / "micro" / "rm" / "final"
