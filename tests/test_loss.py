"""Single-process tests of the vocab-parallel divergences against float64 autograd references."""

import math
from types import SimpleNamespace

import pytest
import torch

from loss_reference import make_logits, reference
from nemo_paced.loss import vocab_parallel_akl, vocab_parallel_jsd, vocab_parallel_kl
from nemo_paced.loss.divergences import Comm, ordered_keys, teacher_head_threshold

KINDS = [("forward", {}), ("reverse", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.1}),
         ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("akl", {"mu": 0.5}), ("akl", {"mu": 0.9})]


def ours(kind, s, t, **kw):
    if kind in ("forward", "reverse"):
        return vocab_parallel_kl(s, t, direction=kind, **kw)
    if kind == "jsd":
        return vocab_parallel_jsd(s, t, **kw)
    return vocab_parallel_akl(s, t, **kw)


def value_and_grad(fn, s, t, weight, **kw):
    s = s.detach().clone().requires_grad_()
    v = fn(s, t, **kw)
    (v * weight.to(v.dtype)).sum().backward()
    return v.detach(), s.grad


def check(kind, opts, s, t, w, *, temperature=1.0, chunk_size=None, rtol=1e-5, grad_atol=1e-6):
    v, g = value_and_grad(lambda a, b, **k: ours(kind, a, b, **k, **opts), s, t, w,
                          temperature=temperature, chunk_size=chunk_size)
    rv, rg = value_and_grad(lambda a, b: reference(kind, a, b, temperature=temperature, **opts),
                            s.double(), t.double(), w.double())
    assert v.dtype == torch.float32 and g.dtype == s.dtype
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    torch.testing.assert_close(v.double(), rv, rtol=rtol, atol=1e-7)
    # gradients are compared at fp32 resolution of the largest one (log-prob differences of logits
    # near 20 carry ~2e-6 absolute rounding in any fp32 implementation)
    torch.testing.assert_close(g.double(), rg, rtol=rtol, atol=grad_atol * max(1.0, rg.abs().max().item()))


@pytest.mark.parametrize("kind,opts", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_float64_reference(kind, opts, temperature):
    s, t, w = make_logits(0, (3, 7, 50))
    check(kind, opts, s, t, w, temperature=temperature, chunk_size=4)  # 4 does not divide 21


@pytest.mark.parametrize("kind,opts", KINDS)
def test_padded_vocabulary_and_dead_rows(kind, opts):
    s, t, w = make_logits(1, (2, 5, 40), pad=9, dead_row=True)
    check(kind, opts, s, t, w, chunk_size=3)
    v = ours(kind, s, t, **opts)
    assert v.view(-1)[0] == 0.0


@pytest.mark.parametrize("kind,opts", KINDS[:3] + KINDS[6:7])
def test_bf16_inputs_accumulate_in_fp32(kind, opts):
    s, t, w = make_logits(2, (4, 6, 64))
    s, t = s.bfloat16(), t.bfloat16()
    # values come from fp32 math on the bf16 numbers; only the returned gradient is rounded to bf16
    check(kind, opts, s, t, w, chunk_size=5, rtol=1e-2, grad_atol=1e-3)
    v = ours(kind, s, t, **opts)
    torch.testing.assert_close(v.double(), reference(kind, s, t, **opts), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 100, None])
def test_chunk_size_does_not_change_result(chunk_size):
    s, t, w = make_logits(3, (13, 33))
    check("forward", {}, s, t, w, chunk_size=chunk_size)
    check("reverse", {}, s, t, w, chunk_size=chunk_size)


def test_large_logits_are_stable():
    s, t, w = make_logits(4, (6, 30), scale=300.0)
    check("forward", {}, s, t, w)
    check("reverse", {}, s, t, w)


def test_kl_where_only_the_student_has_minus_inf_is_huge_and_zero_where_teacher_has_none():
    s = torch.tensor([[0.0, 0.0, float("-inf")], [0.0, 1.0, 2.0]])
    t = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, float("-inf")]])
    v = vocab_parallel_kl(s, t)
    assert v[0] > 1e29 and torch.isfinite(v).all() and 0 < v[1] < 10


def test_teacher_gets_no_gradient_and_student_only_once():
    s, t, _ = make_logits(5, (4, 10))
    s.requires_grad_()
    t.requires_grad_()
    v = vocab_parallel_kl(s, t)
    v.sum().backward(retain_graph=True)
    assert t.grad is None and s.grad is not None
    with pytest.raises(RuntimeError, match="single backward"):
        v.sum().backward()


def test_no_grad_skips_gradient():
    s, t, _ = make_logits(6, (4, 10))
    with torch.no_grad():
        v = vocab_parallel_kl(s.requires_grad_(), t)
    assert not v.requires_grad
    torch.testing.assert_close(v.double(), reference("forward", s, t).detach(), rtol=1e-5, atol=1e-7)


def test_matches_modelopt_logits_kl_loss():
    from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

    s, t, _ = make_logits(7, (5, 2, 40))  # Megatron layout [s, b, V]
    cfg = SimpleNamespace(tensor_model_parallel_size=1, sequence_parallel=False)
    for reverse, direction in ((False, "forward"), (True, "reverse")):
        theirs, tp_reduce, _ = LogitsKLLoss(cfg, temperature=2.0, reverse=reverse)(s, t)
        mine = vocab_parallel_kl(s, t, direction=direction, temperature=2.0)
        torch.testing.assert_close(mine.t(), theirs, rtol=1e-5, atol=1e-6)


def test_generalized_jsd_matches_trl_when_installed():
    trl = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="TRL is not installed")
    s, t, _ = make_logits(8, (2, 3, 30))
    for beta in (0.0, 0.3, 1.0):
        theirs = trl.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=1.5, reduction="none")
        mine = vocab_parallel_jsd(s, t, beta=beta, temperature=1.5)
        torch.testing.assert_close(mine, theirs.sum(-1), rtol=1e-5, atol=1e-6)


def test_head_threshold_is_exact_including_ties_and_crossing_token():
    pt = torch.tensor([[0.3, 0.2, 0.2, 0.2, 0.1],    # 0.3 < .5 before the ties: ties all in
                       [0.5, 0.25, 0.25, 0.0, 0.0],  # head mass reaches exactly mu with one token
                       [0.05] * 4 + [0.8]])          # one dominant token
    keys = ordered_keys(pt.log())
    head = keys >= teacher_head_threshold(keys, pt, 0.5, Comm())[:, None]
    assert head.tolist() == [[True, True, True, True, False],
                             [True, False, False, False, False],
                             [False, False, False, False, True]]


def test_ordered_keys_preserve_float_order():
    x = torch.tensor([float("-inf"), -3e38, -1.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, float("inf")])
    keys = ordered_keys(x)
    assert (keys[1:] > keys[:-1]).all()


@pytest.mark.parametrize("bad,match", [
    (dict(direction="sideways"), "direction"), (dict(temperature=0.0), "temperature"),
    (dict(chunk_size=0), "chunk_size")])
def test_bad_settings_are_named(bad, match):
    s, t, _ = make_logits(9, (2, 5))
    with pytest.raises(ValueError, match=match):
        vocab_parallel_kl(s, t, **bad)


def test_bad_inputs_are_named():
    s, t, _ = make_logits(9, (2, 5))
    with pytest.raises(ValueError, match="same shape"):
        vocab_parallel_kl(s, t[:, :4])
    with pytest.raises(ValueError, match="beta"):
        vocab_parallel_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="mu"):
        vocab_parallel_akl(s, t, mu=0.0)
    assert math.isfinite(float(vocab_parallel_kl(s, t).sum()))


@pytest.mark.parametrize("kind,opts", [KINDS[0], KINDS[1], KINDS[2], KINDS[6]])
def test_relative_error_at_a_real_vocabulary_size(kind, opts):
    """1e-5 relative error at V = 32768 (a dot product in BLAS order drifted to 6e-5 here)."""
    s, t, _ = make_logits(10, (6, 32768))
    rel = (ours(kind, s, t, **opts).double() - reference(kind, s, t, **opts)).abs() / reference(kind, s, t, **opts)
    assert rel.max() <= 1e-5
