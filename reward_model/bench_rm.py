"""RM training throughput: InstructGPT's K-way ranking loss versus the same rankings expanded into pairs.

    python -m reward_model.bench_rm [--quick]          (a row group of `make bench`)

TRL, OpenRLHF and DeepSpeed-Chat expand a K-way ranking into C(K,2) independent (chosen, rejected) pairs,
shuffle them, and score each pair separately: K(K-1) forward passes per prompt, every response seen K-1 times
per epoch (InstructGPT's "overfitting" baseline). The K-way loss scores each response once and compares all
pairs of the group in the loss: K passes. Both arms run here, in one process and interleaved (so a change in
machine load hits both alike), through the stage's own `collate` and `compute_loss` (a pair is a group of 2),
from the same initial weights, with the same learning rate, batching and number of comparisons per optimizer
step (B prompts' worth: B groups, or B*C(K,2) shuffled pairs), so both take the same number of steps. The
table reports one epoch's time for each, the speedup, and the held-out accuracy of both (against the labels,
and against gold where the data has gold scores) with its standard error.

Data: the tiny run's collected preferences (runs/tiny/prefs) when they exist, else the tiny world's static
ranked set (the ideal response and K-1 flawed ones per prompt), each ranking cut to K=4 responses. Backbone:
the tiny SFT model when it exists, else a fresh model of the tiny architecture.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from data.loading import DatasetSpec
from data.world import write_world
from pipeline.config import load_config
from pipeline.model import ModelSpec, build_causal_lm, load_scalar_model
from pipeline.runs import WORLD_DATA_FILE, stage_paths
from pipeline.tokenizer import load_tokenizer, train_tokenizer
from reward_model.config import RewardModelConfig
from reward_model.metrics import ranking_metrics
from reward_model.train import collate, compute_loss, epoch_batches, load_rankings, score_rankings

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny"


def subsample(rows: list[dict], k: int, seed: int) -> list[dict]:
    """Each ranking cut to a seeded subset of k responses, still best first (rows with fewer are dropped)."""
    rng, out = random.Random(seed), []
    for row in rows:
        if len(row["responses"]) >= k:
            keep = sorted(rng.sample(range(len(row["responses"])), k))
            out.append({"prompt": row["prompt"], "responses": [row["responses"][i] for i in keep]})
    return out


def expand_to_pairs(rows: list[dict]) -> list[dict]:
    """Each ranking as its C(K,2) independent (better, worse) pairs: the layout other frameworks train on."""
    return [{"prompt": row["prompt"], "responses": [row["responses"][i], row["responses"][j]]}
            for row in rows for i, j in itertools.combinations(range(len(row["responses"])), 2)]


def tiny_data(cfg: RewardModelConfig, scratch: Path) -> tuple[list[dict], list[dict], str]:
    """(train rankings, held-out rankings, description): the tiny run's collected ones, else the static set,
    split as RM training splits them."""
    prefs = stage_paths(cfg, "prefs").root
    if all((prefs / name).exists() for name in ("train.jsonl", "eval.jsonl", WORLD_DATA_FILE)):
        train, held_out, _ = load_rankings(cfg)
        return train, held_out, "collected tiny prefs"
    static = dataclasses.replace(cfg, train_data=DatasetSpec(path="world:prefs_static"), eval_data=None)
    train, held_out, _ = load_rankings(static, world=write_world(scratch / "world", cfg.world))
    return train, held_out, "tiny world's static ranked set"


def tiny_backbone(cfg: RewardModelConfig, scratch: Path) -> tuple[str, str]:
    """(checkpoint path, description): the tiny SFT final/, else a fresh tiny-architecture model."""
    sft = stage_paths(cfg, "sft").final
    if (sft / "config.json").exists():
        return str(sft), "tiny SFT backbone"
    world = write_world(scratch / "world", cfg.world)  # at once if tiny_data already wrote it
    texts = [json.loads(line)["text"] for line, _ in zip((world / "pretrain.jsonl").open(), range(3000))]
    spec = load_config(ModelSpec, TINY / "model.yaml")
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    build_causal_lm(spec, tokenizer).save_pretrained(scratch / "fresh")
    tokenizer.save_pretrained(scratch / "fresh")
    return str(scratch / "fresh"), "fresh tiny-architecture backbone (no tiny SFT yet)"


class Arm:
    """One side of the comparison: its own copy of the backbone, optimizer and epoch of batches, and its clock."""

    def __init__(self, cfg: RewardModelConfig, backbone: str, groups: list[dict], groups_per_step: int):
        torch.manual_seed(cfg.seed)  # the same scalar-head initialisation for both arms
        self.cfg, self.groups, self.seconds = cfg, groups, 0.0
        self.tokenizer = load_tokenizer(backbone)
        self.model = load_scalar_model(backbone, "bench_rm", self.tokenizer).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, betas=tuple(cfg.adam_betas))
        self.batches = epoch_batches(groups, groups_per_step, len(groups) // groups_per_step, cfg.seed,
                                     cfg.group_by_length)
        self.conversations = sum(len(groups[i]["responses"]) for batch in self.batches for i in batch)
        self.step(self.batches[0], update=False)  # untimed warm-up: one-off allocations, thread start-up

    def step(self, indices: list[int], update: bool = True) -> None:
        """One training step of the stage's loss, timed; with update=False only forward and backward."""
        started = time.perf_counter()
        batch = collate(self.tokenizer, [self.groups[i] for i in indices], self.cfg.max_length,
                        chunk_size=self.cfg.forward_chunk)
        loss, _ = compute_loss(self.model, batch, self.cfg.margin, self.cfg.center_coef)
        loss.backward()
        if update:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.seconds += time.perf_counter() - started
        self.optimizer.zero_grad(set_to_none=True)

    def held_out_metrics(self, held_out: list[dict]) -> dict[str, float]:
        self.model.eval()
        scores = score_rankings(self.model, self.tokenizer, held_out, self.cfg.max_length, self.cfg.eval_batch_size)
        return ranking_metrics(scores, held_out)


def run_benchmark(quick: bool = False, k: int = 4) -> list[dict]:
    """Rows for `make bench`: one epoch of each arm on the same k-response rankings (k=4: the issue's target)."""
    cfg = load_config(RewardModelConfig, TINY / "rm.yaml", [f"runs_dir={REPO / 'runs'}", "run_name=tiny"])
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        train, held_out, data_note = tiny_data(cfg, scratch)
        # an epoch of the full tiny set takes minutes in the pairs arm; a fixed subset keeps `make bench` short
        train, held_out = (train[:32], held_out[:16]) if quick else (train[:400], held_out[:120])
        train = subsample(train, k, cfg.seed)
        backbone, model_note = tiny_backbone(cfg, scratch)
        pairs = expand_to_pairs(train)
        # the same comparisons per optimizer step: B prompts as groups of k, or their B*C(k,2) pairs, shuffled
        prompts_per_step = cfg.batch_size * cfg.responses_per_prompt // k  # the stage's conversations per step
        kway = Arm(cfg, backbone, train, prompts_per_step)
        pair = Arm(cfg, backbone, pairs, prompts_per_step * math.comb(k, 2))
        for kway_batch, pair_batch in zip(kway.batches, pair.batches, strict=True):  # interleaved
            kway.step(kway_batch)
            pair.step(pair_batch)
        kway_metrics, pair_metrics = kway.held_out_metrics(held_out), pair.held_out_metrics(held_out)
    name, note = f"rm (tiny, K={k})", f"{len(train)} rankings; {data_note}; {model_note}"
    rows = [
        {"benchmark": name, "metric": "epoch time, K-way loss", "value": kway.seconds, "unit": "s",
         "note": f"{kway.conversations} conversations scored; {note}"},
        {"benchmark": name, "metric": "epoch time, expanded pairs", "value": pair.seconds, "unit": "s",
         "note": f"{len(pairs)} pairs = {pair.conversations} conversations scored (as TRL/OpenRLHF)"},
        {"benchmark": name, "metric": "K-way speedup per epoch", "value": pair.seconds / kway.seconds, "unit": "x",
         "note": f"target >= 2.5 at K=4 (ideal K-1 = {k - 1}); {len(kway.batches)} optimizer steps each"},
    ]
    for arm, metrics in (("K-way", kway_metrics), ("pairs", pair_metrics)):
        n, accuracy = int(metrics.get("decided_pairs", metrics["pairs"])), metrics["accuracy"]
        gold = f", gold agreement {metrics['gold_accuracy']:.3f} (ceiling {metrics['noise_ceiling']:.3f})" \
            if "gold_accuracy" in metrics else ""
        rows.append({"benchmark": name, "metric": f"held-out accuracy, {arm}", "value": accuracy, "unit": "",
                     "note": f"+- {metrics.get('accuracy_se', math.nan):.3f} (s.e. over {int(metrics['accuracy_rankings'])} "
                             f"rankings) on {n} pairs{gold}"})
    return [{**row, "precision": "fp32"} for row in rows]  # both arms train and score without autocast


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset: a smoke run, not a measurement")
    for row in run_benchmark(parser.parse_args().quick):
        print(json.dumps(row))
