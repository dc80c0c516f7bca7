"""The demo's report: accuracy per method and benchmark (mean ± std over seeds, per seed, and each
evaluation's standard error), paired differences over seeds with intervals, compute accounting,
the pass-rate spread over time, draws per kept problem, the SNR diagnostic and a plain verdict."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from dataclasses import asdict
from typing import Any

import numpy as np

from nemo_paced.demo.compute import FORMULA
from nemo_paced.demo.stats import paired_difference, verdict_word
from nemo_paced.train.local import jsonable
from nemo_paced.weighting import extreme_fraction, pass_rate_histogram

MEAN = "mean"  # the average over difficulty levels


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _ordered(accuracy: dict[str, float]) -> dict[str, float]:
    """Levels in order, then the mean over levels, then the other benchmarks."""
    levels = sorted((name for name in accuracy if name.startswith("L")), key=lambda n: int(n[1:]))
    if levels and MEAN not in accuracy:
        accuracy = {**accuracy, MEAN: statistics.fmean(accuracy[n] for n in levels)}
    rest = [name for name in accuracy if name not in levels and name != MEAN]
    return {name: accuracy[name] for name in levels + ([MEAN] if levels else []) + rest}


def start_summary(table, evaluation: dict[str, Any], k: int) -> dict[str, Any]:
    ids = [r.problem_id for r in table.records()]
    successes, trials, _ = table.counts(ids)
    at_zero, at_one = extreme_fraction(successes, trials)
    return {"accuracy": _ordered(evaluation["accuracy"]), "se": evaluation["se"], "at_zero": at_zero,
            "at_one": at_one, "histogram": pass_rate_histogram(successes / trials, k).tolist()}


def method_summary(by_seed: dict[int, dict[str, Any]], start_accuracy: dict[str, float]) -> dict[str, Any]:
    """One method over its seeds (`by_seed` holds `run_method` results)."""
    finals = {seed: _ordered(r["final"]["accuracy"]) for seed, r in by_seed.items()}
    benchmarks = list(next(iter(finals.values())))
    first = next(iter(by_seed.values()))
    curves = np.array([[_ordered(a)[MEAN] for a in r["curve"]["accuracy"]] for r in by_seed.values()])
    compute_keys = [k for k, v in first["compute"].items() if isinstance(v, (int, float))]
    return {
        "final": {b: _stats([finals[s][b] for s in finals]) for b in benchmarks},
        "per_seed": {str(s): finals[s] for s in finals},
        "eval_se": {str(s): r["final"]["se"] for s, r in by_seed.items()},
        "forgetting": _stats([start_accuracy["retained"] - finals[s]["retained"] for s in finals])
        if "retained" in start_accuracy else None,
        "curve": {"steps": first["curve"]["steps"], "mean": curves.mean(axis=0).tolist(),
                  "std": curves.std(axis=0).tolist(),
                  **{key: np.mean([r["curve"][key] for r in by_seed.values()], axis=0).tolist()
                     for key in ("training_tokens", "total_flops")}},
        "compute": {"mean": {k: statistics.fmean(r["compute"][k] for r in by_seed.values()) for k in compute_keys},
                    "flops": {k: statistics.fmean(r["compute"]["flops"][k] for r in by_seed.values())
                              for k in first["compute"]["flops"]},
                    "per_seed": {str(s): r["compute"] for s, r in by_seed.items()}},
        "passrates": {str(s): r["result"]["history"]["passrates"] for s, r in by_seed.items()},
        "draws": {str(s): r["result"]["draws"] for s, r in by_seed.items()},
        "tokens": {str(s): r["result"]["tokens"] for s, r in by_seed.items()},
        "sequences": {str(s): r["result"]["sequences"] for s, r in by_seed.items()},
        "seconds": {str(s): r["seconds"] for s, r in by_seed.items()},
    }


def paired_rows(methods: dict[str, Any], comparisons, benchmarks=(MEAN, "retained")) -> list[dict[str, Any]]:
    """Paired differences a - b over seeds for every comparison whose methods both ran."""
    rows = []
    for a, b in comparisons:
        if a in methods and b in methods:
            for benchmark in benchmarks:
                if benchmark in methods[a]["final"]:
                    ours = {s: acc[benchmark] for s, acc in methods[a]["per_seed"].items()}
                    theirs = {s: acc[benchmark] for s, acc in methods[b]["per_seed"].items()}
                    rows.append({"a": a, "b": b, "benchmark": benchmark, **paired_difference(ours, theirs)})
    return rows


def build_report(config, setting, start: dict[str, Any], snr: dict[str, Any], runs: dict[str, dict[int, dict]],
                 timings: dict[str, float], probe: str = "") -> dict[str, Any]:
    from nemo_paced.demo.experiment import COMPARISONS

    start_block = start_summary(start["table"], start["evaluation"], config.k)
    methods = {m: method_summary(by_seed, start_block["accuracy"]) for m, by_seed in runs.items() if by_seed}
    se = [v[MEAN] for m in methods.values() for v in m["eval_se"].values()]
    paired = paired_rows(methods, COMPARISONS)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": jsonable(asdict(config)),
        "budget": {"steps": config.steps, "tokens_per_step": setting.tokens_per_step,
                   "pool": len(setting.pool),
                   "epochs": config.steps * config.batch_size / max(len(setting.pool), 1)},
        "timings_s": timings,
        "references": {"problems": start["references"].problems,
                       "with_reference": start["references"].with_reference},
        "evaluation": {"samples_per_problem": config.final_eval_samples, "seed": config.eval_seed,
                       "problems": {b: sum(p.meta["benchmark"] == b for p in setting.tests)
                                    for b in sorted({p.meta["benchmark"] for p in setting.tests})},
                       "max_se_mean": max(se) if se else None},
        "compute": {"formula": FORMULA, "n_student": setting.n_student, "n_teacher": setting.n_teacher,
                    "prompt_tokens": setting.prompt_tokens, "start_estimation": setting.start_estimation},
        "start": start_block,
        "methods": methods,
        "paired": paired,
        "snr": {"model": probe, **snr},
        "verdict": verdict(paired),
    }


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def verdict(paired: list[dict[str, Any]], benchmark: str = MEAN) -> str:
    """Per comparison on the mean over levels: the paired mean difference, its 95 % t interval, the
    seeds won, and 'ahead'/'behind' only when that interval excludes 0."""
    lines = []
    for row in paired:
        if row["benchmark"] != benchmark:
            continue
        low, high = row["t_ci95"]
        lines.append(f"{row['a']} vs {row['b']}: {row['mean']:+.2f} points [{low:+.2f}, {high:+.2f}] "
                     f"({row['better']} of {row['n']} seeds better): {verdict_word(row)}.")
    return "\n".join(lines) if lines else "No paired comparison was run."


def format_table(report: dict[str, Any]) -> str:
    """The accuracy table in the paper's shape (method x benchmark, mean ± std over seeds), then the
    paired differences, the compute, the pass-rate spread and the SNR."""
    methods = report["methods"]
    start = report["start"]
    benchmarks = list(start["accuracy"])
    head = f"{'method':<14}" + "".join(f"{b:>12}" for b in benchmarks) + f"{'forgetting':>12}"
    lines = [head, "-" * len(head)]
    lines.append(f"{'start':<14}" + "".join(f"{start['accuracy'][b]:>12.1f}" for b in benchmarks))
    for name, m in methods.items():
        cells = "".join(f"{m['final'][b]['mean']:>6.1f} ± {m['final'][b]['std']:<3.1f}" for b in benchmarks)
        forgetting = m["forgetting"]
        lines.append(f"{name:<14}" + cells + (f"{forgetting['mean']:>6.1f} ± {forgetting['std']:<3.1f}"
                                             if forgetting else ""))
    seeds = next(iter(methods.values()))["final"][MEAN]["n"]
    evaluation = report["evaluation"]
    lines.append(f"accuracy (%) over {evaluation['samples_per_problem']} samples per test problem; ± is the std over "
                 f"{seeds} seed(s); largest evaluation SE of a run's mean: {evaluation['max_se_mean']:.2f} points")
    lines.append("")
    lines.append(format_paired(report["paired"]))
    lines.append("")
    lines.append(f"compute per run (mean over seeds); {report['compute']['formula']}")
    lines += format_compute(methods, baseline="uniform")
    lines.append("")
    lines.append(f"start: {100 * start['at_zero']:.0f}% of the pool at p=0, {100 * start['at_one']:.0f}% at p=1; "
                 f"histogram of K*p: {start['histogram']}")
    budget = report["budget"]
    lines.append(f"budget of every run: {budget['steps']} steps x {budget['tokens_per_step']} response tokens per "
                 f"step (about {budget['epochs']:.1f} epochs of the {budget['pool']}-problem pool)")
    lines.append(f"{'method':<14}{'p in {0,1} over time (%)':<34}{'kept':>8}{'draws/kept':>12}{'sequences':>11}")
    for name, m in methods.items():
        seed = next(iter(m["passrates"]))
        extremes = " ".join(f"{100 * (e['at_zero'] + e['at_one']):.0f}" for e in m["passrates"][seed])
        draws = m["draws"][seed]
        lines.append(f"{name:<14}{extremes:<34}{draws['distinct']:>8}{draws['per_drawn_problem']:>12.1f}"
                     f"{m['sequences'][seed]:>11}")
    lines.append("(first seed; 'kept' = distinct problems drawn)")
    snr = report["snr"]
    lines.append("")
    lines.append(f"gradient SNR per pass-rate bin (bias-corrected, all parameters, 95% bootstrap interval), "
                 f"{snr['model']}; cos = cosine of the bin's mean gradient with the held-out gradient")
    labels = [label for label in ("start", "switch", "end") if label in snr]
    by_bin = {label: {r["pass_rate"]: r for r in snr[label]["bins"]} for label in labels}
    lines.append(f"{'p':>6}" + "".join(f"{label + ': SNR [95%], cos':>36}" for label in labels))
    for p in sorted({p for rows in by_bin.values() for p in rows}):
        cells = ""
        for label in labels:
            r = by_bin[label].get(p)
            cells += (f"{r['snr']:>8.3f} {_interval(r['snr_ci95'], 3):>18} {r.get('cosine_heldout', np.nan):>+7.2f}"
                      if r else f"{'-':>34}") + "  "
        lines.append(f"{p:>6.3f}" + cells)
    lines.append("")
    lines.append(report["verdict"])
    return "\n".join(lines)


def format_paired(paired: list[dict[str, Any]]) -> str:
    """The paired differences over seeds, one line per comparison and benchmark."""
    lines = [f"{'paired difference (a - b)':<34}{'bench':>9}{'mean':>8}{'95% t interval':>20}"
             f"{'95% bootstrap':>20}{'Wilcoxon p':>12}{'a better':>10}"]
    for row in paired:
        lines.append(f"{row['a'] + ' - ' + row['b']:<34}{row['benchmark']:>9}{row['mean']:>+8.2f}"
                     f"{_interval(row['t_ci95']):>20}{_interval(row['bootstrap_ci95']):>20}"
                     f"{row['wilcoxon_p']:>12.3f}{row['better']:>6} / {row['n']}")
    return "\n".join(lines)


def _interval(bounds, digits: int = 2) -> str:
    return f"[{bounds[0]:+.{digits}f}, {bounds[1]:+.{digits}f}]"


def format_compute(methods: dict[str, Any], baseline: str) -> list[str]:
    """Table lines of each method's mean compute per run (tokens by kind, GFLOP), and its ratio to `baseline`'s."""
    label = f"vs {baseline}"
    lines = [f"{'method':<14}{'train tok':>11}{'teacher tok':>12}{'estim tok':>11}{'on-pol tok':>11}"
             f"{'total GFLOP':>13}{label:>{len(label) + 1}}"]
    base = methods.get(baseline, {}).get("compute", {}).get("mean", {}).get("total_flops")
    for name, m in methods.items():
        c = m["compute"]["mean"]
        ratio = f"{c['total_flops'] / base:>{len(label)}.2f}x" if base else ""
        lines.append(f"{name:<14}{c['training_tokens']:>11.0f}{c['teacher_tokens']:>12.0f}"
                     f"{c['estimation_tokens']:>11.0f}{c['onpolicy_tokens']:>11.0f}"
                     f"{c['total_flops'] / 1e9:>13.2f}{ratio}")
    return lines
