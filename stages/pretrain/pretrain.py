"""Pretraining: next-token prediction on packed sequences of a text corpus.

    python -m stages.pretrain --config configs/tiny/pretrain.yaml [key=value ...]
    accelerate launch -m stages.pretrain --config configs/gpu/pretrain.yaml

Reads top to bottom: config, data, tokenizer and model (fresh or resumed), optimizer, evaluation, the
learning-rate schedule, then the training loop with logging, evaluation and checkpoints in plain sight.
Resume is the same path as a fresh start; only where the weights, optimizer and step come from differs.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from data.loading import DataError, DatasetSpec, load_dataset_for, source_fingerprints
from pipeline.checkpoint import (load_training_state, loading_from, mark_in_training, model_source,
                                 parameter_fingerprint, restore_scaler, resume_settings, save_final,
                                 save_training_checkpoint, scaler_state, write_text_atomic)
from pipeline.config import FieldError
from pipeline.generation import SamplingConfig, sample
from pipeline.packing import PackedCorpus
from pipeline.model import POLICY_STAGES, WEIGHTS_DTYPE, ModelSpec, build_causal_lm, fp32_forward, \
    check_length_fits, count_parameters, non_embedding_parameters, require_causal_lm, set_special_token_ids
from pipeline.runs import StageConfig, accelerate_precision, checkpoint_to_resume, end_stage, learned_world_data, \
    model_path, parse_stage_args, require_ddp, run_main, stage_paths, start_checkpoints, world_dir, world_lineage, \
    write_resolved_config
from pipeline.schedule import warmup_cosine
from pipeline.tokenizer import load_tokenizer, train_tokenizer
from pipeline.tracking import LogWindow, Throughput, Tracker, stop_if_not_finite


@dataclass
class PretrainConfig(StageConfig):
    model: ModelSpec = field(default_factory=ModelSpec)
    """Architecture and tokenizer (usually a recipe's model.yaml)."""
    data: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="world:pretrain"))
    """The corpus (schema `text`): the world by default, or local files, or a hub dataset (streaming: true)."""
    block_size: int = 128
    """Tokens per training sequence; documents are packed end to end, separated by EOS."""
    batch_size: int = 32
    """Sequences per process per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (effective batch = batch_size * grad_accum * processes)."""
    max_steps: int = 1000
    learning_rate: float = 3e-3
    """Peak learning rate. Small models tolerate (and need) a high one."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at learning_rate * min_lr_ratio."""
    warmup_steps: int = 50
    weight_decay: float = 0.1
    """Applied to matrices only, not to norms or biases."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    val_fraction: float = 0.02
    """Fraction of documents held out for validation (in-memory corpora); a held-out document whose text the
    training documents repeat is left out of validation."""
    val_blocks: int = 64
    """Validation blocks per evaluation, at most: of the held-out documents, or (a streamed corpus) the head of
    the stream, which training then skips."""
    eval_every: int = 100
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    sample_prompts: list[str] = field(default_factory=list)
    """Text to continue at each eval. Empty: the first words of a few validation documents."""
    sample_tokens: int = 24
    peak_flops: float = 0.0
    """Peak FLOP/s of one device, for the MFU (perf/mfu) logged beside tokens/s: ~9.9e14 for an H100 in bf16.
    0: no MFU. A CPU's peak depends on its matrix units (AMX, AVX512-BF16), so no guess is made for it."""

    def __post_init__(self):
        super().__post_init__()
        if self.max_steps < 1:  # 0 steps would save the fresh model as pretrain/final/
            raise FieldError("max_steps", f"must be 1 or more, got {self.max_steps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise FieldError("val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        if self.val_blocks < 1:
            raise FieldError("val_blocks", f"must be 1 or more, got {self.val_blocks}")
        if self.block_size < 2:  # a block predicts its tokens from the ones before: one token predicts nothing
            raise FieldError("block_size", f"must be 2 or more, got {self.block_size}")
        if self.init_from:  # every stage's key for its starting checkpoint; pretraining's own is model.pretrained
            if self.model.pretrained and self.model.pretrained != self.init_from:
                raise FieldError("init_from", f"{self.init_from} and model.pretrained ({self.model.pretrained}) both "
                                              "name pretraining's starting checkpoint; set one of them")
            self.model.pretrained = self.init_from


def get_lr(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * learning_rate."""
    return cfg.learning_rate * warmup_cosine(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)


def main(argv: list[str] | None = None) -> None:
    cfg: PretrainConfig = parse_stage_args(PretrainConfig, argv, __doc__, "stages.pretrain", "pretrain.yaml")
    paths = stage_paths(cfg, "pretrain")
    require_ddp("pretrain")
    if cfg.model.pretrained:  # before the data loads: a mistyped path or a reward model fails fast, under its key
        key = "init_from" if cfg.init_from else "model.pretrained"
        require_causal_lm(model_path(cfg, key, "pretrain", POLICY_STAGES, f"pretrain (key '{key}')"),
                          f"pretrain (key '{key}')")
    if cfg.model.tokenizer:
        model_source(cfg.model.tokenizer, "model.tokenizer")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=accelerate_precision(cfg))
    torch.manual_seed(cfg.seed)

    # ---- data: validated before any model is built, so bad input fails fast
    with accelerator.main_process_first():
        world = world_dir(cfg) if cfg.data.path.startswith("world:") else None
    texts = load_dataset_for(cfg.data, "text", world_dir=world, key="data")

    # ---- tokenizer and model: from the newest checkpoint on resume, else fresh
    checkpoint = checkpoint_to_resume(cfg, paths.checkpoints, "pretrain", accelerator.is_main_process,
                                      cfg.max_steps)
    if checkpoint is not None:
        tokenizer = load_tokenizer(str(checkpoint / "model"), turn_end_is_eos=False)
    elif cfg.model.tokenizer or cfg.model.pretrained:  # a pretrained model keeps the vocabulary it learned
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.pretrained, cfg.trust_remote_code,
                                   turn_end_is_eos=False)
    else:
        tokenizer = train_tokenizer(PackedCorpus.tokenizer_sample(texts), cfg.model.vocab_size)
    corpus = PackedCorpus(texts, tokenizer, cfg.block_size, cfg.val_fraction, cfg.val_blocks, cfg.seed, cfg.data.path)
    if len(corpus.val) < accelerator.num_processes:  # each process evaluates its share of the validation blocks
        raise DataError(cfg.data.path, f"{len(corpus.val)} validation block(s) of block_size={cfg.block_size} tokens "
                                       f"for {accelerator.num_processes} process(es), which need one each"
                                       + (f" ({corpus.val_dropped} held-out document(s) left out as copies of "
                                          "training ones)" if corpus.val_dropped else "")
                                       + "; add text, raise val_fraction or val_blocks, or lower block_size")

    if checkpoint is not None:
        from transformers import AutoModelForCausalLM

        # attn_implementation is a runtime choice the checkpoint does not keep: resume with the fresh start's kernel
        with loading_from(checkpoint / "model", "pretrain (resume=true)"):
            model = AutoModelForCausalLM.from_pretrained(checkpoint / "model", dtype=WEIGHTS_DTYPE,
                                                         attn_implementation=cfg.model.extra.get("attn_implementation"))
    else:
        model = build_causal_lm(cfg.model, tokenizer, cfg.trust_remote_code)
    set_special_token_ids(model, tokenizer)
    check_length_fits(model, cfg.block_size, "block_size", " or raise model.max_position_embeddings")
    lineage = world_lineage("pretrain", learned_world_data(world, cfg.data))
    mark_in_training(model, "pretrain", lineage)

    # ---- optimizer: weight decay on matrices only
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=tuple(cfg.adam_betas))
    start_step = 0
    # what each step reads (the corpus, and what decides which documents train: the held-out fraction of a corpus
    # in memory, the held-out head of a stream) and the model
    split = "val_blocks" if cfg.data.streaming else "val_fraction"
    settings = resume_settings(cfg, ("batch_size", "grad_accum", "block_size", "seed", "model", "data", split),
                               accelerator.num_processes)
    if checkpoint is not None:
        state = load_training_state(checkpoint, settings)
        optimizer.load_state_dict(state["optimizer"])
        restore_scaler(accelerator.scaler, state)
        start_step = state["step"]
    # the training time of the launches before a resume: eval.json's is the whole run's
    trained_before = float(state.get("train_seconds", 0.0)) if checkpoint is not None else 0.0
    # after the settings check: a changed `data` is named as such, not as another world
    start_checkpoints(paths.checkpoints, checkpoint, lineage, "pretrain", accelerator.is_main_process,
                      # (the corpus read again only where it is checked or recorded, not by every rank of every start)
                      starts_from=source_fingerprints(data=cfg.data)
                      if checkpoint is not None or accelerator.is_main_process else None)
    model, optimizer = accelerator.prepare(model, optimizer)

    tracker = Tracker(cfg, "pretrain", paths.metrics_file, accelerator.is_main_process, start_step=start_step)
    if accelerator.is_main_process:
        write_resolved_config(cfg, paths)
        n_params = count_parameters(model)
        tracker.summary({"model/parameters": n_params, "data/train_tokens": corpus.train_tokens,
                         "data/unigram_entropy": corpus.unigram_entropy})
        tokens = "a streamed corpus" if corpus.streaming else f"{corpus.train_tokens:,} training tokens"
        print(f"[pretrain] {n_params / 1e6:.2f}M parameters, {tokens}, "
              f"unigram entropy {corpus.unigram_entropy:.3f} nats/token, {accelerator.mixed_precision} mixed precision"
              + (f", resuming from step {start_step}" if start_step else ""))
    sample_prompts = cfg.sample_prompts or corpus.sample_prompts(3)

    @torch.no_grad()
    def estimate_val_loss() -> float:
        """Mean loss per token over every validation block (blocks are equal-length; a last short batch and a
        rank with fewer blocks weigh what they hold, not what a full batch would)."""
        model.eval()
        totals = torch.zeros(2, device=accelerator.device)  # sum of block losses, blocks
        # fp32, outside DDP (no gradients to sync): the loss a plain from_pretrained load of the weights gives
        with fp32_forward(accelerator.unwrap_model(model)) as plain:
            for b in corpus.val_batches(cfg.batch_size, accelerator):
                totals += torch.stack([plain(input_ids=b, labels=b).loss.float() * len(b),
                                       torch.tensor(float(len(b)), device=accelerator.device)])
        model.train()
        loss_sum, blocks = accelerator.reduce(totals, reduction="sum").tolist()
        return loss_sum / blocks

    def continuations() -> list[str]:
        bare = accelerator.unwrap_model(model)
        bare.eval()
        out = []
        with fp32_forward(bare) as plain:  # as a reload of the checkpoint continues them
            for prompt in sample_prompts:
                ids = tokenizer(prompt, return_tensors="pt").to(accelerator.device)
                tokens = sample(plain, ids["input_ids"], ids["attention_mask"],
                                SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=0.0),
                                tokenizer.eos_token_id, tokenizer.pad_token_id)
                # decoded with the prompt: alone, a continuation loses its leading space ("upon a" + "time")
                out.append(tokenizer.decode(torch.cat([ids["input_ids"][0], tokens[0]]), skip_special_tokens=True))
        bare.train()
        return out

    # ---- training loop
    flops_per_token = 6 * non_embedding_parameters(accelerator.unwrap_model(model))
    batches = corpus.train_batches(cfg.batch_size, cfg.grad_accum, start_step, accelerator)
    # the first batch first: a streamed corpus resumed at step N reads the stream up to there, which is not training
    if start_step < cfg.max_steps:  # (a run resumed at its end trains nothing: no stream to re-read)
        batches = itertools.chain([next(batches)], batches)
    throughput = Throughput()
    progress = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                    desc="pretrain", disable=not accelerator.is_main_process)
    model.train()
    started, val_loss, window = time.perf_counter(), None, LogWindow("loss")
    if checkpoint is not None:
        window.restore(state.get("log_window"), accelerator.num_processes)
    for step in progress:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    stop_if_not_finite(grad_norm, "pretrain", step + 1, "Lower learning_rate or check the corpus.",
                                       accelerator.scaler)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            throughput.add(batch.numel() * accelerator.num_processes)
            window.add(loss.detach())

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            tokens_per_sec = throughput.rate()
            # every micro-batch since the last log, on every rank (not the last one of rank 0)
            train_loss = window.means(accelerator)["loss"]
            progress.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_sec:,.0f}")
            tracker.log({"train/loss": train_loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                         "perf/tokens_per_sec": tokens_per_sec,
                         "train/tokens_seen": done * cfg.batch_size * cfg.grad_accum * cfg.block_size
                         * accelerator.num_processes,
                         **({"perf/mfu": flops_per_token * tokens_per_sec  # tokens/s is over all ranks
                                         / (cfg.peak_flops * accelerator.num_processes)} if cfg.peak_flops else {})},
                        step=done, console=False)
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            val_loss = estimate_val_loss()
            tracker.log({"eval/loss": val_loss, "eval/perplexity": math.exp(min(val_loss, 50))}, step=done)
            if accelerator.is_main_process:
                texts = continuations()
                for text in texts:
                    tqdm.write(f"[pretrain]   > {text!r}")
                tracker.table("eval/samples", ["prompt", "text"], [list(row) for row in zip(sample_prompts, texts)],
                              step=done)
            throughput.rate()  # restart the clock: tokens/s measures training, not evaluation
        # the last step too: a resume with a larger max_steps then goes on from the end, not the step before
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            accelerator.wait_for_everyone()
            log_window = window.state(accelerator)
            if accelerator.is_main_process:
                save_training_checkpoint(paths.checkpoints, done, accelerator.unwrap_model(model), tokenizer,
                                         {"optimizer": optimizer.state_dict(), "settings": settings,
                                          "log_window": log_window, **scaler_state(accelerator.scaler),
                                          "train_seconds": trained_before + time.perf_counter() - started},
                                         cfg.keep_checkpoints)
            accelerator.wait_for_everyone()
            throughput.rate()  # nor saving

    # ---- the hand-off: a plain HF checkpoint for the next stage
    if val_loss is None:  # resumed at max_steps: nothing was trained, but report the checkpoint's loss
        val_loss = estimate_val_loss()
    # every rank prints it: under DDP the ranks must agree
    print(f"[pretrain] rank {accelerator.process_index} parameter fingerprint {parameter_fingerprint(model)}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(accelerator.unwrap_model(model), tokenizer, paths.final, "pretrain",
                   world_data=lineage, launch_records=paths.launch_records)
        train_seconds = trained_before + time.perf_counter() - started
        # eval.json as SFT's and the RM's: the report's Run facts read the training time there
        report = {"step": cfg.max_steps, "eval_loss": val_loss, "train_seconds": train_seconds}
        write_text_atomic(paths.root / "eval.json", json.dumps(report, indent=1) + "\n")
        tracker.summary({"eval/final_loss": val_loss, "time/train_seconds": train_seconds})
        print(f"[pretrain] final validation loss {val_loss:.4f} (unigram entropy "
              f"{corpus.unigram_entropy:.4f}); checkpoint in {paths.final}")
        tracker.finish(paths.final)
    end_stage(accelerator)


if __name__ == "__main__":
    run_main(main)
