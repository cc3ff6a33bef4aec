"""The model-facing half of PPO: the token-level critic, sampling and scoring rollouts, and the PPO loss on a
minibatch. stages/ppo/ppo.py runs the loop; ppo_math.py holds the pure tensor maths these call."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from pipeline.generation import decode_responses, encode_prompts, sample, stop_token_ids
from stages.ppo.ppo_math import entropy_from_logits, logprobs_from_logits, policy_loss, response_mask, value_loss

if TYPE_CHECKING:
    from stages.ppo.config import PPOStageConfig


class TokenCritic(torch.nn.Module):
    """The value function: the RM's backbone with its score head applied at every position.

    AutoModelForSequenceClassification applies `score` to all hidden states but returns only the last non-pad
    one; PPO needs a value per response token, so we run the backbone and apply the head everywhere. The RM's
    mean/std are folded in, so values are in the units of the (normalised) rewards from the first step. DDP wraps
    this module, so training must call its forward, not the backbone's.
    """

    def __init__(self, rm: torch.nn.Module):
        super().__init__()
        self.rm = rm
        self.mean, self.std = getattr(rm.config, "reward_mean", 0.0), getattr(rm.config, "reward_std", 1.0) or 1.0

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = self.rm.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids).last_hidden_state
        return (self.rm.score(hidden).squeeze(-1).float() - self.mean) / self.std


def response_logits(model, batch: dict, temperature: float) -> torch.Tensor:
    """Logits [B, T, V] that produced each response token, divided by the sampling temperature (N+)."""
    n_prompt = batch["input_ids"].size(1) - batch["responses"].size(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    return logits[:, n_prompt - 1:-1].float() / temperature


def response_values(critic, batch: dict) -> torch.Tensor:
    n_prompt = batch["input_ids"].size(1) - batch["responses"].size(1)
    return critic(batch["input_ids"], batch["attention_mask"], batch["position_ids"])[:, n_prompt - 1:-1]


@torch.no_grad()
def rollout(policy, reference, critic, tokenizer, prompts: list[str], cfg: PPOStageConfig, generator) -> dict:
    """Sample replies to `prompts` (KV cache; stop at a stop token or the length cap), then score them token by
    token. `replies`: their text up to the stop token, as the RM and the judge read it."""
    enc = encode_prompts(tokenizer, prompts, next(policy.parameters()).device)
    started = time.perf_counter()
    stops = stop_token_ids(policy, tokenizer)
    responses = sample(policy, enc["input_ids"], enc["attention_mask"], cfg.sampling, stops, tokenizer.pad_token_id,
                       generator)
    seconds = time.perf_counter() - started
    return {**score_rollout(policy, reference, critic, tokenizer, enc, responses, cfg), "generation_seconds": seconds,
            "replies": decode_responses(tokenizer, responses, stops)}


@torch.no_grad()
def score_rollout(policy, reference, critic, tokenizer, enc: dict, responses: torch.Tensor, cfg: PPOStageConfig):
    """Policy and reference log-probs, entropy, exact KL and values (critic may be None), one pass each.

    `reference()` is a context manager yielding the SFT model. Tokens after a reply's first EOS are masked out.
    """
    # our sampler writes pad only after EOS, so a pad in a reply without EOS was sampled: an action like any other
    # (no trailing-pad rule, which would hide it from the loss and, in an all-pad reply, from the RM score too)
    mask, has_eos = response_mask(responses, stop_token_ids(policy, tokenizer), None)
    attention_mask = torch.cat([enc["attention_mask"], mask.long()], dim=1)
    # the padding every row has is dropped once, here: the update's micro-batches are then cut from tensors of this
    # width, the width these log-probs are computed at (under bf16 a row's results change with the batch's width)
    batch = trim_padding({"input_ids": torch.cat([enc["input_ids"], responses], dim=1),
                          "attention_mask": attention_mask,
                          "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0), "responses": responses,
                          "mask": mask, "has_eos": has_eos})
    parts: dict[str, list] = {"logprobs": [], "ref_logprobs": [], "entropy": [], "kl_exact": [], "values": []}
    for rows in torch.arange(len(responses)).split(cfg.minibatch_size // cfg.grad_accum):
        chunk = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "position_ids", "responses", "mask")}
        logits = response_logits(policy, chunk, cfg.sampling.temperature)
        with reference() as ref_model:
            ref_logits = response_logits(ref_model, chunk, cfg.sampling.temperature)
        parts["logprobs"].append(logprobs_from_logits(logits, chunk["responses"]))
        parts["ref_logprobs"].append(logprobs_from_logits(ref_logits, chunk["responses"]))
        parts["entropy"].append(entropy_from_logits(logits))
        logp, ref_logp = logits.log_softmax(-1), ref_logits.log_softmax(-1)  # exact KL of the next-token laws
        parts["kl_exact"].append((logp.exp() * (logp - ref_logp)).sum(-1))
        if critic is not None:
            parts["values"].append(response_values(critic, chunk))
    return {**batch, **{k: torch.cat(v) for k, v in parts.items() if v}}


def trim_padding(mb: dict) -> dict:
    """Drop the columns that are padding in every row (before the prompts, after the replies)."""
    n_prompt = mb["input_ids"].size(1) - mb["responses"].size(1)
    first = int(mb["attention_mask"][:, :n_prompt].any(0).nonzero().min())
    width = int(mb["mask"].any(0).nonzero().max()) + 1 if mb["mask"].any() else 1
    return {k: v[:, first:n_prompt + width] if k in ("input_ids", "attention_mask", "position_ids") else
            v[:, :width] if v.dim() == 2 else v for k, v in mb.items()}


def ppo_loss(policy, critic, mb: dict, cfg: PPOStageConfig, train_policy: bool = True,
             n_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The PPO objective on one micro-batch: clipped policy loss + vf_coef * clipped value loss, each token's loss
    divided by `n_tokens` (ppo_math.token_normaliser; None: the micro-batch's mean)."""
    vf_loss, vf_stats = value_loss(response_values(critic, mb), mb["values"], mb["returns"], mb["mask"],
                                   cfg.cliprange_value, n_tokens)
    loss, stats = cfg.vf_coef * vf_loss, {"loss/value": vf_loss.detach(), "val/clipfrac": vf_stats["clipfrac"]}
    if train_policy:
        logprobs = logprobs_from_logits(response_logits(policy, mb, cfg.sampling.temperature), mb["responses"])
        pg_loss, pg_stats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], cfg.cliprange,
                                       n_tokens)
        loss = loss + pg_loss
        stats.update({"loss/policy": pg_loss.detach(), **{f"policy/{k}": v for k, v in pg_stats.items()}})
    return loss, stats
