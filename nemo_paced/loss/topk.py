"""Sparse KL against a teacher known only by its top-k ids and log-probabilities, exact over TP shards.

The teacher (a served frontier model, or a cache of its top-k) gives per token k global vocabulary
ids and their log-probabilities, normalised over its full vocabulary (so Σ exp ≤ 1). The student
is the usual local logit shard `[..., V_local]`; its full-vocabulary softmax is computed exactly,
chunk by chunk, with the machinery of the dense loss (`chunked.py`): per chunk one max and one sum
all-reduce of `[chunk, k + 1]` (its logits at the ids, owned by one rank each, and its mass
outside them). Two ways to compare the distributions on the k ids:

- `tail="bucket"`: k + 1 outcomes, the k ids plus one tail outcome holding the remaining mass
  (teacher: max(0, 1 − Σ exp(lp)); student: its softmax mass outside the ids, summed directly so
  no cancellation occurs). With k = V the tail outcome is empty and dropped, and the loss is the
  full-vocabulary KL.
- `tail="renormalize"`: both distributions renormalised over the k ids; only the student's logits at
  the ids receive gradient.

Temperature divides the student's logits only. The teacher's log-probabilities are used as given,
so a cache must store them at the temperature the loss will use: log_softmax(teacher_logits / T)
over the teacher's full vocabulary, then the top k. The top-k ids do not depend on T, but the
log-probabilities and the tail mass do, and they cannot be re-tempered from the top k alone; a
cache of untempered values (T = 1, the usual case) serves only T = 1 (or `renormalize`, where
lp/T renormalised over the ids is exact).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from nemo_paced.loss.chunked import ChunkLoss, check_options, chunked_student_loss
from nemo_paced.loss.divergences import NEG_LOGIT, Comm, shifted_exp
from nemo_paced.loss.vocab_ids import (
    check_finite_or_neg_inf, check_ids, check_unique_rows, gather_owned, owned, vocab_shard)

# The tail gradient q_j·P_tail/Q_tail is formed as exp(log P_tail − log Q_tail)·q_j; the exponent
# is capped here so that a tail the student has all but emptied (< e^-60 of what the teacher puts
# there) gives a large finite gradient instead of inf·0.
_MAX_LOG_TAIL_RATIO = 60.0


def sparse_kl(log_q: Tensor, log_q_tail: Tensor, log_p: Tensor, *, reverse: bool,
              renormalize: bool, has_tail: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token KL between two distributions known on k ids (+ a tail), with its analytic gradient.

    `log_q` `[n, k]`: the student's full-vocabulary log-probabilities at the ids; `log_q_tail`
    `[n]`: log of its mass outside them; `log_p` `[n, k]`: the teacher's log-probabilities (may be
    −inf). Returns (value `[n]`, gradient at the ids `[n, k]`, tail coefficient `[n]`): the
    gradient of the value with respect to the student's (tempered) logit z_j is `grad[i]` for the
    i-th id and `coef·q_j` for every j outside the ids. fp32 in, fp32 out; the teacher's tail
    mass 1 − Σ exp(lp) is summed in float64 (it cancels when the top k hold nearly all the mass).
    """
    log_p = log_p.clamp(min=NEG_LOGIT)
    if renormalize:
        log_q = log_q - torch.logsumexp(log_q, -1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, -1, keepdim=True)
        q, p = log_q.exp(), log_p.exp()
        if reverse:
            value = (q * (log_q - log_p)).sum(-1)
            return value, q * (log_q - log_p - value[:, None]), torch.zeros_like(value)
        return (p * (log_p - log_q)).sum(-1), q - p, torch.zeros_like(log_q[:, 0])
    if has_tail:
        p_tail = (1.0 - log_p.double().exp().sum(-1)).clamp(min=0.0)
        log_p_tail = p_tail.log().float().clamp(min=NEG_LOGIT)
    else:  # k = V: no vocabulary outside the ids; the teacher's "tail" would be rounding only
        log_p_tail = log_q_tail = torch.full_like(log_q[:, 0], NEG_LOGIT)
    log_q_tail = log_q_tail.clamp(min=NEG_LOGIT)
    q, p = log_q.exp(), log_p.exp()
    q_tail, p_tail = log_q_tail.exp(), log_p_tail.exp()
    if reverse:  # Σ_b Q_b (log Q_b − log P_b); ∂/∂z_j = q_j (r_b(j) − KL)
        r, r_tail = log_q - log_p, log_q_tail - log_p_tail
        value = (q * r).sum(-1) + q_tail * r_tail
        return value, q * (r - value[:, None]), r_tail - value
    # Σ_b P_b (log P_b − log Q_b); ∂/∂z_j = P_tot·q_j − P_j on the ids, q_j (P_tot − P_tail/Q_tail) off
    value = (p * (log_p - log_q)).sum(-1) + p_tail * (log_p_tail - log_q_tail)
    p_total = p.sum(-1) + p_tail
    ratio = torch.where(p_tail > 0, (log_p_tail - log_q_tail).clamp(max=_MAX_LOG_TAIL_RATIO).exp(), 0.0)
    return value, p_total[:, None] * q - p, p_total - ratio


def topk_chunk_loss(ids: Tensor, log_p: Tensor, comm: Comm, offset: int, *, reverse: bool,
                    renormalize: bool, has_tail: bool) -> ChunkLoss:
    """The chunk loss of `sparse_kl` for 2-D global ids and teacher log-probs `[N, k]`."""
    def chunk_loss(lo: int, hi: int, buf: Tensor, grad_out: Tensor | None, grad_scale: float) -> Tensor:
        s = buf[0]
        local, mine = owned(ids[lo:hi], offset, s.shape[1])
        es = shifted_exp(s, buf[1], comm)
        s_ids = gather_owned(s, local, mine)
        # the student's mass outside the ids, summed directly: zero es at the owned ids first
        es.scatter_add_(1, local, -gather_owned(es, local, mine))
        sums = comm.sum(torch.cat([s_ids, es.sum(-1, keepdim=True)], -1))
        s_ids, tail_sum = sums[:, :-1], sums[:, -1]
        log_z = (tail_sum + s_ids.exp().sum(-1)).log()
        value, grad_ids, coef = sparse_kl(s_ids - log_z[:, None], tail_sum.log() - log_z,
                                          log_p[lo:hi].float(), reverse=reverse,
                                          renormalize=renormalize, has_tail=has_tail)
        if grad_out is not None:
            torch.mul(es, (coef * torch.exp(-log_z) * grad_scale)[:, None], out=grad_out)
            grad_out.scatter_add_(1, local, torch.where(mine, grad_ids * grad_scale, 0.0))
        return value

    return chunk_loss


def topk_kl(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
            direction: Literal["forward", "reverse"] = "forward", temperature: float = 1.0,
            tp_group: dist.ProcessGroup | None = None,
            tail: Literal["bucket", "renormalize"] = "bucket", chunk_size: int | None = None) -> Tensor:
    """Per-token KL between the student and a teacher known by its top-k ids and log-probs.

    `student_logits` `[..., V_local]`: this rank's contiguous vocabulary shard; `teacher_ids`
    `[..., k]`: global ids (integer, distinct per token, in [0, V_local·TP)); `teacher_logprobs`
    `[..., k]`: their teacher log-probabilities over the full vocabulary (−inf allowed).
    `direction="forward"`: KL(teacher ‖ student); `"reverse"`: KL(student ‖ teacher), on the
    k + 1 outcomes of `tail="bucket"` or the k renormalised ones of `"renormalize"` (module
    docstring). The student's logits are divided by `temperature`, the teacher's log-probs are
    taken as given; no T² factor. Returns fp32 `[...]`, identical on every rank of `tp_group`;
    differentiable in the student logits only.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    if tail not in ("bucket", "renormalize"):
        raise ValueError(f"tail must be 'bucket' or 'renormalize', got {tail!r}")
    check_options(temperature, chunk_size)
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0 or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point [..., V_local] with V_local > 0, got "
                         f"{student_logits.dtype} {tuple(student_logits.shape)}")
    lead = student_logits.shape[:-1]
    if teacher_ids.dim() != len(lead) + 1 or teacher_ids.shape[:-1] != lead or teacher_ids.shape[-1] == 0:
        raise ValueError(f"teacher_ids {tuple(teacher_ids.shape)} must be [..., k] with k > 0 and the "
                         f"student's leading dimensions {tuple(lead)}")
    if teacher_logprobs.shape != teacher_ids.shape or not teacher_logprobs.is_floating_point():
        raise ValueError(f"teacher_logprobs {teacher_logprobs.dtype} {tuple(teacher_logprobs.shape)} must "
                         f"be floating point with the shape of teacher_ids {tuple(teacher_ids.shape)}")
    v_local = student_logits.shape[-1]
    offset, vocab = vocab_shard(v_local, tp_group)
    check_ids(teacher_ids, vocab, "teacher_ids")
    check_unique_rows(teacher_ids, "teacher_ids")
    check_finite_or_neg_inf(teacher_logprobs, "teacher_logprobs")
    k = teacher_ids.shape[-1]
    chunk_loss = topk_chunk_loss(teacher_ids.reshape(-1, k).long(), teacher_logprobs.detach().reshape(-1, k),
                                 Comm(tp_group), offset, reverse=direction == "reverse",
                                 renormalize=tail == "renormalize", has_tail=k < vocab)
    return chunked_student_loss(student_logits, chunk_loss, 1, temperature, chunk_size)
