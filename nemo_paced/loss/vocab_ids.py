"""Global vocabulary ids against a tensor-parallel vocabulary shard: validation and ownership.

Megatron shards the vocabulary contiguously and evenly: rank r of the TP group holds ids
[r·V_local, (r+1)·V_local). A loss given global ids (a teacher's top-k, the student's sampled
tokens) reads the student's logit at an id on the rank that owns it and contributes 0 elsewhere,
so one sum all-reduce gives every rank the value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def vocab_shard(v_local: int, group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(first global id of this rank's shard, full vocabulary size)."""
    if group is None:
        return 0, v_local
    return dist.get_rank(group) * v_local, v_local * dist.get_world_size(group)


def _position(flat_index: int, shape: torch.Size) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape))


def check_ids(ids: Tensor, vocab: int, name: str) -> None:
    """Integer ids inside [0, vocab); the first bad one is named by its position."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    bad = torch.nonzero(((ids < 0) | (ids >= vocab)).flatten())
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{name}{list(_position(i, ids.shape))} = {int(ids.flatten()[i])} is outside "
                         f"the vocabulary [0, {vocab})")


def check_unique_rows(ids: Tensor, name: str) -> None:
    """No id twice in one row `[..., k]` (a duplicated outcome would be counted twice)."""
    if ids.shape[-1] < 2:
        return
    rows = ids.reshape(-1, ids.shape[-1])
    ordered = rows.sort(-1).values
    dup_rows = torch.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(-1))
    if dup_rows.numel():
        r = int(dup_rows[0])
        row = ordered[r]
        value = int(row[1:][row[1:] == row[:-1]][0])
        where = torch.nonzero(rows[r] == value).flatten().tolist()
        raise ValueError(f"{name}{list(_position(r, ids.shape[:-1]))} holds id {value} twice "
                         f"(at positions {where} of its last dimension)")


def check_finite_or_neg_inf(x: Tensor, name: str) -> None:
    """Log-probabilities may be −inf (zero probability) but neither NaN nor +inf."""
    bad = torch.nonzero((torch.isnan(x) | torch.isposinf(x)).flatten())
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{name}{list(_position(i, x.shape))} = {float(x.flatten()[i])} is not a "
                         f"log-probability")


def owned(ids: Tensor, offset: int, v_local: int) -> tuple[Tensor, Tensor]:
    """(local column of each id, clamped into the shard; whether this rank owns the id)."""
    local = ids - offset
    mine = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), mine


def gather_owned(x: Tensor, local: Tensor, mine: Tensor) -> Tensor:
    """x at the owned ids `[n, k]`, 0 at ids of other ranks (so a sum over ranks gathers them)."""
    return torch.where(mine, x.gather(1, local), 0.0)
