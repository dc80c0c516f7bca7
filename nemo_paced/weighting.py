"""The Beta kernel w(p) = p^alpha (1-p)^beta, pass-rate estimators, weight modes and weight statistics.

PACED weights a problem by how close the student is to solving it: w = 0 for mastered (p = 1)
and hopeless (p = 0) problems, largest at the frontier p = alpha / (alpha + beta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

import numpy as np
import torch

ArrayLike = TypeVar("ArrayLike", float, np.ndarray, torch.Tensor)


def _check_exponents(alpha: float, beta: float) -> None:
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_probabilities(p: np.ndarray) -> None:
    bad = np.isnan(p) | (p < 0) | (p > 1)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0]) if p.ndim else ()
        where = f" at index {index}" if index else ""
        raise ValueError(f"pass rate must lie in [0, 1]; got {p[index].item()!r}{where}")


def beta_kernel(p: ArrayLike, alpha: float = 1.0, beta: float = 1.0) -> ArrayLike:
    """w(p) = p^alpha (1-p)^beta for a float, numpy array or torch tensor; returns the same type.

    alpha = beta = 0 gives w = 1 everywhere (0^0 = 1): the unweighted baseline.
    """
    _check_exponents(alpha, beta)
    if isinstance(p, torch.Tensor):
        _check_probabilities(p.detach().to("cpu", torch.float64).numpy())
        return p.pow(alpha) * (1 - p).pow(beta)
    array = np.asarray(p, dtype=np.float64)
    _check_probabilities(array)
    weights = array**alpha * (1 - array) ** beta
    return float(weights) if np.ndim(p) == 0 and not isinstance(p, np.ndarray) else weights


def kernel_peak(alpha: float, beta: float) -> float | None:
    """Where w(p) is largest: alpha / (alpha + beta); None for the flat kernel alpha = beta = 0."""
    _check_exponents(alpha, beta)
    return None if alpha + beta == 0 else alpha / (alpha + beta)


# --- pass-rate estimators -------------------------------------------------------------------


class PassRateEstimator(str, Enum):
    """How a problem's weight is computed from k successes in K trials.

    mle: w(k/K), as in the paper. posterior: w of the Beta-prior posterior mean (k+a)/(K+a+b),
    so p = 0 or 1 problems keep a small weight. unbiased: an unbiased estimate of p^alpha (1-p)^beta
    itself (integer alpha, beta with alpha + beta <= K); for alpha = beta = 1 it is k(K-k)/(K(K-1)).
    """

    MLE = "mle"
    POSTERIOR = "posterior"
    UNBIASED = "unbiased"


def mle_pass_rate(successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
    return np.asarray(successes, np.float64) / np.asarray(trials, np.float64)


def posterior_pass_rate(successes: np.ndarray, trials: np.ndarray, prior: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    a, b = prior
    return (np.asarray(successes, np.float64) + a) / (np.asarray(trials, np.float64) + a + b)


def _log_binomial(n: np.ndarray, r: np.ndarray) -> np.ndarray:
    lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
    return lgamma(n + 1) - lgamma(r + 1) - lgamma(n - r + 1)


def unbiased_kernel(successes: np.ndarray, trials: np.ndarray, alpha: int = 1, beta: int = 1) -> np.ndarray:
    """Unbiased estimate of p^alpha (1-p)^beta from k ~ Binomial(K, p): C(K-a-b, k-a) / C(K, k).

    For alpha = beta = 1 this is k(K-k) / (K(K-1)) = p_hat (1 - p_hat) K / (K - 1).
    """
    if alpha != int(alpha) or beta != int(beta):
        raise ValueError(f"the unbiased estimator needs integer alpha and beta, got alpha={alpha}, beta={beta}")
    k = np.asarray(successes, np.float64)
    n = np.asarray(trials, np.float64)
    if np.any(n < alpha + beta):
        raise ValueError(f"the unbiased estimator needs trials >= alpha + beta = {alpha + beta}; got trials={n.min()}")
    reduced_k = k - alpha
    reduced_n = n - alpha - beta
    inside = (reduced_k >= 0) & (reduced_k <= reduced_n)
    out = np.zeros(np.broadcast(k, n).shape)
    if inside.any():
        rk, rn = np.broadcast_to(reduced_k, out.shape)[inside], np.broadcast_to(reduced_n, out.shape)[inside]
        kk, nn = np.broadcast_to(k, out.shape)[inside], np.broadcast_to(n, out.shape)[inside]
        out[inside] = np.exp(_log_binomial(rn, rk) - _log_binomial(nn, kk))
    return out


# --- weight modes ---------------------------------------------------------------------------


class WeightMode(str, Enum):
    """How weights enter training.

    loss: the paper. Draw uniformly among problems with w > 0 and scale each problem's loss by w.
    sample: draw problems with probability proportional to w, unweighted loss (same expected gradient).
    filter: the hard-filter baseline: keep problems with band[0] < p < band[1], unweighted.
    uniform: the unweighted baseline: every problem, weight 1.
    """

    LOSS = "loss"
    SAMPLE = "sample"
    FILTER = "filter"
    UNIFORM = "uniform"


@dataclass(frozen=True)
class WeightConfig:
    mode: WeightMode = WeightMode.LOSS
    alpha: float = 1.0
    beta: float = 1.0
    estimator: PassRateEstimator = PassRateEstimator.MLE
    prior: tuple[float, float] = (1.0, 1.0)
    band: tuple[float, float] = (0.2, 0.8)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum(WeightMode, self.mode, "mode"))
        object.__setattr__(self, "estimator", _enum(PassRateEstimator, self.estimator, "estimator"))
        _check_exponents(self.alpha, self.beta)
        low, high = self.band
        if not 0 <= low < high <= 1:
            raise ValueError(f"band must satisfy 0 <= low < high <= 1, got {self.band!r}")
        if self.estimator is PassRateEstimator.UNBIASED and not (float(self.alpha).is_integer()
                                                                and float(self.beta).is_integer()):
            raise ValueError(f"estimator 'unbiased' needs integer alpha and beta, got {self.alpha}, {self.beta}")
        if min(self.prior) <= 0:
            raise ValueError(f"prior pseudo-counts must be > 0, got {self.prior!r}")

    @property
    def unweighted(self) -> bool:
        """Whether every weight is 0 or 1 (filter and uniform modes)."""
        return self.mode in (WeightMode.FILTER, WeightMode.UNIFORM)

    def pass_rates(self, successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
        """The point estimate p_hat used for reporting and for the filter band."""
        if self.estimator is PassRateEstimator.POSTERIOR:
            return posterior_pass_rate(successes, trials, self.prior)
        return mle_pass_rate(successes, trials)

    def weights(self, successes: np.ndarray, trials: np.ndarray) -> np.ndarray:
        """One weight per problem, from its successes and trials."""
        successes = np.asarray(successes, np.float64)
        trials = np.asarray(trials, np.float64)
        if np.any(trials <= 0) or np.any(successes < 0) or np.any(successes > trials):
            raise ValueError("need 0 <= successes <= trials and trials > 0 for every problem")
        if self.mode is WeightMode.UNIFORM:
            return np.ones_like(trials)
        p_hat = self.pass_rates(successes, trials)
        if self.mode is WeightMode.FILTER:
            low, high = self.band
            return ((p_hat > low) & (p_hat < high)).astype(np.float64)
        if self.estimator is PassRateEstimator.UNBIASED:
            return unbiased_kernel(successes, trials, self.alpha, self.beta)
        return beta_kernel(p_hat, self.alpha, self.beta)

    def draw_and_loss(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split per-problem weights into (unnormalised draw probability, loss weight)."""
        weights = np.asarray(weights, np.float64)
        kept = (weights > 0).astype(np.float64)
        if self.mode is WeightMode.LOSS:
            return kept, weights
        if self.mode is WeightMode.SAMPLE:
            return weights, kept
        return kept, kept  # filter and uniform: unweighted, whatever weights they were handed


def _enum(kind: type[Enum], value: object, name: str) -> Enum:
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ValueError(f"{name} must be one of {choices}; got {value!r}") from None


# --- normalisation --------------------------------------------------------------------------


class Normalisation(str, Enum):
    """global_batch: sum(w*l) / sum(w) over the whole global batch (the default).
    dataset_mean: sum(w*l) / (n * mean_w over the dataset), so the effective learning rate
    matches unweighted training and a batch of low weights takes a small step."""

    GLOBAL_BATCH = "global_batch"
    DATASET_MEAN = "dataset_mean"


def normalise(weighted_sum, weight_sum, count: int, mode: Normalisation = Normalisation.GLOBAL_BATCH,
              dataset_mean_weight: float | None = None):
    """Turn the reduced (sum w*l, sum w) of a global batch into the loss; 0 for an all-zero batch."""
    mode = _enum(Normalisation, mode, "normalisation")
    if mode is Normalisation.GLOBAL_BATCH:
        if isinstance(weight_sum, torch.Tensor):
            safe = torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
            return torch.where(weight_sum > 0, weighted_sum / safe, torch.zeros_like(weighted_sum))
        return weighted_sum / weight_sum if weight_sum > 0 else 0.0 * weighted_sum
    if not dataset_mean_weight or dataset_mean_weight <= 0:
        raise ValueError(f"dataset_mean normalisation needs dataset_mean_weight > 0, got {dataset_mean_weight!r}")
    if count <= 0:
        return 0.0 * weighted_sum
    return weighted_sum / (count * dataset_mean_weight)


# --- statistics -----------------------------------------------------------------------------


def effective_sample_size(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2: how many equally weighted problems the weights are worth (0 if all zero)."""
    w = np.asarray(weights, np.float64)
    scale = float(np.max(np.abs(w))) if w.size else 0.0
    if scale == 0:
        return 0.0
    w = w / scale  # ESS is scale-free; rescaling keeps tiny weights from underflowing when squared
    return float(np.sum(w)) ** 2 / float(np.sum(w * w))


def extreme_fraction(successes: np.ndarray, trials: np.ndarray) -> tuple[float, float]:
    """Fractions of problems at p_hat = 0 and at p_hat = 1 (where the paper's weight is zero)."""
    k = np.asarray(successes, np.float64)
    n = np.asarray(trials, np.float64)
    if k.size == 0:
        return 0.0, 0.0
    return float(np.mean(k == 0)), float(np.mean(k == n))


def pass_rate_histogram(pass_rates: np.ndarray, k: int) -> np.ndarray:
    """Counts over the K+1 values j/K a K-rollout estimate can take (other values round to the nearest)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    p = np.asarray(pass_rates, np.float64)
    _check_probabilities(p)
    return np.bincount(np.rint(p * k).astype(np.int64), minlength=k + 1)
