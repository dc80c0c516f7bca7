"""PNG plots of a demo report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nemo_paced.weighting import beta_kernel


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Write the five figures into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    k = report["config"]["k"]
    grid = np.arange(k + 1) / k
    paths = []

    start = np.asarray(report["start"]["histogram"], float)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    width = 0.8 / (1 + len(report["methods"]))
    series = [("start", start)] + [(name, np.asarray(m["passrates"][next(iter(m["passrates"]))][-1]["histogram"], float))
                                   for name, m in report["methods"].items()]
    for i, (name, counts) in enumerate(series):
        ax.bar(grid + (i - (len(series) - 1) / 2) * width / k, counts / max(counts.sum(), 1), width / k, label=name)
    ax.set_xlabel("pass rate p (K = %d samples)" % k)
    ax.set_ylabel("fraction of pool")
    ax.set_title("Pass rates before and after training (first seed)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "passrate_histogram.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.bar(grid, start / start.sum(), 0.8 / k, color="0.75", label="start pool")
    ax.set_xlabel("pass rate p")
    ax.set_ylabel("fraction of pool")
    twin = ax.twinx()
    p = np.linspace(0, 1, 201)
    twin.plot(p, beta_kernel(p), color="C3", label="w(p) = p(1-p)")
    twin.plot(p, ((p > 0.2) & (p < 0.8)).astype(float) * 0.25, color="C0", ls="--", label="filter 0.2<p<0.8 (x0.25)")
    twin.plot(p, ((p > 0) & (p < 1)).astype(float) * 0.2, color="C2", ls=":", label="drop extremes 0<p<1 (x0.2)")
    twin.set_ylabel("weight")
    ax.set_title("PACED weight over the starting pass-rate histogram")
    lines = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="upper right")
    paths.append(_save(fig, out / "kernel_over_histogram.png"))

    for key, scale, xlabel, filename in (
            ("training_tokens", 1e3, "training tokens (thousands, prompt + response)", "accuracy_vs_tokens.png"),
            ("total_flops", 1e9, "total compute (GFLOP: training + teacher + student rollouts)",
             "accuracy_vs_compute.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for name, m in report["methods"].items():
            x = np.asarray(m["curve"][key]) / scale
            mean, std = np.asarray(m["curve"]["mean"]), np.asarray(m["curve"]["std"])
            ax.plot(x, mean, marker="o", label=name)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean accuracy over levels (%)")
        ax.set_title(f"Accuracy during training (mean ± std over seeds, {report['config']['eval_samples']} "
                     "samples/problem)", fontsize=9)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out / filename))

    snr = report["snr"]
    labels = [label for label in ("start", "switch", "end") if label in snr]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True)
    for i, label in enumerate(labels):
        rows = snr[label]["bins"]
        p = np.array([r["pass_rate"] for r in rows]) + (i - (len(labels) - 1) / 2) * 0.012
        for axis, key, interval in ((top, "snr", "snr_ci95"), (bottom, "cosine_heldout", "cosine_ci95")):
            if not rows or key not in rows[0]:
                continue
            value = np.array([r[key] for r in rows])
            bounds = np.array([r[interval] for r in rows]).T
            line, = axis.plot(p, value, marker="o", label=label)
            axis.vlines(p, bounds[0], bounds[1], color=line.get_color(), alpha=0.6)  # may not straddle the point
    top.axhline(0, color="0.6", lw=0.8)
    bottom.axhline(0, color="0.6", lw=0.8)
    top.set_ylabel("gradient SNR (bias-corrected)")
    top.set_title(f"Per pass-rate bin, all {snr['start']['parameters']} parameters, 95% bootstrap "
                  f"({snr['model']})", fontsize=9)
    top.legend(fontsize=8)
    bottom.set_ylabel("cos(bin mean gradient, held-out)")
    bottom.set_xlabel("pass rate bin p")
    paths.append(_save(fig, out / "snr_by_pass_rate.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
