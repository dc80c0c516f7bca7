"""Chunked losses over the student's vocabulary shard with the gradient computed in the forward pass.

Every loss of this package (dense, top-k, sampled-token) has the same shape: per token chunk, load
the student's logits `[chunk, V_local]` into an fp32 buffer, do a few passes and scalar
all-reduces, return per-token values and write the gradient with respect to the logits. The
gradient is kept (in the student's dtype) until backward scales it by the incoming per-token
gradient, in place, so no autograd graph over the vocabulary exists and the logits need not stay
alive after the forward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from nemo_paced.loss.divergences import load_logits

# Auto chunk: about this many elements per fp32 temporary (32 MiB; at 2 threads on a busy CPU, 16 MiB
# chunks made the per-op thread barriers cost as much as the arithmetic).
CHUNK_ELEMENTS = 1 << 23

# chunk_loss(lo, hi, buf, grad_out, grad_scale) -> per-token values [hi − lo] (fp32).
# `buf` is `[1 + n_work, hi − lo, V_local]` fp32: `buf[0]` holds the tempered student logits of
# tokens lo..hi (−inf clamped), the rest is scratch (one block, so that an op can cover several
# of them: on a busy CPU every op's thread barrier costs, not only its memory traffic); when
# `grad_out` (fp32, possibly `buf[0]` itself: write it last) is given, it receives
# grad_scale · ∂value/∂(tempered logits).
ChunkLoss = Callable[[int, int, Tensor, "Tensor | None", float], Tensor]


def default_chunk_size(v_local: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(v_local, 1))


def check_options(temperature: float, chunk_size: int | None) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")


def run_chunks(student_chunk: Callable[[int, int], Tensor], n: int, v_local: int,
               device: torch.device, chunk_loss: ChunkLoss, n_work: int, temperature: float,
               chunk_size: int, grad_chunk: Callable[[int, int], Tensor] | None,
               on_grad: Callable[[int, int], None] | None = None) -> Tensor:
    """Per-token values `[n]` (fp32) of `chunk_loss`, chunk by chunk over the n tokens.

    `student_chunk(lo, hi)` returns the student logits of tokens lo..hi (any float dtype).
    `grad_chunk(lo, hi)` (None: no gradient) returns the tensor that receives the gradient of each
    token's value with respect to those logits (any float dtype); `on_grad(lo, hi)` is called once
    it is written. 1 + `n_work` fp32 `[chunk, V_local]` buffers are allocated once and reused.

    A gradient destination that is not fp32 (bf16 logits) is never the `out=` of the fp32 math:
    torch's CPU kernels with mixed dtypes run 10–20× slower than same-dtype ones. The loss writes
    into the chunk's student buffer instead, and one `copy_` converts it.
    """
    values = torch.empty(n, dtype=torch.float32, device=device)
    rows = min(chunk_size, n)
    buffers = torch.empty(1 + n_work, rows, v_local, dtype=torch.float32, device=device)
    for lo in range(0, n, chunk_size):
        hi = min(lo + chunk_size, n)
        buf = buffers[:, : hi - lo]
        s = load_logits(student_chunk(lo, hi), temperature, buf[0])
        dest = None if grad_chunk is None else grad_chunk(lo, hi)
        grad_out = dest if dest is None or dest.dtype == torch.float32 else s
        values[lo:hi] = chunk_loss(lo, hi, buf, grad_out, 1.0 / temperature)
        if grad_out is not dest:
            dest.copy_(grad_out)
        if on_grad is not None:
            on_grad(lo, hi)
    return values


def scale_rows_(grad: Tensor, scale: Tensor, chunk_size: int) -> Tensor:
    """`grad *= scale[:, None]` in place, `grad` 2-D of any float dtype, `scale` fp32 `[N]`.

    For a non-fp32 `grad` each row chunk goes through one fp32 buffer (a mixed-dtype `mul_` is the
    slow CPU path, and rounding `scale` to bf16 first would add a second rounding error). Callers
    pass a chunk of 4× the forward's: its four buffers are gone by then, so the peak is unchanged.
    """
    if grad.dtype == torch.float32:
        return grad.mul_(scale[:, None])
    buffer = torch.empty(min(chunk_size, grad.shape[0]), grad.shape[1], dtype=torch.float32,
                         device=grad.device)
    for lo in range(0, grad.shape[0], chunk_size):
        hi = min(lo + chunk_size, grad.shape[0])
        grad[lo:hi].copy_(buffer[: hi - lo].copy_(grad[lo:hi]).mul_(scale[lo:hi, None]))
    return grad


class _ChunkedStudentLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, chunk_loss: ChunkLoss, n_work: int, temperature: float,
                chunk_size: int | None) -> Tensor:
        v_local = student.shape[-1]
        s2d = student.reshape(-1, v_local)
        grad = grad_chunk = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
            g2d = grad.view(-1, v_local)
            grad_chunk = lambda lo, hi: g2d[lo:hi]  # noqa: E731
        ctx.chunk_size = chunk_size or default_chunk_size(v_local)
        values = run_chunks(lambda lo, hi: s2d[lo:hi], s2d.shape[0], v_local, student.device,
                            chunk_loss, n_work, temperature, ctx.chunk_size, grad_chunk)
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
        scale_rows_(grad.view(-1, grad.shape[-1]), scale, 4 * ctx.chunk_size)
        return grad, None, None, None, None


def chunked_student_loss(student: Tensor, chunk_loss: ChunkLoss, n_work: int, temperature: float,
                         chunk_size: int | None) -> Tensor:
    """Per-token values `student.shape[:-1]` (fp32) of `chunk_loss`, differentiable in `student`."""
    return _ChunkedStudentLoss.apply(student, chunk_loss, n_work, float(temperature), chunk_size)
