import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nemo_paced.weighting import (
    Normalisation, PassRateEstimator, WeightConfig, WeightMode, beta_kernel, effective_sample_size,
    extreme_fraction, kernel_peak, normalise, pass_rate_histogram, posterior_pass_rate, unbiased_kernel,
)

probabilities = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
# exponents in (0, 0.01) put the peak within rounding of p = 0 or 1, where w drops to 0
exponents = st.one_of(st.just(0.0), st.floats(min_value=0.01, max_value=5.0))


def test_default_kernel_is_p_times_one_minus_p():
    assert beta_kernel(0.25) == pytest.approx(0.1875)
    assert beta_kernel(0.0) == 0.0 and beta_kernel(1.0) == 0.0


def test_kernel_keeps_the_input_type():
    assert isinstance(beta_kernel(0.5), float)
    out = beta_kernel(np.array([0.0, 0.5, 1.0]), 2.0, 1.0)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [0.0, 0.125, 0.0])
    t = beta_kernel(torch.tensor([0.5, 0.75], dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([0.25, 0.1875]))


def test_zero_exponents_are_the_uniform_baseline():
    np.testing.assert_array_equal(beta_kernel(np.array([0.0, 0.3, 1.0]), 0.0, 0.0), [1.0, 1.0, 1.0])
    assert kernel_peak(0, 0) is None


@pytest.mark.parametrize("bad", [-0.1, 1.0001, float("nan")])
def test_out_of_range_pass_rate_names_the_value(bad):
    with pytest.raises(ValueError, match="pass rate must lie in"):
        beta_kernel(bad)
    with pytest.raises(ValueError, match=r"index \(2,\)"):
        beta_kernel(np.array([0.1, 0.2, bad]))
    with pytest.raises(ValueError):
        beta_kernel(torch.tensor([bad]))


@pytest.mark.parametrize("alpha,beta", [(-1, 1), (1, -0.5), (float("inf"), 1)])
def test_negative_or_infinite_exponents_are_rejected(alpha, beta):
    with pytest.raises(ValueError, match="alpha|beta"):
        beta_kernel(0.5, alpha, beta)


@settings(max_examples=200, deadline=None)
@given(alpha=exponents, beta=exponents, p=probabilities)
def test_kernel_is_maximal_at_its_peak(alpha, beta, p):
    peak = kernel_peak(alpha, beta)
    if peak is not None:
        assert beta_kernel(p, alpha, beta) <= beta_kernel(peak, alpha, beta) + 1e-12
    assert 0.0 <= beta_kernel(p, alpha, beta) <= 1.0


@settings(max_examples=100, deadline=None)
@given(alpha=exponents, beta=exponents, p=st.integers(0, 64).map(lambda j: j / 64))  # 1 - p exact
def test_kernel_mirror_symmetry(alpha, beta, p):
    assert beta_kernel(p, alpha, beta) == pytest.approx(beta_kernel(1 - p, beta, alpha), abs=1e-12)


@pytest.mark.parametrize("alpha,beta", [(1, 1), (2, 1), (1, 3), (0, 2)])
def test_unbiased_estimator_is_unbiased(alpha, beta):
    trials = 8
    k = np.arange(trials + 1)
    for p in (0.05, 0.3, 0.5, 0.9):
        pmf = np.array([math.comb(trials, j) * p**j * (1 - p) ** (trials - j) for j in k])
        expectation = float(np.sum(pmf * unbiased_kernel(k, np.full_like(k, trials), alpha, beta)))
        assert expectation == pytest.approx(p**alpha * (1 - p) ** beta, rel=1e-9)


def test_unbiased_p_one_minus_p_matches_closed_form():
    k = np.arange(9)
    np.testing.assert_allclose(unbiased_kernel(k, np.full(9, 8)), k * (8 - k) / (8 * 7))


def test_unbiased_estimator_rejects_fractional_exponents_and_few_trials():
    with pytest.raises(ValueError, match="integer"):
        WeightConfig(alpha=1.5, estimator="unbiased")
    with pytest.raises(ValueError, match="trials >= alpha"):
        unbiased_kernel(np.array([1]), np.array([1]))


def test_posterior_keeps_extremes_weighted():
    p = posterior_pass_rate(np.array([0, 8]), np.array([8, 8]), (1, 1))
    np.testing.assert_allclose(p, [0.1, 0.9])
    w = WeightConfig(estimator=PassRateEstimator.POSTERIOR).weights([0, 8], [8, 8])
    np.testing.assert_allclose(w, [0.09, 0.09])


def test_unweighted_modes_give_0_1_draw_and_loss_weights_whatever_they_are_handed():
    for mode in ("filter", "uniform"):
        draw, loss_w = WeightConfig(mode=mode).draw_and_loss(np.array([0.0, 0.5, 1.0, 0.25]))
        np.testing.assert_array_equal(draw, [0.0, 1.0, 1.0, 1.0])
        np.testing.assert_array_equal(loss_w, [0.0, 1.0, 1.0, 1.0])


def test_modes_split_draw_and_loss_weights():
    successes, trials = np.array([0, 1, 4, 7, 8]), np.full(5, 8)
    kernel = np.array([0, 7, 16, 7, 0]) / 64
    loss = WeightConfig(mode="loss")
    draw, loss_w = loss.draw_and_loss(loss.weights(successes, trials))
    np.testing.assert_allclose(draw, [0, 1, 1, 1, 0])
    np.testing.assert_allclose(loss_w, kernel)
    sample = WeightConfig(mode=WeightMode.SAMPLE)
    draw, loss_w = sample.draw_and_loss(sample.weights(successes, trials))
    np.testing.assert_allclose(draw, kernel)
    np.testing.assert_allclose(loss_w, [0, 1, 1, 1, 0])
    filt = WeightConfig(mode="filter")  # 0.2 < p < 0.8, strict
    np.testing.assert_allclose(filt.weights(np.array([1, 2, 4, 6, 8]), np.full(5, 10)), [0, 0, 1, 1, 0])
    uniform = WeightConfig(mode="uniform")
    np.testing.assert_allclose(uniform.draw_and_loss(uniform.weights(successes, trials)), np.ones((2, 5)))


@pytest.mark.parametrize("kwargs,field", [({"mode": "bogus"}, "mode"), ({"estimator": "x"}, "estimator"),
                                          ({"band": (0.8, 0.2)}, "band"), ({"prior": (0, 1)}, "prior"),
                                          ({"alpha": -1}, "alpha")])
def test_bad_config_names_the_setting(kwargs, field):
    with pytest.raises(ValueError, match=field):
        WeightConfig(**kwargs)


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="successes <= trials"):
        WeightConfig().weights([9], [8])


def test_global_batch_normalisation_and_zero_batches():
    assert normalise(3.0, 1.5, 4) == 2.0
    assert normalise(0.0, 0.0, 4) == 0.0
    t = normalise(torch.tensor(0.0, requires_grad=True), torch.tensor(0.0), 4)
    assert t.item() == 0.0 and not torch.isnan(t)
    t.backward()  # a zero-weight batch still back-propagates without NaN


def test_dataset_mean_normalisation():
    assert normalise(3.0, 1.5, 4, Normalisation.DATASET_MEAN, dataset_mean_weight=0.25) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="dataset_mean_weight"):
        normalise(1.0, 1.0, 1, "dataset_mean")


def test_effective_sample_size():
    assert effective_sample_size(np.ones(10)) == pytest.approx(10)
    assert effective_sample_size(np.array([1.0, 0, 0, 0])) == pytest.approx(1)
    assert effective_sample_size(np.array([1.0, 1.0, 2.0])) == pytest.approx(16 / 6)
    assert effective_sample_size(np.zeros(3)) == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=1, max_size=30))
def test_ess_bounds(weights):
    w = np.array(weights)
    ess = effective_sample_size(w)
    assert 0 <= ess <= (w > 0).sum() + 1e-9
    if (w > 0).any():
        assert ess >= 1 - 1e-9


def test_extremes_and_histogram():
    successes, trials = np.array([0, 0, 3, 8]), np.full(4, 8)
    assert extreme_fraction(successes, trials) == (0.5, 0.25)
    hist = pass_rate_histogram(successes / trials, 8)
    assert hist.tolist() == [2, 0, 0, 1, 0, 0, 0, 0, 1]
    assert pass_rate_histogram(np.array([0.49]), 2).tolist() == [0, 1, 0]
