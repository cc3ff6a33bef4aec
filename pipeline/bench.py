"""`make bench`: throughput and memory benchmarks, printed as one table.

    python -m pipeline.bench [--quick] [--only pretrain,rm,ppo]

- pretrain: tokens/s and peak memory of the real pretrain stage on the `tiny` model, next to a plain
  hand-written torch loop (same model, batch and optimizer) run in the same invocation.
- rm: K-way ranking loss versus the same data expanded into independent pairs (reward_model/bench_rm.py).
- ppo: rollout generation tokens/s (our sampler versus `model.generate`) and the generation/update time split
  per PPO step (stages/ppo/bench_ppo.py).

Every benchmark measures the `tiny` recipe (configs/tiny/, with runs/tiny/'s checkpoints where they exist),
whatever RECIPE or RUN make is given: a fixed workload, comparable across machines and commits. Each row names
the precision it ran in. Each measured program runs in its own subprocess, so peak memory (max RSS) is its own.
Speed targets live here, never in timed tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny"
HEADING = ("Benchmarks of the tiny recipe (configs/tiny/, with runs/tiny/'s checkpoints where they exist), whatever "
           "RECIPE or RUN say.")


def tiny_precision(config_cls: type, stage_yaml: str) -> str:
    """The precision a tiny-recipe stage launched from here trains in ("bf16", "fp16" or "fp32"): as it decides."""
    from pipeline.config import load_config
    from pipeline.runs import resolve_precision

    return resolve_precision(load_config(config_cls, TINY / stage_yaml))


def _run_child(args: list[str]) -> tuple[str, float]:
    """Run a Python child; return its stdout and its own peak RSS in MB (wait4: this child's, not the largest of
    all children so far)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {' '.join(args)} failed:\n{stderr[-2000:]}")
    per_mb = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, kilobytes on Linux
    return stdout, usage.ru_maxrss / per_mb


def plain_torch_loop(steps: int) -> None:
    """The baseline: the same model and batch shape trained by the shortest possible torch loop."""
    import torch

    from pipeline.config import load_config
    from pipeline.model import build_causal_lm
    from pipeline.runs import resolve_precision
    from pipeline.tokenizer import train_tokenizer
    from stages.pretrain.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, TINY / "pretrain.yaml")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg))  # as the stage decides
    tokenizer = train_tokenizer(["warm up the vocabulary with some text"] * 10, cfg.model.vocab_size)
    model = build_causal_lm(cfg.model, tokenizer)
    # same vocabulary size as the stage's trained tokenizer, so the model is identical in shape
    model.resize_token_embeddings(cfg.model.vocab_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the stage's Accelerator puts it
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.adam_betas))
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    warmup = 3
    for step in range(steps + warmup):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device, dtype=half or torch.float32, enabled=half is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_sec": steps * batch.numel() / elapsed}))


def bench_pretrain(quick: bool) -> list[dict]:
    from stages.pretrain.pretrain import PretrainConfig

    precision = tiny_precision(PretrainConfig, "pretrain.yaml")  # the stage's, and the plain loop's (same env)
    steps = 10 if quick else 40
    rows = []
    with tempfile.TemporaryDirectory() as runs_dir:
        _, stage_rss = _run_child(["-m", "stages.pretrain", "--config", str(TINY / "pretrain.yaml"),
                                   f"runs_dir={runs_dir}", "run_name=bench", f"max_steps={steps}",
                                   f"log_every={max(2, steps // 5)}", f"eval_every={steps}",
                                   f"checkpoint_every={steps * 10}", "warmup_steps=2"])
        metrics = [json.loads(line) for line in (Path(runs_dir) / "bench/pretrain/metrics.jsonl").open()]
        windows = [m["perf/tokens_per_sec"] for m in metrics if "perf/tokens_per_sec" in m][1:]  # skip warm-up
        # each window trains the same tokens (log_every steps of full blocks): their total over the total time is
        # the harmonic mean of the rates (the plain mean favours the fast windows)
        stage_rate = len(windows) / sum(1 / rate for rate in windows)
    plain_out, plain_rss = _run_child(["-m", "pipeline.bench", "--plain-loop", str(steps)])
    plain_rate = json.loads(plain_out.strip().splitlines()[-1])["tokens_per_sec"]
    rows.append({"benchmark": "pretrain (tiny)", "metric": "train tokens/s, pipeline stage",
                 "value": stage_rate, "unit": "tok/s", "note": f"{steps} steps, incl. data + logging"})
    rows.append({"benchmark": "pretrain (tiny)", "metric": "train tokens/s, plain torch loop",
                 "value": plain_rate, "unit": "tok/s", "note": "same model, batch, AdamW"})
    rows.append({"benchmark": "pretrain (tiny)", "metric": "stage / plain loop", "value": stage_rate / plain_rate,
                 "unit": "x", "note": "target >= 1.0 (within noise)"})
    rows.append({"benchmark": "pretrain (tiny)", "metric": "peak memory (max RSS)", "value": stage_rss,
                 "unit": "MB", "note": "the pipeline stage's process"})
    return [{**row, "precision": precision} for row in rows]


def _optional(module: str, quick: bool) -> list[dict]:
    import importlib

    try:
        bench = importlib.import_module(module)
    except ModuleNotFoundError as e:
        return [{"benchmark": module, "metric": "-", "value": float("nan"), "unit": "", "precision": "-",
                 "note": f"missing: {e}"}]
    return bench.run_benchmark(quick=quick)


BENCHES = {
    "pretrain": bench_pretrain,
    "rm": lambda quick: _optional("reward_model.bench_rm", quick),
    "ppo": lambda quick: _optional("stages.ppo.bench_ppo", quick),
}


def print_table(rows: list[dict]) -> None:
    cells = [[r["benchmark"], r["metric"], f"{r['value']:,.2f}" if isinstance(r["value"], float)
              else str(r["value"]), r["unit"], r["precision"], r.get("note", "")] for r in rows]
    header = ["benchmark", "metric", "value", "unit", "precision", "note"]
    widths = [max(len(str(c[i])) for c in cells + [header]) for i in range(len(header))]
    line = lambda c: "| " + " | ".join(str(v).rjust(w) if i == 2 else str(v).ljust(w)  # noqa: E731
                                       for i, (v, w) in enumerate(zip(c, widths))) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print(line(c))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps: a smoke run, not a measurement")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of: " + ",".join(BENCHES))
    parser.add_argument("--plain-loop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.only.split(",") if name not in BENCHES]
    if unknown:  # before any bench runs: a typo at the end threw away the finished ones
        parser.error(f"--only: unknown bench {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    if args.plain_loop:
        plain_torch_loop(args.plain_loop)
        return
    rows = []
    for name in args.only.split(","):
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows += BENCHES[name](args.quick)
    print(HEADING + (" --quick: a smoke run, not a measurement." if args.quick else ""))
    print_table(rows)


if __name__ == "__main__":
    main()
