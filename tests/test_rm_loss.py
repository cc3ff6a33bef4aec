"""Tests for reward_model/losses.py (InstructGPT K-way ranking loss).

Expected values are computed by hand with explicit python loops over pairs.
"""

from __future__ import annotations

import math

import pytest
import torch


from reward_model.losses import (
    pack_groups,
    pairwise_accuracy,
    pairwise_loss,
    ranked_pairs_loss,
    ranking_loss,
)


def nls(d):
    """-log sigmoid(d) = log(1 + exp(-d))"""
    return math.log1p(math.exp(-d))


def hand_group_loss(row, margin=0.0):
    """mean over pairs i<j of -log sigmoid(s_i - s_j - margin), explicit loops."""
    terms = []
    for i in range(len(row)):
        for j in range(i + 1, len(row)):
            terms.append(nls(row[i] - row[j] - margin))
    return sum(terms) / len(terms)


def test_k4_equals_mean_of_six_pairwise_losses():
    scores = torch.tensor([[3.0, 1.0, 2.0, -1.0]], dtype=torch.float64)
    loss, stats = ranked_pairs_loss(scores)
    # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): diffs 2, 1, 4, -1, 2, 3
    diffs = [2.0, 1.0, 4.0, -1.0, 2.0, 3.0]
    expected = sum(nls(d) for d in diffs) / 6
    assert abs(float(loss) - expected) < 1e-12
    assert abs(float(loss) - hand_group_loss([3.0, 1.0, 2.0, -1.0])) < 1e-12
    assert abs(float(stats["accuracy"]) - 5 / 6) < 1e-12
    assert abs(float(stats["margin_mean"]) - 11 / 6) < 1e-12
    assert float(stats["num_pairs"]) == 6
    assert abs(pairwise_accuracy(scores) - 5 / 6) < 1e-12


def test_groups_weighted_equally():
    rows = [[3.0, 1.0, 2.0, -1.0], [0.5, 0.0, 1.0, 0.2]]
    loss, _ = ranked_pairs_loss(torch.tensor(rows, dtype=torch.float64))
    expected = (hand_group_loss(rows[0]) + hand_group_loss(rows[1])) / 2
    assert abs(float(loss) - expected) < 1e-12


def test_k2_equals_bradley_terry():
    scores = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss, stats = ranked_pairs_loss(scores)
    assert abs(float(loss) - 0.31326168751822286) < 1e-12  # log(1 + e^-1)
    assert float(stats["accuracy"]) == 1.0
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(8, generator=g, dtype=torch.float64)
    rejected = torch.randn(8, generator=g, dtype=torch.float64)
    expected = sum(nls(c - r) for c, r in zip(chosen.tolist(), rejected.tolist())) / 8
    loss2, _ = ranked_pairs_loss(torch.stack([chosen, rejected], dim=1))
    assert abs(float(loss2) - expected) < 1e-12
    loss3, stats3 = pairwise_loss(chosen, rejected)
    assert abs(float(loss3) - expected) < 1e-12
    acc = sum(1 for c, r in zip(chosen.tolist(), rejected.tolist()) if c > r) / 8
    assert abs(float(stats3["accuracy"]) - acc) < 1e-12


def test_valid_mask_with_padded_column():
    nan = float("nan")
    scores = torch.tensor([[2.0, 0.0, 1.0], [1.0, -1.0, nan]], dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    loss, stats = ranked_pairs_loss(scores, valid)
    # group 0: diffs 2, 1, -1 (3 pairs); group 1: diff 2 (1 pair); groups weighted equally
    g0 = (nls(2.0) + nls(1.0) + nls(-1.0)) / 3
    g1 = nls(2.0)
    assert abs(float(loss.detach()) - (g0 + g1) / 2) < 1e-12
    # pooled over the 4 valid pairs
    assert abs(float(stats["accuracy"]) - 3 / 4) < 1e-12
    assert abs(float(stats["margin_mean"]) - (2 + 1 - 1 + 2) / 4) < 1e-12
    assert float(stats["num_pairs"]) == 4
    loss.backward()
    assert scores.grad[1, 2] == 0 and torch.isfinite(scores.grad).all()
    assert abs(pairwise_accuracy(scores.detach(), valid) - 3 / 4) < 1e-12
    # keyword alias
    loss_alias, _ = ranked_pairs_loss(scores.detach(), ranks_mask=valid)
    assert float(loss_alias) == float(loss.detach())
    # a group with a single valid response has no pairs and is excluded
    scores3 = torch.tensor([[2.0, 0.0, 1.0], [5.0, 9.0, 9.0]], dtype=torch.float64)
    valid3 = torch.tensor([[True, True, True], [True, False, False]])
    loss3, _ = ranked_pairs_loss(scores3, valid3)
    assert abs(float(loss3) - g0) < 1e-12


def test_flat_layout_with_group_sizes():
    flat = torch.tensor([2.0, 0.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    packed, valid = pack_groups(flat, [3, 2])
    assert packed.tolist() == [[2.0, 0.0, 1.0], [1.0, -1.0, 0.0]]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    loss, stats = ranking_loss(flat, [3, 2])
    g0 = (nls(2.0) + nls(1.0) + nls(-1.0)) / 3
    assert abs(float(loss) - (g0 + nls(2.0)) / 2) < 1e-12
    loss2d, _ = ranking_loss(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert abs(float(loss2d) - nls(1.0)) < 1e-12
    with pytest.raises(ValueError, match="group_sizes sum to 6 but got 5 scores"):
        ranking_loss(flat, [3, 3])


def test_margin_term():
    scores = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    loss, _ = ranked_pairs_loss(scores, margin=1.0)
    assert abs(float(loss) - math.log1p(math.exp(0.5))) < 1e-12  # -log sigmoid(0.5 - 1)
    rows = [[3.0, 1.0, 2.0, -1.0]]
    loss4, _ = ranked_pairs_loss(torch.tensor(rows, dtype=torch.float64), margin=0.5)
    assert abs(float(loss4) - hand_group_loss(rows[0], margin=0.5)) < 1e-12
    # per-group margins
    s = torch.tensor([[1.0, 0.5], [2.0, 0.0]], dtype=torch.float64)
    lossg, _ = ranked_pairs_loss(s, margin=torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert abs(float(lossg) - (nls(0.5 - 1.0) + nls(2.0)) / 2) < 1e-12


def test_center_term():
    scores = torch.tensor([[2.0, 0.0, 1.0], [1.0, -1.0, 100.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    base, _ = ranked_pairs_loss(scores, valid)
    loss, stats = ranked_pairs_loss(scores, valid, center_coef=0.01)
    # each prompt's mean score, squared, averaged over prompts; the padded 100 is excluded
    centering = ((2.0 + 0.0 + 1.0) / 3) ** 2 / 2 + ((1.0 - 1.0) / 2) ** 2 / 2
    assert abs(float(loss) - (float(base) + 0.01 * centering)) < 1e-12
    assert abs(float(stats["center_loss"]) - centering) < 1e-12
    # at K = 2 it is Eisenstein et al.'s (r_chosen + r_rejected)^2, over 4 (TRL's center_rewards_coefficient)
    pair = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    _, pair_stats = ranked_pairs_loss(pair, center_coef=1.0)
    assert abs(float(pair_stats["center_loss"]) - (1.5 - 0.5) ** 2 / 4) < 1e-12
    # gradient: the pair's mean is pulled to 0, d/ds_i (mean s)^2 = 2 * mean / K; their difference is untouched
    s = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    l_c, _ = ranked_pairs_loss(s, center_coef=1.0)
    l_0, _ = ranked_pairs_loss(s.detach().clone().requires_grad_(True), center_coef=0.0)
    l_c.backward()
    sig = 1 / (1 + math.exp(1.0))  # d/dd [-log sigmoid(d)] = -sigmoid(-d)
    assert abs(float(s.grad[0, 0]) - (-sig + 2 * 0.5 / 2)) < 1e-12
    assert abs(float(s.grad[0, 1]) - (sig + 2 * 0.5 / 2)) < 1e-12
    assert float(l_c.detach()) > float(l_0.detach())
    shifted, _ = ranked_pairs_loss(torch.tensor([[0.5, -0.5]], dtype=torch.float64), center_coef=1.0)
    assert abs(float(shifted) - nls(1.0)) < 1e-12  # centred already: the term adds nothing


def test_accuracy_counts_ties_as_wrong():
    scores = torch.tensor([[1.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    _, stats = ranked_pairs_loss(scores)
    assert abs(float(stats["accuracy"]) - 1 / 3) < 1e-7
    assert abs(float(stats["margin_mean"]) - (0.0 + 1.0 - 3.0) / 3) < 1e-7


def test_pairs_rated_alike_are_ties_left_out_of_the_loss():
    """Ratings 5, 3, 3, 1 (UltraFeedback's completions): of the six pairs, (1, 2) is a tie and is not trained."""
    row = [3.0, 1.0, 2.0, -1.0]
    loss, stats = ranked_pairs_loss(torch.tensor([row], dtype=torch.float64),
                                    ratings=torch.tensor([[5.0, 3.0, 3.0, 1.0]], dtype=torch.float64))
    diffs = [2.0, 1.0, 4.0, 2.0, 3.0]  # pairs (0,1) (0,2) (0,3) (1,3) (2,3); not (1,2), whose diff is -1
    assert abs(float(loss) - sum(nls(d) for d in diffs) / 5) < 1e-12
    assert float(stats["num_pairs"]) == 5 and float(stats["accuracy"]) == 1.0
    strict, _ = ranked_pairs_loss(torch.tensor([row], dtype=torch.float64),
                                  ratings=torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64))
    assert abs(float(strict) - hand_group_loss(row)) < 1e-12


def test_held_out_metrics_skip_pairs_rated_alike():
    from reward_model.metrics import ranking_metrics

    rows = [{"prompt": "p", "responses": ["a", "b", "c"], "ratings": [2.0, 1.0, 1.0]},
            {"prompt": "q", "responses": ["d", "e"]}]  # unrated: its order is strict
    metrics = ranking_metrics([[1.0, 0.0, 2.0], [0.0, 1.0]], rows)
    # row 1: pairs (0,1) right, (0,2) wrong, (1,2) a tie (skipped); row 2: (0,1) wrong
    assert metrics["pairs"] == 3 and metrics["accuracy"] == pytest.approx(1 / 3)
