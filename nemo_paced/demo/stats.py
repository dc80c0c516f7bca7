"""The demo's statistics: paired differences over seeds and the evaluation's own standard error.

Methods are compared seed by seed: seed s of PACED and seed s of a baseline start from the same
student and are evaluated on the same test problems, so the difference per seed removes what they
share (test set, starting point) and the interval over seeds is about the methods alone. With 5
seeds a paired t interval has 4 degrees of freedom and a Wilcoxon signed-rank test cannot reach
p < 0.05 two-sided (its smallest p is 2/32 = 0.0625): both are reported, with a percentile
bootstrap over seeds, so a reader sees how little 5 seeds can settle.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000


def paired_difference(ours: Mapping[str, float], theirs: Mapping[str, float], seed: int = 0) -> dict[str, Any]:
    """mean(ours - theirs) over the seeds both have, with a 95 % paired t interval, a 95 % percentile
    bootstrap interval (resampling seeds), the two-sided Wilcoxon signed-rank p and the seeds won."""
    from scipy import stats

    seeds = sorted(ours.keys() & theirs.keys(), key=str)
    if not seeds:
        raise ValueError("no seed in common: a paired difference needs the same seeds on both sides")
    diffs = np.array([ours[s] - theirs[s] for s in seeds], dtype=np.float64)
    n = diffs.size
    mean = float(diffs.mean())
    sd = float(diffs.std(ddof=1)) if n > 1 else 0.0
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        t_interval = [mean - half, mean + half]
        rng = np.random.default_rng(seed)
        means = diffs[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
        bootstrap = [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]
    else:
        t_interval = bootstrap = [float("nan"), float("nan")]
    wilcoxon = float(stats.wilcoxon(diffs).pvalue) if n > 1 and np.any(diffs != 0) else 1.0
    return {"seeds": [str(s) for s in seeds], "diffs": diffs.tolist(), "mean": mean, "sd": sd,
            "t_ci95": t_interval, "bootstrap_ci95": bootstrap, "wilcoxon_p": wilcoxon,
            "better": int((diffs > 0).sum()), "worse": int((diffs < 0).sum()), "n": n}


def verdict_word(diff: Mapping[str, Any]) -> str:
    """'ahead' / 'behind' only when the paired t interval excludes 0, else 'no clear difference'."""
    low, high = diff["t_ci95"]
    if low > 0:
        return "ahead"
    if high < 0:
        return "behind"
    return "no clear difference"


def accuracy_with_se(per_problem: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
    """Accuracy (%) per benchmark, the mean over levels, and the sampling standard error of each
    given the test problems: per problem, Var(successes/n) is estimated unbiasedly by
    p(1-p)/(n-1); a benchmark's variance is the sum over its problems / problems^2; the mean over
    levels averages the level variances / levels^2. `per_problem` is (benchmark, successes, n)."""
    by_benchmark: dict[str, list[tuple[int, int]]] = {}
    for benchmark, successes, n in per_problem:
        by_benchmark.setdefault(benchmark, []).append((successes, n))
    accuracy: dict[str, float] = {}
    variance: dict[str, float] = {}
    for name, rows in sorted(by_benchmark.items()):
        rates = np.array([s / n for s, n in rows])
        n = np.array([n for _, n in rows], dtype=np.float64)
        per = np.where(n > 1, rates * (1 - rates) / np.maximum(n - 1, 1), 0.0)
        accuracy[name] = 100.0 * float(rates.mean())
        variance[name] = 1e4 * float(per.sum()) / len(rows) ** 2
    levels = [name for name in accuracy if name.startswith("L")]
    if levels:
        accuracy["mean"] = float(np.mean([accuracy[name] for name in levels]))
        variance["mean"] = float(sum(variance[name] for name in levels)) / len(levels) ** 2
    return {"accuracy": accuracy, "se": {name: math.sqrt(v) for name, v in variance.items()}}
