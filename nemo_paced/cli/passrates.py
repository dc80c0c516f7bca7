"""`nemo-paced passrates show FILE`: summarise a pass-rate table and the weights it implies."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("passrates", help="inspect pass-rate tables",
                                   description="Inspect pass-rate tables written by the rollout service.")
    commands = parser.add_subparsers(dest="passrates_command", metavar="ACTION", required=True)
    show = commands.add_parser(
        "show", help="summary, histogram, effective sample size and weight quantiles",
        description="Summarise a pass-rate table (JSON Lines, see nemo_paced.passrates): number of problems, "
                    "checkpoints the estimates came from, the histogram over the K+1 pass rates, the "
                    "fractions at p=0 and p=1, and the weights under --alpha/--beta/--mode: their mean, "
                    "quantiles, the number kept (w>0) and the effective sample size (sum w)^2/sum w^2.")
    show.add_argument("file", help="pass-rate table (.jsonl)")
    show.add_argument("--alpha", type=float, default=1.0, help="kernel exponent of p (default 1)")
    show.add_argument("--beta", type=float, default=1.0, help="kernel exponent of 1-p (default 1)")
    show.add_argument("--mode", default="loss", choices=["loss", "sample", "filter", "uniform"],
                      help="weight mode (default loss)")
    show.add_argument("--estimator", default="mle", choices=["mle", "posterior", "unbiased"],
                      help="how k successes of K become a weight (default mle)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(handler=show_table)


def summarise(table, config) -> dict:
    import numpy as np

    from nemo_paced.weighting import effective_sample_size, extreme_fraction, pass_rate_histogram

    records = table.records()
    successes = np.array([r.successes for r in records])
    trials = np.array([r.trials for r in records])
    k = int(round(float(np.median(trials)))) if records else 8
    weights = config.weights(successes, trials) if records else np.zeros(0)
    at_zero, at_one = extreme_fraction(successes, trials)
    quantiles = np.quantile(weights, [0.0, 0.25, 0.5, 0.75, 1.0]).tolist() if records else []
    return {
        "problems": len(records), "version": table.version, "k": k,
        "checkpoints": sorted({r.checkpoint or "-" for r in records}),
        "mean_pass_rate": float(np.mean(successes / trials)) if records else None,
        "fraction_p0": at_zero, "fraction_p1": at_one,
        "histogram": pass_rate_histogram(successes / trials, k).tolist() if records else [],
        "weights": {"alpha": config.alpha, "beta": config.beta, "mode": config.mode.value,
                    "estimator": config.estimator.value, "mean": float(weights.mean()) if records else None,
                    "kept": int((weights > 0).sum()), "ess": effective_sample_size(weights),
                    "quantiles": dict(zip(["min", "q25", "median", "q75", "max"], quantiles))},
    }


def show_table(args: argparse.Namespace) -> int:
    import json

    from nemo_paced.passrates import PassRateFileError, PassRateTable
    from nemo_paced.weighting import WeightConfig

    try:
        table = PassRateTable.load(args.file)
        config = WeightConfig(mode=args.mode, alpha=args.alpha, beta=args.beta, estimator=args.estimator)
        summary = summarise(table, config)
    except (PassRateFileError, ValueError) as e:
        raise SystemExit(f"nemo-paced passrates show: {e}") from None
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    w = summary["weights"]
    print(f"{args.file}: {summary['problems']} problems, table version {summary['version']}, "
          f"K = {summary['k']}, checkpoints: {', '.join(summary['checkpoints']) or '-'}")
    if summary["problems"]:
        print(f"mean pass rate {summary['mean_pass_rate']:.3f}; at p=0: {summary['fraction_p0']:.1%}, "
              f"at p=1: {summary['fraction_p1']:.1%}")
        top = max(summary["histogram"]) or 1
        print("pass-rate histogram:")
        for j, count in enumerate(summary["histogram"]):
            print(f"  p={j}/{summary['k']:<3} {count:7d}  {'#' * int(round(40 * count / top))}")
    q = w["quantiles"]
    print(f"weights (mode {w['mode']}, alpha {w['alpha']:g}, beta {w['beta']:g}, {w['estimator']}): "
          f"kept {w['kept']}/{summary['problems']}, ESS {w['ess']:.1f}"
          + (f", mean {w['mean']:.4f}, min {q['min']:.4f}, q25 {q['q25']:.4f}, median {q['median']:.4f}, "
             f"q75 {q['q75']:.4f}, max {q['max']:.4f}" if summary["problems"] else ""))
    if summary["problems"] and summary["fraction_p0"] + summary["fraction_p1"] >= 1.0:
        import sys

        from nemo_paced.cli.estimate import degenerate_warning

        print(degenerate_warning(table.records()), file=sys.stderr)
    return 0
