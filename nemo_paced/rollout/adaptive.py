"""Adaptive pass-rate estimation: fewer rollouts for the same quality of weights.

Two rules replace "K rollouts for every problem at every refresh":

1. Sequential K. Every problem first gets `first` rollouts; while the posterior standard deviation
   of its weight w(p) = p^α(1−p)^β is above `tolerance`, it gets `step` more, up to `max_k`. The
   posterior is Beta(a + successes, b + failures), with the prior Beta(a, b) fitted to the pool
   by moments (empirical Bayes: `fit_prior`, on the job's first rounds: `JobPrior`), so a problem
   that starts 4/4 in a pool where most problems are solved is believed mastered sooner.
2. Re-checks. A problem whose current estimate is confidently at p ≈ 0 or 1 (every rollout failed,
   or every one passed, and the posterior mean of w is below `confident` × the kernel's peak) keeps
   its estimate at a refresh, and is estimated again only with probability `recheck`, so none is
   starved: one left out waits 1/recheck refreshes on average.

The table keeps (successes, trials) per problem as always; trials now vary between problems, and a
problem left out keeps its record (checkpoint and step say how old it is). Why these rules and what
they save on the demo's pool: bench/adaptive_bench.py and the README's "Estimation at scale".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from nemo_paced.passrates import Outcome, PassRateTable


@dataclass(frozen=True)
class AdaptiveConfig:
    first: int = 4  # rollouts every estimated problem gets
    step: int = 4  # rollouts added per round to a problem whose weight is still uncertain
    max_k: int = 12  # most rollouts per problem per refresh
    tolerance: float = 0.04  # stop once the posterior standard deviation of w(p) is at most this
    recheck: float = 0.25  # probability that a confidently mastered/hopeless problem is re-estimated
    confident: float = 0.25  # "confident" extreme: posterior mean of w below this share of the kernel peak
    alpha: float = 1.0  # the kernel w(p) = p^alpha (1-p)^beta the tolerance is about
    beta: float = 1.0
    min_fit: int = 32  # problems needed to fit the prior; fewer: the flat prior Beta(1, 1)

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.max_k or self.step < 1:
            raise ValueError(f"need 1 <= first <= max_k and step >= 1, got first={self.first}, step={self.step}, "
                             f"max_k={self.max_k}")
        for name in ("tolerance", "recheck", "confident"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {self.alpha}, {self.beta}")


def _log_beta(a, b):
    return np.vectorize(lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y), otypes=[float])(a, b)


def posterior_weight(successes, trials, prior: tuple[float, float], alpha: float = 1.0,
                     beta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and standard deviation of w(p) = p^alpha (1-p)^beta given the counts, under the
    Beta prior: E[w^j] = B(A + j·alpha, B + j·beta) / B(A, B) with A = a + successes, B = b + failures."""
    s, n = np.asarray(successes, float), np.asarray(trials, float)
    a, b = prior[0] + s, prior[1] + n - s
    log_norm = _log_beta(a, b)
    mean = np.exp(_log_beta(a + alpha, b + beta) - log_norm)
    second = np.exp(_log_beta(a + 2 * alpha, b + 2 * beta) - log_norm)
    return mean, np.sqrt(np.maximum(second - mean**2, 0.0))


def fit_prior(successes, trials, min_problems: int = 32) -> tuple[float, float]:
    """Beta(a, b) matching the pool's spread of pass rates by moments, corrected for binomial noise;
    the flat Beta(1, 1) when there are fewer than `min_problems` or the counts carry no spread."""
    s, n = np.asarray(successes, float), np.asarray(trials, float)
    if len(s) < max(min_problems, 2):
        return (1.0, 1.0)
    rates = s / n
    mean = float(rates.mean())
    if not 0 < mean < 1:
        return (1.0, 1.0)
    # E[var(rate | p)] = E[p(1-p)/n]; what is left of the observed variance is the pool's spread.
    noise = float(np.mean(rates * (1 - rates) / np.maximum(n - 1, 1)))
    spread = float(rates.var()) - noise
    if spread <= 0:
        return (1.0, 1.0)
    total = min(max(mean * (1 - mean) / spread - 1, 0.1), 1000.0)  # a + b
    return (mean * total, (1 - mean) * total)


def confident_extremes(table: PassRateTable, ids: Sequence[str], config: AdaptiveConfig,
                       prior: tuple[float, float]) -> list[str]:
    """Ids whose current record is all-fail or all-pass with a posterior mean weight below
    `confident` × the kernel's peak: the ones a refresh may leave out."""
    records = [(i, table.get(i)) for i in ids]
    extreme = [(i, r) for i, r in records if r is not None and r.successes in (0.0, r.trials)]
    if not extreme:
        return []
    mean, _ = posterior_weight([r.successes for _, r in extreme], [r.trials for _, r in extreme], prior,
                               config.alpha, config.beta)
    return [i for (i, _), m in zip(extreme, mean) if m < config.confident * kernel_peak(config.alpha, config.beta)]


def kernel_peak(alpha: float, beta: float) -> float:
    if alpha + beta == 0:
        return 1.0
    p = alpha / (alpha + beta)
    return p**alpha * (1 - p) ** beta


def select(ids: Sequence[str], table: PassRateTable, config: AdaptiveConfig,
           rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """(ids to estimate at this refresh, ids left out with their current estimate), in `ids` order."""
    known = [i for i in ids if i in table]
    successes, trials, _ = table.counts(known)
    prior = fit_prior(successes, trials, config.min_fit)
    confident = set(confident_extremes(table, ids, config, prior))
    kept = {i for i in confident if rng.random() >= config.recheck}
    return [i for i in ids if i not in kept], [i for i in ids if i in kept]


# draw(ids, n) -> (successes, trials) per id from n fresh rollouts each
Draw = Callable[[Sequence[str], int], Sequence[tuple[int, int]]]


class JobPrior:
    """The prior of one estimation job. The pool's pass rates move between refreshes (they polarise
    as the student learns), so once `min_fit` problems have had their first round in this job, the
    prior is fitted to those first-round counts; before that, it is the last refresh's (`fallback`)."""

    def __init__(self, fallback: tuple[float, float], min_fit: int = 32) -> None:
        self.fallback, self.min_fit = fallback, min_fit
        self.successes: list[float] = []
        self.trials: list[float] = []

    def observe(self, counts: Sequence[tuple[int, int]]) -> None:
        for s, t in counts:
            self.successes.append(s)
            self.trials.append(t)

    def __call__(self) -> tuple[float, float]:
        if len(self.successes) < self.min_fit:
            return self.fallback
        return fit_prior(self.successes, self.trials, self.min_fit)


def estimate(ids: Sequence[str], draw: Draw, config: AdaptiveConfig,
             prior: tuple[float, float] | JobPrior = (1.0, 1.0)) -> list[Outcome]:
    """Sequential K for `ids`: `first` rollouts each, then `step` more for every problem whose
    posterior standard deviation of w is above the tolerance, until none is or `max_k` is reached.
    One Outcome per id with all its rollouts, in `ids` order. A `JobPrior` sees the first round."""
    counts = {i: [0, 0] for i in ids}
    pending, n = list(ids), config.first
    while pending:
        drawn = draw(pending, n)
        if isinstance(prior, JobPrior) and n == config.first and counts[pending[0]][1] == 0:
            prior.observe(drawn)
        for i, (s, t) in zip(pending, drawn):
            counts[i][0] += s
            counts[i][1] += t
        s, t = np.array([counts[i] for i in pending], float).T
        _, sd = posterior_weight(s, t, prior() if isinstance(prior, JobPrior) else prior, config.alpha, config.beta)
        pending = [i for i, trials, spread in zip(pending, t, sd)
                   if trials < config.max_k and spread > config.tolerance]
        if pending:
            n = min(config.step, config.max_k - counts[pending[0]][1])
    return [Outcome(i, *counts[i]) for i in ids]


def table_prior(table: PassRateTable, config: AdaptiveConfig) -> JobPrior:
    """The prior for a refresh: fitted to the table's current estimates (the last refresh) until the
    job's own first rounds take over."""
    successes, trials, _ = table.counts([r.problem_id for r in table.records()])
    return JobPrior(fit_prior(successes, trials, config.min_fit), config.min_fit)


def estimate_batch(ids: Sequence[str], rollout_fn, config: AdaptiveConfig, prior: tuple[float, float] | JobPrior,
                   attempts: int = 3) -> tuple[list[Outcome], str, int | None]:
    """`estimate` on an engine: rollout_fn(ids, n, round) -> (ProblemRollouts list, step) draws n
    graded rollouts per id (round numbers the calls, for seeds that differ between rounds).
    Returns (outcomes, checkpoint, step); redone when the weights change between rounds, so one
    outcome never mixes two checkpoints."""
    for _ in range(attempts):
        seen: list[tuple[str, int | None]] = []
        rounds = itertools.count()

        def draw(batch, n):
            results, step = rollout_fn(batch, n, next(rounds))
            seen.append((results[0].checkpoint, step))
            return [(r.successes, r.trials) for r in results]

        outcomes = estimate(ids, draw, config, prior)
        if len(set(seen)) == 1:
            return outcomes, *seen[0]
    raise RuntimeError(f"the weights changed during each of {attempts} attempts at one batch")
