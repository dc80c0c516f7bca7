"""Per-chunk divergence math on one vocabulary shard: value and gradient, no autograd.

Every function here sees one chunk of tokens on this rank's vocabulary shard, with the softmax
statistics of the student and the teacher over the full vocabulary (fp32 `[n, V_local]` buffers).
Sums over the vocabulary are *partial* on a shard; `comm` turns them into full-vocabulary
per-token sums with scalar all-reduces (never the vocabulary itself). Each function returns the
per-token divergence `[n]` (identical on every rank) and, when asked, writes its gradient with
respect to the tempered student logits `z_S / T` on this shard, times a scale (1/T), in place.

Forward and reverse KL use lean formulas on the unnormalised buffers (few passes, no
temporaries); JSD and AKL normalise in place and use the general ones.
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


# −inf logits (a padded vocabulary) are clamped to this: probability exactly 0, and every
# difference of log-probabilities stays finite, so no 0·∞ = NaN appears in values or gradients.
# A divergence that is truly infinite (mass where the other model has −inf) becomes ~1e30; a row
# that is −inf everywhere in both models becomes uniform in both: divergence 0, gradient 0.
NEG_LOGIT = -1e30


@dataclass
class Chunk:
    """One token chunk on this rank's shard, softmax statistics over the full vocabulary.

    `s`, `t`: logits minus their global row max; `es`, `et`: their exponentials; `log_zs`,
    `log_zt`: per-token log of the global sums of `es`, `et` (so log p = s − log_z). All fp32
    work buffers that the divergence may overwrite.
    """

    s: Tensor
    t: Tensor
    es: Tensor
    et: Tensor
    log_zs: Tensor
    log_zt: Tensor

    def normalize(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Turn the buffers into log p_S, p_S, log p_T, p_T in place (for the general formulas)."""
        self.s.sub_(self.log_zs[:, None])
        self.t.sub_(self.log_zt[:, None])
        self.es.mul_(torch.exp(-self.log_zs)[:, None])
        self.et.mul_(torch.exp(-self.log_zt)[:, None])
        return self.s, self.es, self.t, self.et


# A divergence maps a chunk to its per-token value [n] (full vocabulary, identical on all ranks)
# and, when `grad_out` (fp32) is given, writes grad_scale · ∂value/∂(tempered student logits) into
# it. `grad_out` may be the chunk's own `s` buffer: it is written last, after every read of `s`
# except element-wise ones at the same position.
Divergence = Callable[[Chunk, Comm, "Tensor | None", float], Tensor]


def load_logits(x: Tensor, temperature: float, out: Tensor) -> Tensor:
    """Copy a logits chunk into the fp32 buffer `out`, divided by T, with −inf clamped."""
    if x.dtype == torch.float32:
        torch.clamp(x, min=NEG_LOGIT, out=out)
    else:
        out.copy_(x).clamp_(min=NEG_LOGIT)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def global_softmax_stats(st: Tensor, e: Tensor, comm: Comm) -> Chunk:
    """Softmax statistics of fp32 student and teacher logit chunks over the full (sharded) vocabulary.

    `st` is `[2, n, V_local]` (student, teacher), `e` receives their exponentials; each step is
    one op over both. Two packed all-reduces of per-token scalars: the max, then the sum of
    exponentials.
    """
    st.sub_(comm.max(st.amax(-1))[..., None])
    torch.exp(st, out=e)
    log_z = comm.sum(e.sum(-1)).log_()
    return Chunk(s=st[0], t=st[1], es=e[0], et=e[1], log_zs=log_z[0], log_zt=log_z[1])


def shifted_exp(s: Tensor, es: Tensor, comm: Comm) -> Tensor:
    """One model's logits chunk minus its global row max, in place, and its exponentials into `es`.

    The sum of `es` is left to the caller, to pack into one all-reduce with its other sums.
    """
    s.sub_(comm.max(s.amax(-1))[:, None])
    return torch.exp(s, out=es)


def _p_log_ratio(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """p·(log p − log q) element-wise, exactly 0 where p = 0."""
    return torch.where(p > 0, p * (log_p - log_q), 0.0)


def forward_kl(c: Chunk, comm: Comm, grad_out: Tensor | None, grad_scale: float) -> Tensor:
    """KL(teacher ‖ student) = Σ p_T (log p_T − log p_S); gradient p_S − p_T."""
    inv_zt = torch.exp(-c.log_zt)
    # e^t·(log p_T − log p_S), in the teacher's buffer; torch's sum is pairwise (a BLAS dot drifts)
    terms = c.t.sub_(c.s).sub_((c.log_zt - c.log_zs)[:, None]).mul_(c.et)
    value = comm.sum(terms.sum(-1) * inv_zt)
    if grad_out is not None:
        ps = c.es.mul_((torch.exp(-c.log_zs) * grad_scale)[:, None])
        torch.addcmul(ps, c.et, (inv_zt * -grad_scale)[:, None], out=grad_out)
    return value


def reverse_kl(c: Chunk, comm: Comm, grad_out: Tensor | None, grad_scale: float) -> Tensor:
    """KL(student ‖ teacher) = Σ p_S (log p_S − log p_T); gradient p_S ⊙ (log p_S − log p_T − KL)."""
    inv_zs = torch.exp(-c.log_zs)
    log_ratio = c.s.sub_(c.t).sub_((c.log_zs - c.log_zt)[:, None])  # log p_S − log p_T
    value = comm.sum(torch.mul(log_ratio, c.es, out=c.t).sum(-1) * inv_zs)  # teacher buffer is free
    if grad_out is not None:
        ps = c.es.mul_((inv_zs * grad_scale)[:, None])
        torch.mul(ps, log_ratio.sub_(value[:, None]), out=grad_out)  # subtract first: no cancellation
    return value


def generalized_jsd(beta: float) -> Divergence:
    """β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m) with m = β·p_T + (1−β)·p_S (TRL's convention).

    β = 0 and β = 1 are forward and reverse KL (the limits of the JSD divided by β and 1−β),
    as in TRL's `generalized_jsd_loss`. Gradient: (1−β)·p_S ⊙ (log p_S − log m − KL(p_S ‖ m)).
    """
    if beta == 0.0:
        return forward_kl
    if beta == 1.0:
        return reverse_kl

    def jsd(c: Chunk, comm: Comm, grad_out: Tensor | None, grad_scale: float) -> Tensor:
        ls, ps, lt, pt = c.normalize()
        # log m, clamped so that p·(log p − log m) is a finite 0 where both probabilities vanish
        log_m = torch.mul(ps, 1.0 - beta).add_(pt, alpha=beta).log_().clamp_(min=NEG_LOGIT)
        teacher_terms = lt.sub_(log_m).mul_(pt)
        log_ratio = ls.sub_(log_m)  # log p_S − log m
        student_terms = torch.mul(log_ratio, ps, out=log_m)
        sums = comm.sum(torch.stack([teacher_terms.sum(-1), student_terms.sum(-1)]))
        if grad_out is not None:
            ps.mul_((1.0 - beta) * grad_scale)
            torch.mul(ps, log_ratio.sub_(sums[1][:, None]), out=grad_out)
        return beta * sums[0] + (1.0 - beta) * sums[1]

    return jsd


def ordered_keys(x: Tensor) -> Tensor:
    """Map fp32 values to int32 keys with the same order (−inf smallest), for exact bisection."""
    bits = x.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def teacher_head_threshold(keys: Tensor, pt: Tensor, mu: float, comm: Comm) -> Tensor:
    """Per-token key θ such that the head {i: key_i ≥ θ} is the teacher's top tokens up to mass μ.

    The head holds every token whose strictly-more-probable tokens have total mass < μ: sorting
    the teacher descending, tokens are taken until the cumulative mass reaches μ, the crossing token
    included (ties at the threshold are all in). Found exactly by bisection over the ordered integer
    keys of the teacher log-probabilities; each step all-reduces two scalars per token (mass above
    the midpoint, number of keys strictly inside the interval) and stops when no key is left
    inside. Invariant: mass above `lo` ≥ μ > mass above `hi`; at most 33 steps for fp32.
    Each shard sorts its keys once, so a step costs a binary search per token, not a vocabulary pass.
    """
    sorted_keys, order = keys.sort(-1)
    mass = pt.gather(-1, order).double()
    del order
    # above[:, j] = local mass of sorted positions ≥ j (float64: a long fp32 cumsum drifts)
    above = torch.cat([mass.flip(-1).cumsum(-1).flip(-1), mass.new_zeros(mass.shape[0], 1)], -1)
    del mass
    lo = comm.min(sorted_keys[:, 0].long()) - 1
    hi = comm.max(sorted_keys[:, -1].long())

    def position(key: Tensor, right: bool) -> Tensor:
        return torch.searchsorted(sorted_keys, key.clamp(min=-2**31).to(torch.int32)[:, None],
                                  right=right)

    while True:
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        mass_above_mid = above.gather(-1, position(mid, right=True)).view(-1)
        inside = (position(hi, right=False) - position(lo, right=True)).view(-1).double()
        mass_above_mid, inside = comm.sum(torch.stack([mass_above_mid, inside]))
        open_ = inside > 0
        if not bool(open_.any()):
            return hi.to(torch.int32)
        lo = torch.where(open_ & (mass_above_mid >= mu), mid, lo)
        hi = torch.where(open_ & (mass_above_mid < mu), mid, hi)


def adaptive_kl(mu: float = 0.5) -> Divergence:
    """AKL (Wu et al., COLING 2025): per token, g_head/(g_head+g_tail)·FKL + g_tail/(…)·RKL.

    g_head and g_tail are Σ|p_T − p_S| over the teacher's head (top tokens up to mass μ, see
    `teacher_head_threshold`) and tail; p_S in the mix weights is treated as a constant. When
    p_S = p_T exactly (both g are 0) the weights are ½, ½; both KLs and their gradients are 0 there.
    """

    def akl(c: Chunk, comm: Comm, grad_out: Tensor | None, grad_scale: float) -> Tensor:
        ls, ps, lt, pt = c.normalize()
        keys = ordered_keys(lt)
        head = keys >= teacher_head_threshold(keys, pt, mu, comm)[:, None]
        del keys
        gap = (pt - ps).abs_()
        g_head = torch.where(head, gap, 0.0).sum(-1)
        g_tail = torch.where(head, 0.0, gap).sum(-1)
        del gap, head
        reverse_terms = _p_log_ratio(ps, ls, lt)
        sums = torch.stack([g_head, g_tail, _p_log_ratio(pt, lt, ls).sum(-1), reverse_terms.sum(-1)])
        g_head, g_tail, fkl, rkl = comm.sum(sums)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
        w_tail = 1.0 - w_head
        if grad_out is not None:
            grad = reverse_terms.sub_(ps * rkl[:, None]).mul_(w_tail[:, None])
            grad_out.copy_(grad.add_((ps - pt).mul_(w_head[:, None])).mul_(grad_scale))
        return w_head * fkl + w_tail * rkl

    return akl
