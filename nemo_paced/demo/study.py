"""`nemo-paced demo --study`: the dose-response. The paper's mechanism says PACED gains by not spending
tokens on problems at p in {0, 1}, so its advantage should grow with the share of the pool there.
The study repeats the demo's comparison from three starting students pretrained to different depths
(about 15 %, 50 % and 80 % of the pool at p in {0, 1}), with a budget under one epoch of the pool,
so which problems get the tokens matters, and reports the paired differences per arm.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from nemo_paced.atomic import atomic_write_json
from nemo_paced.demo.experiment import DemoConfig, prepare, run_all, start_setting
from nemo_paced.tiny_models import PretrainConfig, cached_pretrained

STUDY_COMPARISONS = (("paced_fkl", "uniform"), ("paced_fkl", "filter"), ("paced_fkl", "drop_extremes"))

_LEVELS = {1: 0.35, 2: 0.3, 3: 0.2, 4: 0.1, 5: 0.04, 6: 0.01}


@dataclass(frozen=True)
class StudyConfig:
    # 24 steps of 64 sequences: 0.76 epochs of the pool. Pass rates are estimated once, at the start
    # (in under one epoch a refresh changes little and costs a full estimate), and the final evaluation
    # takes 32 samples per test problem.
    demo: DemoConfig = field(default_factory=lambda: DemoConfig(
        steps=24, refresh_every=0, eval_every=0, final_eval_samples=32, final_estimate=False,
        methods=("paced_fkl", "drop_extremes", "filter", "uniform")))
    # label -> the student's pretraining; the depth sets how polarised its pool starts
    arms: tuple[tuple[str, PretrainConfig], ...] = (
        ("shallow", PretrainConfig(steps=500, level_weights=_LEVELS, seed=2)),
        ("medium", PretrainConfig(steps=600, level_weights=_LEVELS, seed=2)),
        ("deep", PretrainConfig(steps=1000, level_weights=_LEVELS, seed=2)),
    )


def run_study(study: StudyConfig, out: Path, cache: Path, say: Callable[[str], None] = print,
              progress: bool = False, workers: int = 1) -> dict[str, Any]:
    """Every arm's setting, runs and paired differences; written to out/report.json."""
    from nemo_paced.demo.report import machine, method_summary, paired_rows, start_summary

    config = study.demo
    started = time.perf_counter()
    prepared = prepare(config, out, cache, say)
    arms = []
    for label, pretrain in study.arms:
        arm_out = out / label
        for stale in ("runs", "service", "snapshots"):
            shutil.rmtree(arm_out / stale, ignore_errors=True)
        arm_out.mkdir(parents=True, exist_ok=True)
        cached = cached_pretrained(cache, "student", config.task, config.student, pretrain)
        shutil.copytree(cached, arm_out / "student", dirs_exist_ok=True)
        setting, start = start_setting(config, arm_out, prepared, say, student=str(arm_out / "student"),
                                       label=label)
        start_block = start_summary(start["table"], start["evaluation"], config.k)
        say(f"{label}: {100 * (start_block['at_zero'] + start_block['at_one']):.0f}% of the pool at p in {{0,1}}, "
            f"start mean accuracy {start_block['accuracy']['mean']:.1f}")
        runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in config.methods}
        jobs = [(method, seed, None) for seed in config.seeds for method in config.methods]
        for method, seed, run in run_all(setting, jobs, arm_out, workers, progress):
            runs[method][seed] = run
            say(f"  {label} {method} seed {seed}: {run['seconds']:.0f} s, mean "
                f"{run['final']['accuracy']['mean']:.1f}")
        runs = {m: dict(sorted(by_seed.items())) for m, by_seed in runs.items()}
        methods = {m: method_summary(by_seed, start_block["accuracy"]) for m, by_seed in runs.items()}
        arms.append({"label": label, "pretrain_steps": pretrain.steps, "level_weights": pretrain.level_weights,
                     "polarised": start_block["at_zero"] + start_block["at_one"], "start": start_block,
                     "budget_epochs": config.steps * config.batch_size / len(setting.pool),
                     "methods": {m: {k: v for k, v in s.items() if k in ("final", "per_seed", "eval_se", "compute")}
                                 for m, s in methods.items()},
                     "paired": paired_rows(methods, STUDY_COMPARISONS, benchmarks=("mean",))})
    import datetime

    from nemo_paced.train.local import jsonable

    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "config": jsonable({"steps": config.steps, "batch_size": config.batch_size,
                                                        "refresh_every": config.refresh_every,
                                                        "seeds": config.seeds, "methods": config.methods,
                                                        "final_eval_samples": config.final_eval_samples}),
              "arms": jsonable(arms), "seconds": time.perf_counter() - started}
    atomic_write_json(out / "report.json", report)
    return report


def format_study(report: dict[str, Any]) -> str:
    """Paired differences (mean over levels) per arm, ordered by how polarised the arm's pool starts."""
    lines = [f"dose-response: {report['config']['steps']} steps per run, "
             f"{len(report['config']['seeds'])} paired seeds, mean accuracy over levels"]
    lines.append(f"{'arm':<9}{'p in {0,1}':>11}{'start':>8}{'epochs':>8}  " +
                 "".join(f"{a + ' - ' + b:>30}" for a, b in STUDY_COMPARISONS))
    for arm in sorted(report["arms"], key=lambda a: a["polarised"]):
        rows = {(r["a"], r["b"]): r for r in arm["paired"]}
        cells = ""
        for pair in STUDY_COMPARISONS:
            r = rows.get(pair)
            cells += (f"{r['mean']:>+8.2f} [{r['t_ci95'][0]:+.2f}, {r['t_ci95'][1]:+.2f}] {r['better']}/{r['n']}"
                      .rjust(30) if r else f"{'-':>30}")
        lines.append(f"{arm['label']:<9}{100 * arm['polarised']:>10.0f}%{arm['start']['accuracy']['mean']:>8.1f}"
                     f"{arm['budget_epochs']:>8.2f}  {cells}")
    lines.append("(paired mean difference in points, 95% t interval over seeds, seeds where the first method won)")
    return "\n".join(lines)


def write_study_plot(report: dict[str, Any], out: Path) -> Path:
    """PACED's paired advantage against the share of the starting pool at p in {0, 1}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4))
    arms = sorted(report["arms"], key=lambda a: a["polarised"])
    for i, pair in enumerate(STUDY_COMPARISONS):
        xs, ys, lows, highs = [], [], [], []
        for arm in arms:
            row = next((r for r in arm["paired"] if (r["a"], r["b"]) == pair), None)
            if row:
                xs.append(100 * arm["polarised"] + (i - (len(STUDY_COMPARISONS) - 1) / 2) * 0.8)
                ys.append(row["mean"])
                lows.append(row["mean"] - row["t_ci95"][0])
                highs.append(row["t_ci95"][1] - row["mean"])
        ax.errorbar(xs, ys, yerr=[lows, highs], marker="o", capsize=3, label=f"{pair[0]} - {pair[1]}")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("starting pool at p in {0, 1} (%)")
    ax.set_ylabel("paired difference, mean accuracy (points)")
    ax.set_title("Dose-response (95% paired t intervals over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dose_response.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaled(study: StudyConfig, **changes: Any) -> StudyConfig:
    """The study with DemoConfig fields changed (e.g. seeds for a shorter run)."""
    return replace(study, demo=replace(study.demo, **changes))
