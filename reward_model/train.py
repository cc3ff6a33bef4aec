"""Reward-model training: InstructGPT's K-way ranking loss on ranked responses, from the SFT backbone.

    python -m reward_model.train --config configs/tiny/rm.yaml [key=value ...]      (make rm)
    accelerate launch -m reward_model.train --config configs/gpu/rm.yaml

The backbone is the SFT model with a scalar head (`AutoModelForSequenceClassification`, num_labels=1), read
at the last non-pad token. Each prompt's K ranked responses are scored in one forward pass and the loss is the
mean of -log sigmoid(r_i - r_j) over its C(K,2) ordered pairs (`ranked_pairs_loss`): K forward passes per
prompt where expanding the ranking into independent pairs costs K(K-1), and a response is seen once per epoch,
not K-1 times, which is what InstructGPT found kept the RM from overfitting. Plain pairs are the K=2 case.

Reads top to bottom: config, ranked data (validated before any model is built), the backbone (fresh or
resumed, optionally with LoRA), optimizer and schedule, held-out evaluation, the training loop, then the
hand-off: final/ with the RM's mean and std over the held-out responses in its config (the SFT policy's
samples when collected; PPO normalises rewards with them), and eval.json with the held-out accuracy, the
agreement with gold and the annotator's noise ceiling.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from data.loading import DataError, DatasetSpec, load_dataset_for
from pipeline.checkpoint import (LAUNCH_RECORDS, load_training_state, mark_in_training, output_id,
                                 parameter_fingerprint, restore_scaler, resume_settings, save_final,
                                 save_training_checkpoint, scaler_state, write_text_atomic)
from pipeline.config import ConfigError, load_config
from pipeline.evaluation import load_judge
from pipeline.model import POLICY_STAGES, SCALAR_STAGES, check_length_fits, check_lora_can_train, fp32_forward, \
    load_scalar_model, resume_lora
from pipeline.runs import WORLD_DATA_FILE, accelerate_precision, check_world_lineage, checkpoint_to_resume, end_stage, \
    init_checkpoint, learned_world_data, parse_stage_args, require_ddp, run_main, stage_paths, start_checkpoints, \
    world_dir, world_lineage, write_resolved_config
from pipeline.schedule import warmup_cosine_scheduler
from pipeline.tokenizer import load_tokenizer, template_refusals_named
from pipeline.tracking import LogWindow, Throughput, Tracker, stop_if_not_finite
from reward_model.collect import question_of, split_indices
from reward_model.config import RewardModelConfig
from reward_model.losses import pack_groups, ranked_pairs_loss
from reward_model.metrics import (add_gold_criteria, best_and_rest, describe_accuracy, describe_by_criterion,
                                   distinct_reply_scores, headline_metrics, labeled_pairs, ranking_metrics,
                                   score_stats)
from reward_model.scoring import conversation_text, encode_conversations, sequence_scores


# what only collection reads: set for `make rm` (RM_ARGS, ARGS), they would be recorded in rm/config.yaml as if the
# rankings had been collected so
COLLECTION_KEYS = ("policy", "prompts", "max_prompts", "responses_per_prompt", "sampling", "max_prompt_tokens",
                   "generation_batch_size", "mix_static", "eval_fraction")


def check_collected_with(cfg: RewardModelConfig, prefs: Path) -> None:
    """Refuse collection settings other than those the run's rankings were collected with (prefs/ keeps that
    config): RM training does not read them."""
    record = prefs / LAUNCH_RECORDS["config.yaml"]
    try:
        collected = load_config(RewardModelConfig, record) if record.is_file() else None
    except ConfigError:  # written by another version of the stage: nothing to compare with
        collected = None
    if collected is None:
        return
    then, now = resume_settings(collected, COLLECTION_KEYS, 0), resume_settings(cfg, COLLECTION_KEYS, 0)
    changed = [key for key in now if now[key] != then.get(key)]
    if changed:
        raise ConfigError(
            "; ".join(f"key '{key}' is {now[key]} here, {then.get(key)} in the collected rankings" for key in changed)
            + f" ({record}). Collection reads it, not RM training, which records what its rankings were collected "
            f"with: give RM training their value (RM_ARGS, which make passes to collection too), or collect them "
            f"again with this one (make prefs PREFS_ARGS=\"{changed[0]}=...\")")


def load_rankings(cfg: RewardModelConfig, world: Path | None = None) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, where they came from); each row has `prompt` and `responses` best first,
    and `gold_scores` when known. Invalid data raises DataError naming the file, row and column. `world`: the
    run's world directory as it is (default: world_dir(cfg), which writes it when the settings changed)."""
    def the_world() -> Path:
        return world or world_dir(cfg)

    def load(spec: DatasetSpec, key: str) -> list[dict]:
        return [dict(row) for row in load_dataset_for(spec, "preferences", world_dir=the_world()
                                                      if spec.path.startswith("world:") else None, key=key)]

    if cfg.train_data is None:
        prefs = stage_paths(cfg, "prefs").root
        if not (prefs / "train.jsonl").exists() or not (prefs / "eval.jsonl").exists():
            record = prefs / WORLD_DATA_FILE
            left = (f" The {WORLD_DATA_FILE} there is what an RM trained on train_data left; make takes it as the "
                    "collection done, so it does not collect by itself."
                    if record.is_file() and record.read_text().strip() == "null" else "")
            raise DataError(str(prefs), "no collected preferences (train.jsonl, eval.jsonl). Collect them first "
                                        "(make prefs, or python -m reward_model.collect with this config), "
                                        f"or set train_data to a preference dataset.{left}")
        if not (prefs / WORLD_DATA_FILE).exists():
            raise DataError(str(prefs), f"the last collection did not finish (train.jsonl and eval.jsonl may come "
                                        f"from two runs; it writes {WORLD_DATA_FILE} last). "
                                        "Collect again (make prefs).")
        train, held_out = (load(DatasetSpec(path=str(prefs / f"{split}.jsonl")), "prefs")
                           for split in ("train", "eval"))
        return train, held_out, str(prefs)
    train = load(cfg.train_data, "train_data")
    if cfg.eval_data is not None:
        return train, load(cfg.eval_data, "eval_data"), cfg.train_data.path
    # hold out whole prompts: pair datasets repeat a prompt (and its responses) over several rows; the world's
    # rankings hold out whole questions, as collection does: also from a file (a copy of prefs/train.jsonl or
    # world/prefs_static.jsonl), known by the gold scores only the world's annotator writes
    by_question = cfg.train_data.path.startswith("world:") or any(row.get("gold_scores") for row in train)
    if by_question:
        judge = load_judge(the_world())
        prompts = [question_of(judge, row["prompt"]) for row in train]
    else:
        prompts = [row["prompt"] for row in train]
    train_idx, eval_idx = split_indices(prompts, cfg.eval_fraction, cfg.seed, cfg.train_data.path,
                                        "question" if by_question else "prompt", " (or set eval_data)")
    return [train[i] for i in train_idx], [train[i] for i in eval_idx], cfg.train_data.path


def held_out_fingerprint(rows: list[dict]) -> str:
    """Which prompts an RM's training held out: collected again, or with train_data edited and split again, others
    are held out, some of which the RM learned from."""
    return hashlib.sha256("\n".join(sorted(row["prompt"] for row in rows)).encode()).hexdigest()[:16]


def collate(tokenizer, groups: list[dict], max_length: int, device: torch.device | str = "cpu",
            chunk_size: int = 0) -> dict:
    """G ranked groups as token batches of all their responses, plus each group's size (from which `pack_groups`
    lays the scores out as [G, K] with a valid mask).

    The conversations are sorted by length and cut into chunks of `chunk_size` (0: one chunk), each right-padded
    only to its own longest: a long response no longer pads the whole batch. `order` maps back to group order
    (group after group, best first)."""
    prompts = [g["prompt"] for g in groups for _ in g["responses"]]
    responses = [r for g in groups for r in g["responses"]]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    size = chunk_size or len(order)
    chunks = [encode_conversations(tokenizer, [prompts[i] for i in part], [responses[i] for i in part], max_length,
                                   device) for part in (order[k:k + size] for k in range(0, len(order), size))]
    batch = {"chunks": chunks, "order": torch.tensor(order, device=device),
             "group_sizes": [len(g["responses"]) for g in groups]}
    if any(g.get("ratings") for g in groups):  # labeler ratings: pairs rated alike are ties, not trained on
        ratings = [g.get("ratings") or range(len(g["responses"]), 0, -1) for g in groups]  # unrated: strict order
        batch["ratings"] = torch.tensor([x for r in ratings for x in r], dtype=torch.float64, device=device)
    return batch


def longer_than(tokenizer, groups: list[dict], max_length: int) -> int:
    """How many of the groups' conversations the RM would read cut (encode_conversations keeps the last tokens)."""
    texts = [conversation_text(tokenizer, g["prompt"], r) for g in groups for r in g["responses"]]
    return sum(len(ids) > max_length for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def batch_scores(model, batch: dict) -> torch.Tensor:
    """The score of every conversation of a collated batch, in group order (one forward pass per chunk)."""
    sorted_scores = torch.cat([sequence_scores(model, c["input_ids"], c["attention_mask"]) for c in batch["chunks"]])
    return sorted_scores[torch.argsort(batch["order"])]


def compute_loss(model, batch: dict, margin: float = 0.0, center_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The K-way ranking loss of one collated batch: every response scored once, all C(K,2) pairs compared."""
    grouped, valid = pack_groups(batch_scores(model, batch), batch["group_sizes"])
    ratings = pack_groups(batch["ratings"], batch["group_sizes"])[0] if "ratings" in batch else None
    return ranked_pairs_loss(grouped, valid, margin=margin, center_coef=center_coef, ratings=ratings)


def epoch_batches(rows: list[dict], batch_size: int, n_batches: int, seed: int,
                  group_by_length: bool) -> list[list[int]]:
    """One epoch's batches of row indices: a seeded shuffle cut into `n_batches` batches (the rest is dropped).

    With group_by_length each window of 50 batches is sorted by length (a row's prompt and longest response)
    before it is cut, and the batches are then shuffled: a batch's conversations are padded to similar
    lengths (HF's `group_by_length`)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=generator).tolist()[:batch_size * n_batches]
    lengths = [len(row["prompt"]) + max(len(r) for r in row["responses"]) for row in rows]
    if group_by_length:
        window = 50 * batch_size
        order = [i for w in range(0, len(order), window) for i in sorted(order[w:w + window], key=lengths.__getitem__)]
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


@torch.no_grad()
def score_rankings(model, tokenizer, rows: list[dict], max_length: int, batch_size: int,
                   device: torch.device | str = "cpu") -> list[list[float]]:
    """The model's score of every response of every row, grouped like the rows."""
    if not rows:  # a rank's shard of a held-out set smaller than the number of processes
        return []
    scores = batch_scores(model, collate(tokenizer, rows, max_length, device, chunk_size=batch_size)).tolist()
    bounds = list(itertools.accumulate([0] + [len(row["responses"]) for row in rows]))
    return [scores[a:b] for a, b in zip(bounds, bounds[1:])]


def build_model(cfg: RewardModelConfig, init: str, tokenizer, checkpoint: Path | None):
    """The SFT backbone with a scalar head (or the resumed one), wrapped with LoRA adapters if configured."""
    lora = cfg.lora
    full_resume = checkpoint is not None and not lora.enabled
    model = load_scalar_model(str(checkpoint / "model") if full_resume else init, "reward_model.train", tokenizer,
                              cfg.trust_remote_code, allowed_stages=POLICY_STAGES + SCALAR_STAGES)
    if not lora.enabled:
        return model
    if checkpoint is not None:
        return resume_lora(model, checkpoint / "model", "reward_model.train")
    from peft import get_peft_model

    return get_peft_model(model, lora.peft_config("SEQ_CLS", model))


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg: RewardModelConfig = parse_stage_args(RewardModelConfig, argv, __doc__, "reward_model.train", "rm.yaml")
    paths = stage_paths(cfg, "rm")
    require_ddp("rm")
    # ranks score their micro-batches in as many forward passes as their responses need (rankings differ in size):
    # DDP's buffer broadcast before each forward pass would pair up unlike calls across ranks and hang. The
    # buffers (rotary frequencies) are constants, the same on every rank.
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=accelerate_precision(cfg),
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    torch.manual_seed(cfg.seed)
    n_procs, rank = accelerator.num_processes, accelerator.process_index

    # ---- ranked data: validated before any model is built, so bad input fails fast
    with accelerator.main_process_first():
        train_rows, eval_rows, source = load_rankings(cfg)
        if cfg.train_data is None:
            check_collected_with(cfg, Path(source))
        add_gold_criteria(cfg, eval_rows)
        # collected preferences come from the world, and so does a world:<split> given as data
        reads_world = any(spec is not None and spec.path.startswith("world:")
                          for spec in (cfg.train_data, cfg.eval_data))
        world = world_dir(cfg) if cfg.train_data is None or reads_world else None
    micro_batch = cfg.batch_size * n_procs
    steps_per_epoch = len(train_rows) // (micro_batch * cfg.grad_accum)
    if steps_per_epoch == 0:
        raise DataError(source, f"{len(train_rows)} training rankings are fewer than one optimizer step takes "
                                f"(batch_size {cfg.batch_size} x grad_accum {cfg.grad_accum} x {n_procs} processes); "
                                f"lower batch_size or collect more prompts.")
    max_steps = cfg.epochs * steps_per_epoch

    # ---- backbone: the SFT model with a scalar head, or the newest checkpoint on resume
    init = init_checkpoint(cfg, "rm", POLICY_STAGES + SCALAR_STAGES)
    check_world_lineage(cfg, init, world, "rm")
    if cfg.train_data is None:
        check_world_lineage(cfg, source, world, "rm", config_key="")
    checkpoint = checkpoint_to_resume(cfg, paths.checkpoints, "rm", accelerator.is_main_process)
    tokenizer = load_tokenizer(init, cfg.trust_remote_code)
    if cfg.lora.enabled:
        check_lora_can_train(tokenizer, init)
    held_out_source = cfg.eval_data.path if cfg.train_data is not None and cfg.eval_data is not None else source

    def refusals_named():
        """Around rendering rankings (a sample up front, the held-out ones at each evaluation, the training ones
        batch by batch): one the chat template refuses is named by its prompt (the split reorders the rows)."""
        def render(row: dict) -> list[str]:
            return [conversation_text(tokenizer, row["prompt"], response) for response in row["responses"]]

        sources = [(train_rows, source), (eval_rows, held_out_source)]
        return template_refusals_named(f"{init} (key 'init_from')", sources, render, "prompt", numbered=False)
    model = build_model(cfg, init, tokenizer, checkpoint)
    check_length_fits(model, cfg.max_length, "max_length")
    # what it learned from: the training rankings (held-out ones are only evaluated on)
    lineage = world_lineage("rm", learned_world_data(world, *([cfg.train_data] if cfg.train_data else [])),
                            *([source] if cfg.train_data is None else []), init)
    mark_in_training(model, "rm", lineage)
    # recollected preferences (or edited train_data files) would have the resumed steps read other rankings
    rankings = hashlib.sha256(json.dumps([train_rows, eval_rows], sort_keys=True, default=str).encode()).hexdigest()
    start_checkpoints(paths.checkpoints, checkpoint, lineage, "rm", accelerator.is_main_process,
                      starts_from={"init checkpoint": output_id(init), "rankings": rankings[:16]})

    # ---- optimizer and schedule: weight decay on matrices only; linear warmup, cosine decay
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.learning_rate, betas=tuple(cfg.adam_betas))
    scheduler = warmup_cosine_scheduler(optimizer, math.ceil(cfg.warmup_ratio * max_steps), max_steps, cfg.min_lr_ratio)
    start_step = 0
    # the data each step reads (max_length: how much of each conversation); and what the restored optimizer and
    # scheduler state (the peak learning rate, weight decay, betas) and the saved adapter config (lora.*) would
    # overrule without a word. A new warmup_ratio or min_lr_ratio reshapes the schedule from where it is, as in the
    # other stages: asked for, so honoured.
    settings = resume_settings(cfg, ("batch_size", "grad_accum", "epochs", "seed", "eval_fraction", "mix_static",
                                     "group_by_length", "max_length", "learning_rate", "weight_decay", "adam_betas",
                                     "lora"), n_procs)
    if checkpoint is not None:
        state = load_training_state(checkpoint, settings)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_scaler(accelerator.scaler, state)
        start_step = state["step"]
    # the training time of the launches before a resume: eval.json's is the whole run's
    trained_before = float(state.get("train_seconds", 0.0)) if checkpoint is not None else 0.0
    with warnings.catch_warnings():  # torch 2.13 renames broadcast_buffers, the name accelerate 1.15 passes on
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        model, optimizer = accelerator.prepare(model, optimizer)

    tracker = Tracker(cfg, "rm", paths.metrics_file, accelerator.is_main_process, upstream={"sft": Path(init)},
                      start_step=start_step)
    if accelerator.is_main_process:
        write_resolved_config(cfg, paths)
        n_train = sum(p.numel() for p in trainable)
        n_pairs = sum(len(labeled_pairs(r)) for r in train_rows)
        tracker.summary({"model/trainable_parameters": n_train, "data/train_rankings": len(train_rows),
                         "data/train_pairs": n_pairs, "data/eval_rankings": len(eval_rows)})
        held_out = f" ({cfg.eval_data.path})" if cfg.eval_data is not None else ""
        print(f"[rm] {len(train_rows)} training rankings ({n_pairs} pairs) from {source} and {len(eval_rows)} held "
              f"out{held_out}; backbone {init}; {n_train / 1e6:.2f}M trainable parameters"
              + (f"; LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "")
              + (f"; resuming at step {start_step}" if start_step else ""))
        rankings = [*train_rows, *eval_rows]
        checked = random.Random(cfg.seed).sample(rankings, min(len(rankings), 2000))  # a sample: hh-rlhf is large
        with refusals_named():
            too_long = longer_than(tokenizer, checked, cfg.max_length)
        if too_long:
            of = "" if len(checked) == len(rankings) else f" (in a sample of {len(checked):,} rankings)"
            print(f"[rm] warning: {too_long:,} conversations{of} are longer than max_length={cfg.max_length} tokens "
                  "and are cut on the left, so the RM reads them without the start of their prompt")

    def evaluate(step: int) -> tuple[dict[str, float], list[list[float]]]:
        """Score the held-out rankings (sharded over processes) and compare them with labels and gold."""
        model.eval()
        with accelerator.split_between_processes(eval_rows) as shard, refusals_named(), \
                fp32_forward(accelerator.unwrap_model(model)) as plain:  # scored as RewardScorer and PPO will
            scores = score_rankings(plain, tokenizer, shard, cfg.max_length, cfg.eval_batch_size, accelerator.device)
        model.train()
        scores = gather_object([scores])
        scores = [group for shard_scores in scores for group in shard_scores]
        metrics = ranking_metrics(scores, eval_rows)
        chosen, rejected = best_and_rest(scores, eval_rows)
        metrics.update({**score_stats("chosen", chosen), **score_stats("rejected", rejected)})
        # the console gets the headline; the per-criterion and per-family breakdown goes to W&B
        tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step=step,
                    console_keys=[f"eval/{k}" for k in metrics if k.count("/") < 2])
        if tracker.run is not None:  # W&B histograms of the best-ranked response's score vs the others'
            import wandb

            tracker.run.log({"eval/chosen_scores": wandb.Histogram(chosen),
                             "eval/rejected_scores": wandb.Histogram(rejected)}, step=step)
        return metrics, scores

    def micro_batches(start: int):
        """This process's share of each epoch's batches; a resumed run skips the micro-batches already done."""
        for epoch in itertools.count(start // steps_per_epoch):
            batches = epoch_batches(train_rows, micro_batch, steps_per_epoch * cfg.grad_accum, cfg.seed + epoch,
                                    cfg.group_by_length)
            for batch in batches[max(0, start - epoch * steps_per_epoch) * cfg.grad_accum:]:
                yield [train_rows[i] for i in batch[rank * cfg.batch_size:(rank + 1) * cfg.batch_size]]

    # ---- training loop
    if start_step == 0:
        evaluate(0)
    throughput, batches = Throughput(), micro_batches(start_step)
    window = LogWindow("loss", "accuracy", "margin")
    if checkpoint is not None:
        window.restore(state.get("log_window"), accelerator.num_processes)
    progress = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="rm",
                    disable=not accelerator.is_main_process)
    model.train()
    started, metrics, scores, grad_norm = time.perf_counter(), None, None, float("nan")
    for step in progress:
        for _ in range(cfg.grad_accum):
            with refusals_named():
                batch = collate(tokenizer, next(batches), cfg.max_length, accelerator.device, cfg.forward_chunk)
            with accelerator.accumulate(model):
                loss, stats = compute_loss(model, batch, cfg.margin, cfg.center_coef)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    stop_if_not_finite(grad_norm, "rm", step + 1, "Lower learning_rate.", accelerator.scaler)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            throughput.add(sum(int(c["attention_mask"].sum()) for c in batch["chunks"]))  # this rank's
            window.add(loss.item(), stats["accuracy"].item(), stats["margin_mean"].item())
        scheduler.step()

        done = step + 1
        if done % cfg.log_every == 0 or done == max_steps:
            tokens_per_sec = throughput.rate(accelerator)
            # every rank's micro-batches since the last log, not rank 0's alone
            logged = {f"train/{k}": v for k, v in window.means(accelerator).items()}
            progress.set_postfix(loss=f"{logged['train/loss']:.3f}", acc=f"{logged['train/accuracy']:.2f}",
                                 tok_s=f"{tokens_per_sec:,.0f}")
            tracker.log({**logged, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                         "train/epoch": done / steps_per_epoch, "perf/tokens_per_sec": tokens_per_sec},
                        step=done, console=False)
        if done % cfg.eval_every == 0 or done == max_steps:
            metrics, scores = evaluate(done)
            throughput.rate()  # restart the clock: tokens/s measures training, not evaluation
        if done % cfg.checkpoint_every == 0 and done < max_steps:
            accelerator.wait_for_everyone()
            log_window = window.state(accelerator)
            if accelerator.is_main_process:
                save_training_checkpoint(paths.checkpoints, done, accelerator.unwrap_model(model), tokenizer,
                                         {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                          "settings": settings, "log_window": log_window,
                                          **scaler_state(accelerator.scaler),
                                          "train_seconds": trained_before + time.perf_counter() - started},
                                         cfg.keep_checkpoints)
            accelerator.wait_for_everyone()

    # ---- the hand-off: a plain HF checkpoint whose config carries the RM's mean and std over SFT samples
    if metrics is None:  # resumed at max_steps: nothing was trained, but report the checkpoint
        metrics, scores = evaluate(max_steps)
    tracker.table("eval/rankings", ["prompt", "rank", "response", "rm_score", "gold_score"],
                  [[row["prompt"], rank, response, score, (row.get("gold_scores") or [None] * len(s))[rank]]
                   for row, s in zip(eval_rows[:8], scores) for rank, (response, score)
                   in enumerate(zip(row["responses"], s))], step=max_steps)
    # the held-out responses are the SFT policy's samples on prompts the RM never trained on: what PPO will show it
    reward_stats = score_stats("reward", distinct_reply_scores(scores, eval_rows))
    reward_mean, reward_std = reward_stats["reward_mean"], reward_stats["reward_std"]
    # every rank prints it: under DDP the ranks must agree
    print(f"[rm] rank {accelerator.process_index} parameter fingerprint {parameter_fingerprint(model)}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model)
        if cfg.lora.enabled:
            final_model = final_model.merge_and_unload()
        save_final(final_model, tokenizer, paths.final, "rm", reward_mean=reward_mean, reward_std=reward_std,
                   rm_max_length=cfg.max_length, world_data=lineage, launch_records=paths.launch_records,
                   rm_held_out_prompts=held_out_fingerprint(eval_rows))
        result = headline_metrics(metrics)
        result.update(reward_mean=reward_mean, reward_std=reward_std,
                      train_seconds=trained_before + time.perf_counter() - started)
        write_text_atomic(paths.root / "eval.json", json.dumps(result, indent=1) + "\n")
        tracker.summary({f"eval/final_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        print(f"[rm] held-out pairwise accuracy {describe_accuracy(result)}; reward mean {reward_mean:.3f} "
              f"std {reward_std:.3f}; checkpoint in {paths.final}, metrics in {paths.root / 'eval.json'}")
        for line in describe_by_criterion(result):
            print(f"[rm] {line}")
        tracker.finish(paths.final)
    end_stage(accelerator)
    return metrics


if __name__ == "__main__":
    run_main(main)
