"""topk_kl and sampled_reverse_kl on one process, against float64 autograd references."""

import math

import pytest
import torch

from loss_reference import distinct_ids, make_logits, reference, topk_reference
from nemo_paced.loss import paced_reduce, sampled_reverse_kl, topk_kl, vocab_parallel_kl
from nemo_paced.loss.topk import sparse_kl

SHAPE, K = (3, 7, 50), 6


def _inputs(seed, shape=SHAPE, k=K, pad=0, dead_row=False):
    s, t, w = make_logits(seed, shape, pad=pad, dead_row=dead_row)
    ids = distinct_ids(seed + 1, shape[:-1], shape[-1], k)
    return s, ids, t.log_softmax(-1).gather(-1, ids), w


def _ours(s, ids, lp, w, **kw):
    x = s.detach().clone().requires_grad_()
    v = topk_kl(x, ids, lp, **kw)
    (v * w).sum().backward()
    return v.detach(), x.grad


def _ref(s, ids, lp, w, **kw):
    x = s.detach().double().requires_grad_()
    v = topk_reference(x, ids, lp, **kw)
    (v * w.double()).sum().backward()
    return v.detach(), x.grad


def _close(ours, ref, rtol=1e-5, grad_atol=1e-6):
    (v, g), (rv, rg) = ours, ref
    assert v.dtype == torch.float32 and torch.isfinite(v).all() and torch.isfinite(g).all()
    torch.testing.assert_close(v.double(), rv, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(g.double(), rg, rtol=rtol, atol=grad_atol * max(1.0, rg.abs().max().item()))


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_float64_reference(direction, tail, temperature):
    s, ids, lp, w = _inputs(0)
    kw = dict(direction=direction, tail=tail, temperature=temperature)
    _close(_ours(s, ids, lp, w, chunk_size=4, **kw), _ref(s, ids, lp, w, **kw))  # 4 does not divide 21


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_bucket_with_every_id_is_the_full_vocabulary_kl(direction):
    s, t, w = make_logits(1, (4, 5, 40))
    ids = distinct_ids(2, (4, 5), 40, 40)  # k = V, in shuffled order
    v, g = _ours(s, ids, t.log_softmax(-1).gather(-1, ids), w, direction=direction, chunk_size=3)
    x = s.clone().requires_grad_()
    dense = vocab_parallel_kl(x, t, direction=direction)
    (dense * w).sum().backward()
    torch.testing.assert_close(v, dense.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-6)


def test_renormalize_moves_only_the_logits_at_the_ids():
    s, ids, lp, w = _inputs(3)
    _, g = _ours(s, ids, lp, w, tail="renormalize")
    off = torch.ones_like(g, dtype=torch.bool).scatter(-1, ids, False)
    assert not g[off].any() and g[~off].abs().min() > 0


def test_bucket_tail_matters_and_renormalize_ignores_it():
    """Same top-k probabilities, different teacher tail mass: only bucket sees the difference."""
    s, ids, lp, w = _inputs(4)
    shifted = lp - 0.5  # every top-k probability × e^-0.5: more teacher mass in the tail
    for tail, differs in (("bucket", True), ("renormalize", False)):
        a, b = topk_kl(s, ids, lp, tail=tail), topk_kl(s, ids, shifted, tail=tail)
        assert bool((a - b).abs().max() > 1e-3) == differs


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_padded_vocabulary_and_dead_row(direction, tail):
    """−inf logits (padding, ids of padded entries, a row that is −inf everywhere): no NaN, exact."""
    s, t, w = make_logits(5, SHAPE, pad=12, dead_row=True)
    # a padded id (45) in every token, the teacher −inf there (0 probability), and real ids
    ids = torch.cat([torch.full((*SHAPE[:-1], 1), 45), distinct_ids(6, SHAPE[:-1], 38, K - 1)], -1)
    lp = t.log_softmax(-1).gather(-1, ids).nan_to_num(nan=-math.inf)  # the dead row: −inf everywhere
    lp = torch.where(ids >= 38, -math.inf, lp)
    kw = dict(direction=direction, tail=tail)
    v, g = _ours(s, ids, lp, w, chunk_size=5, **kw)
    # the reference's −inf are −1e4 (exactly zero probability in float64 too, but no inf − inf)
    finite = lambda x: torch.where(torch.isinf(x), -1e4, x)  # noqa: E731
    rv, rg = _ref(finite(s), ids, finite(lp), w, **kw)
    live = torch.ones(v.shape, dtype=torch.bool)
    live.view(-1)[0] = False  # the dead row: uniform student, uniform/… teacher, checked for finiteness
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    torch.testing.assert_close(v[live].double(), rv[live], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[live].double(), rg[live], rtol=1e-5, atol=1e-6)
    assert not g[live][..., 38:].any()


def test_teacher_minus_inf_where_the_student_has_mass_is_huge_not_inf():
    s = torch.zeros(1, 4)
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[0.0, -math.inf]])
    v = topk_kl(s, ids, lp, direction="reverse")
    assert 1e28 < v.item() < math.inf
    assert topk_kl(s, ids, lp, direction="forward").item() == pytest.approx(math.log(4.0), rel=1e-6)


def test_bf16_student_accumulates_in_fp32():
    s, ids, lp, w = _inputs(6)
    s = s.bfloat16()
    v, g = _ours(s, ids, lp, w, chunk_size=5)
    assert g.dtype == torch.bfloat16
    _close((v, g.float()), _ref(s.float(), ids, lp, w), rtol=1e-2, grad_atol=1e-2)
    torch.testing.assert_close(v.double(), topk_reference(s.double(), ids, lp), rtol=1e-5, atol=1e-6)


def test_int32_ids_and_bf16_teacher_logprobs_are_accepted():
    s, ids, lp, w = _inputs(7)
    a = topk_kl(s, ids, lp.bfloat16())
    b = topk_kl(s, ids.int(), lp.bfloat16().float())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_paced_reduce_takes_the_per_token_output():
    s, ids, lp, _ = _inputs(8, shape=(4, 6, 30))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0] * 6, [1] * 6, [0, 1, 0, 1, 0, 1]], dtype=torch.bool)
    weight = torch.tensor([0.5, 1.0, 0.0, 2.0])
    x = s.clone().requires_grad_()
    v = topk_kl(x, ids, lp)
    total, weight_sum = paced_reduce(v, mask, weight)
    total.backward()
    expected = 0.5 * v[0, :3].mean() + 2.0 * v[3, 1::2].mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6) and weight_sum.item() == 2.5
    # the gradient is the per-token gradient times w_b / (response tokens of b); none elsewhere
    per_token = torch.zeros(4, 6)
    per_token[0, :3], per_token[3, 1::2] = 0.5 / 3, 2.0 / 3
    _, g = _ref(s, ids, lp, per_token)
    torch.testing.assert_close(x.grad.double(), g, rtol=1e-5, atol=1e-7)
    assert not x.grad[1:3].any()


def test_duplicate_ids_are_an_error_naming_the_token():
    s, ids, lp, _ = _inputs(9)
    ids[1, 4, 3] = ids[1, 4, 1]
    with pytest.raises(ValueError, match=r"teacher_ids\[1, 4\] holds id \d+ twice \(at positions \[1, 3\]"):
        topk_kl(s, ids, lp)


def test_ids_out_of_range_are_an_error_naming_the_position():
    s, ids, lp, _ = _inputs(10)
    ids[2, 5, 4] = 50
    with pytest.raises(ValueError, match=r"teacher_ids\[2, 5, 4\] = 50 is outside the vocabulary \[0, 50\)"):
        topk_kl(s, ids, lp)
    ids[2, 5, 4] = -1
    with pytest.raises(ValueError, match=r"teacher_ids\[2, 5, 4\] = -1"):
        topk_kl(s, ids, lp)


@pytest.mark.parametrize("bad,match", [
    (dict(direction="sideways"), "direction"), (dict(tail="drop"), "tail"),
    (dict(temperature=0.0), "temperature"), (dict(chunk_size=0), "chunk_size")])
def test_bad_settings_are_named(bad, match):
    s, ids, lp, _ = _inputs(11)
    with pytest.raises(ValueError, match=match):
        topk_kl(s, ids, lp, **bad)


def test_bad_inputs_are_named():
    s, ids, lp, _ = _inputs(12)
    with pytest.raises(ValueError, match="teacher_ids"):
        topk_kl(s, ids[:2], lp[:2])
    with pytest.raises(ValueError, match="teacher_logprobs"):
        topk_kl(s, ids, lp[..., :3])
    with pytest.raises(ValueError, match="integer"):
        topk_kl(s, ids.float(), lp)
    lp[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logprobs\[0, 1, 2\] = nan"):
        topk_kl(s, ids, lp)


def test_sparse_kl_gradient_matches_autograd_of_its_value():
    """The pure per-chunk function: its analytic gradient against autograd through the softmax."""
    g = torch.Generator().manual_seed(13)
    z = (torch.randn(5, 12, generator=g, dtype=torch.float64) * 2).requires_grad_()
    ids = distinct_ids(14, (5,), 12, 4)
    log_p = (torch.randn(5, 12, generator=g) * 2).log_softmax(-1).gather(-1, ids)
    for reverse in (False, True):
        for renormalize in (False, True):
            lq = z.log_softmax(-1)
            outside = torch.ones(5, 12, dtype=torch.bool).scatter(-1, ids, False)
            lq_tail = torch.where(outside, lq, -math.inf).logsumexp(-1)
            value, grad_ids, coef = sparse_kl(lq.gather(-1, ids).float(), lq_tail.float(), log_p,
                                              reverse=reverse, renormalize=renormalize, has_tail=True)
            (auto,) = torch.autograd.grad(topk_reference(z, ids, log_p, direction="reverse" if reverse else
                                                         "forward", tail="renormalize" if renormalize
                                                         else "bucket").sum(), z)
            analytic = (coef[:, None].double() * lq.exp()).detach().scatter(-1, ids, grad_ids.double())
            torch.testing.assert_close(analytic, auto, rtol=1e-5, atol=1e-6)


# ---- the sampled-token reverse-KL estimator ------------------------------------------------------

def test_sampled_value_and_gradient_for_fixed_samples():
    s, t, w = make_logits(15, (3, 5, 20))
    y = distinct_ids(16, (3, 5), 20, 1)[..., 0]
    lp = t.log_softmax(-1).gather(-1, y[..., None])[..., 0]
    x = s.clone().requires_grad_()
    v = sampled_reverse_kl(x, y, lp, temperature=1.5, chunk_size=4)
    (v * w).sum().backward()
    xd = s.double().requires_grad_()
    log_q = (xd / 1.5).log_softmax(-1).gather(-1, y[..., None])[..., 0]
    advantage = log_q - lp.double()
    (advantage.detach() * log_q * w.double()).sum().backward()  # stop-gradient advantage on log q
    torch.testing.assert_close(v.double(), advantage.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)


def test_sampled_estimator_gradient_is_the_reverse_kl_gradient_in_expectation():
    """Monte Carlo, seeded and bounded: a tiny softmax-linear student at 3 positions, 40k samples each.

    The mean estimator gradient must match the exact ∇ Σ_t KL(q_t ‖ p_t) within 4 standard errors,
    while the naive pathwise gradient of the same samples (no stop-gradient) has expectation 0.
    """
    g = torch.Generator().manual_seed(17)
    positions, hidden, vocab, samples = 3, 4, 7, 40_000
    x = torch.randn(positions, hidden, generator=g)
    weight = (torch.randn(vocab, hidden, generator=g) * 0.7).requires_grad_()
    teacher = torch.randn(positions, vocab, generator=g) * 1.5
    (exact,) = torch.autograd.grad(reference("reverse", x @ weight.t(), teacher).sum(), weight)
    with torch.no_grad():
        y = torch.multinomial((x @ weight.t()).softmax(-1), samples, replacement=True, generator=g)
    lp = teacher.log_softmax(-1).gather(-1, y)  # [positions, samples]
    logits = (x @ weight.t())[:, None, :].expand(positions, samples, vocab)
    values = sampled_reverse_kl(logits, y, lp)
    (estimated,) = torch.autograd.grad(values.mean(1).sum(), weight)
    # the values estimate the KL itself (loosely: this only guards the sign and scale)
    torch.testing.assert_close(values.detach().mean(1).double(),
                               reference("reverse", x @ weight.t(), teacher).detach().double(),
                               rtol=0.05, atol=0.02)
    # standard error of the estimate: the estimator is A·(onehot(y) − q) ⊗ x per sample
    with torch.no_grad():
        q = (x @ weight.t()).softmax(-1)
        advantage = q.log().gather(-1, y) - lp
        onehot = torch.nn.functional.one_hot(y, vocab).double()
        per = advantage[..., None].double() * (onehot - q[:, None].double())  # [P, M, V]
        grad_samples = torch.einsum("pmv,ph->mvh", per, x.double())
        stderr = grad_samples.std(0) / math.sqrt(samples)
    error = (estimated - exact).abs().double()
    assert (error <= 4 * stderr + 1e-6).all(), f"max error/stderr {(error / stderr).max():.2f}"
    assert exact.abs().max() > 20 * stderr.max()  # the check has power: the gradient is far from 0
