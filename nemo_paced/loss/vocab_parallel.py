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

from typing import Callable, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from nemo_paced.loss.divergences import (
    Comm, Divergence, adaptive_kl, forward_kl, generalized_jsd, global_softmax_stats, load_logits,
    reverse_kl)

# Auto chunk: about this many elements per fp32 temporary (16 MiB).
CHUNK_ELEMENTS = 1 << 22


def default_chunk_size(v_local: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(v_local, 1))


def run_chunks(student_chunk: Callable[[int, int], Tensor], teacher: Tensor, divergence: Divergence,
               temperature: float, comm: Comm, chunk_size: int,
               grad_chunk: Callable[[int, int], Tensor] | None,
               on_grad: Callable[[int, int], None] | None = None) -> Tensor:
    """Per-token divergence `[N]` (fp32) of 2-D logits, chunk by chunk over the N tokens.

    `student_chunk(lo, hi)` returns the student logits of tokens lo..hi (any float dtype).
    `grad_chunk(lo, hi)` (None: no gradient) returns the tensor that receives the gradient of each
    token's divergence with respect to those logits (any float dtype); `on_grad(lo, hi)` is called
    once it is written. Four fp32 `[chunk, V_local]` buffers are allocated once and reused.

    A gradient destination that is not fp32 (bf16 logits) is never the `out=` of the divergence's
    fp32 math: torch's CPU kernels with mixed dtypes run 10–20× slower than same-dtype ones. The
    divergence writes into the chunk's student buffer instead, and one `copy_` converts it.
    """
    n, v_local = teacher.shape
    values = torch.empty(n, dtype=torch.float32, device=teacher.device)
    rows = min(chunk_size, n)
    buffers = torch.empty(4, rows, v_local, dtype=torch.float32, device=teacher.device)
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        s, t, es, et = buffers[:, : hi - lo]
        load_logits(student_chunk(lo, hi), temperature, s)
        load_logits(teacher[lo:hi], temperature, t)
        chunk = global_softmax_stats(s, t, es, et, comm)
        dest = None if grad_chunk is None else grad_chunk(lo, hi)
        grad_out = dest if dest is None or dest.dtype == torch.float32 else s
        values[lo:hi] = divergence(chunk, comm, grad_out, 1.0 / temperature)
        if grad_out is not dest:
            dest.copy_(grad_out)
        if on_grad is not None:
            on_grad(lo, hi)
    return values


def scale_rows_(grad: Tensor, scale: Tensor, chunk_size: int) -> Tensor:
    """`grad *= scale[:, None]` in place, `grad` 2-D of any float dtype, `scale` fp32 `[N]`.

    For a non-fp32 `grad` each row chunk goes through one fp32 buffer (a mixed-dtype `mul_` is the
    slow CPU path, and rounding `scale` to bf16 first would add a second rounding error).
    """
    if grad.dtype == torch.float32:
        return grad.mul_(scale[:, None])
    buffer = torch.empty(min(chunk_size, grad.shape[0]), grad.shape[1], dtype=torch.float32,
                         device=grad.device)
    for lo in range(0, grad.shape[0], chunk_size):
        hi = min(lo + chunk_size, grad.shape[0])
        grad[lo:hi].copy_(buffer[: hi - lo].copy_(grad[lo:hi]).mul_(scale[lo:hi, None]))
    return grad


class _VocabParallelDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, divergence: Divergence, temperature: float,
                group: dist.ProcessGroup | None, chunk_size: int | None) -> Tensor:
        v_local = student.shape[-1]
        s2d = student.reshape(-1, v_local)
        grad = grad_chunk = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
            g2d = grad.view(-1, v_local)
            grad_chunk = lambda lo, hi: g2d[lo:hi]  # noqa: E731
        ctx.chunk_size = chunk_size or default_chunk_size(v_local)
        values = run_chunks(lambda lo, hi: s2d[lo:hi], teacher.reshape(-1, v_local), divergence,
                            temperature, Comm(group), ctx.chunk_size, grad_chunk)
        ctx.grad = grad
        return values.view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("the vocab-parallel divergence keeps one precomputed gradient and "
                               "supports a single backward pass (retain_graph is not supported)")
        ctx.grad = None
        scale = grad_values.reshape(-1).to(torch.float32)
        scale_rows_(grad.view(-1, grad.shape[-1]), scale, ctx.chunk_size)
        return grad, None, None, None, None, None


def check_options(temperature: float, chunk_size: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")


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
    return _VocabParallelDivergence.apply(student, teacher.detach(), divergence, float(temperature),
                                          tp_group, chunk_size)


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
