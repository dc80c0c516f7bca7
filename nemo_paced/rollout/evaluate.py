"""Benchmark accuracy on the rollout engines: n samples per problem, graded, reported as the mean
accuracy over the n samples ± its standard deviation across them (the paper's metric, n = 8)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from nemo_paced.problems import Problem
from nemo_paced.rollout.engines.base import Engine, SamplingParams
from nemo_paced.rollout.estimate import batched, rollout
from nemo_paced.rollout.verifiers import Verifier


@dataclass(frozen=True)
class BenchmarkResult:
    """`accuracy_per_sample[j]` is the accuracy of the j-th sample of every problem; `mean` and `std`
    (over j, ddof 1) are in percent. `successes` maps each problem id to its correct samples out of n."""

    name: str
    problems: int
    n: int
    mean: float
    std: float
    accuracy_per_sample: list[float]
    successes: dict[str, int]


def evaluate(engine: Engine, benchmarks: dict[str, Sequence[Problem]], verifier: Verifier,
             params: SamplingParams, template: str = "plain", batch_problems: int = 16,
             progress: Callable[[str, int, int], None] | None = None) -> list[BenchmarkResult]:
    results = []
    for name, problems in benchmarks.items():
        scores: list[list[int]] = []
        successes: dict[str, int] = {}
        for batch in batched(problems, batch_problems):
            for rollouts in rollout(engine, batch, verifier, params, template):
                scores.append([s.score for s in rollouts.samples])
                successes[rollouts.problem_id] = rollouts.successes
            if progress is not None:
                progress(name, len(scores), len(problems))
        per_sample = [100.0 * sum(row[j] for row in scores) / len(scores) for j in range(params.n)]
        mean = sum(per_sample) / params.n
        std = math.sqrt(sum((a - mean) ** 2 for a in per_sample) / (params.n - 1)) if params.n > 1 else 0.0
        results.append(BenchmarkResult(name, len(scores), params.n, mean, std, per_sample, successes))
    return results


def format_table(results: Sequence[BenchmarkResult]) -> str:
    width = max([len("benchmark")] + [len(r.name) for r in results])
    lines = [f"{'benchmark':<{width}}  problems  n  accuracy % (mean ± std over samples)"]
    lines += [f"{r.name:<{width}}  {r.problems:8d}  {r.n}  {r.mean:6.2f} ± {r.std:.2f}" for r in results]
    return "\n".join(lines)
