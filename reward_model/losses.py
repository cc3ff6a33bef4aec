"""Reward-model losses: InstructGPT's K-way ranking loss (Bradley-Terry pairs).

References
----------
* [InstructGPT] Ouyang et al. 2022, "Training language models to follow
  instructions with human feedback", sec. 3.5 / eq. 1:
  ``loss = -1/C(K,2) * E[log sigmoid(r(x, y_w) - r(x, y_l))]``, where all
  C(K,2) comparisons from one prompt are kept together as one batch element
  (each prompt weighted equally) to avoid overfitting.
* [Centering] Eisenstein et al. 2023, "Helping or Herding? Reward Model
  Ensembles Mitigate but do not Eliminate Reward Hacking": auxiliary
  ``center_coef * (r_w + r_l)^2`` term pinning rewards near zero; here per
  ranking, each prompt's mean score squared.
* [Margin] Touvron et al. 2023 (Llama 2), sec. 3.2.2: ranking loss with a
  margin, ``-log sigmoid(r_w - r_l - m)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ranked_pairs_loss",
    "ranking_loss",
    "pairwise_loss",
    "pairwise_accuracy",
    "pack_groups",
]


def _pair_mask(valid: Tensor) -> Tensor:
    """[G, K, K] bool: pair (i, j) with i < j and both responses valid."""
    K = valid.shape[1]
    upper = torch.ones(K, K, dtype=torch.bool, device=valid.device).triu(diagonal=1)
    return valid[:, :, None] & valid[:, None, :] & upper


def _check(scores: Tensor, valid: Tensor | None) -> Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [G, K] (best first), got shape {tuple(scores.shape)}")
    if valid is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if valid.shape != scores.shape:
        raise ValueError(f"valid mask shape {tuple(valid.shape)} != scores shape {tuple(scores.shape)}")
    return valid if valid.dtype == torch.bool else valid != 0


def ranked_pairs_loss(
    scores: Tensor,
    valid: Tensor | None = None,
    margin: float | Tensor = 0.0,
    center_coef: float = 0.0,
    *,
    ranks_mask: Tensor | None = None,
    ratings: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """InstructGPT K-way ranking loss (Ouyang et al. 2022, eq. 1).

    Args:
        scores: ``[G, K]`` reward-model scores of K responses to each of G
            prompts, ordered best first (column 0 is the most preferred).
        valid: optional bool ``[G, K]``; False marks padding columns of groups
            with fewer than K responses (their scores are ignored entirely).
            ``ranks_mask`` is accepted as a keyword alias.
        margin: scalar, or ``[G]`` per-group margin ``m`` in
            ``-log sigmoid(s_i - s_j - m)`` (Llama 2 style; 0 = plain BT).
        center_coef: weight of the reward-centering term ``center_coef * mean_g (mean_{valid i} s_gi)^2``:
            each prompt's mean score is pulled to 0, its responses' differences are left alone (Eisenstein
            et al. 2023's ``(r_chosen + r_rejected)^2``, per group; at K = 2 it is that over 4, so TRL's
            ``center_rewards_coefficient`` c is ``center_coef`` 4c).
        ratings: optional ``[G, K]`` labeler ratings (non-increasing along K); a pair the
            labeler rated alike is a tie and is left out of the loss and the stats.

    Loss: for each group, the mean over all valid pairs ``i < j`` of
    ``-log sigmoid(s_i - s_j - margin)`` (i.e. 1/C(K,2) per comparison, every
    prompt weighted equally); then the mean over groups that have at least
    one valid pair; plus the centering term.  With K = 2 this is exactly the
    pairwise Bradley-Terry loss ``-log sigmoid(s_chosen - s_rejected)``.

    Returns:
        ``(loss, stats)``; stats are detached 0-d tensors pooled over all
        valid pairs: ``accuracy`` (fraction with ``s_i > s_j``),
        ``margin_mean`` (mean ``s_i - s_j``), ``num_pairs``, and
        ``center_loss`` (the centering term, unweighted).
    """
    if ranks_mask is not None:
        if valid is not None:
            raise ValueError("pass only one of valid / ranks_mask")
        valid = ranks_mask
    valid = _check(scores, valid)
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    s = torch.where(valid, scores, zero)  # drop padding garbage (NaN-safe)

    pairs = _pair_mask(valid)  # [G, K, K]
    if ratings is not None:
        pairs = pairs & (ratings[:, :, None] != ratings[:, None, :])
    diff = s[:, :, None] - s[:, None, :]  # diff[g, i, j] = s_i - s_j
    m = torch.as_tensor(margin, dtype=scores.dtype, device=scores.device)
    if m.dim() == 1:
        m = m[:, None, None]
    pair_loss = torch.where(pairs, -F.logsigmoid(diff - m), zero)

    n_pairs = pairs.sum(dim=(1, 2)).to(scores.dtype)  # [G]
    group_loss = pair_loss.sum(dim=(1, 2)) / n_pairs.clamp(min=1.0)
    has_pairs = n_pairs > 0
    loss = torch.where(has_pairs, group_loss, zero).sum() / has_pairs.sum().clamp(min=1)

    group_mean = s.sum(dim=1) / valid.sum(dim=1).clamp(min=1)  # padding entries are 0 in s
    has_responses = valid.any(dim=1)
    center = torch.where(has_responses, group_mean**2, zero).sum() / has_responses.sum().clamp(min=1)
    if center_coef:
        loss = loss + center_coef * center

    with torch.no_grad():
        total = pairs.sum().clamp(min=1)
        d = diff.detach()
        stats = {
            "accuracy": ((d > 0) & pairs).sum().to(scores.dtype) / total,
            "margin_mean": torch.where(pairs, d, zero).sum() / total,
            "num_pairs": pairs.sum().to(scores.dtype),
            "center_loss": center.detach(),
        }
    return loss, stats


def pack_groups(scores: Tensor, group_sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Pack flat scores ``[N]`` (groups concatenated, each best first) into a
    padded ``[G, K_max]`` layout plus its bool ``valid`` mask."""
    sizes = [int(k) for k in group_sizes]
    if sum(sizes) != scores.shape[0]:
        raise ValueError(f"group_sizes sum to {sum(sizes)} but got {scores.shape[0]} scores")
    G, K = len(sizes), max(sizes, default=0)
    sizes_t = torch.tensor(sizes, device=scores.device)
    valid = torch.arange(K, device=scores.device)[None, :] < sizes_t[:, None]
    packed = scores.new_zeros(G, K)
    packed = packed.masked_scatter(valid, scores)  # row-major order == concatenation order
    return packed, valid


def ranking_loss(
    scores: Tensor,
    group_sizes: Sequence[int] | None = None,
    margin: float | Tensor = 0.0,
    center_coef: float = 0.0,
    valid: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """K-way ranking loss for either layout (see :func:`ranked_pairs_loss`).

    * ``scores`` ``[G, K]`` (optionally with ``valid``), or
    * flat ``scores`` ``[N]`` with ``group_sizes`` (groups concatenated, each
      ordered best first), which is packed into ``[G, K_max]`` + mask.
    """
    if group_sizes is not None:
        if scores.dim() != 1:
            raise ValueError("with group_sizes, scores must be flat [N]")
        if valid is not None:
            raise ValueError("valid is derived from group_sizes; do not pass both")
        scores, valid = pack_groups(scores, group_sizes)
    return ranked_pairs_loss(scores, valid, margin=margin, center_coef=center_coef)


def pairwise_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: float | Tensor = 0.0,
    center_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Pairwise Bradley-Terry RM loss ``mean(-log sigmoid(r_chosen - r_rejected - margin))``
    (the K = 2 case of InstructGPT eq. 1), with the same stats."""
    return ranked_pairs_loss(
        torch.stack([chosen_scores.reshape(-1), rejected_scores.reshape(-1)], dim=1),
        margin=margin,
        center_coef=center_coef,
    )


@torch.no_grad()
def pairwise_accuracy(scores: Tensor, valid: Tensor | None = None) -> float:
    """Fraction of valid ranked pairs ``i < j`` in ``[G, K]`` best-first scores
    that the RM orders correctly (``s_i > s_j``; ties count as wrong)."""
    valid = _check(scores, valid)
    pairs = _pair_mask(valid)
    diff = scores[:, :, None] - scores[:, None, :]
    total = int(pairs.sum())
    if total == 0:
        return float("nan")
    return float(((diff > 0) & pairs).sum()) / total
