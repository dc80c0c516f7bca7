"""topk_kl and sampled_reverse_kl on 2 and 4 gloo ranks equal the single-process (TP=1) result.

Every rank builds the same full inputs, keeps its contiguous vocabulary shard of the student's
logits (the ids stay global) and returns its per-token values and its shard of the gradient.
"""

import math

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_ranks
from loss_reference import distinct_ids, make_logits
from nemo_paced.loss import sampled_reverse_kl, topk_kl

V, LEAD, K = 24, (2, 5), 5  # 10 tokens, chunk 3 does not divide them
# (name, kwargs of topk_kl or "sampled", student dtype, pad)
CASES = [
    ("forward-bucket", dict(direction="forward"), torch.float32, 0),
    ("reverse-bucket-t", dict(direction="reverse", temperature=2.0), torch.float32, 0),
    ("forward-renormalize", dict(tail="renormalize"), torch.float32, 0),
    ("reverse-renormalize-pad", dict(direction="reverse", tail="renormalize"), torch.float32, 6),
    ("forward-bucket-pad", dict(direction="forward"), torch.float32, 6),
    ("forward-bucket-bf16", dict(direction="forward"), torch.bfloat16, 0),
    ("every-id", dict(direction="reverse"), torch.float32, 0),
    ("sampled", "sampled", torch.float32, 0),
]


def _inputs(i):
    name, _, dtype, pad = CASES[i]
    s, t, w = make_logits(i, (*LEAD, V), pad=pad)
    k = V if name == "every-id" else 1 if name == "sampled" else K
    ids = distinct_ids(50 + i, LEAD, V, k)  # spread over all shards, padded ids included
    lp = t.log_softmax(-1).gather(-1, ids).nan_to_num(nan=-math.inf)
    return s.to(dtype), ids, lp, w


def _loss(i, s, ids, lp, group):
    kw = CASES[i][1]
    if kw == "sampled":
        return sampled_reverse_kl(s, ids[..., 0], lp[..., 0], tp_group=group, chunk_size=3)
    return topk_kl(s, ids, lp, tp_group=group, chunk_size=3, **kw)


def _run(i, lo=0, hi=V, group=None):
    s, ids, lp, w = _inputs(i)
    x = s[..., lo:hi].clone().requires_grad_()
    v = _loss(i, x, ids, lp, group)
    (v * w).sum().backward()
    return v.detach().numpy(), x.grad.float().numpy()


def _ranks(rank, world_size):
    shard = V // world_size
    return [_run(i, rank * shard, (rank + 1) * shard, dist.group.WORLD) for i in range(len(CASES))]


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_equals_tp1(world_size):
    results = run_ranks(_ranks, world_size, timeout=240)
    for i, (name, *_rest) in enumerate(CASES):
        v1, g1 = (torch.from_numpy(a) for a in _run(i))
        values = [torch.from_numpy(r[i][0]) for r in results]
        for v in values[1:]:
            assert torch.equal(v, values[0]), f"{name}: ranks disagree"
        grad = torch.cat([torch.from_numpy(r[i][1]) for r in results], dim=-1)
        assert torch.isfinite(values[0]).all() and torch.isfinite(grad).all(), name
        torch.testing.assert_close(values[0], v1, rtol=1e-5, atol=1e-6, msg=name)
        tol = dict(rtol=1e-2, atol=1e-3) if CASES[i][2] == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, g1, **tol, msg=name)


def _bad_id(rank, world_size):
    s, ids, lp, _ = _inputs(0)
    ids[1, 2, 3] = V  # in range of no shard
    shard = V // world_size
    try:
        topk_kl(s[..., rank * shard:(rank + 1) * shard], ids, lp, tp_group=dist.group.WORLD)
    except ValueError as e:
        return str(e)
    return None


@pytest.mark.distributed
def test_an_id_beyond_the_global_vocabulary_is_named_on_every_rank():
    for message in run_ranks(_bad_id, 2, timeout=120):
        assert message == f"teacher_ids[1, 2, 3] = {V} is outside the vocabulary [0, {V})"
