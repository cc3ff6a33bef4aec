"""Preference collection: the SFT policy answers each prompt K times, the simulated annotator ranks the answers.

    python -m reward_model.collect --config configs/tiny/rm.yaml [key=value ...]     (make prefs)

InstructGPT's labelers ranked K samples of the policy per prompt; here the world's `Annotator` does (its
noise set by `world.annotator_temperature`). Writes `runs/<run>/prefs/train.jsonl` and `eval.jsonl`
(held-out prompts), one row per prompt: `prompt`, `responses` best first, their `gold_scores` (for analysis
only: the RM never sees them), `family`. Exact duplicate and empty responses are dropped; a prompt left with
fewer than 2 distinct responses has nothing to rank and is skipped (and counted). With `train_data` set the
RM trains on that dataset and there is nothing to collect.
"""
from __future__ import annotations

import os
import json
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from data.loading import DataError, DatasetSpec, load_dataset_for
from data.world import Annotator
from pipeline.checkpoint import copy_launch_records, write_text_atomic
from pipeline.evaluation import load_judge
from pipeline.generation import decode_responses, encode_prompts, ended_with_stop, prompts_that_fit, sample, \
    stop_token_ids
from pipeline.model import POLICY_STAGES, load_causal_lm
from pipeline.runs import WORLD_DATA_FILE, check_world_lineage, learned_world_data, model_path, require_ddp, \
    parse_stage_args, run_main, stage_paths, world_dir, world_lineage, write_resolved_config
from pipeline.tokenizer import check_chat_prompts, load_tokenizer
from pipeline.tracking import Tracker
from reward_model.config import RewardModelConfig


def split_indices(groups: list, eval_fraction: float, seed: int, source: str, what: str = "prompt",
                  hint: str = "") -> tuple[list[int], list[int]]:
    """A seeded held-out split of rows by group: (train indices, eval indices). Rows of one group (the phrasings
    of one question, the rows of one prompt) land on one side; `eval_fraction` of the groups are held out, and
    both sides are non-empty. Fewer than 2 groups is a DataError naming `source`, `what` the groups are (a noun)
    and a `hint`."""
    distinct = list(dict.fromkeys(groups))
    if len(distinct) < 2:
        raise DataError(source, f"only {len(distinct)} distinct {what}; a held-out split needs two or more{hint}")
    random.Random(f"rm-split/{seed}").shuffle(distinct)
    n_eval = min(max(1, round(eval_fraction * len(distinct))), len(distinct) - 1)
    held_out = set(distinct[:n_eval])
    return ([i for i, g in enumerate(groups) if g not in held_out], [i for i, g in enumerate(groups) if g in held_out])


def question_of(judge, prompt: str):
    """What a world prompt asks, shared by all its phrasings ("What is 23 plus 45?", "Compute 23 plus 45.") and for
    arithmetic by every form of its addition fact ("45 plus 23", "68 minus 23": the ranked answers to one teach the
    others'); the text itself for a prompt the world does not know."""
    task = judge.task(prompt)
    return task.fact_key if task is not None else prompt


def distinct_responses(responses: list[str]) -> tuple[list[str], int, int]:
    """Keep the first copy of each non-empty response. Returns (kept, duplicates dropped, empty dropped)."""
    kept, empty = [], 0
    for response in responses:
        if not response.strip():
            empty += 1
        elif response not in kept:
            kept.append(response)
    return kept, len(responses) - len(kept) - empty, empty


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    cfg: RewardModelConfig = parse_stage_args(RewardModelConfig, argv, __doc__, "reward_model.collect", "rm.yaml")
    paths = stage_paths(cfg, "prefs")
    if cfg.train_data is not None:
        print(f"[prefs] train_data is set ({cfg.train_data.path}): the reward model trains on it, "
              "so there are no preferences to collect.")
        # the file make waits for. Nothing was learned from the world here; an earlier collection's record stays
        # with its rankings, so they are still checked if train_data is unset again
        record = paths.root / WORLD_DATA_FILE
        if not record.exists():
            paths.root.mkdir(parents=True, exist_ok=True)
            write_text_atomic(record, "null\n")
        elif record.read_text().strip() == "null":
            # dated now: make then sees this step as newer than the SFT model it followed, instead of launching
            # it on every later make (an earlier collection's record keeps its own date)
            os.utime(record)
        return
    require_ddp("prefs")
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    K = cfg.responses_per_prompt

    # ---- prompts and the held-out split: validated before the policy is loaded
    with accelerator.main_process_first():
        world = world_dir(cfg)
    rows = list(load_dataset_for(cfg.prompts, "prompts", world_dir=world, key="prompts"))
    # one row per prompt text: a repeated prompt could otherwise land on both sides of the held-out split
    first_rows = {}
    for row in rows:
        first_rows.setdefault(row["prompt"], row)
    distinct = list(first_rows.values())
    if len(distinct) < len(rows) and accelerator.is_main_process:
        print(f"[prefs] {cfg.prompts.path}: {len(rows) - len(distinct)} repeated prompt(s) dropped "
              f"(each prompt is sampled and held out once)")
    rows = distinct
    if cfg.max_prompts:
        rows = rows[:cfg.max_prompts]
    if len(rows) < 2:
        raise DataError(cfg.prompts.path, f"{len(rows)} prompt(s); the train/eval split needs 2 or more")

    # ---- the SFT policy
    init = model_path(cfg, "policy", "sft", POLICY_STAGES, "prefs")
    check_world_lineage(cfg, init, world, "prefs", config_key="policy")
    tokenizer = load_tokenizer(init, cfg.trust_remote_code)
    # by its text: repeated prompts are gone, so a row's place is not its file's
    check_chat_prompts(tokenizer, f"{init} (key 'policy')", [(rows, cfg.prompts.path)], numbered=False)
    policy = load_causal_lm(init, "reward_model.collect", cfg.trust_remote_code,
                            tokenizer=tokenizer).to(accelerator.device).eval()
    rows = prompts_that_fit(rows, tokenizer, policy, cfg.sampling.max_new_tokens, cfg.max_prompt_tokens,
                            cfg.prompts.path, "prefs", report=accelerator.is_main_process)
    if len(rows) < 2:
        raise DataError(cfg.prompts.path, f"{len(rows)} prompt(s) fit max_prompt_tokens; the train/eval split "
                                          "needs 2 or more")
    judge = load_judge(world)
    outside = sum(judge.task(row["prompt"]) is None for row in rows)
    if outside and accelerator.is_main_process:  # the annotator knows the world's tasks alone
        print(f"[prefs] note: {outside} of the {len(rows)} prompts ({cfg.prompts.path}) are no task of the world: "
              "the simulated annotator ranks their replies by tone, concision and format alone (gold scores too), "
              "with its noise deciding between replies alike in those")
    # held out by question: another phrasing of a held-out question (or another form of its addition fact) in the
    # training rankings would flatter the RM
    questions = [question_of(judge, row["prompt"]) for row in rows]
    train_idx, eval_idx = split_indices(questions, cfg.eval_fraction, cfg.seed, cfg.prompts.path,
                                        "question", " (every prompt asks the same one)")
    tracker = Tracker(cfg, "prefs", paths.metrics_file, accelerator.is_main_process, upstream={"sft": Path(init)})
    if accelerator.is_main_process:
        write_resolved_config(cfg, paths)
        print(f"[prefs] {len(rows)} prompts ({len(train_idx)} train, {len(eval_idx)} held out), "
              f"K={K} samples each from {init}")

    # ---- sampling: K copies of every prompt, batched through the KV-cache sampler; each process takes a shard
    jobs = [(i, row["prompt"]) for i, row in enumerate(rows) for _ in range(K)]
    with accelerator.split_between_processes(jobs) as my_jobs:
        generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)
        batches = range(0, len(my_jobs), cfg.generation_batch_size)
        sampled, new_tokens, started = [], 0, time.perf_counter()
        stops = stop_token_ids(policy, tokenizer)
        progress = tqdm(batches, desc="prefs: sampling", disable=not accelerator.is_main_process)
        for start in progress:
            chunk = my_jobs[start:start + cfg.generation_batch_size]
            batch = encode_prompts(tokenizer, [prompt for _, prompt in chunk], accelerator.device)
            tokens = sample(policy, batch["input_ids"], batch["attention_mask"], cfg.sampling, stops,
                            tokenizer.pad_token_id, generator)
            ended = ended_with_stop(tokens, stops)
            sampled += [(i, text, end) for (i, _), text, end in zip(chunk, decode_responses(tokenizer, tokens, stops),
                                                                    ended)]
            new_tokens += int((tokens != tokenizer.pad_token_id).sum())
            progress.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):,.0f}")
    sample_seconds = time.perf_counter() - started
    tokens_per_sec = accelerator.reduce(torch.tensor(new_tokens / sample_seconds, device=accelerator.device),
                                        reduction="sum").item()
    sampled = gather_object(sampled)

    # ---- ranking: the annotator orders each prompt's distinct responses, best first. Every rank ranks (the
    # same seeded annotator, the same gathered samples), so a bad outcome stops all of them, not rank 0 alone
    annotator = Annotator(judge, cfg.world.annotator_temperature, seed=cfg.seed)
    # a reply cut at max_new_tokens is left out: the RM reads every reply as a finished turn (the chat template
    # closes it), so it would learn from an end-of-turn the policy never produced; PPO gives such replies
    # missing_eos_penalty (N+; with it off, the RM's guess)
    by_prompt: list[list[str]] = [[] for _ in rows]
    unfinished = 0
    for i, text, ended in sampled:
        if ended:
            by_prompt[i].append(text)
        else:
            unfinished += 1
    ranked, skipped, duplicates, empty = {}, 0, 0, 0
    for i, row in enumerate(tqdm(rows, desc="prefs: ranking", disable=not accelerator.is_main_process)):
        responses, n_duplicates, n_empty = distinct_responses(by_prompt[i])
        duplicates, empty = duplicates + n_duplicates, empty + n_empty
        if len(responses) < 2:
            skipped += 1
            continue
        ordered = [responses[j] for j in annotator.rank(row["prompt"], responses)]
        verdicts = [judge.score(row["prompt"], r) for r in ordered]
        ranked[i] = {"prompt": row["prompt"], "responses": ordered,
                                 "gold_scores": [v.score for v in verdicts],
                                 "family": row.get("family") or verdicts[0].family}
    train_out = [ranked[i] for i in train_idx if i in ranked]
    eval_out = [ranked[i] for i in eval_idx if i in ranked]
    if not train_out or not eval_out:
        raise DataError(str(init), f"after dropping duplicates and replies cut at sampling.max_new_tokens, "
                                   f"{len(train_out)} training and {len(eval_out)} held-out prompts have 2+ distinct "
                                   f"finished responses; sample with a higher sampling.temperature, a larger "
                                   f"responses_per_prompt or sampling.max_new_tokens")
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return

    # ---- optional: the world's static ranked set, for the training prompts only (eval stays held out)
    n_static = 0
    if cfg.mix_static:
        train_prompts = {rows[i]["prompt"] for i in train_idx}
        static = load_dataset_for(DatasetSpec(path="world:prefs_static"), "preferences", world_dir=world)
        static_rows = [dict(r) for r in static if r["prompt"] in train_prompts]
        train_out += static_rows
        n_static = len(static_rows)

    paths.root.mkdir(parents=True, exist_ok=True)
    # the record make waits for goes first and comes back last: a re-collection cut off between the two files
    # leaves none, so make collects again and RM training refuses the mismatched pair
    (paths.root / WORLD_DATA_FILE).unlink(missing_ok=True)
    write_jsonl_atomic(paths.root / "train.jsonl", train_out)
    write_jsonl_atomic(paths.root / "eval.jsonl", eval_out)
    # what the rankings came from in the world, with the SFT policy's chain, for the RM to check and carry
    learned = learned_world_data(world, cfg.prompts, annotator=True)
    # the config these rankings were collected with, dated at its start, for the report: a later collection that
    # is cut off has rewritten config.yaml
    copy_launch_records(paths.root, (paths.config_file,))
    write_text_atomic(paths.root / WORLD_DATA_FILE, json.dumps(world_lineage("prefs", learned, init)) + "\n")

    # ---- what was collected: sample quality, and the annotator's agreement with gold (the noise ceiling)
    collected = list(ranked.values())
    gold = [s for row in collected for s in row["gold_scores"]]
    agree = decided = 0
    for row in collected:
        scores = row["gold_scores"]
        for a in range(len(scores)):
            for b in range(a + 1, len(scores)):
                decided += scores[a] != scores[b]
                agree += scores[a] > scores[b]
    summary = {"prefs/prompts": len(rows), "prefs/train_prompts": len(train_out) - n_static,
               "prefs/static_prompts": n_static, "prefs/eval_prompts": len(eval_out),
               "prefs/skipped_prompts": skipped, "prefs/duplicates_dropped": duplicates,
               "prefs/empty_dropped": empty, "prefs/unfinished_dropped": unfinished,
               "prefs/responses_per_prompt": len(gold) / len(collected),
               "prefs/gold_score_mean": sum(gold) / len(gold),
               **({"prefs/annotator_gold_agreement": agree / decided} if decided else {}),
               "perf/tokens_per_sec": tokens_per_sec, "time/sampling_seconds": sample_seconds}
    tracker.log(summary, step=0, console=False)
    tracker.table("prefs/samples", ["prompt", "rank", "response", "gold_score"],
                  [[row["prompt"], rank, r, g] for row in collected[:8]
                   for rank, (r, g) in enumerate(zip(row["responses"], row["gold_scores"]))], step=0)
    tracker.summary(summary)
    print(f"[prefs] {len(train_out)} training rankings ({n_static} static) -> {paths.root / 'train.jsonl'}, "
          f"{len(eval_out)} held out -> {paths.root / 'eval.jsonl'}")
    print(f"[prefs] {summary['prefs/responses_per_prompt']:.2f} distinct responses per prompt "
          f"({duplicates} duplicates, {empty} empty and {unfinished} cut at max_new_tokens dropped, {skipped} "
          f"prompts skipped with < 2 left); "
          f"mean gold score {summary['prefs/gold_score_mean']:.3f}; annotator agrees with gold on "
          f"{agree / max(decided, 1):.1%} of {decided} decided pairs; {tokens_per_sec:,.0f} tokens/s")
    tracker.finish()
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    run_main(main, interrupted="interrupted (collection starts over: make prefs)")
