"""Output layer and divergence fused: the student's `[tokens, V_local]` logits never exist in full.

The student's logits are produced one token chunk at a time from its last hidden states and its
output-layer weight shard (Megatron's `ColumnParallelLinear`, `[V_local, H]`), consumed by the same
chunked divergence as `vocab_parallel_kl`, and dropped. The backward pass recomputes each chunk
(one more matmul and softmax pass per chunk) because the weight gradient Σ_n g_n·h_nᵀ needs each
token's incoming gradient before the sum; what persists between forward and backward is nothing
but the inputs. With tensor parallelism the hidden states are replicated over the TP group (no
sequence parallelism), so the hidden-state gradient is all-reduced over it, as
`ColumnParallelLinear`'s backward does; that is `[tokens, H]`, never the vocabulary.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from nemo_paced.loss.chunked import check_options, default_chunk_size, run_chunks
from nemo_paced.loss.divergences import Comm, Divergence
from nemo_paced.loss.vocab_parallel import dense_chunk_loss, kl_direction


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, teacher: Tensor, divergence: Divergence,
                temperature: float, group: dist.ProcessGroup | None, chunk_size: int) -> Tensor:
        h2d = hidden.reshape(-1, hidden.shape[-1])
        t2d = teacher.reshape(-1, teacher.shape[-1])
        values = run_chunks(lambda lo, hi: h2d[lo:hi] @ weight.t(), h2d.shape[0], weight.shape[0],
                            weight.device, dense_chunk_loss(t2d, divergence, temperature, Comm(group)),
                            3, temperature, chunk_size, None)
        ctx.save_for_backward(hidden, weight, teacher)
        ctx.options = (divergence, temperature, group, chunk_size)
        return values.view(hidden.shape[:-1])

    @staticmethod
    def backward(ctx, grad_values: Tensor):
        hidden, weight, teacher = ctx.saved_tensors
        divergence, temperature, group, chunk_size = ctx.options
        h2d = hidden.reshape(-1, hidden.shape[-1])
        scale = grad_values.reshape(-1)
        grad_hidden = torch.empty_like(h2d)
        want_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_weight else None
        g_buffer = torch.empty(min(chunk_size, h2d.shape[0]), weight.shape[0], dtype=torch.float32,
                               device=weight.device)

        def accumulate(lo: int, hi: int) -> None:
            g = g_buffer[: hi - lo].mul_(scale[lo:hi, None]).to(weight.dtype)
            torch.mm(g, weight, out=grad_hidden[lo:hi])
            if grad_weight is not None:
                grad_weight.addmm_(g.t().float(), h2d[lo:hi].float())

        chunk_loss = dense_chunk_loss(teacher.reshape(-1, teacher.shape[-1]), divergence, temperature,
                                      Comm(group))
        run_chunks(lambda lo, hi: h2d[lo:hi] @ weight.t(), h2d.shape[0], weight.shape[0], weight.device,
                   chunk_loss, 3, temperature, chunk_size, lambda lo, hi: g_buffer[: hi - lo], accumulate)
        if group is not None:
            dist.all_reduce(grad_hidden, group=group)
        return (grad_hidden.view(hidden.shape), grad_weight.to(weight.dtype) if want_weight else None,
                None, None, None, None, None)


def fused_linear_kl(hidden: Tensor, weight: Tensor, teacher_logits: Tensor, *,
                    direction: Literal["forward", "reverse"] = "forward", temperature: float = 1.0,
                    tp_group: dist.ProcessGroup | None = None, chunk_size: int | None = None) -> Tensor:
    """Per-token KL of the student `hidden @ weight.T` against `teacher_logits`, without its logits.

    `hidden` `[..., H]` is the student's last hidden state (identical on every rank of
    `tp_group`), `weight` `[V_local, H]` its output-layer shard and `teacher_logits`
    `[..., V_local]` the teacher's logit shard. Same values and conventions as
    `vocab_parallel_kl(hidden @ weight.T, teacher_logits, ...)`; differentiable in `hidden` and
    `weight` (the weight gradient is accumulated in fp32).
    """
    divergence = kl_direction(direction)
    check_options(temperature, chunk_size)
    if hidden.dtype != weight.dtype or not hidden.is_floating_point():
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one float dtype")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V_local, H] with H = hidden's last "
                         f"dimension {hidden.shape[-1]}")
    if teacher_logits.shape != (*hidden.shape[:-1], weight.shape[0]):
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must be "
                         f"{(*hidden.shape[:-1], weight.shape[0])} (hidden's tokens x V_local)")
    return _FusedLinearDivergence.apply(hidden, weight, teacher_logits.detach(), divergence,
                                        float(temperature), tp_group,
                                        chunk_size or default_chunk_size(weight.shape[0]))
