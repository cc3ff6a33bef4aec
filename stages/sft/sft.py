"""Supervised fine-tuning: the pretrained model learns to answer in the chat format (InstructGPT step 1).

    python -m stages.sft --config configs/tiny/sft.yaml [key=value ...]
    accelerate launch -m stages.sft --config configs/gpu/sft.yaml

Reads top to bottom: config, the starting checkpoint (checked before anything loads), data, tokenizer and
model, TRL's `SFTTrainer` (what it does each step is set in `training_arguments`), the pretrained model's
gold-judge baseline, training with a gold-judge evaluation at every eval, then the hand-off to `final/`.

The loss falls on assistant tokens only: the chat template marks each assistant reply, end-of-turn token
included, with `{% generation %}`, and TRL turns every other token's label into -100. So the model learns to
answer and to stop, never to imitate the user.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback, set_seed
from trl import SFTConfig

from data.loading import DataError, DatasetSpec, load_dataset_for, source_fingerprints
from pipeline.checkpoint import (CheckpointError, atomic_dir, check_resume_settings, checkpoint_stage,
                                 checkpoint_step, copy_launch_records, mark_final, mark_in_training, output_id,
                                 replace_dir, resume_settings, save_final, write_text_atomic)
from pipeline.config import ConfigError, FieldError
from pipeline.evaluation import EvalResult, evaluate_policy, family_table, load_judge, load_prompts
from pipeline.generation import SamplingConfig, stop_token_ids
from pipeline.model import POLICY_STAGES, LoraSpec, check_length_fits, check_lora_can_train, count_parameters, \
    fp32_forward, load_causal_lm, set_special_token_ids
from pipeline.runs import StageConfig, check_world_lineage, init_checkpoint, parse_stage_args, stage_paths, world_dir
from pipeline.runs import distributed_launch, learned_world_data, resolve_precision, run_main, start_checkpoints, \
    weights_sharded, whole_weights_unsaved, world_lineage, write_resolved_config
from pipeline.tokenizer import ADDED_ROLE_TOKENS, check_chat_prompts, load_tokenizer, trl_masks_replies
from pipeline.tracking import Tracker, TrackerCallback
from stages.sft.trainer_parts import (ProgressBar, RecordResumeSettings, StageSFTTrainer,
                                      StopOnNonFiniteGradients, TrainingTime, check_resumable,
                                      conversation_refusals_named, finished_steps, replies_cut, resume_checkpoint,
                                      resume_settings_record, trains_a_token, with_reply_masks)


@dataclass
class SFTStageConfig(StageConfig):
    data: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="world:sft_train"))
    """Chat demonstrations (schema `sft`: `messages`, or `prompt` + `completion`): the world's noisy demos by
    default, or local files, or a hub dataset."""
    eval_data: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="world:sft_eval"))
    """Held-out demonstrations for the eval loss (the world's are always clean)."""
    max_length: int = 256
    """Tokens per example; longer conversations are cut at the end. The block length when packing."""
    packing: bool = False
    """Pack whole examples into max_length blocks (best-fit decreasing). TRL flattens a batch into one sequence
    whose position ids restart at each example, and attention stays within an example (a test checks). No pad
    tokens: on tiny, 1.65x faster on the CPU at the same gold. With packing, batch_size counts blocks."""
    group_by_length: bool = False
    """Batch demonstrations of similar length together (transformers' length-grouped sampler: sorted within
    random windows of 50 batches), so batches carry little padding. Random batches of the world's demos are
    about half padding: on tiny, grouping runs the same 752 steps in 103 s instead of 266 s, but gold falls from
    0.740 to 0.724 (facts 0.825 -> 0.70), since each batch then holds mostly one task family. Off by default."""
    batch_size: int = 32
    """Examples (or packed blocks) per process per micro-step; also the eval batch size."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (effective batch = batch_size * grad_accum * processes)."""
    num_epochs: float = 1.0
    """Passes over the data, unless max_steps is set."""
    max_steps: int = -1
    """Optimizer steps; -1: num_epochs decides."""
    learning_rate: float = 1e-3
    """Peak learning rate, then cosine decay to 0. Tiny models from scratch want ~1e-3; a 100M+ model ~5e-5;
    LoRA ~10x the full-fine-tuning rate."""
    warmup_ratio: float = 0.05
    """Fraction of the steps (below 1) spent warming the learning rate up linearly."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower. For big models or max_length."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    eval_every: int = 100
    """Steps between evaluations: the eval loss and the gold-judge evaluation. The last step is always one."""
    log_every: int = 10
    checkpoint_every: int = 200
    """Steps between resumable checkpoints (weights, optimizer, scheduler, RNG) in checkpoints/."""
    keep_checkpoints: int = 2
    gold_eval_prompts: int = 100
    """Held-out world prompts (the first N of eval_prompts.jsonl) answered and scored by the gold judge at
    every evaluation, and by the pretrained model once as the baseline. 0: off."""
    gold_sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=0.0))
    """How evaluation answers are sampled. Greedy by default: the policy's best guess, repeatable."""
    gold_batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.warmup_ratio < 1.0:  # transformers reads a warmup of 1 or more as a step count
            raise FieldError("warmup_ratio", f"must be a fraction of the steps in [0, 1), got {self.warmup_ratio}")
        if self.max_length < 2:  # a prompt token and a reply token at least; 0 failed inside TRL
            raise FieldError("max_length", f"must be 2 or more, got {self.max_length}")
        if self.max_steps <= 0 and self.num_epochs <= 0:  # the Trainer would stop with a traceback
            raise FieldError(("num_epochs", "max_steps"), f"with max_steps {self.max_steps} (off), num_epochs "
                                                          f"decides: it must be above 0, got {self.num_epochs}")
        if self.max_steps <= 0 and self.data.streaming:  # (so would the Trainer: no length to count epochs by)
            raise FieldError(("data.streaming", "max_steps"), "a streamed dataset has no length to count epochs by: "
                                                              "set max_steps")


def training_arguments(cfg: SFTStageConfig, checkpoints_dir: Path) -> SFTConfig:
    """Our config as TRL's: assistant-only loss, checkpoints under runs/<run>/sft/, our tracking only."""
    precision = resolve_precision(cfg)
    return SFTConfig(
        output_dir=str(checkpoints_dir), seed=cfg.seed, assistant_only_loss=True,
        max_length=cfg.max_length, packing=cfg.packing,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_ratio,  # the schedule: StageSFTTrainer
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
        bf16=precision == "bf16", fp16=precision == "fp16", activation_checkpointing=cfg.activation_checkpointing,
        # transformers refuses bf16 without a GPU unless told the run is on the CPU
        use_cpu=precision == "bf16" and not torch.cuda.is_available(),
        eval_strategy="steps", eval_steps=cfg.eval_every, logging_steps=cfg.log_every, logging_first_step=True,
        save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=max(1, cfg.keep_checkpoints),
        # one tracking path for every stage: TrackerCallback, not the Trainer's integrations
        report_to="none", include_num_input_tokens_seen="non_padding", disable_tqdm=False,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (and stops the run), not as earlier losses' mean
        dataloader_pin_memory=torch.cuda.is_available(),
        # every parameter takes part in the loss: the Trainer's default (True without gradient checkpointing) costs
        # DDP a traversal of the autograd graph every step, and a warning per rank saying so
        ddp_find_unused_parameters=False)


class GoldEval(TrainerCallback):
    """At each evaluation the policy answers held-out world prompts and the gold judge scores the answers.

    Runs on the main process only (the other ranks wait at their next collective). Logs `<prefix>/score`,
    per criterion (`<prefix>/correctness`, ...) and per family (`<prefix>/<family>/score|correctness`), and a
    table of prompt / response / score. The prefix is `gold` during training and `baseline` for the
    pretrained model.
    """

    def __init__(self, cfg: SFTStageConfig, rows: list[dict], world: Path | None, tokenizer, tracker: Tracker):
        self.cfg, self.rows, self.tokenizer, self.tracker = cfg, rows, tokenizer, tracker
        self.judge = load_judge(world) if rows else None
        self.result: EvalResult | None = None
        self.last_eval_step, self.eval_loss = -1, float("nan")

    def run(self, model, step: int, prefix: str, log: bool = True) -> EvalResult:
        """`log`: False when a resumed run recomputes what its first launch already logged (the baseline)."""
        with fp32_forward(model) as plain:  # as a plain from_pretrained load answers
            result = evaluate_policy(plain, self.tokenizer, self.rows, self.judge, self.cfg.gold_sampling,
                                     self.cfg.gold_batch_size, seed=self.cfg.seed)
        if log:
            self.tracker.log(renamed(result.summary, prefix), step=step, console=False)
            self.tracker.table(f"{prefix}/samples", ["prompt", "family", "response", "gold_score"],
                               [[s["prompt"], s["family"], s["response"], s["gold_score"]] for s in result.samples],
                               step=step)
        s = result.summary
        tqdm.write(f"[sft] step {step} | {prefix} score {s['gold/score']:.3f} | correctness "
                   f"{s['gold/correctness']:.3f} | eos_rate {s['eos_rate']:.2f} on {len(self.rows)} held-out prompts"
                   f" | e.g. {result.samples[0]['prompt']!r} -> {result.samples[0]['response']!r}")
        return result

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        self.last_eval_step, self.eval_loss = state.global_step, (metrics or {}).get("eval_loss", float("nan"))
        if state.is_world_process_zero and self.rows:
            self.result = self.run(model, state.global_step, "gold")


def renamed(summary: dict[str, float], prefix: str) -> dict[str, float]:
    """evaluate_policy's keys under `prefix/`: gold/score -> baseline/score, eos_rate -> baseline/eos_rate."""
    return {f"{prefix}/{key.removeprefix('gold/')}": value for key, value in summary.items()}


def comparison(sft: dict[str, float], pretrained: dict[str, float]) -> list[dict]:
    """Per family and overall: SFT's gold score and correctness next to the pretrained model's, and the
    correctness of blind guessing (`chance`)."""
    rows = [{"family": family, "sft_score": score, "pretrained_score": pretrained[f"gold/{family}/score"],
             "sft_correctness": correct, "pretrained_correctness": pretrained[f"gold/{family}/correctness"],
             "chance": sft[f"gold/{family}/chance"]}
            for family, score, correct in family_table(sft)]
    rows.append({"family": "overall", "sft_score": sft["gold/score"], "pretrained_score": pretrained["gold/score"],
                 "sft_correctness": sft["gold/correctness"],
                 "pretrained_correctness": pretrained["gold/correctness"], "chance": sft["gold/chance"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    cfg: SFTStageConfig = parse_stage_args(SFTStageConfig, argv, __doc__, "stages.sft", "sft.yaml")
    paths = stage_paths(cfg, "sft")
    # FSDP / ZeRO-3: the Trainer trains and saves sharded weights; our evaluation samples on the main process
    sharding = weights_sharded()
    if sharding and cfg.gold_eval_prompts:
        raise ConfigError(f"key 'gold_eval_prompts': the gold-judge evaluation samples on the main process with the "
                          f"whole model, which {sharding} does not hold there; set gold_eval_prompts=0")
    if sharding and cfg.lora.enabled:
        raise ConfigError(f"key 'lora.enabled': merging the adapters into final/ needs the whole model on the main "
                          f"process, which {sharding} does not hold there; launch LoRA with DDP")
    if sharding and (unsaved := whole_weights_unsaved()):
        raise ConfigError(f"sft under {sharding}: final/ would get no model weights, since {unsaved}")
    # first: the arguments set the distributed state up (CPU DDP included) and ZeRO-3's sharded loading
    arguments = training_arguments(cfg, paths.checkpoints)
    state = PartialState()
    set_seed(cfg.seed)

    # ---- the starting checkpoint: upstream pretrain/final/ or any HF causal LM; a reward model is refused
    init = init_checkpoint(cfg, "sft", POLICY_STAGES)

    # ---- data: validated before any model loads, so bad input fails fast
    uses_world = cfg.gold_eval_prompts > 0 or any(s.path.startswith("world:") for s in (cfg.data, cfg.eval_data))
    with state.main_process_first():
        world = world_dir(cfg) if uses_world else None
    train_data = load_dataset_for(cfg.data, "sft", world_dir=world, key="data")
    eval_data = load_dataset_for(cfg.eval_data, "sft", world_dir=world, key="eval_data")
    if not cfg.data.path.startswith("world:") and cfg.eval_data.path.startswith("world:") and state.is_main_process:
        print(f"[sft] note: training on {cfg.data.path}, but eval_data is still {cfg.eval_data.path}: eval/loss "
              "measures the synthetic world. Set eval_data to held-out rows of your data.")
    gold_rows = load_prompts(world / "eval_prompts.jsonl", cfg.gold_eval_prompts) if cfg.gold_eval_prompts else []
    check_world_lineage(cfg, init, world, "sft")

    # ---- tokenizer (with our chat template unless the checkpoint has its own) and model
    tokenizer = load_tokenizer(init, cfg.trust_remote_code)
    if gold_rows:  # the gold judge's prompts, which it answers before it trains and at each evaluation
        check_chat_prompts(tokenizer, f"{init} (key 'init_from')", [(gold_rows, str(world / "eval_prompts.jsonl"))])
    model = load_causal_lm(init, "sft", cfg.trust_remote_code, tokenizer=tokenizer)
    set_special_token_ids(model, tokenizer)
    check_length_fits(model, cfg.max_length, "max_length")
    if cfg.lora.enabled:
        check_lora_can_train(tokenizer, init)

    upstream = {checkpoint_stage(init) or "init": Path(init)} if Path(init).exists() else None
    checkpoint = resume_checkpoint(paths.checkpoints, state.is_main_process) if cfg.resume else None
    # the data each step reads; and what the restored optimizer and scheduler state would overrule without a word
    # (the peak learning rate, weight decay) and the saved adapter config (lora.*). A new max_steps or warmup
    # reshapes the schedule from where it is, as in the other stages.
    settings = resume_settings(cfg, ("batch_size", "grad_accum", "seed", "max_length", "packing", "num_epochs",
                                     "group_by_length", "data", "learning_rate", "weight_decay", "lora"),
                               state.num_processes)
    if checkpoint is not None:
        check_resume_settings(checkpoint, resume_settings_record(checkpoint), settings)
        check_resumable(checkpoint, sharded=distributed_launch() is not None)
    lineage = world_lineage("sft", learned_world_data(world, cfg.data), init)
    mark_in_training(model, "sft", lineage)

    # ---- the trainer: the conversations are tokenized with the chat template, every label but the trained replies
    # masked (StageSFTTrainer, as TRL would). Built (and so checked) before the earlier run's checkpoints are set
    # aside: a bad setting must leave them for a resume
    peft_config = cfg.lora.peft_config("CAUSAL_LM", model) if cfg.lora.enabled else None
    sources = [(train_data, cfg.data.path), (eval_data, cfg.eval_data.path)]  # a stream is tokenized as it is read
    with conversation_refusals_named(tokenizer, init, sources):
        # no {% generation %} markers TRL can use (or patch in), or none that take in the end-of-turn token
        if not trl_masks_replies(tokenizer):
            train_data, eval_data = (with_reply_masks(data, tokenizer, init, spec.path)
                                     for data, spec in ((train_data, cfg.data), (eval_data, cfg.eval_data)))
            arguments.assistant_only_loss = False  # TRL builds the labels from our assistant_masks column instead
        trainer = StageSFTTrainer(model=model, args=arguments, train_dataset=train_data, eval_dataset=eval_data,
                                  processing_class=tokenizer, peft_config=peft_config,
                                  data_sources={"train": cfg.data.path, "eval": cfg.eval_data.path})
    for data, spec in ((trainer.train_dataset, cfg.data), (trainer.eval_dataset, cfg.eval_data)):
        # none left (the Trainer would fail on an empty dataloader), or, packed (TRL keeps the rows it cuts), none
        # with a trained token: the run trained on nothing and reported an eval loss of 0
        if isinstance(data, Dataset) and not trains_a_token(data):
            raise DataError(spec.path, f"no demonstration left: each has no assistant token within "
                                       f"max_length={cfg.max_length} (TRL cuts each at max_length, and drops or, "
                                       "packing, keeps those); raise max_length")

    start_checkpoints(paths.checkpoints, checkpoint, lineage, "sft", state.is_main_process,
                      starts_from={"init checkpoint": output_id(init),
                                   **(source_fingerprints(data=cfg.data) if checkpoint or state.is_main_process
                                      else {})})
    tracker = Tracker(cfg, "sft", paths.metrics_file, state.is_main_process, upstream=upstream,
                      start_step=checkpoint_step(Path(checkpoint)) if checkpoint else 0)
    if state.is_main_process:
        write_resolved_config(cfg, paths)
    gold = GoldEval(cfg, gold_rows, world, tokenizer, tracker)
    nan_guard = StopOnNonFiniteGradients()
    nan_guard.scaler = trainer.accelerator.scaler
    # gold first: its time is not training time
    for callback in (gold, TrackerCallback(tracker), nan_guard, RecordResumeSettings(settings)):
        trainer.add_callback(callback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBar())

    if state.is_main_process:
        n_params, n_trainable = count_parameters(trainer.model), count_parameters(trainer.model, trainable_only=True)
        sizes = [f"{len(d):,}" if isinstance(d, Dataset) else "streamed" for d in (train_data, eval_data)]
        kept = trainer.train_dataset
        if not cfg.packing and isinstance(train_data, Dataset) and len(kept) < len(train_data):
            # TRL cuts each conversation to max_length and drops those left with no assistant token
            print(f"[sft] warning: {len(train_data) - len(kept):,} of {len(train_data):,} demonstrations dropped: "
                  f"no assistant token within max_length={cfg.max_length} (raise max_length to keep them)")
            sizes[0] = f"{len(kept):,}"
        if not cfg.packing and isinstance(eval_data, Dataset):
            sizes[1] = f"{len(trainer.eval_dataset):,}"  # held out and evaluated: TRL drops the same rows there
        if not cfg.packing and isinstance(kept, Dataset):
            cut, looked = replies_cut(kept, cfg.max_length, stop_token_ids(model, tokenizer), cfg.seed)
            if cut:
                of = f"{looked:,}" if looked == len(kept) else f"a sample of {looked:,}"
                print(f"[sft] warning: {cut:,} of {of} demonstrations have a reply cut at max_length="
                      f"{cfg.max_length} before its end-of-turn token: the model learns replies that run on (raise "
                      "max_length)")
        tracker.summary({"model/parameters": n_params, "model/trainable_parameters": n_trainable})
        print(f"[sft] {n_params / 1e6:.2f}M parameters ({n_trainable / 1e6:.2f}M trainable) from {init}; "
              f"{sizes[0]} demonstrations, {sizes[1]} held out"
              + (f"; resuming from {checkpoint}" if checkpoint else ""))
        if cfg.resume and checkpoint is None:
            print(f"[sft] resume=true but no checkpoint in {paths.checkpoints}: starting from {init}")
        if cfg.packing and torch.cuda.is_available():
            # TRL flattens a packed batch into one row; without flash attention a dense batch-wide mask keeps each
            # example's attention to itself, at the cost of attending over the whole batch
            print(f"[sft] note: packing flattens each micro-batch into one row of up to {cfg.batch_size} x "
                  f"{cfg.max_length} tokens under a block-diagonal mask: attention then costs as for that whole "
                  "row. With long max_length, packing=false (group_by_length=true against padding) may be faster.")

    # ---- the baseline: the pretrained model, prompted exactly as the SFT model will be
    baseline = gold.run(trainer.model, 0, "baseline", log=checkpoint is None) \
        if state.is_main_process and gold_rows else None

    # ---- training: logging, evaluation (eval loss + gold judge) and checkpoints happen inside
    timer = TrainingTime(checkpoint)
    trainer.add_callback(timer)
    if checkpoint is not None and not distributed_launch() and finished_steps(checkpoint, trainer):
        trainer.restore_finished(checkpoint)  # (FSDP, DeepSpeed: weights load inside train(), with the extra step)
    else:
        with conversation_refusals_named(tokenizer, init, sources):
            trainer.train(resume_from_checkpoint=checkpoint)
    train_seconds = timer.seconds()
    if gold.last_eval_step != trainer.state.global_step:  # resumed at the end: nothing trained, still report
        tracker.muted = True  # the launch that trained logged this step's evaluation already
        trainer.evaluate()

    # ---- the hand-off: a plain HF checkpoint (LoRA merged in) with the chat template, and the figures
    state.wait_for_everyone()
    tokenizer.init_kwargs.pop(ADDED_ROLE_TOKENS, None)  # trained in full now (LoRA on them was refused)
    if sharding:  # every rank takes part in the Trainer's save, which gathers the weights; the main one writes
        staging = paths.root / ".tmp-final-gathered"
        if state.is_main_process:  # what a save killed midway left
            shutil.rmtree(staging, ignore_errors=True)
        state.wait_for_everyone()
        mark_final(trainer.accelerator.unwrap_model(trainer.model), "sft", lineage)
        trainer.save_model(str(staging))
        if state.is_main_process:
            if not any((staging / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
                raise CheckpointError(f"sft: the Trainer's save under {sharding} wrote no whole weights (its warning "
                                      f"above says why); {paths.final} is left as it was")
            (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle: final/ holds safetensors only
            tokenizer.save_pretrained(staging)
            copy_launch_records(staging, paths.launch_records)
            replace_dir(staging, paths.final)
    elif state.is_main_process:
        model = trainer.model
        if cfg.lora.enabled:
            with atomic_dir(paths.root / "adapter") as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            model = model.merge_and_unload()
        save_final(model, tokenizer, paths.final, "sft", world_data=lineage, launch_records=paths.launch_records)
    if state.is_main_process:
        report = {"step": trainer.state.global_step, "eval_loss": gold.eval_loss, "train_seconds": train_seconds}
        tracker.summary({"eval/final_loss": gold.eval_loss, "time/train_seconds": train_seconds})
        if gold.result is not None:
            rows = comparison(gold.result.summary, baseline.summary)
            report.update(prompts=len(gold_rows), families=rows, sft=gold.result.summary,
                          pretrained=baseline.summary, samples=gold.result.samples)
            tracker.summary({f"sft_vs_pretrained/{r['family']}/{k}": v for r in rows for k, v in r.items()
                             if k != "family"})
            print(f"[sft] gold judge on {len(gold_rows)} held-out world prompts, pretrained -> SFT:")
            print(f"  {'family':<20} {'gold score':>18} {'correctness':>18} {'chance':>8}")
            for r in rows:
                print(f"  {r['family']:<20} {r['pretrained_score']:>8.3f} -> {r['sft_score']:<6.3f}"
                      f" {r['pretrained_correctness']:>8.3f} -> {r['sft_correctness']:<6.3f} {r['chance']:>8.3f}")
        write_text_atomic(paths.root / "eval.json", json.dumps(report, indent=1) + "\n")
        print(f"[sft] eval loss {gold.eval_loss:.4f} after {trainer.state.global_step} steps "
              f"({train_seconds:.0f}s); checkpoint in {paths.final}")
        tracker.finish(paths.final)
    state.wait_for_everyone()


if __name__ == "__main__":
    run_main(main)
