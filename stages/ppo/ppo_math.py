"""Pure tensor maths for the PPO stage of the RLHF pipeline.

Everything here is a small, side-effect-free function of torch tensors (plus two
tiny KL-coefficient controllers), so it can be unit-tested on hand-sized inputs;
``rewards_and_advantages`` chains the reward functions as each PPO step does.

Conventions
-----------
* Per-token tensors have shape ``[B, T]`` and are aligned with the *response*
  tokens: position ``t`` holds the quantity for response token ``t``.
* ``mask`` is bool or 0/1 float, shape ``[B, T]``: 1 for real response tokens
  (up to and including the first EOS), 0 for padding and post-EOS positions.
  Every function that reduces over tokens ignores masked positions *entirely*:
  their values are selected away with ``torch.where`` (never multiplied by 0), so
  even NaN/inf garbage there changes neither the result nor the gradient.

References
----------
* [InstructGPT] Ouyang et al. 2022, "Training language models to follow
  instructions with human feedback".
* [N+] Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A
  Case Study on TL;DR Summarization".
* [GAE] Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation".
* [Ziegler] Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences" (adaptive KL controller).
* [k3] J. Schulman, "Approximating KL Divergence" (blog post, 2020).
* [PPO] Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from stages.ppo.config import PPOStageConfig

AllReduce = Callable[[Tensor], Tensor]

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_penalty_per_token",
    "shape_scores",
    "compute_rewards",
    "gae",
    "rewards_and_advantages",
    "policy_loss",
    "token_normaliser",
    "value_loss",
    "entropy_from_logits",
    "logprobs_from_logits",
    "explained_variance",
    "AdaptiveKLController",
    "FixedKLController",
    "kl_controller",
    "first_true_index",
    "response_mask",
]


# --------------------------------------------------------------------------- #
# Masked statistics
# --------------------------------------------------------------------------- #
def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is set (masked entries are dropped,
    not multiplied by zero, so NaN/inf there cannot leak)."""
    m = _as_bool(mask)
    xs = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xs.sum() if dim is None else xs.sum(dim=dim)


def _count(mask: Tensor, dtype: torch.dtype, dim=None) -> Tensor:
    m = _as_bool(mask).to(dtype)
    return m.sum() if dim is None else m.sum(dim=dim)


def masked_mean(
    x: Tensor,
    mask: Tensor,
    dim: int | Sequence[int] | None = None,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    The mean is ``sum(x * mask) / sum(mask)`` as used for per-token PPO losses
    and statistics in [N+] (Huang et al. 2024, "The N+ Implementation Details of
    RLHF with PPO").  An empty mask gives 0 instead of NaN.

    ``all_reduce``: optional function that returns the sum of a tensor across
    data-parallel ranks, e.g.
    ``def all_reduce(t): t = t.clone(); dist.all_reduce(t); return t``.  When
    given, both the numerator and the token count are reduced *before*
    dividing, so the result is exactly the global token mean (not a mean of
    per-rank means).  With ``dim`` set, every rank must produce the same
    output shape.
    """
    s = masked_sum(x, mask, dim)
    n = _count(mask, s.dtype, dim).expand_as(s)
    if all_reduce is not None:
        s, n = all_reduce(torch.stack([s, n])).unbind(0)  # one collective
    return s / n.clamp(min=1.0)


def masked_var(
    x: Tensor,
    mask: Tensor,
    unbiased: bool = True,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is 1.

    Two-pass computation from reduced sums -- ``sum x``, ``sum mask`` and then
    ``sum (x - mean)^2`` -- so that with ``all_reduce`` it is exactly the global
    variance across ranks.  ``unbiased`` applies Bessel's correction
    ``n / (n - 1)`` as in the whitening of [N+] / OpenAI's lm-human-preferences.
    Returns 0 when there are too few tokens (``n <= 1`` unbiased, ``n == 0``
    biased) instead of NaN.
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    sq = masked_sum((x - mean) ** 2, mask)
    n = _count(mask, sq.dtype)
    if all_reduce is not None:
        sq, n = all_reduce(torch.stack([sq, n])).unbind(0)
    denom = n - 1.0 if unbiased else n
    return sq / denom.clamp(min=1.0) * (denom > 0).to(sq.dtype)


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce: AllReduce | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Whiten ``x`` with masked statistics (advantage normalisation).

    ``(x - mean) / sqrt(var + 1e-8)`` over the masked positions, using the
    (unbiased) masked variance; with ``shift_mean=False`` the mean is not
    subtracted and ``x / sqrt(var + 1e-8)`` is returned (scale only).  Masked
    positions are returned as exactly 0.  Advantage whitening per minibatch is
    detail "advantage normalisation" in [N+] (Huang et al. 2024); PPO
    reference implementations whiten over all tokens of the batch.

    Note: OpenAI's lm-human-preferences ``whiten(shift_mean=False)`` instead
    returns ``(x - mean) / std + mean``; this function deliberately implements
    the scale-only variant.

    ``all_reduce`` (sum across ranks) makes mean and variance global, see
    :func:`masked_mean`.
    """
    m = _as_bool(mask)
    mean = masked_mean(x, m, all_reduce=all_reduce)
    var = masked_var(x, m, unbiased=True, all_reduce=all_reduce)
    centred = x - mean if shift_mean else x
    out = centred * torch.rsqrt(var + eps)
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


# --------------------------------------------------------------------------- #
# KL penalty and rewards
# --------------------------------------------------------------------------- #
def kl_penalty_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of sampled tokens.

    Estimators from J. Schulman, "Approximating KL Divergence" (2020), with
    samples x ~ pi and ``log r = log pi_ref(x) - log pi(x)``:

    * ``"k1"``: ``-log r = logp - ref_logp`` -- unbiased, can be negative; the
      per-token penalty used by InstructGPT (Ouyang et al. 2022, eq. 2) and
      Ziegler et al. 2019.
    * ``"k2"``: ``0.5 * (log r)^2`` -- biased, low variance, non-negative.
    * ``"k3"``: ``(r - 1) - log r`` -- unbiased and non-negative.

    Raises ``ValueError`` for any other estimator name.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    log_r = ref_logprobs - logprobs
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        # expm1 keeps precision when r ~ 1 (the common case).
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of 'k1', 'k2', 'k3'")


def answered(has_eos: Tensor, replies: list[str]) -> Tensor:
    """Replies the RM may score: ended with EOS and say something. An empty turn is no answer either; the RM
    never learns what one is worth (collection keeps only answers), so its score would be anyone's guess and a
    policy could learn to stop at once. Both get ``missing_eos_penalty`` in ``shape_scores``."""
    if len(replies) != has_eos.numel():
        raise ValueError(f"{len(replies)} replies for {has_eos.numel()} EOS flags")
    said = torch.tensor([bool(r.strip()) for r in replies], dtype=torch.bool, device=has_eos.device)
    return _as_bool(has_eos) & said


def shape_scores(
    scores: Tensor,
    has_eos: Tensor,
    missing_eos_penalty: float | None,
    clip: float | None,
) -> Tensor:
    """Sequence scores as PPO rewards them: a truncated reply gets a constant, then clipping.

    [N+] (Huang et al. 2024): a response that hit the length cap without EOS is
    not a finished answer, so its RM score is *replaced* by ``missing_eos_penalty``
    (``None``: keep the score); then scores are clipped to ``[-clip, clip]``
    (``None``: no clipping) so one outlier cannot dominate a batch.
    """
    out = scores
    if missing_eos_penalty is not None:
        out = torch.where(_as_bool(has_eos), out, torch.full_like(out, float(missing_eos_penalty)))
    return out if clip is None else out.clamp(-clip, clip)


def _last_true_index(mask: Tensor) -> Tensor:
    """Index of the last True along the last dim; -1 where there is none."""
    m = _as_bool(mask)
    pos = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, pos, torch.full_like(pos, -1)).amax(dim=-1)


def compute_rewards(
    score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: KL penalty on every token + RM score at the end.

    InstructGPT (Ouyang et al. 2022, eq. 2) maximises
    ``r_theta(x, y) - beta * log(pi(y|x) / pi_SFT(y|x))``; following Ziegler et
    al. 2019 and [N+] (Huang et al. 2024) this is spread over tokens as
    ``reward_t = -kl_coef * kl_t`` on every real response token, plus the
    scalar sequence ``score`` added at the *last* real response token of each
    row (the last position where ``mask == 1``).

    Args:
        score: ``[B]`` (or ``[B, 1]``) reward-model scores.
        logprobs, ref_logprobs: ``[B, T]`` policy / reference log-probs of the
            sampled response tokens.
        mask: ``[B, T]`` response mask.
        kl_coef: scalar beta (float or 0-d tensor).
        estimator: KL estimator, see :func:`kl_penalty_per_token`.

    Returns:
        ``(rewards, kl)``, both ``[B, T]`` and exactly 0 on masked positions.
        Rows with an all-zero mask get no score (all zeros).
    """
    m = _as_bool(mask)
    kl = kl_penalty_per_token(logprobs, ref_logprobs, estimator)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    kl = torch.where(m, kl, zero)
    rewards = -kl_coef * kl
    last = _last_true_index(m)
    has_any = last >= 0
    last = last.clamp(min=0)
    score = score.reshape(-1).to(rewards.dtype)
    if score.shape[0] != rewards.shape[0]:
        raise ValueError(f"score has {score.shape[0]} rows, expected {rewards.shape[0]}")
    add = torch.where(has_any, score, zero)
    rewards = rewards.scatter_add(1, last.unsqueeze(1), add.unsqueeze(1))
    return rewards, kl


# --------------------------------------------------------------------------- #
# Advantages
# --------------------------------------------------------------------------- #
@torch.no_grad()
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16).

    Backwards over the response tokens:
    ``delta_t = r_t + gamma * V_{t+1} - V_t``,
    ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V = 0`` and ``A = 0`` after the last real token (the episode ends at
    EOS / truncation, as in [N+]).  Masked positions are skipped entirely --
    they neither contribute rewards/values nor interrupt the recursion -- so
    padding or post-EOS garbage has no effect, and rows whose mask is 1 only on
    a prefix are handled naturally.  ``returns = advantages + values`` (the
    value-function targets).  Both outputs are 0 on masked positions.

    Runs under ``torch.no_grad``: advantages and returns are constants for
    the PPO update.
    """
    m = _as_bool(mask)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.to(dtype), zero)
    v = torch.where(m, values.to(dtype), zero)
    B, T = r.shape
    next_value = torch.zeros(B, dtype=dtype, device=r.device)
    last_adv = torch.zeros(B, dtype=dtype, device=r.device)
    adv_rev = []
    for t in range(T - 1, -1, -1):
        m_t = m[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * last_adv
        last_adv = torch.where(m_t, adv_t, last_adv)
        next_value = torch.where(m_t, v[:, t], next_value)
        adv_rev.append(torch.where(m_t, adv_t, zero))
    advantages = torch.stack(adv_rev[::-1], dim=1)
    returns = torch.where(m, advantages + v, zero)
    return advantages, returns


def rewards_and_advantages(rollout: dict, rm_score: Tensor, kl_coef: float, cfg: PPOStageConfig,
                           all_reduce: AllReduce | None = None) -> dict[str, Tensor]:
    """A rollout's rewards and advantages, as each PPO step computes them: the RM score shaped (a reply without EOS,
    or empty, scores ``cfg.missing_eos_penalty``; then clipped) at the last token minus ``kl_coef`` * KL on every
    token, GAE, and whitening over all ranks (``all_reduce``) as ``cfg`` asks. ``rollout``: what
    ``passes.rollout`` returns. Returns ``score`` [B], ``kl`` [B, T], ``rlhf_reward`` [B] (the reply's summed
    reward, score - kl_coef * KL, before any whitening), ``advantages`` and ``returns`` [B, T]."""
    mask = rollout["mask"]
    score = shape_scores(rm_score, answered(rollout["has_eos"], rollout["replies"]), cfg.missing_eos_penalty,
                         cfg.reward_clip)
    rewards, kl = compute_rewards(score, rollout["logprobs"], rollout["ref_logprobs"], mask, kl_coef,
                                  cfg.kl_estimator)
    rlhf_reward = rewards.sum(1)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    advantages, returns = gae(rewards, rollout["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask, all_reduce=all_reduce)
    return {"score": score, "kl": kl, "rlhf_reward": rlhf_reward, "advantages": advantages, "returns": returns}


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def token_normaliser(mask: Tensor, micro_batches: int, n_ranks: int = 1, all_reduce: AllReduce | None = None) -> Tensor:
    """What each micro-batch divides its summed token loss by, so the minibatch's gradient is the mean over all of
    its real tokens on every rank: the token count summed by ``all_reduce`` over ``n_ranks``, divided by
    ``micro_batches`` (accelerate divides each micro-batch's loss by their number) and by ``n_ranks`` (DDP
    averages their gradients). A per-micro-batch mean
    would instead weigh a token by the size of the micro-batch it lands in, so grad_accum and the number of
    processes would change the update."""
    count = _count(mask, torch.float32)
    if all_reduce is not None:  # the minibatch's tokens on every rank
        count = all_reduce(count)
    return count.clamp(min=1.0) / (micro_batches * n_ranks)


def _token_mean(x: Tensor, mask: Tensor, n_tokens: Tensor | float | None) -> Tensor:
    return masked_mean(x, mask) if n_tokens is None else masked_sum(x, mask) / n_tokens


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective, as a loss (Schulman et al. 2017, eq. 7).

    ``ratio = exp(logp - old_logp)``;
    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))``,
    averaged over all real tokens of the batch (token-level mean, [N+]). ``n_tokens``: divide the masked sum by
    this count instead of the batch's own, so that a micro-batch of a larger minibatch weighs each of its tokens
    as the whole minibatch's mean would (see ``token_normaliser``).

    Stats (detached 0-d tensors):
      * ``clipfrac``: fraction of tokens where the clipped term is active,
        ``masked_mean(-A * clipped > -A * ratio)``.
      * ``approxkl``: ``0.5 * masked_mean((logp - old_logp)^2)``, the k2
        estimator logged by OpenAI's lm-human-preferences / [N+].
    """
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(m, logprobs - old_logprobs, zero)
    adv = torch.where(m, advantages.to(logprobs.dtype), zero)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = _token_mean(torch.maximum(pg_unclipped, pg_clipped), m, n_tokens)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(logprobs.dtype), m),
            "approxkl": 0.5 * masked_mean(log_ratio.detach() ** 2, m),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float | None,
    n_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value-function loss (OpenAI baselines / lm-human-preferences, [N+]).

    ``v_clipped = old_values + clamp(values - old_values, -eps_v, eps_v)``;
    ``loss = 0.5 * masked_mean(max((values - returns)^2, (v_clipped - returns)^2))``.
    ``clip_range_value=None`` disables clipping (plain 0.5 * MSE). ``n_tokens`` as in ``policy_loss``.

    Stats: ``clipfrac`` = fraction of tokens where the clipped error is the
    larger one (detached 0-d tensor).
    """
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v = torch.where(m, values, zero)
    v_old = torch.where(m, old_values.to(values.dtype), zero)
    ret = torch.where(m, returns.to(values.dtype), zero)
    err_unclipped = (v - ret) ** 2
    if clip_range_value is None:
        err_clipped = err_unclipped
    else:
        v_clipped = v_old + torch.clamp(v - v_old, -clip_range_value, clip_range_value)
        err_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * _token_mean(torch.maximum(err_unclipped, err_clipped), m, n_tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), m)}
    return loss, stats


# --------------------------------------------------------------------------- #
# Logits helpers
# --------------------------------------------------------------------------- #
def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-token entropy ``H = logsumexp(z) - sum softmax(z) * z`` of ``[B, T, V]``
    logits, returned as ``[B, T]`` (float32 or wider).

    The (max-shifted) logsumexp form is numerically stable and avoids an
    explicit ``log_softmax`` tensor; logged as the policy entropy in [N+].
    Expects finite logits.
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    # Entropy is shift-invariant; removing the max keeps both terms O(1) so
    # they do not cancel catastrophically for large logits.
    z = z - z.detach().amax(dim=-1, keepdim=True)
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probabilities of ``tokens`` [B, T] under ``logits`` [B, T, V]
    (``log_softmax`` + ``gather``), returned as ``[B, T]``.

    ``logits[:, t]`` must already be the distribution that *produced*
    ``tokens[:, t]`` (i.e. the caller shifts causal-LM logits by one) and,
    per [N+] (Huang et al. 2024), be divided by the sampling temperature.
    Half-precision logits are upcast to float32 for the softmax.
    """
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = torch.log_softmax(z, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def explained_variance(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    all_reduce: AllReduce | None = None,
) -> float:
    """``1 - Var[returns - values] / Var[returns]`` over masked tokens.

    Value-function diagnostic from OpenAI baselines, logged in [N+]: 1 is a
    perfect fit, 0 is no better than a constant, negative is worse.  Returns a
    python float (NaN when the returns have zero variance).
    """
    with torch.no_grad():
        var_y = masked_var(returns, mask, all_reduce=all_reduce)
        var_res = masked_var(returns - values, mask, all_reduce=all_reduce)
        if float(var_y) == 0.0:
            return float("nan")
        return float(1.0 - var_res / var_y)


# --------------------------------------------------------------------------- #
# KL coefficient controllers
# --------------------------------------------------------------------------- #
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2).

    Proportional control of ``beta`` towards a target KL ``KL_target``:
    ``e = clip(KL / KL_target - 1, -0.2, 0.2)``,
    ``beta <- beta * (1 + e * n_steps / horizon)``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update ``value`` after ``n_steps`` samples/episodes with mean KL
        ``current_kl``; returns the new value."""
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the current coefficient.  ``target``/``horizon`` stay as
        constructed (they come from the run config)."""
        self.value = float(state["value"])


class FixedKLController:
    """Constant KL coefficient (InstructGPT uses a fixed beta; Ouyang et al. 2022).

    Same interface as :class:`AdaptiveKLController`; ``update`` is a no-op.
    """

    def __init__(self, kl_coef: float, target: float | None = None, horizon: float | None = None):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Nothing to restore: a fixed coefficient is the run config's (a run resumed as fixed after adapting takes
        the config's, not the adapted one)."""


def kl_controller(
    init_kl_coef: float, target: float | None, horizon: float
) -> AdaptiveKLController | FixedKLController:
    """Adaptive controller (Ziegler et al. 2019) if ``target`` is set, else fixed."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)


# --------------------------------------------------------------------------- #
# Response masks
# --------------------------------------------------------------------------- #
def first_true_index(x: Tensor, dim: int = -1) -> Tensor:
    """Index of the first True along ``dim``; ``x.size(dim)`` where there is none."""
    x = _as_bool(x)
    n = x.shape[dim]
    shape = [1] * x.dim()
    shape[dim] = n
    pos = torch.arange(n, device=x.device).view(shape).expand_as(x)
    return torch.where(x, pos, torch.full_like(pos, n)).amin(dim=dim)


def response_mask(
    response_tokens: Tensor,
    eos_token_ids: Sequence[int] | int,
    pad_token_id: int | None,
) -> tuple[Tensor, Tensor]:
    """Mask of the real tokens of generated responses ``[B, T]``.

    True up to and *including* the first EOS token, False after it.  In rows
    without any EOS (truncated at max length) everything is True except a
    trailing run of ``pad_token_id`` tokens.  Pad tokens that occur before the
    first EOS are kept (they were sampled by the policy); when
    ``pad_token_id`` is also an EOS id, the first one is the EOS and kept.

    [N+] (Huang et al. 2024) uses ``has_eos`` to penalise truncated responses
    that never emitted EOS (replace their score by a constant).

    Returns:
        ``(mask, has_eos)``: bool ``[B, T]`` and bool ``[B]``.
    """
    tokens = response_tokens
    T = tokens.shape[-1]
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos = torch.as_tensor(list(eos_token_ids), dtype=tokens.dtype, device=tokens.device)
    is_eos = torch.isin(tokens, eos)
    first_eos = first_true_index(is_eos, dim=-1)  # T if none
    has_eos = first_eos < T
    pos = torch.arange(T, device=tokens.device).expand_as(tokens)
    mask = pos <= first_eos.unsqueeze(-1)
    if pad_token_id is not None:
        non_pad = tokens != pad_token_id
        last_non_pad = _last_true_index(non_pad)  # -1 if the row is all padding
        # trailing padding only matters for rows without EOS
        trailing_pad = (pos > last_non_pad.unsqueeze(-1)) & ~has_eos.unsqueeze(-1)
        mask = mask & ~trailing_pad
    return mask, has_eos
