"""Vocab-parallel divergences on 1, 2 and 4 gloo ranks against a float64 reference on the gathered logits.

Every rank builds the same full logits, keeps its contiguous vocabulary shard, and returns its
per-token values and its shard of the student gradient; the test gathers the shards.
"""

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_ranks
from loss_reference import make_logits, reference
from nemo_paced.loss import vocab_parallel_akl, vocab_parallel_jsd, vocab_parallel_kl

V = 24  # divisible by 1, 2 and 4; with pad=6 the whole last shard is padding at TP=4
SHAPE = (2, 5, V)  # 10 tokens, chunk 3 does not divide them
# (name, kwargs of ours, kind and kwargs of the reference, input dtype, pad, dead row)
CASES = [
    ("forward", dict(direction="forward"), ("forward", {}), torch.float32, 0, False),
    ("reverse", dict(direction="reverse", temperature=2.0), ("reverse", {}), torch.float32, 0, False),
    ("forward-pad", dict(direction="forward"), ("forward", {}), torch.float32, 6, True),
    ("reverse-pad", dict(direction="reverse"), ("reverse", {}), torch.float32, 6, True),
    ("forward-bf16", dict(direction="forward"), ("forward", {}), torch.bfloat16, 0, False),
    ("jsd", dict(beta=0.3, temperature=1.5), ("jsd", {"beta": 0.3}), torch.float32, 6, True),
    ("akl", dict(mu=0.5), ("akl", {"mu": 0.5}), torch.float32, 6, True),
    ("akl-t", dict(mu=0.7, temperature=0.5), ("akl", {"mu": 0.7}), torch.float32, 0, False),
]


def _ours(name, s, t, kw, group):
    fn = vocab_parallel_jsd if name.startswith("jsd") else vocab_parallel_akl if name.startswith("akl") \
        else vocab_parallel_kl
    return fn(s, t, tp_group=group, chunk_size=3, **kw)


def _inputs(seed, dtype, pad, dead):
    s, t, w = make_logits(seed, SHAPE, pad=pad, dead_row=dead)
    return s.to(dtype), t.to(dtype), w


def _run_cases(rank, world_size, group, group_rank, group_size, seed_offset):
    shard = V // group_size
    lo, hi = group_rank * shard, (group_rank + 1) * shard
    out = []
    for i, (name, kw, _, dtype, pad, dead) in enumerate(CASES):
        s, t, w = _inputs(i + seed_offset, dtype, pad, dead)
        s_local = s[..., lo:hi].clone().requires_grad_()
        v = _ours(name, s_local, t[..., lo:hi].clone(), kw, group)
        (v * w).sum().backward()
        # numpy arrays travel by value; many tensors through the result queue use shared file
        # descriptors that vanish when the rank exits
        out.append((v.detach().numpy(), s_local.grad.float().numpy(), str(s_local.grad.dtype)))
    return out


def _world_case(rank, world_size):
    return _run_cases(rank, world_size, dist.group.WORLD, rank, world_size, 0)


def _two_groups_case(rank, world_size):
    """Ranks {0, 1} and {2, 3} form two TP groups working on different data at the same time."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    return _run_cases(rank, world_size, groups[rank // 2], rank % 2, 2, 100 * (rank // 2))


def _check(results, seed_offset):
    for i, (name, _, (kind, opts), dtype, pad, dead) in enumerate(CASES):
        values = [torch.from_numpy(r[i][0]) for r in results]
        for v in values[1:]:
            assert torch.equal(v, values[0]), f"{name}: ranks disagree"
        assert all(r[i][2] == str(dtype) for r in results), f"{name}: gradient dtype"
        grad = torch.cat([torch.from_numpy(r[i][1]) for r in results], dim=-1)
        s, t, w = _inputs(i + seed_offset, dtype, pad, dead)
        sd = s.double().requires_grad_()
        ref = reference(kind, sd, t.double(), temperature=CASES[i][1].get("temperature", 1.0), **opts)
        (ref * w.double()).sum().backward()
        assert torch.isfinite(grad).all() and torch.isfinite(values[0]).all()
        torch.testing.assert_close(values[0].double(), ref.detach(), rtol=1e-5, atol=1e-7, msg=name)
        tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), sd.grad, **tol, msg=name)
        if dead:
            assert values[0].view(-1)[0] == 0 and not grad.view(-1, V)[0].any()


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_tp_matches_float64_reference(world_size):
    _check(run_ranks(_world_case, world_size, timeout=240), 0)


@pytest.mark.distributed
def test_two_tp_groups_stay_separate():
    results = run_ranks(_two_groups_case, 4, timeout=240)
    _check(results[:2], 0)
    _check(results[2:], 100)
