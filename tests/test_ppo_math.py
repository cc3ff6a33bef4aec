"""Tests for stages/ppo/ppo_math.py.

Expected values are computed by hand (literal numbers) or by explicit python
loops over floats -- never by calling the function under test.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch


from stages.ppo.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    first_true_index,
    gae,
    kl_controller,
    kl_penalty_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    rewards_and_advantages,
    shape_scores,
    token_normaliser,
    value_loss,
)

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-9):
    a = torch.as_tensor(a, dtype=D)
    b = torch.as_tensor(b, dtype=D)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=0), (a, b)


# --------------------------------------------------------------------------- #
# masked statistics
# --------------------------------------------------------------------------- #
def test_masked_mean_and_var_by_hand():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 9.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]], torch.bool)
    close(masked_mean(x, mask), 3.0)  # (1+2+3+4+5)/5
    # unbiased: ((1-3)^2 + (2-3)^2 + 0 + (4-3)^2 + (5-3)^2) / 4 = 10/4
    close(masked_var(x, mask), 2.5)
    close(masked_var(x, mask, unbiased=False), 2.0)
    # per-row mean
    close(masked_mean(x, mask, dim=1), [2.0, 4.5])
    # float 0/1 mask behaves like bool
    close(masked_mean(x, mask.to(D)), 3.0)
    # empty mask -> 0, not NaN
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)


def test_masked_whiten_by_hand():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, float("nan"), float("inf")]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]], torch.bool)
    std = math.sqrt(2.5 + 1e-8)
    w = masked_whiten(x, mask)
    close(w, [[-2 / std, -1 / std, 0.0, 0.0], [1 / std, 2 / std, 0.0, 0.0]])
    # statistics over the mask: mean 0, (unbiased) std 1
    vals = [w[0, 0], w[0, 1], w[0, 2], w[1, 0], w[1, 1]]
    vals = [float(v) for v in vals]
    mean = sum(vals) / 5
    var = sum((v - mean) ** 2 for v in vals) / 4
    assert abs(mean) < 1e-9 and abs(var - 1.0) < 1e-6
    # shift_mean=False: scale only
    w2 = masked_whiten(x, mask, shift_mean=False)
    close(w2, [[1 / std, 2 / std, 3 / std, 0.0], [4 / std, 5 / std, 0.0, 0.0]])


def test_whiten_random_mean0_std1():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g, dtype=D) * 3 + 5
    lengths = [7, 3, 1, 5]
    mask = torch.zeros(4, 7, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    w = masked_whiten(x, mask)
    vals = [float(w[b, i]) for b in range(4) for i in range(lengths[b])]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    assert abs(mean) < 1e-9 and abs(var - 1.0) < 1e-6
    assert (w[~mask] == 0).all()


# --------------------------------------------------------------------------- #
# distributed statistics via all_reduce
# --------------------------------------------------------------------------- #
def test_all_reduce_two_identical_ranks():
    x = t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 9.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]], torch.bool)
    calls = []

    def double(z):  # two identical ranks: the sum over ranks is 2 * local
        calls.append(z.shape)
        return 2 * z

    close(masked_mean(x, mask, all_reduce=double), 3.0)
    # global set = the five values twice: mean 3, sum sq dev 20, n = 10 -> 20/9
    close(masked_var(x, mask, all_reduce=double), 20.0 / 9.0)
    close(masked_var(x, mask, unbiased=False, all_reduce=double), 2.0)
    std = math.sqrt(20.0 / 9.0 + 1e-8)
    close(
        masked_whiten(x, mask, all_reduce=double),
        [[-2 / std, -1 / std, 0.0, 0.0], [1 / std, 2 / std, 0.0, 0.0]],
    )
    assert calls, "all_reduce was never called"


class ThreadAllReduce:
    """Simulates a sum all-reduce among `n` ranks running in threads."""

    def __init__(self, n):
        self.slots = [None] * n
        self.barrier = threading.Barrier(n, timeout=10)

    def for_rank(self, rank):
        def fn(z):
            self.slots[rank] = z.clone()
            self.barrier.wait()
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total = total + other
            self.barrier.wait()
            return total

        return fn


def run_ranks(fn_per_rank, n):
    results, errors = [None] * n, []

    def target(r):
        try:
            results[r] = fn_per_rank(r)
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=20)
    if errors:
        raise errors[0]
    return results


def test_all_reduce_two_different_ranks_equals_global():
    # rank 0 holds rows 0-1 (4 tokens), rank 1 holds row 2 (3 tokens).
    x = t([[1.0, 2.0, 3.0, 50.0], [4.0, 0.0, 0.0, 0.0], [10.0, 6.0, 8.0, 7.0]])
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 0]], torch.bool)
    shards = [(x[:2], mask[:2]), (x[2:], mask[2:])]

    # global statistics by hand over the 8 real tokens
    vals = [1.0, 2.0, 3.0, 4.0, 10.0, 6.0, 8.0]
    g_mean = sum(vals) / len(vals)  # 34 / 7
    g_var = sum((v - g_mean) ** 2 for v in vals) / (len(vals) - 1)
    g_var_b = sum((v - g_mean) ** 2 for v in vals) / len(vals)
    # mean of per-rank means would be different -> the test can fail
    assert abs(((1 + 2 + 3 + 4) / 4 + (10 + 6 + 8) / 3) / 2 - g_mean) > 0.1

    ar = ThreadAllReduce(2)

    def work(r):
        xs, ms = shards[r]
        f = ar.for_rank(r)
        return (
            masked_mean(xs, ms, all_reduce=f),
            masked_var(xs, ms, all_reduce=f),
            masked_var(xs, ms, unbiased=False, all_reduce=f),
            masked_whiten(xs, ms, all_reduce=f),
        )

    res = run_ranks(work, 2)
    std = math.sqrt(g_var + 1e-8)
    for r in range(2):
        mean, var, var_b, w = res[r]
        close(mean, g_mean)
        close(var, g_var)
        close(var_b, g_var_b)
        xs, ms = shards[r]
        expected = [
            [(float(xs[i, j]) - g_mean) / std if ms[i, j] else 0.0 for j in range(4)]
            for i in range(xs.shape[0])
        ]
        close(w, expected)


# --------------------------------------------------------------------------- #
# KL estimators, rewards
# --------------------------------------------------------------------------- #
def test_kl_estimators_by_hand():
    logp = t([-1.0, -2.0, -0.5])
    ref = t([-1.5, -1.0, -0.5])
    close(kl_penalty_per_token(logp, ref, "k1"), [0.5, -1.0, 0.0])
    close(kl_penalty_per_token(logp, ref), [0.5, -1.0, 0.0])  # default k1
    # k3 = (r - 1) - log r with log r = ref - logp = [-0.5, 1.0, 0.0]
    k3 = kl_penalty_per_token(logp, ref, "k3")
    close(k3, [math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1.0, 0.0])
    close(k3, [0.10653065971263342, 0.7182818284590451, 0.0])
    assert (k3 >= 0).all()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(100, generator=g), torch.randn(100, generator=g)
    assert (kl_penalty_per_token(a, b, "k3") >= 0).all()
    with pytest.raises(ValueError, match="bogus"):
        kl_penalty_per_token(logp, ref, "bogus")


def test_compute_rewards_places_score_at_last_real_token():
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], torch.bool)
    ref = torch.zeros(3, 4, dtype=D)
    logp = t([[0.1, 0.2, 0.3, 9.0], [0.5, -0.5, 7.0, float("nan")], [0.0, 0.0, 0.0, 0.1]])
    score = t([1.0, 2.0, -3.0])
    rewards, kl = compute_rewards(score, logp, ref, mask, kl_coef=0.1)
    close(kl, [[0.1, 0.2, 0.3, 0.0], [0.5, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.1]])
    close(
        rewards,
        [
            [-0.01, -0.02, -0.03 + 1.0, 0.0],
            [-0.05, 0.05 + 2.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, -0.01 - 3.0],
        ],
    )
    # score of shape [B, 1] works too
    r2, _ = compute_rewards(score[:, None], logp, ref, mask, kl_coef=0.1)
    close(r2, rewards)
    # k3 estimator path
    r3, kl3 = compute_rewards(score, logp, ref, mask, kl_coef=0.5, estimator="k3")
    k3_01 = math.exp(-0.1) - 1 + 0.1
    assert abs(float(kl3[0, 0]) - k3_01) < 1e-12
    assert abs(float(r3[0, 0]) + 0.5 * k3_01) < 1e-12


# --------------------------------------------------------------------------- #
# GAE
# --------------------------------------------------------------------------- #
def test_gae_1x3_hand_unrolled():
    rewards = t([[0.1, -0.2, 1.0]])
    values = t([[0.5, 0.4, 0.3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta2 = 1.0 - 0.3 = 0.7                       A2 = 0.7
    # delta1 = -0.2 + 0.9*0.3 - 0.4 = -0.33          A1 = -0.33 + 0.72*0.7   = 0.174
    # delta0 = 0.1 + 0.9*0.4 - 0.5 = -0.04           A0 = -0.04 + 0.72*0.174 = 0.08528
    close(adv, [[0.08528, 0.174, 0.7]])
    close(ret, [[0.58528, 0.574, 1.0]])


def test_gae_2x4_with_padded_row():
    rewards = t([[0.0, 0.0, 0.0, 1.0], [0.0, 2.0, 7.0, 7.0]])
    values = t([[0.2, 0.4, 0.6, 0.8], [1.0, 0.5, 9.0, float("nan")]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]], torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: every delta is 0.2; A3=.2, A2=.3, A1=.35, A0=.375
    # row 1: value after token 1 is 0 (episode ends), garbage ignored:
    #   delta1 = 2.0 - 0.5 = 1.5 -> A1 = 1.5 ; delta0 = 0.5 - 1.0 = -0.5 -> A0 = -0.5 + 0.5*1.5 = 0.25
    close(adv, [[0.375, 0.35, 0.3, 0.2], [0.25, 1.5, 0.0, 0.0]])
    close(ret, [[0.575, 0.75, 0.9, 1.0], [1.25, 2.0, 0.0, 0.0]])


def reference_gae(rewards, values, lengths, gamma, lam):
    """Plain python loop over each row's real prefix."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    for b in range(B):
        n = lengths[b]
        last = 0.0
        for i in reversed(range(n)):
            next_v = values[b][i + 1] if i + 1 < n else 0.0
            delta = rewards[b][i] + gamma * next_v - values[b][i]
            last = delta + gamma * lam * last
            adv[b][i] = last
    ret = [[adv[b][i] + values[b][i] if i < lengths[b] else 0.0 for i in range(T)] for b in range(B)]
    return adv, ret


def test_gae_random_against_python_loop():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(4, 6, generator=g, dtype=D)
    v = torch.randn(4, 6, generator=g, dtype=D)
    lengths = [6, 2, 1, 4]
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    adv, ret = gae(r, v, mask, gamma=0.97, lam=0.9)
    exp_adv, exp_ret = reference_gae(r.tolist(), v.tolist(), lengths, 0.97, 0.9)
    close(adv, exp_adv)
    close(ret, exp_ret)


def test_gae_no_grad():
    v = torch.tensor([[0.1, 0.2]], requires_grad=True)
    adv, ret = gae(torch.ones(1, 2), v, torch.ones(1, 2), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


def test_a_ppo_steps_rewards_are_the_shaped_score_minus_beta_kl_and_its_advantages_whitened():
    """rewards_and_advantages, as the PPO stage calls it on each rollout: the reward each reply is trained on, and
    the advantages the update weighs its tokens by."""
    from stages.ppo.config import PPOStageConfig

    nan = float("nan")  # at masked positions: must not leak
    rollout = {"mask": t([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], torch.bool),
               "has_eos": torch.tensor([True, False, True]), "replies": ["Five.", "It is five and", "No."],
               "logprobs": t([[-1.0, -0.5, -0.2, 9.0], [-0.3, -0.3, -0.3, -0.3], [-2.0, -0.1, nan, nan]]),
               "ref_logprobs": t([[-1.2, -0.5, -0.6, 0.0], [-0.3, -0.5, -0.1, -0.4], [-1.0, -0.1, 0.0, 0.0]]),
               "values": t([[0.1, 0.2, 0.3, nan], [0.0, -0.5, 0.5, 1.0], [0.4, 0.3, 7.0, 7.0]])}
    rm_score, beta = t([0.5, 2.0, -7.0]), 0.1
    plain = rewards_and_advantages(rollout, rm_score, beta, PPOStageConfig(lam=1.0, whiten_advantages=False))
    # row 1 hit the length cap without EOS: missing_eos_penalty (-1) replaces its RM score; row 2 is clipped to -5
    close(plain["score"], [0.5, -1.0, -5.0])
    # k1 KL (logp - ref) summed over real tokens: 0.2 + 0 + 0.4, 0 + 0.2 - 0.2 + 0.1, -1.0 + 0
    close(plain["kl"], [[0.2, 0.0, 0.4, 0.0], [0.0, 0.2, -0.2, 0.1], [-1.0, 0.0, 0.0, 0.0]], tol=1e-12)
    close(plain["rlhf_reward"], [0.5 - beta * 0.6, -1.0 - beta * 0.1, -5.0 - beta * -1.0], tol=1e-12)
    # gamma = lam = 1: a token's advantage is the reward still to come (all of it at the first) minus its value
    close(plain["advantages"][:, 0], plain["rlhf_reward"] - rollout["values"][:, 0], tol=1e-12)
    close(plain["returns"], torch.where(rollout["mask"], plain["advantages"] + rollout["values"], 0.0), tol=1e-12)

    whitened = rewards_and_advantages(rollout, rm_score, beta, PPOStageConfig(lam=1.0))
    mask = rollout["mask"]
    real = [float(a) for a in whitened["advantages"][mask]]
    mean = sum(real) / len(real)
    assert abs(mean) < 1e-9 and abs(sum((a - mean) ** 2 for a in real) / (len(real) - 1) - 1.0) < 1e-6
    assert (whitened["advantages"][~mask] == 0).all()
    # the plain advantages, centred and scaled over the real tokens of every row
    unwhitened = [float(a) for a in plain["advantages"][mask]]
    plain_mean = sum(unwhitened) / len(unwhitened)
    plain_std = math.sqrt(sum((a - plain_mean) ** 2 for a in unwhitened) / (len(unwhitened) - 1))
    close(real, [(a - plain_mean) / plain_std for a in unwhitened], tol=1e-6)
    for key in ("score", "kl", "rlhf_reward", "returns"):  # whitening the advantages changes nothing else
        close(whitened[key], plain[key])


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
def test_policy_loss_clipped_by_hand():
    ratios = [1.5, 0.5, 1.1, 0.7]
    adv_list = [1.0, 1.0, -1.0, -1.0]
    old_list = [-1.0, -2.0, -0.5, -1.2]
    old = t([old_list + [-3.0]])
    logp = t([[o + math.log(r) for o, r in zip(old_list, ratios)] + [50.0]]).requires_grad_(True)
    adv = t([adv_list + [1e6]])
    mask = t([[1, 1, 1, 1, 0]], torch.bool)
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # token 0: r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: r=0.5, A=+1: max(-0.5, -0.8) = -0.5
    # token 2: r=1.1, A=-1: max(1.1, 1.1)   =  1.1
    # token 3: r=0.7, A=-1: max(0.7, 0.8)   =  0.8 (clipped)
    close(loss.detach(), (-1.2 - 0.5 + 1.1 + 0.8) / 4)
    close(stats["clipfrac"], 0.5)
    approxkl = 0.5 * sum(math.log(r) ** 2 for r in ratios) / 4
    close(stats["approxkl"], approxkl)
    loss.backward()
    grad = logp.grad[0]
    # clipped tokens and the padding get no gradient; d/dlogp(-A r)/4 = -A r / 4
    close(grad, [0.0, -0.5 / 4, 1.1 / 4, 0.0, 0.0])


def test_value_loss_clipped_by_hand():
    values = t([[1.0, 0.6, 0.0, 0.2, 123.0]])
    old = t([[0.5, 0.5, 0.5, 1.0, -5.0]])
    returns = t([[1.0, 1.0, 1.0, 0.0, float("inf")]])
    mask = t([[1, 1, 1, 1, 0]], torch.bool)
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # v_clipped = [0.7, 0.6, 0.3, 0.8]
    # unclipped sq err = [0.0, 0.16, 1.0, 0.04]; clipped = [0.09, 0.16, 0.49, 0.64]
    # max = [0.09, 0.16, 1.0, 0.64] -> 0.5 * 1.89 / 4
    close(loss, 0.5 * 1.89 / 4)
    close(stats["clipfrac"], 0.5)
    # no clipping
    loss_nc, stats_nc = value_loss(values, old, returns, mask, clip_range_value=None)
    close(loss_nc, 0.5 * (0.0 + 0.16 + 1.0 + 0.04) / 4)
    close(stats_nc["clipfrac"], 0.0)


def test_micro_batches_and_ranks_weigh_every_token_of_a_minibatch_alike():
    """A minibatch cut into micro-batches (accelerate divides each one's loss by their number) and over ranks (DDP
    averages the ranks' gradients) gets the gradient of one token-mean over the whole minibatch. A per-micro-batch
    mean weighed a token of a 1-token reply ten times as much as one of a 10-token reply beside it."""
    torch.manual_seed(0)
    lengths = [1, 10, 10, 1]  # micro-batches {0, 1} and {2, 3} hold 11 tokens each; {0, 3} would hold 2
    mask = torch.arange(10)[None, :] < t(lengths)[:, None]
    logprobs, values = torch.randn(4, 10, dtype=D, requires_grad=True), torch.randn(4, 10, dtype=D, requires_grad=True)
    old, adv, old_values, returns = (torch.randn(4, 10, dtype=D) for _ in range(4))

    def grads(groups: list[list[int]], n_ranks: int, per_micro_mean: bool = False):
        """`groups`: rank by rank, the rows of each of its micro-batches."""
        logprobs.grad = values.grad = None
        rank_counts = [float(mask[sum(g, [])].sum()) for g in groups]
        for micro_batches in groups:
            n_tokens = None if per_micro_mean else token_normaliser(
                mask[sum(micro_batches, [])], len(micro_batches), n_ranks, lambda c: c.new_tensor(sum(rank_counts)))
            for rows in micro_batches:
                pl, _ = policy_loss(logprobs[rows], old[rows], adv[rows], mask[rows], 0.2, n_tokens)
                vl, _ = value_loss(values[rows], old_values[rows], returns[rows], mask[rows], 0.2, n_tokens)
                ((pl + vl) / len(micro_batches) / n_ranks).backward()  # accelerate's division, then DDP's mean
        return logprobs.grad.clone(), values.grad.clone()

    whole = grads([[[0, 1, 2, 3]]], 1)
    for split in ([[[0, 3], [1, 2]]], [[[0]], [[1, 2, 3]]], [[[0], [3]], [[1], [2]]]):  # grad_accum, ranks, both
        for got, want in zip(grads(split, len(split)), whole):
            torch.testing.assert_close(got, want)
    got, want = grads([[[0, 3], [1, 2]]], 1, per_micro_mean=True), whole  # the old weighting: the check can fail
    assert not torch.allclose(got[0], want[0])


def test_explained_variance_by_hand():
    returns = t([[1.0, 2.0, 3.0, 99.0]])
    values = t([[1.0, 2.0, 2.0, -4.0]])
    mask = t([[1, 1, 1, 0]], torch.bool)
    # residual [0, 0, 1]: unbiased var 1/3; var(returns) = 1
    ev = explained_variance(values, returns, mask)
    assert abs(float(ev) - 2.0 / 3.0) < 1e-9


def test_entropy_and_logprobs_from_logits_by_hand():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, -1.0]]])
    ent = entropy_from_logits(logits)
    z = [1.0, 2.0, 3.0, -1.0]
    lse = math.log(sum(math.exp(v) for v in z))
    p = [math.exp(v - lse) for v in z]
    close(ent, [[math.log(4.0), -sum(pi * math.log(pi) for pi in p)]])
    tokens = torch.tensor([[1, 2]])
    lp = logprobs_from_logits(logits, tokens)
    close(lp, [[-math.log(4.0), 3.0 - lse]])
    # numerically stable for huge logits
    big = torch.tensor([[[1000.0, 1000.0]]])
    assert torch.allclose(entropy_from_logits(big), torch.tensor([[math.log(2.0)]]))
    assert torch.isfinite(logprobs_from_logits(big, torch.tensor([[0]]))).all()
    # bf16 logits are computed in float32: over a real vocabulary a bf16 softmax is off by ~0.02 nats
    wide = (torch.randn(1, 4, 32000, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    exact_entropy = entropy_from_logits(wide.double())
    assert entropy_from_logits(wide).dtype == torch.float32
    assert (entropy_from_logits(wide).double() - exact_entropy).abs().max() < 1e-4
    picked = torch.arange(4).unsqueeze(0) * 7001
    exact_logprobs = logprobs_from_logits(wide.double(), picked)
    assert (logprobs_from_logits(wide, picked).double() - exact_logprobs).abs().max() < 1e-4


# --------------------------------------------------------------------------- #
# Masking invariance
# --------------------------------------------------------------------------- #
def test_masked_positions_never_matter():
    g = torch.Generator().manual_seed(7)
    B, T = 3, 6
    mask = t([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], torch.bool)

    def rand():
        return torch.randn(B, T, generator=g, dtype=D)

    base = dict(
        logp=rand(), old=rand(), ref=rand(), values=rand(), old_values=rand(), adv=rand(), ret=rand()
    )
    score = t([0.3, -1.0, 2.0])

    def run(d):
        out = {}
        leaf = d["logp"].clone().requires_grad_(True)
        vleaf = d["values"].clone().requires_grad_(True)
        for est in ("k1", "k3"):
            out[f"rewards_{est}"], out[f"kl_{est}"] = compute_rewards(score, leaf.detach(), d["ref"], mask, 0.05, est)
        out["adv"], out["ret"] = gae(out["rewards_k1"], d["values"], mask, 0.99, 0.95)
        out["white"] = masked_whiten(out["adv"], mask)
        out["white_noshift"] = masked_whiten(d["adv"], mask, shift_mean=False)
        pl, ps = policy_loss(leaf, d["old"], d["adv"], mask, 0.2)
        vl, vs = value_loss(vleaf, d["old_values"], d["ret"], mask, 0.2)
        (pl + vl).backward()
        out.update(pl=pl.detach(), vl=vl.detach(), pg_grad=leaf.grad, v_grad=vleaf.grad)
        out.update({f"p_{k}": v for k, v in ps.items()}, **{f"v_{k}": v for k, v in vs.items()})
        out["mean"] = masked_mean(d["logp"], mask)
        out["row_mean"] = masked_mean(d["logp"], mask, dim=1)
        out["var"] = masked_var(d["logp"], mask)
        out["ev"] = torch.tensor(explained_variance(d["values"], d["ret"], mask))
        return out

    ref_out = run(base)
    for garbage in (1e4, -1e4, float("nan"), float("inf")):
        perturbed = {k: torch.where(mask, v, torch.full_like(v, garbage)) for k, v in base.items()}
        out = run(perturbed)
        for k in ref_out:
            assert torch.equal(ref_out[k], out[k]), (k, garbage)
    # gradients at masked positions are exactly zero, real positions get some
    assert (ref_out["pg_grad"][~mask] == 0).all() and (ref_out["v_grad"][~mask] == 0).all()
    assert (ref_out["v_grad"][mask] != 0).any()
    for k in ("rewards_k1", "kl_k1", "adv", "ret", "white"):
        assert (ref_out[k][~mask] == 0).all(), k


# --------------------------------------------------------------------------- #
# KL controllers
# --------------------------------------------------------------------------- #
def test_adaptive_kl_controller_updates():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL above target, error 9/6-1 = 0.5 clipped to 0.2: mult = 1 + 0.2 * 1000/10000
    c.update(9.0, 1000)
    assert abs(c.value - 0.102) < 1e-12
    # below target, inside the clip: error = 5.4/6 - 1 = -0.1 -> mult 0.99
    c.update(5.4, 1000)
    assert abs(c.value - 0.10098) < 1e-12
    # KL 0: error -1 clipped to -0.2; mult = 1 - 0.2 * 500/10000 = 0.99
    c.update(torch.tensor(0.0), 500)
    assert abs(c.value - 0.0999702) < 1e-12
    # slightly above target: error 0.1 -> mult 1.01
    c.update(6.6, 1000)
    assert abs(c.value - 0.0999702 * 1.01) < 1e-12
    # resume
    sd = c.state_dict()
    assert all(isinstance(v, float) for v in sd.values())
    c2 = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    c2.load_state_dict(sd)
    assert c2.value == c.value
    c.update(100.0, 10)
    c2.update(100.0, 10)
    assert c2.value == c.value


def test_fixed_kl_controller_and_factory():
    f = FixedKLController(0.05)
    f.update(100.0, 1000)
    assert f.value == 0.05
    f.load_state_dict({"value": 0.2})  # a coefficient an adaptive run reached: fixed, the config's holds
    assert f.state_dict() == {"value": 0.05}
    assert isinstance(kl_controller(0.05, None, 10000), FixedKLController)
    a = kl_controller(0.05, 6.0, 10000)
    assert isinstance(a, AdaptiveKLController) and a.value == 0.05 and a.target == 6.0


# --------------------------------------------------------------------------- #
# Response mask
# --------------------------------------------------------------------------- #
def test_first_true_index():
    x = torch.tensor([[False, True, True], [False, False, False], [True, False, False]])
    assert first_true_index(x).tolist() == [1, 3, 0]


def test_response_mask_eos_positions():
    EOS, PAD = 2, 0
    tokens = torch.tensor(
        [
            [5, 2, 0, 0],  # EOS in the middle, padding after
            [5, 6, 7, 2],  # EOS at the end
            [5, 6, 7, 8],  # no EOS (truncated)
            [2, 5, 2, 0],  # EOS first; second EOS ignored
            [5, 2, 9, 9],  # post-EOS junk that is not padding
            [5, 6, 0, 0],  # no EOS but trailing pads
        ]
    )
    mask, has_eos = response_mask(tokens, EOS, PAD)
    assert mask.dtype == torch.bool and has_eos.dtype == torch.bool
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, True, True, True],
        [True, False, False, False],
        [True, True, False, False],
        [True, True, False, False],
    ]
    assert has_eos.tolist() == [True, True, False, True, True, False]


def test_response_mask_multiple_eos_and_pad_equals_eos():
    tokens = torch.tensor([[5, 3, 2, 0], [4, 4, 2, 3]])
    mask, has_eos = response_mask(tokens, [2, 3], 0)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert has_eos.tolist() == [True, True]
    # pad == eos (common for HF tokenizers): the first one is the EOS and is kept
    tokens = torch.tensor([[5, 0, 0, 0], [5, 6, 7, 8]])
    mask, has_eos = response_mask(tokens, 0, 0)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert has_eos.tolist() == [True, False]


def test_an_empty_reply_is_no_answer_either():
    """The RM never sees an empty turn (collection keeps answers only): its score would be a guess to exploit."""
    from stages.ppo.ppo_math import answered

    has_eos = torch.tensor([True, True, False, True])
    assert answered(has_eos, ["Five.", "", "Fi", "  "]).tolist() == [True, False, False, False]
    scores = torch.tensor([0.5, 3.0, 2.0, 4.0])
    shaped = shape_scores(scores, answered(has_eos, ["Five.", "", "Fi", "  "]), -1.0, 5.0)
    assert shaped.tolist() == [0.5, -1.0, -1.0, -1.0]


def test_shape_scores_penalises_missing_eos_then_clips():
    scores = t([0.5, 7.0, -2.0, -9.0])
    has_eos = torch.tensor([True, True, False, True])
    assert shape_scores(scores, has_eos, -1.0, 5.0).tolist() == [0.5, 5.0, -1.0, -5.0]
    assert shape_scores(scores, has_eos, None, 5.0).tolist() == [0.5, 5.0, -2.0, -5.0]
    assert shape_scores(scores, has_eos, -1.0, None).tolist() == [0.5, 7.0, -1.0, -9.0]
