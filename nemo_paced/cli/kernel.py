"""`nemo-paced kernel`: print the Beta kernel w(p) = p^alpha (1-p)^beta and where it peaks."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "kernel", help="print the Beta-kernel weight w(p) = p^alpha (1-p)^beta and its peak",
        description="Print the PACED weight w(p) = p^alpha (1-p)^beta on the K+1 pass rates a "
                    "K-rollout estimate can take, with a bar for each, and the kernel's peak "
                    "alpha/(alpha+beta). alpha = beta = 0 is the unweighted baseline.")
    parser.add_argument("--alpha", type=float, default=1.0, help="exponent of p (default 1)")
    parser.add_argument("--beta", type=float, default=1.0, help="exponent of 1-p (default 1)")
    parser.add_argument("--k", type=int, default=8, help="rollouts per problem: rows at p = j/K (default 8)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from nemo_paced.weighting import beta_kernel, kernel_peak

    if args.k < 1:
        raise SystemExit(f"nemo-paced kernel: --k must be >= 1, got {args.k}")
    try:
        peak = kernel_peak(args.alpha, args.beta)
    except ValueError as e:
        raise SystemExit(f"nemo-paced kernel: {e}") from None
    p = np.arange(args.k + 1) / args.k
    w = beta_kernel(p, args.alpha, args.beta)
    w_max = 1.0 if peak is None else float(beta_kernel(peak, args.alpha, args.beta))
    print(f"w(p) = p^{args.alpha:g} (1-p)^{args.beta:g}")
    print("   p        w(p)")
    for pi, wi in zip(p, w):
        bar = "#" * int(round(40 * wi / w_max)) if w_max > 0 else ""
        print(f"{pi:6.3f}  {wi:10.6f}  {bar}")
    if peak is None:
        print("peak: none (flat kernel, every problem weighs 1)")
    else:
        print(f"peak: p = {peak:.4f}, w = {w_max:.6f}")
    return 0
