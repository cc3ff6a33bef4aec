"""PPO against the reward model (InstructGPT step 3): a policy, a critic, GAE and a KL leash to the SFT model.

    python -m stages.ppo --config configs/tiny/ppo.yaml [key=value ...]
    accelerate launch -m stages.ppo --config configs/gpu/ppo.yaml

Each step, every rank samples replies to its own prompts with the KV cache; one forward pass each gives the
policy's log-probs (of temperature-scaled logits), the SFT reference's log-probs and the critic's values, and the
frozen RM scores each conversation. The reward is the normalised RM score (a constant if the reply never ended or
is empty, then clipped) at the last token, minus beta * KL on every token. GAE gives advantages, whitened over all
ranks; then several epochs of clipped policy and value updates on shuffled minibatches. The settings are in
config.py, the model passes in passes.py, the maths in ppo_math.py; the details follow Ouyang et al. 2022 and
Huang et al. 2024 ("N+").

Models: the policy starts from SFT final/; the reference is SFT (with LoRA: the policy with its adapter off, no
second copy); the RM is frozen; the critic starts from the RM (see TokenCritic). With `ema_decay` > 0, final/
holds the EMA of the policy's weights (what is evaluated) and final_online/ the last policy itself.

Distributed: under DDP each rank samples its own prompts, statistics (whitening, KL, metrics) are reduced
across ranks, and only the main process logs and saves. The policy and the critic each have their own optimizer,
so fp16 is refused with a message at start (the shared GradScaler would unscale and update twice per step; bf16
needs no scaler), and so are FSDP and DeepSpeed, like for every stage with its own training loop (require_ddp). For a
policy too large for one device, train it with LoRA: the reference is then the same weights with the adapter off.
Resume restores policy, critic, both optimizers, the KL controller, the EMA, RNG and the data position; every
random draw of step s comes from generators seeded with (seed, step, rank), so a resumed run replays exactly.
"""
from __future__ import annotations

import contextlib
import json
import math
import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from data.loading import load_dataset_for, source_fingerprints
from data.world.judge import CRITERIA_WEIGHTS
from pipeline.checkpoint import (atomic_dir, load_training_state, mark_in_training, output_id, parameter_fingerprint,
                                 resume_settings, save_final, save_training_checkpoint, unwrap, write_text_atomic)
from pipeline.config import ConfigError
from pipeline.evaluate import evaluate_checkpoint
from pipeline.evaluation import family_table, load_judge, load_prompts, win_rate
from pipeline.generation import SamplingConfig, prompts_that_fit
from pipeline.model import POLICY_STAGES, SCALAR_STAGES, check_length_fits, check_lora_can_train, \
    fp32_forward, load_causal_lm, load_scalar_model, resume_lora, set_special_token_ids
from pipeline.packing import PackedCorpus
from pipeline.runs import accelerate_precision, check_world_lineage, checkpoint_to_resume, end_stage, \
    init_checkpoint, learned_world_data, model_path, parse_stage_args, require_ddp, run_main, stage_paths, \
    start_checkpoints, world_dir, world_lineage, write_resolved_config
from pipeline.tokenizer import PAD, check_chat_prompts, load_tokenizer
from pipeline.tracking import Tracker, stop_if_not_finite
from reward_model.scoring import RewardScorer
from stages.ppo.config import FP16_UNSUPPORTED, PPOStageConfig
from stages.ppo.passes import TokenCritic, ppo_loss, rollout
from stages.ppo.ppo_math import explained_variance, kl_controller, masked_mean, masked_sum, rewards_and_advantages, \
    token_normaliser


def prompt_indices(n_rows: int, step: int, rank: int, world: int, batch: int, seed: int) -> list[int]:
    """This rank's prompts at `step`: a seeded shuffle per pass over the data, a pure function of the step."""
    start = (step * world + rank) * batch
    orders = {e: torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1000003 + e))
              for e in range(start // n_rows, (start + batch - 1) // n_rows + 1)}
    return [int(orders[i // n_rows][i % n_rows]) for i in range(start, start + batch)]


def main(argv: list[str] | None = None) -> None:
    cfg: PPOStageConfig = parse_stage_args(PPOStageConfig, argv, __doc__, "stages.ppo", "ppo.yaml")
    paths = stage_paths(cfg, "ppo")
    require_ddp("ppo")
    if accelerate_precision(cfg) == "fp16":  # precision: auto under `accelerate launch --mixed_precision fp16`
        raise ConfigError(f"key 'precision': {FP16_UNSUPPORTED}")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=accelerate_precision(cfg))
    device, rank, n_ranks = accelerator.device, accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.seed)
    all_reduce = lambda t: accelerator.reduce(t, reduction="sum")  # noqa: E731 (ppo_math's cross-rank sum)

    # ---- data: training prompts, held-out eval prompts, the world's gold judge
    with accelerator.main_process_first():
        world = world_dir(cfg)
    rows = [dict(r) for r in load_dataset_for(cfg.prompts, "prompts", world_dir=world, key="prompts")]
    eval_rows = load_prompts(world / "eval_prompts.jsonl", cfg.eval_prompts) if cfg.eval_prompts else []
    judge = load_judge(world)
    # the judge scores the world's tasks alone: on a prompt of your own it would grade only tone and form
    world_prompts = sum(judge.task(r["prompt"]) is not None for r in rows)
    if world_prompts < len(rows) and accelerator.is_main_process:
        print(f"[ppo] note: {len(rows) - world_prompts} of the {len(rows)} training prompts ({cfg.prompts.path}) are "
              f"no task of the world, which the gold judge cannot score: objective/gold_score "
              + (f"covers the other {world_prompts}" if world_prompts else "is not logged")
              + "; the held-out evaluation stays on the world's prompts")

    # ---- models: policy (SFT, or the checkpoint on resume), reference, frozen RM, critic (from the RM)
    sft_path = init_checkpoint(cfg, "ppo", POLICY_STAGES)
    rm_path = model_path(cfg, "reward_model", "rm", SCALAR_STAGES, "ppo (key 'reward_model')")
    check_world_lineage(cfg, sft_path, world, "ppo")
    check_world_lineage(cfg, rm_path, world, "ppo (key 'reward_model')", config_key="reward_model")
    checkpoint = checkpoint_to_resume(cfg, paths.checkpoints, "ppo", accelerator.is_main_process,
                                      cfg.max_steps)
    if checkpoint is not None and (checkpoint / "model" / "adapter_config.json").is_file() != cfg.lora.enabled:
        saved = "with LoRA adapters" if cfg.lora.enabled is False else "without LoRA"
        raise ConfigError(f"key 'lora.enabled': cannot resume from {checkpoint}, saved {saved}; set lora.enabled "
                          f"back to {not cfg.lora.enabled} to resume, or start over without resume=true")
    tokenizer = load_tokenizer(sft_path, cfg.trust_remote_code)
    check_chat_prompts(tokenizer, f"{sft_path} (key 'init_from')",
                       [(rows, cfg.prompts.path), (eval_rows, str(world / "eval_prompts.jsonl"))])
    if cfg.lora.enabled:
        check_lora_can_train(tokenizer, sft_path)
    rm = RewardScorer(rm_path, device, cfg.trust_remote_code, needed_by="ppo (key 'reward_model')")
    check_chat_prompts(rm.tokenizer, f"{rm_path} (key 'reward_model')", [(rows, cfg.prompts.path)])  # it reads them too
    # the critic, made from the RM, reads policy tokens (an RM keeps its own pad, which may be its EOS: the policy's
    # tokenizer then has our pad besides, which the critic's embeddings grow to)
    rm_vocab = rm.tokenizer.get_vocab()
    if rm_vocab != {t: i for t, i in tokenizer.get_vocab().items() if t != PAD or t in rm_vocab}:
        raise ConfigError(f"key 'reward_model': {rm_path} has a different tokenizer from the policy {sft_path}")
    check_length_fits(rm.model, cfg.rm_max_length, "rm_max_length")
    policy = load_causal_lm(str(checkpoint / "model") if checkpoint and not cfg.lora.enabled else sft_path, "ppo",
                            cfg.trust_remote_code, tokenizer=tokenizer)
    set_special_token_ids(policy, tokenizer)
    if cfg.ptx:
        check_length_fits(policy, cfg.ptx_block_size, "ptx_block_size")
    # the critic (the RM's backbone) reads prompt and reply too: an RM with fewer positions caps them
    rows = prompts_that_fit(rows, tokenizer, (policy, rm.model), cfg.sampling.max_new_tokens, cfg.max_prompt_tokens,
                            cfg.prompts.path, "ppo", report=accelerator.is_main_process)
    world_data = world_lineage("ppo", learned_world_data(world, cfg.prompts), sft_path, rm_path)
    mark_in_training(policy, "ppo", world_data)  # the critic keeps the RM's marks: a resume loads it as an RM
    ref_model = None
    if cfg.lora.enabled:
        from peft import get_peft_model

        policy = resume_lora(policy, checkpoint / "model", "ppo") if checkpoint else \
            get_peft_model(policy, cfg.lora.peft_config("CAUSAL_LM", policy))
    else:
        ref_model = load_causal_lm(sft_path, "ppo", cfg.trust_remote_code,
                                   tokenizer=tokenizer).to(device).eval().requires_grad_(False)
    critic = TokenCritic(load_scalar_model(str(checkpoint / "critic") if checkpoint else rm_path, "ppo (critic)",
                                           tokenizer, cfg.trust_remote_code, allowed_stages=("rm",)))

    @contextlib.contextmanager
    def reference():
        """The frozen SFT model: its own copy, or (LoRA) the policy with the adapter switched off."""
        if ref_model is not None:
            yield ref_model
        else:
            with unwrap(policy).disable_adapter():
                yield unwrap(policy)

    # ---- optimizers (one per model: separate learning rates), KL controller, EMA, PPO-ptx data
    policy_opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.policy_lr,
                                   eps=cfg.adam_eps, weight_decay=0.0)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, eps=cfg.adam_eps, weight_decay=0.0)
    kl_ctl = kl_controller(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    ema = None
    if cfg.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        # eval(): a LoRA policy comes out of peft in train mode, and the copy would keep its adapter dropout on
        # in the evaluation's sampling and KL (the policy itself is put in eval mode below)
        ema = AveragedModel(policy, device=device, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                            use_buffers=True).eval()
    start_step = 0
    # the prompts (and pretraining text) each step reads; and what the restored optimizers (eps), KL coefficient
    # (init_kl_coef) and saved adapter (lora.*) would overrule without a word
    # (ptx_data only with ptx: unread text is no reason to refuse)
    settings = resume_settings(cfg, ("rollout_batch_size", "minibatch_size", "ppo_epochs", "grad_accum", "seed",
                                     "critic_warmup_steps", "ptx", *(("ptx_data",) if cfg.ptx else ()),
                                     "ptx_batch_size", "ptx_block_size", "prompts", "max_prompt_tokens", "adam_eps",
                                     "init_kl_coef", "lora"), n_ranks)
    # the prompt filter leaves room for the reply within the model's positions: another length keeps other prompts
    settings["sampling.max_new_tokens"] = cfg.sampling.max_new_tokens
    if checkpoint is not None:
        state = load_training_state(checkpoint, settings)
        if (ema is not None) != ("ema" in state):
            raise ConfigError(f"key 'ema_decay': cannot resume from {checkpoint}, saved "
                              f"{'with' if 'ema' in state else 'without'} an EMA of the policy (final/ would hold "
                              f"{'the online policy' if 'ema' in state else 'an EMA of the resumed steps alone'}); "
                              "set ema_decay back, or start over without resume=true")
        policy_opt.load_state_dict(state["policy_optimizer"])
        critic_opt.load_state_dict(state["critic_optimizer"])
        kl_ctl.load_state_dict(state["kl_controller"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        start_step = state["step"]
    # the training time of the launches before a resume: eval.json's is the whole run's
    trained_before = float(state.get("train_seconds", 0.0)) if checkpoint is not None else 0.0
    # after the settings check: a changed `prompts` is named as such, not as another world
    inputs = {"policy": output_id(sft_path), "reward model": output_id(rm_path),
              **(source_fingerprints(prompts=cfg.prompts, ptx_data=cfg.ptx_data if cfg.ptx else None)
                 if checkpoint is not None or accelerator.is_main_process else {})}
    start_checkpoints(paths.checkpoints, checkpoint, world_data, "ppo", accelerator.is_main_process, inputs)
    policy, critic, policy_opt, critic_opt = accelerator.prepare(policy, critic, policy_opt, critic_opt)
    policy.eval()  # dropout off throughout: rollout and update log-probs come from the same function (N+)
    critic.eval()
    ptx_batches = None
    if cfg.ptx:  # the batch stream resumes at the block the interrupted run reached
        done_minibatches = max(0, start_step - cfg.critic_warmup_steps) * cfg.ppo_epochs * \
            (cfg.rollout_batch_size // cfg.minibatch_size)
        ptx_batches = PackedCorpus(load_dataset_for(cfg.ptx_data, "text", world_dir=world, key="ptx_data"), tokenizer,
                                   cfg.ptx_block_size, seed=cfg.seed, source=cfg.ptx_data.path).train_batches(
            cfg.ptx_batch_size, cfg.grad_accum, done_minibatches, accelerator)

    tracker = Tracker(cfg, "ppo", paths.metrics_file, accelerator.is_main_process,
                      upstream={"sft": sft_path, "rm": rm_path}, start_step=start_step)
    if accelerator.is_main_process:
        write_resolved_config(cfg, paths)
        print(f"[ppo] policy {sft_path}, reward model {rm_path}, {len(rows)} prompts, {n_ranks} process(es)"
              + (f", resuming from step {start_step}" if start_step else ""))

    # ---- evaluation (main process): greedy replies to held-out prompts, scored by the RM and the gold judge
    deliverable = lambda: ema.module if ema is not None else unwrap(policy)  # noqa: E731
    eval_sampling = SamplingConfig(max_new_tokens=cfg.sampling.max_new_tokens, temperature=0.0)
    eval_prompts = [r["prompt"] for r in eval_rows]

    def answer(model) -> tuple:
        with fp32_forward(model) as fp32_model:  # as a plain from_pretrained load answers
            # RM scores as training rewards them: a policy that learnt to run on gains nothing here either
            result = evaluate_checkpoint(fp32_model, tokenizer, eval_rows, judge, eval_sampling, cfg.seed,
                                         cfg.eval_batch_size, scorer=rm, reward=cfg)
        return result, [s["rm_score"] for s in result.samples]

    def eval_kl(model) -> float:
        """Mean KL(policy || SFT) per reply on eval prompts: exact per-token KL summed along sampled replies, both
        models at the sampling temperature (the distributions PPO's KL penalty and kl_target are about)."""
        g = torch.Generator(device=device).manual_seed(cfg.seed)

        @contextlib.contextmanager
        def fp32_reference():  # both sides in fp32 (with LoRA + EMA the reference is the autocast policy)
            with reference() as ref, fp32_forward(ref) as plain:
                yield plain

        with fp32_forward(model) as fp32_model:
            return torch.cat([masked_sum(r["kl_exact"], r["mask"], dim=1) for r in (
                rollout(fp32_model, fp32_reference, None, tokenizer, eval_prompts[i:i + cfg.eval_batch_size], cfg, g)
                for i in range(0, len(eval_prompts), cfg.eval_batch_size))]).mean().item()

    with reference() as ref:
        sft_eval = answer(ref) if accelerator.is_main_process and eval_rows else None

    def evaluate(step: int) -> dict:
        (sft, sft_rm), (ppo, ppo_rm) = sft_eval, answer(deliverable())
        result = {"sft_gold_score": sft.summary["gold/score"], "ppo_gold_score": ppo.summary["gold/score"],
                  "gold_win_rate": win_rate(ppo.scores, sft.scores), "kl_to_sft": eval_kl(deliverable()),
                  "kl_target": cfg.kl_target, "sft_rm_score": sum(sft_rm) / len(sft_rm),
                  "ppo_rm_score": sum(ppo_rm) / len(ppo_rm), "ppo_eos_rate": ppo.summary["eos_rate"],
                  "per_family_gold": {f: {"sft": s, "ppo": p} for (f, s, _), (_, p, _) in
                                      zip(family_table(sft.summary), family_table(ppo.summary), strict=True)},
                  "per_criterion_gold": {c: {"sft": sft.summary[f"gold/{c}"], "ppo": ppo.summary[f"gold/{c}"]}
                                         for c in CRITERIA_WEIGHTS},
                  "eval_prompts": len(eval_rows)}
        result["rm_score_gain"] = result["ppo_rm_score"] - result["sft_rm_score"]
        tracker.log({**{f"eval/{k}": v for k, v in result.items() if isinstance(v, float)},
                     **{f"eval/gold/{f}": v["ppo"] for f, v in result["per_family_gold"].items()}}, step=step)
        tracker.table("eval/samples", ["prompt", "family", "sft_response", "sft_rm", "sft_gold", "ppo_response",
                                       "ppo_rm", "ppo_gold"],
                      [[a["prompt"], a["family"], a["response"], sft_rm[i], a["gold_score"], b["response"], ppo_rm[i],
                        b["gold_score"]] for i, (a, b) in enumerate(zip(sft.samples, ppo.samples))], step=step)
        tqdm.write(f"[ppo] step {step} eval: gold {result['ppo_gold_score']:.3f} (SFT {result['sft_gold_score']:.3f}), "
                   f"win rate {result['gold_win_rate']:.1%}, KL to SFT {result['kl_to_sft']:.2f}, "
                   f"RM gain {result['rm_score_gain']:+.2f}")
        return result

    # ---- the PPO loop
    result, loop_started = None, time.perf_counter()
    for step in tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="ppo",
                     disable=not accelerator.is_main_process):
        started, done, train_policy = time.perf_counter(), step + 1, step >= cfg.critic_warmup_steps
        left = 1.0 - max(0, step - cfg.critic_warmup_steps) / max(1, cfg.max_steps - cfg.critic_warmup_steps)
        for opt, lr in ((policy_opt, cfg.policy_lr), (critic_opt, cfg.critic_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * (left if cfg.anneal_lr else 1.0)
        seed = cfg.seed * 1000003 + step * 1009 + rank
        sampler, shuffler = torch.Generator(device=device).manual_seed(seed), torch.Generator().manual_seed(seed + 7)

        # rollouts: this rank's prompts, sampled replies, log-probs, values; RM and gold scores of the text
        prompts = [rows[i]["prompt"] for i in
                   prompt_indices(len(rows), step, rank, n_ranks, cfg.rollout_batch_size, cfg.seed)]
        with accelerator.autocast():
            data = rollout(unwrap(policy), reference, unwrap(critic), tokenizer, prompts, cfg, sampler)
        replies, mask = data["replies"], data["mask"]
        rm_score = rm.score(prompts, replies, normalize=True, max_length=cfg.rm_max_length).to(device)
        gold = [judge.score(p, r).score for p, r in zip(prompts, replies) if judge.task(p) is not None]

        # rewards: shaped score at the last token minus beta * KL on every token; GAE; global whitening. Adds
        # score, kl, rlhf_reward (score - beta * KL, per reply), advantages and returns, one row per reply
        beta = kl_ctl.value
        data.update(rewards_and_advantages(data, rm_score, beta, cfg, all_reduce))
        rollout_seconds, update_started, update_stats = time.perf_counter() - started, time.perf_counter(), []

        # PPO update: epochs of shuffled minibatches, accumulated over micro-batches, clipped, one step per model
        # (rollout() trimmed the padding once for all rows: under bf16 a row's log-probs depend on the batch's width)
        micro = cfg.minibatch_size // cfg.grad_accum
        for _ in range(cfg.ppo_epochs):
            for minibatch in torch.randperm(cfg.rollout_batch_size, generator=shuffler).to(device).split(
                    cfg.minibatch_size):
                n_tokens = token_normaliser(mask[minibatch], cfg.grad_accum, n_ranks, all_reduce)
                for idx in minibatch.split(micro):
                    mb = {k: v[idx] for k, v in data.items() if isinstance(v, torch.Tensor)}
                    with accelerator.accumulate(policy, critic):
                        loss, stats = ppo_loss(policy, critic, mb, cfg, train_policy, n_tokens)
                        if ptx_batches is not None and train_policy:
                            blocks = next(ptx_batches)
                            stats["loss/ptx"] = policy(input_ids=blocks, labels=blocks).loss
                            loss = loss + cfg.ptx_coef * stats["loss/ptx"]
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            stats["val/grad_norm"] = accelerator.clip_grad_norm_(critic.parameters(), cfg.grad_clip)
                            if train_policy:
                                stats["policy/grad_norm"] = accelerator.clip_grad_norm_(policy.parameters(),
                                                                                        cfg.grad_clip)
                            for key in ("val/grad_norm", "policy/grad_norm"):
                                if key in stats:
                                    stop_if_not_finite(stats[key], "ppo", done, "Lower the learning rates.")
                        critic_opt.step()
                        critic_opt.zero_grad(set_to_none=True)
                        if train_policy:
                            policy_opt.step()
                            policy_opt.zero_grad(set_to_none=True)
                            if ema is not None and accelerator.sync_gradients:
                                ema.update_parameters(unwrap(policy))
                    update_stats.append({k: v.detach().float() for k, v in stats.items()})
        update_seconds = time.perf_counter() - update_started

        # metrics, reduced across ranks (equal batches per rank, so the mean of rank means is the global mean)
        seq_kl = data["kl"].sum(1)
        if train_policy:  # Ziegler's controller adapts beta to the KL of this batch
            kl_ctl.update(accelerator.reduce(seq_kl.mean(), "mean").item(), cfg.rollout_batch_size * n_ranks)
        local = {"objective/rm_score": rm_score.mean(), "objective/score": data["score"].mean(),
                 "objective/kl": seq_kl.mean(), "objective/kl_exact": masked_sum(data["kl_exact"], mask, dim=1).mean(),
                 "objective/rlhf_reward": data["rlhf_reward"].mean(),
                 "rollout/response_length": mask.sum(1).float().mean(),
                 "rollout/eos_rate": data["has_eos"].float().mean(),
                 **{k: torch.stack([s[k] for s in update_stats if k in s]).mean() for k in update_stats[-1]}}
        metrics = dict(zip(local, accelerator.reduce(torch.stack(list(local.values())).float(), "mean").tolist()))
        # float64 on every rank: a rank without world prompts would send int64 zeros, a collective of another size
        gold_stats = torch.tensor([float(sum(gold)), float(len(gold))], dtype=torch.float64, device=device)
        gold_sum, gold_count = accelerator.reduce(gold_stats, "sum").tolist()
        if gold_count:
            metrics["objective/gold_score"] = gold_sum / gold_count
        tokens = accelerator.reduce(mask.sum().float(), "sum").item()
        metrics.update({"objective/entropy": masked_mean(data["entropy"], mask, all_reduce=all_reduce).item(),
                        "objective/kl_coef": beta, "train/policy_lr": policy_opt.param_groups[0]["lr"],
                        "perf/generation_tokens_per_sec": tokens / data["generation_seconds"],
                        "perf/tokens_per_sec": tokens / (time.perf_counter() - started),
                        "perf/generation_seconds": data["generation_seconds"], "perf/rollout_seconds": rollout_seconds,
                        "perf/update_seconds": update_seconds})
        variance_explained = explained_variance(data["values"], data["returns"], mask, all_reduce)
        if not math.isnan(variance_explained):  # NaN when the returns do not vary: a diagnostic, not a failure
            metrics["val/explained_variance"] = variance_explained
        tracker.log(metrics, step=done, console=False)
        if accelerator.is_main_process:
            gold_part = f" | gold {metrics['objective/gold_score']:.3f}" if "objective/gold_score" in metrics else ""
            tqdm.write(f"[ppo] step {done} | rm {metrics['objective/rm_score']:+.3f}{gold_part} | kl "
                       f"{metrics['objective/kl']:.2f} (beta "
                       f"{beta:.3f}) | eos {metrics['rollout/eos_rate']:.2f} | "
                       f"{metrics['perf/tokens_per_sec']:.0f} tok/s")
        if eval_rows and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            if accelerator.is_main_process:
                result = evaluate(done)
            accelerator.wait_for_everyone()
        # the last step too: a resume with a larger max_steps then goes on from the end, not the step before
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_training_checkpoint(
                    paths.checkpoints, done, unwrap(policy), tokenizer,
                    {"policy_optimizer": policy_opt.state_dict(), "critic_optimizer": critic_opt.state_dict(),
                     "kl_controller": kl_ctl.state_dict(), "settings": settings,
                     "train_seconds": trained_before + time.perf_counter() - loop_started,
                     **({"ema": ema.state_dict()} if ema is not None else {})},
                    cfg.keep_checkpoints, extra_models={"critic": unwrap(critic).rm})
            accelerator.wait_for_everyone()

    # ---- the hand-off: a plain HF checkpoint (LoRA merged), eval.json; per-rank weight hashes on request
    train_seconds = trained_before + time.perf_counter() - loop_started
    if accelerator.is_main_process and eval_rows and result is None:  # resumed at max_steps: evaluate anyway
        result = evaluate(cfg.max_steps)
    accelerator.wait_for_everyone()
    print(f"[ppo] rank {rank} policy fingerprint {parameter_fingerprint(policy)}")  # equal on all ranks under DDP
    if accelerator.is_main_process:
        plain = lambda m: m.merge_and_unload() if cfg.lora.enabled else m  # noqa: E731
        if cfg.lora.enabled:
            with atomic_dir(paths.root / "adapter") as tmp:  # as SFT's: a kill mid-save leaves the old one whole
                deliverable().save_pretrained(tmp)
        if ema is not None:
            save_final(plain(unwrap(policy)), tokenizer, paths.root / "final_online", "ppo", world_data)
        save_final(plain(deliverable()), tokenizer, paths.final, "ppo", world_data, paths.launch_records,
                   ppo_ema=ema is not None)
        # written without an evaluation too: the report's Run facts read the training time there, as SFT's
        write_text_atomic(paths.root / "eval.json", json.dumps({**(result or {}), "train_seconds": train_seconds},
                                                               indent=1) + "\n")
        tracker.summary({**{f"final/{k}": v for k, v in (result or {}).items() if isinstance(v, (int, float))},
                         "time/train_seconds": train_seconds})
        print(f"[ppo] final policy in {paths.final}" + (f"; evaluation in {paths.root}/eval.json" if result else ""))
        tracker.finish(paths.final)
    end_stage(accelerator)


if __name__ == "__main__":
    run_main(main)
