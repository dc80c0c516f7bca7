"""PNG plots of a demo report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from nemo_paced.weighting import beta_kernel


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Write the four figures into `out`; returns their paths."""
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
    twin.set_ylabel("weight")
    ax.set_title("PACED weight over the starting pass-rate histogram")
    lines = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
    ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize=8, loc="upper right")
    paths.append(_save(fig, out / "kernel_over_histogram.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, m in report["methods"].items():
        steps, mean, std = np.asarray(m["curve"]["steps"]), np.asarray(m["curve"]["mean"]), np.asarray(m["curve"]["std"])
        ax.plot(steps, mean, marker="o", label=name)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean accuracy over levels (%)")
    ax.set_title("Accuracy during training (mean ± std over seeds)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "accuracy_vs_steps.png"))

    fig, ax = plt.subplots(figsize=(6.4, 4))
    rows = report["snr"]
    ax.plot([r["pass_rate"] for r in rows], [r["snr"] for r in rows], marker="o")
    ax.set_xlabel("pass rate bin p")
    ax.set_ylabel("gradient SNR (output layer)")
    ax.set_title("Gradient SNR per pass-rate bin (starting student, forward KL)")
    paths.append(_save(fig, out / "snr_by_pass_rate.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
