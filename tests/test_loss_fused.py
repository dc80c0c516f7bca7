"""fused_linear_kl: output layer + KL without full student logits, against float64 autograd."""

import pytest
import torch
import torch.distributed as dist

from gloo_ranks import run_ranks
from loss_reference import reference
from nemo_paced.loss import fused_linear_kl, vocab_parallel_kl

H, V = 16, 24


def _inputs(seed: int, tokens=(3, 7), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*tokens, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    teacher = 0.5 * hidden @ weight.t() + torch.randn(*tokens, V, generator=g)
    teacher[..., -5:] -= 30.0  # nearly no teacher mass there
    return hidden.to(dtype), weight.to(dtype), teacher.to(dtype), torch.rand(tokens, generator=g) + 0.5


def _reference(direction, hidden, weight, teacher, w, temperature=1.0):
    h = hidden.double().requires_grad_()
    wt = weight.double().requires_grad_()
    v = reference(direction, h @ wt.t(), teacher.double(), temperature=temperature)
    (v * w.double()).sum().backward()
    return v.detach(), h.grad, wt.grad


def _ours(direction, hidden, weight, teacher, w, group=None, temperature=1.0, lo=0, hi=V):
    h = hidden.detach().clone().requires_grad_()
    wt = weight[lo:hi].detach().clone().requires_grad_()
    v = fused_linear_kl(h, wt, teacher[..., lo:hi], direction=direction, temperature=temperature,
                        tp_group=group, chunk_size=4)
    (v * w).sum().backward()
    return v.detach(), h.grad, wt.grad


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_matches_float64_reference(direction, temperature):
    hidden, weight, teacher, w = _inputs(0)
    v, gh, gw = _ours(direction, hidden, weight, teacher, w, temperature=temperature)
    rv, rgh, rgw = _reference(direction, hidden, weight, teacher, w, temperature)
    torch.testing.assert_close(v.double(), rv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh.double(), rgh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw.double(), rgw, rtol=1e-5, atol=1e-5)


def test_equals_unfused_loss_on_materialised_logits():
    hidden, weight, teacher, w = _inputs(1, dtype=torch.bfloat16)
    v, gh, gw = _ours("forward", hidden, weight, teacher, w)
    h = hidden.clone().requires_grad_()
    wt = weight.clone().requires_grad_()
    ref = vocab_parallel_kl(h @ wt.t(), teacher)
    (ref * w).sum().backward()
    torch.testing.assert_close(v, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh.float(), h.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), wt.grad.float(), rtol=2e-2, atol=2e-2)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, teacher, _ = _inputs(2)
    h = hidden.requires_grad_()
    fused_linear_kl(h, weight, teacher).sum().backward()
    assert h.grad is not None and weight.grad is None


def test_bad_shapes_are_named():
    hidden, weight, teacher, _ = _inputs(3)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_kl(hidden, weight[:, :5], teacher)
    with pytest.raises(ValueError, match="teacher_logits"):
        fused_linear_kl(hidden, weight, teacher[..., :5])
    with pytest.raises(ValueError, match="direction"):
        fused_linear_kl(hidden, weight, teacher, direction="both")


def _tp_fused(rank, world_size, direction):
    hidden, weight, teacher, w = _inputs(4)
    shard = V // world_size
    v, gh, gw = _ours(direction, hidden, weight, teacher, w, dist.group.WORLD,
                      lo=rank * shard, hi=(rank + 1) * shard)
    return v.numpy(), gh.numpy(), gw.numpy()


@pytest.mark.distributed
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_tp2_matches_reference(direction):
    results = run_ranks(_tp_fused, 2, direction, timeout=240)
    rv, rgh, rgw = _reference(direction, *_inputs(4))
    for v, gh, _ in results:
        torch.testing.assert_close(torch.from_numpy(v).double(), rv, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.from_numpy(gh).double(), rgh, rtol=1e-5, atol=1e-5)
    gw = torch.cat([torch.from_numpy(r[2]) for r in results])
    torch.testing.assert_close(gw.double(), rgw, rtol=1e-5, atol=1e-5)
