"""Per-chunk divergence math on one vocabulary shard: value and gradient, no autograd.

Every function here sees one chunk of tokens: globally normalised student and teacher
log-probabilities and probabilities of this rank's vocabulary shard, all fp32 `[n, V_local]`.
Sums over the vocabulary are *partial* on a shard; `comm` turns them into full-vocabulary
per-token sums with scalar all-reduces (never the vocabulary itself). Each function returns the
per-token divergence `[n]` (identical on every rank) and, when asked, its gradient with respect to
the tempered student logits `z_S / T` on this shard (the caller divides by T once more).

Convention for zero probabilities: a term p·(log p − log q) with p = 0 is 0, so padded vocabulary
entries (−inf logits in both models) contribute nothing and never produce NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Comm:
    """Element-wise all-reduces of per-token tensors over the tensor-parallel group (None: local)."""

    group: dist.ProcessGroup | None = None

    def _reduce(self, x: Tensor, op: dist.ReduceOp) -> Tensor:
        if self.group is not None:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def sum(self, x: Tensor) -> Tensor:
        return self._reduce(x, dist.ReduceOp.SUM)

    def max(self, x: Tensor) -> Tensor:
        return self._reduce(x, dist.ReduceOp.MAX)

    def min(self, x: Tensor) -> Tensor:
        return self._reduce(x, dist.ReduceOp.MIN)


@dataclass
class ChunkProbs:
    """Global log-softmax of one token chunk, restricted to this rank's vocabulary shard."""

    ls: Tensor  # student log-probabilities
    ps: Tensor  # student probabilities
    lt: Tensor  # teacher log-probabilities
    pt: Tensor  # teacher probabilities


Divergence = Callable[[ChunkProbs, Comm, bool], "tuple[Tensor, Tensor | None]"]


def global_log_softmax(s: Tensor, t: Tensor, comm: Comm) -> ChunkProbs:
    """Log-softmax over the full (sharded) vocabulary of fp32 chunks `s`, `t`, modified in place.

    Two packed all-reduces of per-token scalars (max, then sum of exponentials). A row whose
    logits are all −inf on every shard gets log-probabilities −inf and probabilities 0.
    """
    m = comm.max(torch.stack([s.amax(-1), t.amax(-1)]))
    m = torch.where(torch.isfinite(m), m, 0.0)
    s.sub_(m[0, :, None])
    t.sub_(m[1, :, None])
    ps, pt = s.exp(), t.exp()
    z = comm.sum(torch.stack([ps.sum(-1), pt.sum(-1)]))
    z = torch.where(z > 0, z, 1.0)
    s.sub_(z[0].log()[:, None])
    t.sub_(z[1].log()[:, None])
    ps.div_(z[0, :, None])
    pt.div_(z[1, :, None])
    return ChunkProbs(ls=s, ps=ps, lt=t, pt=pt)


def _p_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """p·(log p − log q) element-wise, exactly 0 where p = 0."""
    return torch.where(p > 0, p * (log_p - log_q), 0.0)


def forward_kl(c: ChunkProbs, comm: Comm, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(teacher ‖ student); gradient p_S − p_T."""
    value = comm.sum(_p_log_ratio(c.pt, c.lt, c.ls).sum(-1))
    return value, (c.ps - c.pt) if want_grad else None


def reverse_kl(c: ChunkProbs, comm: Comm, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """KL(student ‖ teacher); gradient p_S ⊙ (log p_S − log p_T − KL)."""
    terms = _p_log_ratio(c.ps, c.ls, c.lt)
    value = comm.sum(terms.sum(-1))
    if not want_grad:
        return value, None
    return value, terms.sub_(c.ps * value[:, None])


def generalized_jsd(beta: float) -> Divergence:
    """β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m) with m = β·p_T + (1−β)·p_S (TRL's convention).

    β = 0 and β = 1 are forward and reverse KL (the limits of the JSD divided by β and 1−β),
    as in TRL's `generalized_jsd_loss`. Gradient: (1−β)·p_S ⊙ (log p_S − log m − KL(p_S ‖ m)).
    """
    if beta == 0.0:
        return forward_kl
    if beta == 1.0:
        return reverse_kl
    log_b, log_1mb = torch.log(torch.tensor(beta)).item(), torch.log1p(torch.tensor(-beta)).item()

    def jsd(c: ChunkProbs, comm: Comm, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        log_m = torch.logaddexp(c.ls + log_1mb, c.lt + log_b)
        student_terms = _p_log_ratio(c.ps, c.ls, log_m)
        sums = comm.sum(torch.stack([_p_log_ratio(c.pt, c.lt, log_m).sum(-1), student_terms.sum(-1)]))
        value = beta * sums[0] + (1.0 - beta) * sums[1]
        if not want_grad:
            return value, None
        return value, student_terms.sub_(c.ps * sums[1][:, None]).mul_(1.0 - beta)

    return jsd


def ordered_keys(x: Tensor) -> Tensor:
    """Map fp32 values to int64 keys with the same order (−inf smallest), for exact bisection."""
    bits = x.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


def teacher_head_threshold(keys: Tensor, pt: Tensor, mu: float, comm: Comm) -> Tensor:
    """Per-token key θ such that the head {i: key_i ≥ θ} is the teacher's top tokens up to mass μ.

    The head holds every token whose strictly-more-probable tokens have total mass < μ: sorting
    the teacher descending, tokens are taken until the cumulative mass reaches μ, the crossing token
    included (ties at the threshold are all in). Found exactly by bisection over the ordered integer
    keys of the teacher log-probabilities; each step all-reduces two scalars per token (mass above
    the midpoint, number of keys strictly inside the interval) and stops when no key is left
    inside. Invariant: mass above `lo` ≥ μ > mass above `hi`; at most 33 steps for fp32.
    """
    lo = comm.min(keys.amin(-1)) - 1
    hi = comm.max(keys.amax(-1))
    while True:
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        above = torch.where(keys > mid[:, None], pt, 0.0).sum(-1)
        inside = ((keys > lo[:, None]) & (keys < hi[:, None])).sum(-1).to(torch.float32)
        above, inside = comm.sum(torch.stack([above, inside]))
        open_ = inside > 0
        if not bool(open_.any()):
            return hi
        lo = torch.where(open_ & (above >= mu), mid, lo)
        hi = torch.where(open_ & (above < mu), mid, hi)


def adaptive_kl(mu: float = 0.5) -> Divergence:
    """AKL (Wu et al., COLING 2025): per token, g_head/(g_head+g_tail)·FKL + g_tail/(…)·RKL.

    g_head and g_tail are Σ|p_T − p_S| over the teacher's head (top tokens up to mass μ, see
    `teacher_head_threshold`) and tail; p_S in the mix weights is treated as a constant. When
    p_S = p_T exactly (both g are 0) the weights are ½, ½; both KLs and their gradients are 0 there.
    """

    def akl(c: ChunkProbs, comm: Comm, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        keys = ordered_keys(c.lt)
        head = keys >= teacher_head_threshold(keys, c.pt, mu, comm)[:, None]
        del keys
        gap = (c.pt - c.ps).abs_()
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        del gap, head
        reverse_terms = _p_log_ratio(c.ps, c.ls, c.lt)
        sums = torch.stack([g_head, g_tail, _p_log_ratio(c.pt, c.lt, c.ls).sum(-1),
                            reverse_terms.sum(-1)])
        g_head, g_tail, fkl, rkl = comm.sum(sums)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
        w_tail = 1.0 - w_head
        value = w_head * fkl + w_tail * rkl
        if not want_grad:
            return value, None
        grad = reverse_terms.sub_(c.ps * rkl[:, None]).mul_(w_tail[:, None])
        return value, grad.add_((c.ps - c.pt).mul_(w_head[:, None]))

    return akl
