"""The pieces SFT plugs into TRL's SFTTrainer: a length-grouped order a resume reproduces, the checkpoint a resume
takes up (and a finished one without the Trainer's extra step), reply masks for chat templates TRL cannot mark,
the settings record beside each checkpoint, the NaN guard and the progress bar. The recipe is stages/sft/sft.py.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
from datasets import Dataset, IterableDataset
from transformers import ProgressCallback, TrainerCallback, TrainerState
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer
from trl.data_utils import common_prefix_length, get_dataset_column_names
from trl.trainer.utils import global_then_local_main_first

from data.loading import DataError
from pipeline.checkpoint import CheckpointError, check_not_past, checkpoint_step, list_checkpoints, \
    write_text_atomic
from pipeline.config import ConfigError
from pipeline.runs import STARTS_FROM_FILE
from pipeline.schedule import warmup_cosine_scheduler
from pipeline.tokenizer import TemplateError, reply_masks, template_refusals_named
from pipeline.tracking import stop_if_not_finite


RESUME_SETTINGS_FILE = "pipeline_resume_settings.json"  # beside each Trainer checkpoint (RecordResumeSettings)
TRAIN_SECONDS_FILE = "pipeline_train_seconds.json"  # beside each Trainer checkpoint (TrainingTime)


class EpochSeededSampler(torch.utils.data.Sampler):
    """transformers' length-grouped sampler, drawing each epoch's order from seed + epoch. Left alone it draws from
    the global RNG as an epoch starts, which a resumed run has not restored by then: the resumed epoch read another
    order than the interrupted one, and skipped the wrong batches. (The random strategy's sampler is accelerate's
    seeded one already.)"""

    def __init__(self, sampler: LengthGroupedSampler, seed: int):
        self.sampler, self.seed = sampler, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:  # SamplerEpoch calls it as each epoch begins
        self.sampler.generator = torch.Generator().manual_seed(self.seed + epoch)

    def __iter__(self):
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class SamplerEpoch(TrainerCallback):
    """Gives the trainer's EpochSeededSampler each epoch's number as the epoch begins. The data loader's set_epoch
    reaches a sampler two wrappers down; under DDP a resume adds a third (accelerate's batch skipping), so the
    resumed epoch read epoch 0's order."""

    def __init__(self, trainer: StageSFTTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state: TrainerState, control, **kwargs):
        if self.trainer.epoch_seeded_sampler is not None:  # (a resumed state's epoch is mid-way: 6.43 is epoch 6)
            self.trainer.epoch_seeded_sampler.set_epoch(int(state.epoch + 1e-6))


class StageSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with a length-grouped order that a resume reproduces (EpochSeededSampler), the stages'
    learning-rate schedule, a held-out loss per token, and the replies of a demonstration's prompt left untrained
    (completion_masks). `data_sources`: where the "train" and "eval" data come from, for errors that name a row."""

    def __init__(self, *args, data_sources: dict[str, str] | None = None, **kwargs):
        self.data_sources = data_sources or {}  # read while the parent tokenizes the datasets
        self.epoch_seeded_sampler: EpochSeededSampler | None = None
        super().__init__(*args, **kwargs)
        self.add_callback(SamplerEpoch(self))

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """Demonstrations as data.loading gives them are tokenized here, not by TRL: TRL would train every reply in
        `messages`, those of a prompt + completion row's prompt too. It then builds the labels from our masks,
        truncates and packs as it does."""
        columns = get_dataset_column_names(dataset)
        if args.assistant_only_loss and PROMPT_TURNS in columns:
            with global_then_local_main_first():  # as TRL tokenizes: one process per node writes the cache
                dataset = dataset.map(completion_masks, with_indices=True, remove_columns=columns,
                                      fn_kwargs={"tokenizer": processing_class, "chat_template": self.chat_template,
                                                 "source": self.data_sources.get(dataset_name, dataset_name)})
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Cosine after a warmup that starts above 0 (pipeline.schedule): transformers' first step learnt nothing."""
        if self.lr_scheduler is None:
            self.lr_scheduler = warmup_cosine_scheduler(optimizer or self.optimizer,
                                                        self.args.get_warmup_steps(num_training_steps),
                                                        num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """A forward of our own that adds up each row's token losses: the Trainer averages batch means over
        examples, so its eval_loss moved with the eval batch size and the number of processes. gather_for_metrics
        leaves out the rows DDP repeats to even out the ranks' last batches. (TRL's own eval pass gives no rows,
        and asked for its outputs it runs the model a second time.)"""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            logits = model(**{k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")},
                           use_cache=False).logits
        rows = row_token_losses(logits, inputs)
        self._eval_sums += torch.stack([part.sum() for part in self.accelerator.gather_for_metrics(rows)])
        loss = rows[0].sum() / rows[1].sum().clamp(min=1)
        return (loss, None, None) if prediction_loss_only else (loss, logits, inputs.get("labels"))

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums = torch.zeros(3, device=self.args.device)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        total, tokens, correct = self._eval_sums.tolist()  # gathered from every rank already
        if tokens:
            output.metrics[f"{metric_key_prefix}_loss"] = total / tokens
            output.metrics[f"{metric_key_prefix}_mean_token_accuracy"] = correct / tokens
        return output

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            sampler = self.epoch_seeded_sampler = EpochSeededSampler(sampler, self.args.seed)
        return sampler

    def _issue_warnings_after_load(self, load_result) -> None:
        """Without the tied weights a checkpoint leaves out (a tied LM head is saved once, as the embeddings):
        transformers named them "missing keys" on every resume, though the resumed weights are whole."""
        tied = set(getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {})
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result)

    def restore_finished(self, checkpoint: str) -> None:
        """Take up a checkpoint at or past max_steps without training: train() would take one step past it first
        (transformers checks the limit only after a step), and write that step's checkpoint and metrics."""
        self._load_from_checkpoint(checkpoint)
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))


def row_token_losses(logits: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's summed next-token loss, number of trained tokens, and how many of them the model ranks first."""
    if inputs.get("shift_labels") is not None:
        targets = inputs["shift_labels"]
    else:
        targets, logits = inputs["labels"][..., 1:], logits[:, :-1]
    sums, correct = [], []
    for row_logits, row_targets in zip(logits, targets):  # a row at a time: fp32 logits of one row, not the batch
        trained = row_targets != -100
        predicted, wanted = row_logits[trained].float(), row_targets[trained]
        sums.append(torch.nn.functional.cross_entropy(predicted, wanted, reduction="sum"))
        correct.append((predicted.argmax(-1) == wanted).sum())
    return torch.stack(sums), (targets != -100).sum(-1).float(), torch.stack(correct).float()


PROMPT_TURNS = "prompt_turns"  # data.loading's count of the messages that are a demonstration's prompt


def completion_masks(row: dict, index: int, tokenizer, chat_template: str | None, source: str) -> dict:
    """A conversation tokenized as TRL tokenizes it for its assistant-only loss (the replies marked by the template's
    {% generation %}; `chat_template`: TRL's training template, or None for the tokenizer's own), with the replies in
    its first `prompt_turns` messages unmarked. Like TRL's prompt-completion data, the completion starts where the
    prompt, rendered with the generation prompt, and the whole conversation part."""
    messages, prompt_turns = row["messages"], row.get(PROMPT_TURNS) or 0
    encoded = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, masks = encoded["input_ids"], encoded["assistant_masks"]
    if 1 not in masks:  # TRL's own check, which tokenizing here bypasses
        raise DataError(source, "the chat template marks no reply of this conversation as the assistant's: check "
                                "its {% generation %} markers", row=index + 1, column="messages")
    if prompt_turns:  # as TRL's prompt-completion rule: a template may mark the generation prompt's last newline
        prompt = tokenizer.apply_chat_template(messages[:prompt_turns], chat_template=chat_template, tokenize=True,
                                               return_dict=True, add_generation_prompt=True)["input_ids"]
        start = common_prefix_length(prompt, ids)
        masks = [0] * start + masks[start:]
    return {"input_ids": ids, "assistant_masks": masks}


def with_reply_masks(data: Dataset | IterableDataset, tokenizer, init: str, source: str
                     ) -> Dataset | IterableDataset:
    """The conversations tokenized, each reply marked for the loss (reply_masks; not those of a prompt + completion
    row's prompt), for a chat template TRL cannot mark itself. A conversation the template does not render reply by
    reply is refused by key, with its row."""
    def masked(row: dict, index: int) -> dict:
        try:
            return reply_masks(tokenizer, row["messages"], row.get(PROMPT_TURNS) or 0)
        except TemplateError as e:
            raise ConfigError(f"key 'init_from': {init}: {e} (conversation of row {index + 1} in {source}), and "
                              "has no {% generation %} markers TRL could use. Give its tokenizer a chat template "
                              "with them around each reply") from None

    first = next(iter(data))
    masked(first, 0)  # a template we cannot read at all fails before the model trains
    return data.map(masked, with_indices=True, remove_columns=list(first))


def replies_cut(data: Dataset, max_length: int, stop_token_ids: list[int], seed: int,
                sample: int = 2000) -> tuple[int, int]:
    """(rows of TRL's tokenized, unpacked data whose reply max_length cut before its end-of-turn token, rows looked
    at): such a row ends at max_length on a trained token that is not a stop token. A sample of a large dataset."""
    looked = data if len(data) <= sample else data.select(sorted(random.Random(seed).sample(range(len(data)), sample)))
    cut = sum(len(row["input_ids"]) >= max_length and row["labels"][-1] != -100
              and row["input_ids"][-1] not in stop_token_ids for row in looked)
    return cut, len(looked)


def trains_a_token(data: Dataset) -> bool:
    """Whether a row of TRL's prepared data (its masks folded into `labels`, packed or not) has a token in the loss;
    the first such row ends the scan."""
    if "labels" not in data.column_names:
        return len(data) > 0
    return any(any(label != -100 for label in labels) for labels in data["labels"])


def conversation_refusals_named(tokenizer, init: str, datasets: list[tuple[Dataset | IterableDataset, str]]):
    """Around tokenizing `datasets` ((data, source) pairs), inside TRL or our reply masks: a conversation the chat
    template of `init` refuses is named by its file and row (a stream is tokenized as it is read, also during
    training)."""
    def render(row: dict) -> str:
        return tokenizer.apply_chat_template(row["messages"], tokenize=False)

    return template_refusals_named(f"{init} (key 'init_from')", datasets, render, "messages")


def resume_checkpoint(checkpoints_dir: Path, is_main_process: bool) -> str | None:
    """The newest Trainer checkpoint whose trainer_state.json parses (and, where the run records them, with our
    settings record beside it, written after). The Trainer writes that file last, but
    not atomically: a run killed while saving leaves a checkpoint without it, or with it empty or cut short.
    The main process deletes such a checkpoint, since the Trainer's rotation would count it as the newest and
    delete finished ones in its place."""
    def saved(path: Path) -> bool:
        try:
            return isinstance(json.loads((path / "trainer_state.json").read_text()).get("global_step"), int)
        except (OSError, ValueError, AttributeError):
            return False

    found = list_checkpoints(checkpoints_dir)
    # our settings record comes after the Trainer's state: where the run writes it, a checkpoint without it was
    # cut short too (and would resume unchecked). Checkpoints from before the record existed have none; a run
    # that writes it also wrote starts_from.json at its start (its first checkpoint may be the one cut short).
    # A run that records its settings for all its checkpoints at its start (RecordResumeSettings) is checked
    # against that: the Trainer deletes the older checkpoints before the newest gets its own record, so a kill
    # in between would otherwise leave no checkpoint to resume from.
    recorded = (Path(checkpoints_dir) / STARTS_FROM_FILE).is_file() or \
        any((p / RESUME_SETTINGS_FILE).is_file() for p in found)

    def finished(path: Path) -> bool:
        return saved(path) and (not recorded or resume_settings_record(path) is not None)

    done = [p for p in found if finished(p)]
    if is_main_process:
        for unfinished in sorted(set(found) - set(done)):
            print(f"[sft] removing {unfinished}: cut short while it was saved (no complete trainer_state.json"
                  + (f" and {RESUME_SETTINGS_FILE})" if recorded else ")"))
            shutil.rmtree(unfinished, ignore_errors=True)
    return str(done[-1]) if done else None


def check_resumable(checkpoint: str, sharded: bool) -> None:
    """The files a Trainer resume reads, there and whole. Without optimizer.pt or scheduler.pt the Trainer resumes
    with a fresh optimizer and the learning-rate warmup begun again, without a word; a file cut short fails deep in
    torch or safetensors without its name. `sharded`: FSDP and DeepSpeed save optimizer state their own way."""
    import zipfile

    from safetensors import safe_open

    path = Path(checkpoint)
    fix = "remove that checkpoint directory to resume from the one before it, or set resume=false to start afresh"
    needed = [] if sharded else ["optimizer.pt", "scheduler.pt"]
    for name in needed:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"sft: cannot resume from {path}: {name} is missing; {fix}")
        if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; one cut short has lost its directory
            raise CheckpointError(f"sft: cannot resume from {path}: {file} is cut short or corrupt; {fix}")
    weights = [path / n for n in ("model.safetensors", "adapter_model.safetensors") if (path / n).is_file()]
    for file in weights:
        try:
            with safe_open(str(file), "pt"):  # checks that the header's tensors cover the file exactly
                pass
        except Exception as e:
            raise CheckpointError(f"sft: cannot resume from {path}: {file} is cut short or corrupt ({e}); "
                                  f"{fix}") from None


def finished_steps(checkpoint: str, trainer: SFTTrainer) -> bool:
    """Whether the checkpoint is at this run's last step: max_steps, or the last step of num_epochs as the Trainer
    counts it (not the one the checkpoint's run recorded: that run may have stopped by max_steps). One past it is
    refused (check_not_past): restored, it was saved as final/."""
    last = trainer.args.max_steps
    if last <= 0:
        last = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    check_not_past(checkpoint, last, "max_steps" if trainer.args.max_steps > 0 else "num_epochs")
    return checkpoint_step(Path(checkpoint)) >= last


class ProgressBar(ProgressCallback):
    """The Trainer's tqdm bar with the latest loss as postfix; the Tracker prints the log lines themselves."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and "loss" in (logs or {}):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}", refresh=False)


def resume_settings_record(checkpoint: str | Path) -> dict | None:
    """The settings a resume from `checkpoint` must share: its own record, else the one its run wrote for all its
    checkpoints at its start (the settings a resume may not change are those of the whole run)."""
    for record in (Path(checkpoint) / RESUME_SETTINGS_FILE, Path(checkpoint).parent / RESUME_SETTINGS_FILE):
        if record.is_file():
            return json.loads(record.read_text())
    return None


class RecordResumeSettings(TrainerCallback):
    """The settings a resume must share (resume_settings), for the run's checkpoints at its start and beside each
    one: the Trainer itself resumes under another batch size or process count without a word, reading other data
    per step."""

    def __init__(self, settings: dict):
        self.settings = settings

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # after start_checkpoints set an earlier run's aside
            write_text_atomic(Path(args.output_dir) / RESUME_SETTINGS_FILE, json.dumps(self.settings) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_text_atomic(checkpoint / RESUME_SETTINGS_FILE, json.dumps(self.settings) + "\n")


class TrainingTime(TrainerCallback):
    """The run's training time over every launch a resume joins (eval.json's train_seconds): each checkpoint keeps
    the time up to it, which the Trainer's state does not, and a resume adds on from there. Made as training
    starts."""

    def __init__(self, checkpoint: str | None):
        self.before, self.started = 0.0, time.perf_counter()
        if checkpoint and (Path(checkpoint) / TRAIN_SECONDS_FILE).is_file():
            self.before = float(json.loads((Path(checkpoint) / TRAIN_SECONDS_FILE).read_text())["train_seconds"])

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.started

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_text_atomic(checkpoint / TRAIN_SECONDS_FILE, json.dumps({"train_seconds": self.seconds()}) + "\n")


class StopOnNonFiniteGradients(TrainerCallback):
    """Stop before the optimizer step on a NaN/inf gradient, as the other stages do (stop_if_not_finite). The
    Trainer would apply it, save the NaN weights at the next checkpoint, and log the loss as the mean of earlier
    ones. The squared norm is summed over ranks (sharded gradients under FSDP), so every rank stops alike."""

    def __init__(self):
        self.scaler = None  # the Trainer's fp16 GradScaler, once the Trainer exists: an overflow is its to handle

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # an FSDP2 gradient is a DTensor: its local shard (the sum over ranks below adds the shards up). Under
        # DeepSpeed the engine steps inside backward and keeps no .grad: nothing to check here, it is unguarded
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        squares = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(squares)
        stop_if_not_finite(squares.sqrt(), "sft", state.global_step + 1,
                           "Lower learning_rate or check the demonstrations.", self.scaler)
