"""Sampled-token estimator of the reverse KL, for on-policy distillation against a served teacher.

On the student's own samples y_t ~ q(·|y_<t), the teacher returns only log p(y_t|y_<t). Per token,
A_t = log q(y_t) − log p(y_t) is an unbiased estimate of KL(q ‖ p) at that position, and
A_t·∇log q(y_t), with A_t held constant (a stop-gradient advantage), is an unbiased estimate of its
gradient, because E_q[∇log q] = 0. This loss returns A_t per token and backpropagates
exactly A_t·∇log q(y_t), through the same chunked, vocab-parallel machinery as the dense KL
(log q(y_t) needs the student's full-vocabulary softmax).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from nemo_paced.loss.chunked import ChunkLoss, check_options, chunked_student_loss
from nemo_paced.loss.divergences import NEG_LOGIT, Comm, shifted_exp
from nemo_paced.loss.vocab_ids import check_finite_or_neg_inf, check_ids, gather_owned, owned, vocab_shard


def sampled_chunk_loss(ids: Tensor, log_p: Tensor, comm: Comm, offset: int) -> ChunkLoss:
    """The chunk loss for 1-D sampled global ids `[N]` and teacher log-probs of them `[N]`."""

    def chunk_loss(lo: int, hi: int, buf: Tensor, grad_out: Tensor | None, grad_scale: float) -> Tensor:
        s = buf[0]
        local, mine = owned(ids[lo:hi, None], offset, s.shape[1])
        es = shifted_exp(s, buf[1], comm)
        sums = comm.sum(torch.cat([gather_owned(s, local, mine), es.sum(-1, keepdim=True)], -1))
        log_z = sums[:, 1].log()
        advantage = (sums[:, 0] - log_z) - log_p[lo:hi].float().clamp(min=NEG_LOGIT)
        if grad_out is not None:  # A·(onehot(y) − q) · scale
            torch.mul(es, (-advantage * torch.exp(-log_z) * grad_scale)[:, None], out=grad_out)
            grad_out.scatter_add_(1, local, torch.where(mine, advantage[:, None] * grad_scale, 0.0))
        return advantage

    return chunk_loss


def sampled_reverse_kl(student_logits: Tensor, sampled_ids: Tensor, teacher_logprobs: Tensor, *,
                       temperature: float = 1.0, tp_group: dist.ProcessGroup | None = None,
                       chunk_size: int | None = None) -> Tensor:
    """Per-token A_t = log q(y_t) − log p(y_t); its gradient is A_t·∇log q(y_t) (A_t constant).

    `student_logits` `[..., V_local]`: this rank's vocabulary shard of the logits the tokens were
    sampled from (at `temperature`, which divides them); `sampled_ids` `[...]`: the sampled global
    ids; `teacher_logprobs` `[...]`: the teacher's log-probability of each (−inf allowed: a huge
    finite advantage). Returns fp32 `[...]`, identical on every rank of `tp_group`. Its mean over
    tokens estimates the reverse KL; its gradient is the unbiased estimator of the reverse KL's
    gradient only when the tokens were sampled from this student (on-policy).
    """
    check_options(temperature, chunk_size)
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0 or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be floating point [..., V_local] with V_local > 0, got "
                         f"{student_logits.dtype} {tuple(student_logits.shape)}")
    lead = student_logits.shape[:-1]
    if sampled_ids.shape != lead:
        raise ValueError(f"sampled_ids {tuple(sampled_ids.shape)} must be the student's leading "
                         f"dimensions {tuple(lead)}")
    if teacher_logprobs.shape != lead or not teacher_logprobs.is_floating_point():
        raise ValueError(f"teacher_logprobs {teacher_logprobs.dtype} {tuple(teacher_logprobs.shape)} "
                         f"must be floating point of shape {tuple(lead)}")
    offset, vocab = vocab_shard(student_logits.shape[-1], tp_group)
    check_ids(sampled_ids, vocab, "sampled_ids")
    check_finite_or_neg_inf(teacher_logprobs, "teacher_logprobs")
    chunk_loss = sampled_chunk_loss(sampled_ids.reshape(-1).long(), teacher_logprobs.detach().reshape(-1),
                                    Comm(tp_group), offset)
    return chunked_student_loss(student_logits, chunk_loss, 1, temperature, chunk_size)
