"""Exact full-vocabulary divergences over tensor-parallel vocabulary shards, chunked over tokens.

Each TP rank holds a contiguous shard `[..., V_local]` of the student and teacher logits. Tokens
are processed in chunks: per chunk, a few fp32 `[chunk, V_local]` temporaries, two packed
all-reduces for the global log-softmax and one for the divergence's partial sums. Only per-token
scalars cross ranks.

The gradient with respect to the student logits is computed analytically in the same pass (no
autograd graph over the vocabulary) and kept in the student's dtype until backward scales it by the
incoming per-token gradient, in place. So the student and teacher logits need not stay alive after
the forward, and the peak extra memory is one gradient tensor plus the chunk temporaries.

Temperature convention: both logits are divided by T and the divergence of the tempered
distributions is returned, without the T² factor of Hinton et al. (as ModelOpt's `LogitsKLLoss` and
TRL's `generalized_jsd_loss` do); multiply by T² yourself to keep gradient scale independent of T.
"""

from __future__ import annotations

from typing import Literal

import torch.distributed as dist
from torch import Tensor

from nemo_paced.loss.chunked import ChunkLoss, check_options, chunked_student_loss
from nemo_paced.loss.divergences import (
    Comm, Divergence, adaptive_kl, forward_kl, generalized_jsd, global_softmax_stats, load_logits,
    reverse_kl)


def dense_chunk_loss(teacher: Tensor, divergence: Divergence, temperature: float,
                     comm: Comm) -> ChunkLoss:
    """The chunk loss of a full-vocabulary divergence against 2-D teacher logits `[N, V_local]`."""

    def chunk_loss(lo: int, hi: int, buf: Tensor, grad_out: Tensor | None, grad_scale: float) -> Tensor:
        load_logits(teacher[lo:hi], temperature, buf[1])
        return divergence(global_softmax_stats(buf[0:2], buf[2:4], comm), comm, grad_out, grad_scale)

    return chunk_loss


def kl_direction(direction: str) -> Divergence:
    divergences = {"forward": forward_kl, "reverse": reverse_kl}
    if direction not in divergences:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return divergences[direction]


def _check(student: Tensor, teacher: Tensor, temperature: float, chunk_size: int | None) -> None:
    check_options(temperature, chunk_size)
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits "
                         f"{tuple(teacher.shape)} must have the same shape [..., V_local]")
    if student.dim() < 1 or student.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last (vocabulary) dimension, got {tuple(student.shape)}")
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _apply(student: Tensor, teacher: Tensor, divergence: Divergence, temperature: float,
           tp_group: dist.ProcessGroup | None, chunk_size: int | None) -> Tensor:
    _check(student, teacher, temperature, chunk_size)
    chunk_loss = dense_chunk_loss(teacher.detach().reshape(-1, teacher.shape[-1]), divergence,
                                  float(temperature), Comm(tp_group))
    return chunked_student_loss(student, chunk_loss, 3, temperature, chunk_size)


def vocab_parallel_kl(student_logits: Tensor, teacher_logits: Tensor, *,
                      direction: Literal["forward", "reverse"] = "forward", temperature: float = 1.0,
                      tp_group: dist.ProcessGroup | None = None, chunk_size: int | None = None) -> Tensor:
    """Per-token KL over the full vocabulary from this rank's logit shards `[..., V_local]`.

    `direction="forward"`: KL(teacher ‖ student); `"reverse"`: KL(student ‖ teacher), both of the
    distributions at temperature T (no T² factor). Returns fp32 `[...]`, identical on every rank of
    `tp_group` (None: the whole vocabulary is local). Differentiable in the student logits only.
    `chunk_size` tokens are processed at a time (None: about 4M logits per chunk).
    """
    return _apply(student_logits, teacher_logits, kl_direction(direction), temperature, tp_group,
                  chunk_size)


def vocab_parallel_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
                       temperature: float = 1.0, tp_group: dist.ProcessGroup | None = None,
                       chunk_size: int | None = None) -> Tensor:
    """Generalised JSD per token (TRL's convention): β = 0 is forward KL, β = 1 reverse KL.

    β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m) with m = β·p_T + (1−β)·p_S; same interface as
    `vocab_parallel_kl`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    return _apply(student_logits, teacher_logits, generalized_jsd(float(beta)), temperature,
                  tp_group, chunk_size)


def vocab_parallel_akl(student_logits: Tensor, teacher_logits: Tensor, *, mu: float = 0.5,
                       temperature: float = 1.0, tp_group: dist.ProcessGroup | None = None,
                       chunk_size: int | None = None) -> Tensor:
    """Adaptive KL (AKL) per token: forward and reverse KL mixed by the head/tail gaps.

    The teacher's head (top tokens until their cumulative mass reaches `mu`, the crossing token
    included) is found exactly across shards with scalar all-reduces; same interface as
    `vocab_parallel_kl`.
    """
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"mu must be in (0, 1], got {mu}")
    return _apply(student_logits, teacher_logits, adaptive_kl(float(mu)), temperature, tp_group,
                  chunk_size)
