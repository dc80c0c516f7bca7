"""Adaptive pass-rate estimation against fixed K on the demo's pool, with the demo's tiny student.

    .venv/bin/python bench/adaptive_bench.py [--samples 64] [--out runs/adaptive_bench]

Step 1 records, for every problem of the demo's pool (2,010 problems), --samples graded rollouts of
three students standing in for three refreshes: the demo's starting student (500 pretraining
steps) and the same pretraining run to 700 and 1,000 steps, which polarises the pool towards
p = 0 and 1 as distillation does in the demo. Outcomes are cached in OUT/outcomes-*.npz. Each
rollout's score is an independent Bernoulli draw given the problem, so replaying recorded outcomes
in order is the same as drawing fresh ones.

Step 2 replays them through each estimator on disjoint slices of every problem's samples:
  run A  samples [0, 16)      run B  samples [16, 32)      reference  samples [32, 64)
and prints, per refresh: rollouts spent, saved against fixed K=8, the test-retest correlation of
the weights w = p(1-p) between runs A and B, and their correlation with the 32-sample reference.
Each refresh starts from the previous refresh's table of the same run (A from A, B from B), as the
service does; problems left out keep that estimate, so "r ref" also shows what staleness costs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def record(out: Path, samples: int, cache: Path) -> dict[str, np.ndarray]:
    """scores[name] = (problems, samples) 0/1 outcomes of the named student on the demo's pool."""
    import torch

    from nemo_paced.demo.experiment import DemoConfig
    from nemo_paced.rollout.engines import SamplingParams
    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.rollout.estimate import rollout
    from nemo_paced.rollout.verifiers import resolve
    from nemo_paced.tasks import make_splits
    from nemo_paced.tiny_models import PretrainConfig, cached_pretrained

    config = DemoConfig()
    pool = make_splits(config.task, config.pool_per_level, config.test_per_level, config.retained_size).pool
    # The demo's starting student (500 pretraining steps) and the same pretraining run to 1,000 steps.
    start = PretrainConfig(steps=500, level_weights={1: 0.35, 2: 0.3, 3: 0.2, 4: 0.1, 5: 0.04, 6: 0.01}, seed=2)
    students = {"refresh0": start, "refresh1": replace(start, steps=700), "refresh2": replace(start, steps=1000)}
    torch.set_num_threads(1)
    scores = {}
    for name, training in students.items():
        path = out / f"outcomes-student{training.steps}-{samples}.npz"
        if path.exists():
            scores[name] = np.load(path)["scores"]
            continue
        started = time.perf_counter()
        model = cached_pretrained(cache, "student", config.task, config.student, training)
        engine = HFEngine(str(model), device="cpu", batch_size=2048)
        params = SamplingParams(n=samples, max_tokens=config.task.answer_length(config.task.max_level) + 1, seed=0)
        torch.manual_seed(0)
        rows = []
        for start in range(0, len(pool), 64):
            results = rollout(engine, pool[start:start + 64], resolve("exact"), params, template="raw")
            rows += [[s.score for s in r.samples] for r in results]
        scores[name] = np.array(rows, dtype=np.int8)
        out.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, scores=scores[name], ids=np.array([p.id for p in pool]))
        print(f"recorded {name}: {scores[name].size} rollouts in {time.perf_counter() - started:.0f} s", flush=True)
    return scores


class Replay:
    """Rollout outcomes served in recorded order from one slice [start, stop) of each problem's samples."""

    def __init__(self, scores: np.ndarray, ids: list[str], start: int, stop: int) -> None:
        self.scores, self.row = scores, {i: r for r, i in enumerate(ids)}
        self.next = {i: start for i in ids}
        self.stop = stop

    def __call__(self, ids, n):
        out = []
        for i in ids:
            first = self.next[i]
            if first + n > self.stop:
                raise RuntimeError(f"{i}: the slice has no rollouts left ({first} + {n} > {self.stop})")
            self.next[i] = first + n
            out.append((int(self.scores[self.row[i], first:first + n].sum()), n))
        return out


def fixed(draw, ids, k):
    return {i: (s, t) for i, (s, t) in zip(ids, draw(ids, k))}


def weights(counts: dict, ids: list[str], prior: tuple[float, float] | None = None) -> np.ndarray:
    """w per problem from its (successes, trials): the sampler's default, w(p_hat) with
    p_hat = successes / trials, or with `prior` the sampler's estimator "posterior",
    w((successes + a) / (trials + a + b))."""
    s, t = np.array([counts[i] for i in ids], float).T
    p = s / t if prior is None else (s + prior[0]) / (t + sum(prior))
    return p * (1 - p)


def correlation(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def simulate(scores: dict[str, np.ndarray], config, k: int = 8, seed: int = 0, batch: int = 128) -> list[dict]:
    """Per refresh: fixed K and the adaptive rules on runs A and B and against the reference.
    Adaptive runs go through `estimate` in batches of `batch` problems, as the service's jobs do."""
    from nemo_paced.passrates import PassRateTable
    from nemo_paced.rollout.adaptive import estimate, fit_prior, select, table_prior

    rows, tables = [], {"A": PassRateTable(), "B": PassRateTable()}
    for refresh, name in enumerate(scores):
        data = scores[name]
        ids = [f"q{r}" for r in range(len(data))]
        reference = data[:, 32:64].mean(1)
        truth = reference * (1 - reference)
        row = {"refresh": refresh, "student": name, "problems": len(ids), "fixed_k": k,
               "mean_pass_rate": float(reference.mean()),
               "extreme_share_reference": float(np.mean((reference == 0) | (reference == 1)))}
        runs = {}
        for run, start in (("A", 0), ("B", 16)):
            counts = fixed(Replay(data, ids, start, start + 16), ids, k)
            prior = fit_prior(*np.array([counts[i] for i in ids], float).T)
            runs[run] = (weights(counts, ids), weights(counts, ids, prior))
        row["fixed"] = {"rollouts": k * len(ids), "test_retest_r": correlation(runs["A"][0], runs["B"][0]),
                        "r_vs_reference": correlation(runs["A"][0], truth),
                        "posterior_test_retest_r": correlation(runs["A"][1], runs["B"][1])}
        runs, spent = {}, {}
        for run, start in (("A", 0), ("B", 16)):
            table = tables[run]
            chosen, kept = select(ids, table, config, np.random.default_rng([seed, refresh, start]))
            prior = table_prior(table, config)
            draw = Replay(data, ids, start, start + 16)
            outcomes = []
            for first in range(0, len(chosen), batch):
                outcomes += estimate(chosen[first:first + batch], draw, config, prior)
            spent[run] = sum(o.trials for o in outcomes)
            table.update(outcomes)
            counts = {r.problem_id: (r.successes, r.trials) for r in table.records()}
            runs[run] = (weights(counts, ids), weights(counts, ids, fit_prior(*table.counts(ids)[:2])))
            row.setdefault("left_out", {})[run] = len(kept)
        row["adaptive"] = {"rollouts": spent["A"], "rollouts_B": spent["B"],
                           "saved_vs_fixed": k * len(ids) - spent["A"], "fewer_x": k * len(ids) / spent["A"],
                           "test_retest_r": correlation(runs["A"][0], runs["B"][0]),
                           "r_vs_reference": correlation(runs["A"][0], truth),
                           "posterior_test_retest_r": correlation(runs["A"][1], runs["B"][1])}
        rows.append(row)
    return rows


def report(rows: list[dict]) -> str:
    lines = [f"{'refresh':<8} {'mean p':>6} {'p in {0,1}':>10} | {'K=8 rollouts':>12} {'r':>6} {'r ref':>6} "
             f"{'r post':>6} | {'adaptive':>8} {'fewer':>6} {'left out':>8} {'r':>6} {'r ref':>6} {'r post':>6}"]
    for row in rows:
        f, a = row["fixed"], row["adaptive"]
        lines.append(f"{row['refresh']:<8} {row['mean_pass_rate']:6.3f} {row['extreme_share_reference']:10.3f} | "
                     f"{f['rollouts']:12d} {f['test_retest_r']:6.3f} {f['r_vs_reference']:6.3f} "
                     f"{f['posterior_test_retest_r']:6.3f} | {a['rollouts']:8d} {a['fewer_x']:5.2f}x "
                     f"{row['left_out']['A']:8d} {a['test_retest_r']:6.3f} {a['r_vs_reference']:6.3f} "
                     f"{a['posterior_test_retest_r']:6.3f}")
    return "\n".join(lines)


def main() -> None:
    from nemo_paced.rollout.adaptive import AdaptiveConfig

    default = AdaptiveConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64, help="recorded rollouts per problem and student")
    parser.add_argument("--out", type=Path, default=Path("runs/adaptive_bench"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/nemo-paced"), help="tiny-model cache (the demo's)")
    for name in ("first", "step", "max_k", "tolerance", "recheck"):
        value = getattr(default, name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"AdaptiveConfig.{name} (default {value})")
    args = parser.parse_args()
    scores = record(args.out, args.samples, args.cache)
    config = AdaptiveConfig(first=args.first, step=args.step, max_k=args.max_k, tolerance=args.tolerance,
                            recheck=args.recheck)
    rows = simulate(scores, config)
    print(f"{config}\n"
          "r: test-retest correlation of w = p(1-p) between runs A and B; r ref: run A against the 32-sample "
          "reference; r post: test-retest with the sampler's 'posterior' estimator and a prior fitted to the pool")
    print(report(rows))
    (args.out / "report.json").write_text(json.dumps({"config": vars(args) | {"out": str(args.out),
                                                                               "cache": str(args.cache)},
                                                      "refreshes": rows}, indent=1))


if __name__ == "__main__":
    main()
