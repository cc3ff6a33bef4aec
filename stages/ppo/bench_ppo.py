"""PPO benchmarks for `make bench`: rollout generation speed and where a PPO step's time goes.

1. Rollout generation tokens/s on the same prompts and model, in one run: our batched KV-cache sampler
   (`pipeline.generation.sample`, the PPO rollout path) against `model.generate` with its defaults (greedy), and
   both sampling at the rollout temperature, all in fp32. Only real response tokens count (up to and including EOS).
2. The time split of a PPO step: a short run of the real stage (configs/tiny/ppo.yaml) in a subprocess, in the
   precision the stage takes here, reading perf/generation_seconds, perf/rollout_seconds and perf/update_seconds
   from its metrics.jsonl.

Uses runs/tiny/sft/final and runs/tiny/rm/final when they exist; otherwise (a fresh clone) randomly initialised
models of the tiny architecture, whose replies run to the length cap (the note says which).

    python -m stages.ppo.bench_ppo [--quick]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch

from pipeline.bench import tiny_precision

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny"


def _models(work: Path, world: Path) -> tuple[Path, Path, str]:
    """(SFT path, RM path, note): the tiny run's checkpoints, or random models of the tiny architecture."""
    sft, rm = REPO / "runs" / "tiny" / "sft" / "final", REPO / "runs" / "tiny" / "rm" / "final"
    if (sft / "config.json").exists() and (rm / "config.json").exists():
        return sft, rm, "tiny SFT + RM"
    from pipeline.checkpoint import save_final
    from pipeline.config import load_config
    from pipeline.model import ModelSpec, build_causal_lm, load_scalar_model
    from pipeline.tokenizer import train_tokenizer

    spec = load_config(ModelSpec, TINY / "model.yaml")
    texts = [json.loads(line)["text"] for line in (world / "pretrain.jsonl").read_text().splitlines()[:3000]]
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    torch.manual_seed(0)
    save_final(build_causal_lm(spec, tokenizer), tokenizer, work / "sft", "sft")
    save_final(load_scalar_model(str(work / "sft"), "bench", tokenizer), tokenizer, work / "rm", "rm")
    return work / "sft", work / "rm", "random tiny models (no runs/tiny yet): replies hit the length cap"


def _tokens_per_sec(generate, enc: dict, tokenizer, repeats: int) -> float:
    """Real response tokens per second of the fastest of `repeats` timed calls (robust to a busy machine)."""
    from stages.ppo.ppo_math import response_mask

    generate(enc)  # warm-up
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        responses = generate(enc)
        seconds = time.perf_counter() - started
        tokens = int(response_mask(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)[0].sum())
        best = max(best, tokens / seconds)
    return best


def generation_rows(sft: Path, world: Path, note: str, quick: bool, stage_precision: str) -> list[dict]:
    from pipeline.config import load_config
    from pipeline.generation import SamplingConfig, encode_prompts, sample, stop_token_ids
    from pipeline.model import load_causal_lm
    from pipeline.tokenizer import load_tokenizer
    from stages.ppo.config import PPOStageConfig

    cfg = load_config(PPOStageConfig, TINY / "ppo.yaml")
    tokenizer = load_tokenizer(str(sft))
    model = load_causal_lm(str(sft), "bench").eval()
    n = 16 if quick else cfg.rollout_batch_size
    prompts = [json.loads(line)["prompt"] for line in (world / "ppo_prompts.jsonl").read_text().splitlines()[:n]]
    enc = encode_prompts(tokenizer, prompts)
    n_prompt, cap, repeats = enc["input_ids"].size(1), cfg.sampling.max_new_tokens, 2 if quick else 5
    stops = stop_token_ids(model, tokenizer)

    def ours(sampling: SamplingConfig):
        return lambda e: sample(model, e["input_ids"], e["attention_mask"], sampling, stops, tokenizer.pad_token_id,
                                generator=torch.Generator().manual_seed(0))

    def hf(**kwargs):
        return lambda e: model.generate(**e, max_new_tokens=cap, eos_token_id=stops,
                                        pad_token_id=tokenizer.pad_token_id, **kwargs)[:, n_prompt:]

    with torch.no_grad():
        greedy_ours, greedy_hf = ours(SamplingConfig(cap, 0.0))(enc), hf()(enc)
        width = min(greedy_ours.size(1), greedy_hf.size(1))
        same = torch.equal(greedy_ours[:, :width], greedy_hf[:, :width])
        rates = {"greedy, our sampler": _tokens_per_sec(ours(SamplingConfig(cap, 0.0)), enc, tokenizer, repeats),
                 "greedy, model.generate defaults": _tokens_per_sec(hf(), enc, tokenizer, repeats),
                 f"T={cfg.sampling.temperature}, our sampler": _tokens_per_sec(
                     ours(cfg.sampling), enc, tokenizer, repeats),
                 f"T={cfg.sampling.temperature}, model.generate": _tokens_per_sec(
                     hf(do_sample=True, temperature=cfg.sampling.temperature, top_k=cfg.sampling.top_k or None,
                        top_p=cfg.sampling.top_p), enc, tokenizer, repeats)}
    # no autocast here: the stage samples its rollouts under its own precision, which may not be fp32
    setting = f"{n} prompts, cap {cap} tokens, {note}" + (
        "" if stage_precision == "fp32" else f"; the PPO stage samples in {stage_precision} here")
    rows = [{"benchmark": "ppo rollout (tiny)", "metric": f"generation tok/s, {k}", "value": v, "unit": "tok/s",
             "precision": "fp32", "note": setting} for k, v in rates.items()]
    rows.append({"benchmark": "ppo rollout (tiny)", "metric": "our sampler / model.generate (greedy)",
                 "value": rates["greedy, our sampler"] / rates["greedy, model.generate defaults"], "unit": "x",
                 "precision": "fp32", "note": "same tokens" if same else "greedy tokens differ (check!)"})
    return rows


def describe_steps(steps: list[int]) -> str:
    """The steps a figure averages, as the note says it: "step 2", or "mean of steps 2-4"."""
    return f"step {steps[0]}" if len(steps) == 1 else f"mean of steps {steps[0]}-{steps[-1]}"


def step_split_rows(sft: Path, rm: Path, runs: Path, note: str, quick: bool, precision: str) -> list[dict]:
    steps = 2 if quick else 4
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "stages.ppo", "--config", str(TINY / "ppo.yaml"),
                          f"runs_dir={runs}", "run_name=bench", f"init_from={sft}", f"reward_model={rm}",
                          # every step a full PPO step: the recipe's critic-only warmup steps would dilute the split
                          f"max_steps={steps}", "critic_warmup_steps=0", "eval_prompts=0", "checkpoint_every=100000"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"PPO bench run failed:\n{run.stderr[-2000:]}")
    records = [json.loads(line) for line in (runs / "bench" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if "perf/update_seconds" in r][1:]  # the first step pays one-off warm-up costs
    gen, roll, upd = (mean(r[f"perf/{k}_seconds"] for r in steady) for k in ("generation", "rollout", "update"))
    total = roll + upd
    setting = f"configs/tiny/ppo.yaml, {describe_steps([r['step'] for r in steady])}, {note}"
    rows = [
        {"benchmark": "ppo step (tiny)", "metric": "generation (sampling)", "value": gen, "unit": "s/step",
         "note": f"{gen / total:.0%} of the step; {setting}"},
        {"benchmark": "ppo step (tiny)", "metric": "scoring (policy/ref/critic/RM passes)", "value": roll - gen,
         "unit": "s/step", "note": f"{(roll - gen) / total:.0%} of the step"},
        {"benchmark": "ppo step (tiny)", "metric": "update (PPO epochs)", "value": upd, "unit": "s/step",
         "note": f"{upd / total:.0%} of the step"},
        {"benchmark": "ppo step (tiny)", "metric": "rollout tokens/s (whole step)",
         "value": mean(r["perf/tokens_per_sec"] for r in steady), "unit": "tok/s", "note": "response tokens"}]
    return [{**row, "precision": precision} for row in rows]


def run_benchmark(quick: bool = False) -> list[dict]:
    from pipeline.config import load_config
    from stages.ppo.config import PPOStageConfig
    from data.world import write_world

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = write_world(work / "runs" / "bench" / "world", load_config(PPOStageConfig, TINY / "ppo.yaml").world)
        sft, rm, note = _models(work, world)
        precision = tiny_precision(PPOStageConfig, "ppo.yaml")  # the stage's, launched in this environment
        return (generation_rows(sft, world, note, quick, precision)
                + step_split_rows(sft, rm, work / "runs", note, quick, precision))


if __name__ == "__main__":
    import argparse

    from pipeline.bench import print_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset: a smoke run, not a measurement")
    print_table(run_benchmark(parser.parse_args().quick))
