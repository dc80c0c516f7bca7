"""PACED per-problem weighting of per-token divergences: Σ_x w(x)·ℓ(x) and Σ_x w(x).

ℓ(x) is the token mean over a sequence's response tokens. Returning the two sums (instead of
their ratio) lets the caller normalise over the whole global batch, i.e. all micro-batches and
data-parallel ranks, so the objective does not depend on how a batch is split.
"""

from __future__ import annotations

import torch
from torch import Tensor


def paced_reduce(per_token_kl: Tensor, loss_mask: Tensor, sample_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Return `(Σ_b w_b·mean_b, Σ_b w_b)` over sequences b with response tokens and w_b > 0.

    `per_token_kl` and `loss_mask` are batch-first `[B, ...]` (the mask is bool or 0/1, nonzero
    marks a response token); `sample_weight` is `[B]`, ≥ 0. A sequence without response tokens or
    with weight 0 adds exactly 0 to both sums and receives a zero gradient, even where its KL is
    inf or NaN (masked positions are never multiplied, only selected away). Both sums are fp32.
    """
    if per_token_kl.shape != loss_mask.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} must have the shape of "
                         f"per_token_kl {tuple(per_token_kl.shape)}")
    if per_token_kl.dim() < 1 or sample_weight.shape != per_token_kl.shape[:1]:
        raise ValueError(f"sample_weight {tuple(sample_weight.shape)} must be one weight per "
                         f"sequence, shape ({per_token_kl.shape[0] if per_token_kl.dim() else '?'},)")
    weight = sample_weight.to(torch.float32)
    bad = torch.nonzero(~(weight >= 0)).flatten()
    if bad.numel():
        rows = bad[:5].tolist()
        raise ValueError(f"sample_weight must be >= 0 and not NaN; bad rows {rows}: "
                         f"{weight[bad[:5]].tolist()}")
    mask = loss_mask.reshape(loss_mask.shape[0], -1) != 0
    kl = per_token_kl.reshape(mask.shape).to(torch.float32)
    tokens = mask.sum(-1)
    seq_mean = torch.where(mask, kl, 0.0).sum(-1) / tokens.clamp(min=1)
    counted = (tokens > 0) & (weight > 0)
    weighted_sum = torch.where(counted, weight * seq_mean, 0.0).sum()
    weight_sum = torch.where(counted, weight, 0.0).sum()
    return weighted_sum, weight_sum
