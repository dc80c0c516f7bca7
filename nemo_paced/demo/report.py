"""The demo's report: accuracy per method and benchmark (mean ± std over seeds, and per seed), the
pass-rate spread over time, draws per kept problem, tokens trained, and a plain verdict."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import asdict
from typing import Any

import numpy as np

from nemo_paced.passrates import PassRateTable
from nemo_paced.train.local import jsonable
from nemo_paced.weighting import extreme_fraction, pass_rate_histogram

MEAN = "mean"  # the average over difficulty levels


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _with_mean(accuracy: dict[str, float]) -> dict[str, float]:
    levels = {name: v for name, v in accuracy.items() if name.startswith("L")}
    rest = {name: v for name, v in accuracy.items() if name not in levels}
    return {**levels, MEAN: statistics.fmean(levels.values()), **rest}


def build_report(config, table: PassRateTable, snr: list[dict[str, Any]], runs: dict[str, dict[int, dict]],
                 timings: dict[str, float], references) -> dict[str, Any]:
    ids = [r.problem_id for r in table.records()]
    successes, trials, _ = table.counts(ids)
    at_zero, at_one = extreme_fraction(successes, trials)
    first = next(iter(next(iter(runs.values())).values()))
    start_accuracy = _with_mean(first["history"]["evals"][0]["accuracy"])
    methods = {}
    for method, by_seed in runs.items():
        finals = {seed: _with_mean(r["history"]["evals"][-1]["accuracy"]) for seed, r in by_seed.items()}
        benchmarks = list(next(iter(finals.values())))
        curve_steps = [e["step"] for e in next(iter(by_seed.values()))["history"]["evals"]]
        curves = [[_with_mean(e["accuracy"])[MEAN] for e in r["history"]["evals"]] for r in by_seed.values()]
        methods[method] = {
            "final": {b: _stats([finals[s][b] for s in finals]) for b in benchmarks},
            "per_seed": {str(s): finals[s] for s in finals},
            "forgetting": _stats([start_accuracy["retained"] - finals[s]["retained"] for s in finals])
            if "retained" in start_accuracy else None,
            "curve": {"steps": curve_steps, "mean": np.mean(curves, axis=0).tolist(),
                      "std": np.std(curves, axis=0).tolist()},
            "passrates": {str(s): r["history"]["passrates"] for s, r in by_seed.items()},
            "draws": {str(s): r["draws"] for s, r in by_seed.items()},
            "tokens": {str(s): r["tokens"] for s, r in by_seed.items()},
            "sequences": {str(s): r["sequences"] for s, r in by_seed.items()},
        }
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
                   f"Python {platform.python_version()}",
        "config": jsonable(asdict(config)),
        "budget": {"steps": first["config"]["schedule"]["total_steps"],
                   "tokens_per_step": first["config"]["tokens_per_step"]},
        "timings_s": timings,
        "references": {"problems": references.problems, "with_reference": references.with_reference},
        "start": {"accuracy": start_accuracy, "at_zero": at_zero, "at_one": at_one,
                  "histogram": pass_rate_histogram(successes / trials, config.k).tolist()},
        "methods": methods,
        "snr": snr,
        "verdict": verdict(methods),
    }


def verdict(methods: dict[str, Any]) -> str:
    """Whether PACED beat the unweighted and hard-filter baselines on the mean over levels, by how
    much, and on how many seeds."""
    if "paced" not in methods:
        return "PACED was not run."
    paced = methods["paced"]
    lines = []
    for baseline in ("uniform", "filter", "paced_fkl"):
        if baseline not in methods:
            continue
        other = methods[baseline]
        diff = paced["final"][MEAN]["mean"] - other["final"][MEAN]["mean"]
        seeds = paced["per_seed"].keys() & other["per_seed"].keys()
        wins = sum(paced["per_seed"][s][MEAN] > other["per_seed"][s][MEAN] for s in seeds)
        word = "beat" if diff > 0 else "did not beat"
        lines.append(f"PACED (two-stage) {word} {baseline} by {diff:+.1f} points of mean accuracy over levels "
                     f"({wins} of {len(seeds)} seeds better).")
    return " ".join(lines)


def format_table(report: dict[str, Any]) -> str:
    """The accuracy table in the paper's shape (method x benchmark, mean ± std over seeds), then the
    pass-rate spread and draws per kept problem."""
    methods = report["methods"]
    benchmarks = list(report["start"]["accuracy"])
    head = f"{'method':<12}" + "".join(f"{b:>13}" for b in benchmarks) + f"{'forgetting':>13}"
    lines = [head, "-" * len(head)]
    lines.append(f"{'start':<12}" + "".join(f"{report['start']['accuracy'][b]:>13.1f}" for b in benchmarks))
    for name, m in methods.items():
        cells = "".join(f"{m['final'][b]['mean']:>7.1f} ± {m['final'][b]['std']:<3.1f}" for b in benchmarks)
        forgetting = m["forgetting"]
        lines.append(f"{name:<12}" + cells + (f"{forgetting['mean']:>7.1f} ± {forgetting['std']:<3.1f}"
                                             if forgetting else ""))
    seeds = next(iter(methods.values()))["final"][MEAN]["n"]
    lines.append(f"mean accuracy (%) over {report['config']['eval_samples']} samples per problem; ± is the std "
                 f"over {seeds} seed(s); forgetting = retained-skills accuracy lost since the start")
    lines.append("")
    lines.append(f"start: {100 * report['start']['at_zero']:.0f}% of the pool at p=0, "
                 f"{100 * report['start']['at_one']:.0f}% at p=1; histogram of K*p: {report['start']['histogram']}")
    budget = report["budget"]
    lines.append(f"budget of every run: {budget['steps']} steps x {budget['tokens_per_step'] or 'all'} response "
                 f"tokens per step")
    lines.append(f"{'method':<12}{'p in {0,1} over time (%)':<40}{'kept':>8}{'draws/kept':>12}{'tokens':>10}"
                 f"{'sequences':>11}")
    for name, m in methods.items():
        seed = next(iter(m["passrates"]))
        extremes = " ".join(f"{100 * (e['at_zero'] + e['at_one']):.0f}" for e in m["passrates"][seed])
        draws = m["draws"][seed]
        lines.append(f"{name:<12}{extremes:<40}{draws['distinct']:>8}{draws['per_drawn_problem']:>12.1f}"
                     f"{m['tokens'][seed]:>10}{m['sequences'][seed]:>11}")
    lines.append("(first seed; 'kept' = distinct problems drawn, 'tokens' = response tokens with weight > 0)")
    lines.append("")
    lines.append(report["verdict"])
    return "\n".join(lines)

