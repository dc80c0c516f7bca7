"""`nemo-paced demo`: the whole PACED pipeline on a laptop-class CPU, against the paper's baselines."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run a complete two-stage PACED distillation on CPU and compare it with its baselines",
        description=(
            "Train a tiny teacher and student on a synthetic task (running means of digits; difficulty = "
            "number of steps), start the rollout service on loopback, estimate pass rates over HTTP, build "
            "teacher references, and distil with PACED (forward then reverse KL), PACED forward-KL only, PACED in "
            "sample mode, 'drop extremes' (w = 1 on 0 < p < 1), the hard filter 0.2 < p < 0.8 and unweighted "
            "forward KL under the same token budget, every run on a freshly started rollout service. Prints the "
            "accuracy table (mean ± std over seeds), paired differences over seeds with 95% intervals, the "
            "compute of every method (tokens and FLOPs) and the gradient SNR per pass-rate bin, and writes "
            "report.json and PNG plots into --out. --study runs the dose-response instead: the comparison from "
            "three starting students of different pretraining depth, under one epoch of the pool. "
            "The tiny models are trained once and cached under --cache."))
    parser.add_argument("--quick", action="store_true",
                        help="small task, pool and budget, two seeds, four methods: the CI smoke run "
                             "(< 3 min on 2 cores)")
    parser.add_argument("--study", action="store_true",
                        help="the dose-response study (three starting students, ~15/50/80%% of the pool at "
                             "p in {0,1}; about 6 CPU-minutes); writes OUT/study/report.json")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/nemo-paced"),
                        help="where pretrained tiny models are kept, keyed by their settings "
                             "(default .cache/nemo-paced)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5, or 2 with --quick)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only write the problem files and the tiny teacher and student (for the SLURM "
                             "chain); prints their paths and writes OUT/prepared.json")
    parser.add_argument("--self-distillation", action="store_true",
                        help="the self-distillation comparison instead (PACED vs unweighted vs hard filter, reverse "
                             "KL on the student's own samples against the student itself with the answer in its "
                             "prompt; same budget and seeds; with --quick, the quick settings); writes "
                             "OUT/self/report.json")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="processes the training runs are spread over (default: 2, or 1 on a one-core "
                             "machine; results do not depend on it; --self-distillation runs them in turn)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=demo)


def demo(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    import torch

    from nemo_paced.demo.experiment import QUICK, DemoConfig, prepare, run_demo

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny models: more threads only add contention on a small machine
    if args.study and (args.quick or args.prepare_only or args.self_distillation):
        raise SystemExit("nemo-paced demo: --study runs on its own (not with --quick, --prepare-only or "
                         "--self-distillation)")
    config = QUICK if args.quick else DemoConfig()
    if args.workers < 1:
        raise SystemExit("nemo-paced demo: --workers must be >= 1")
    if args.seeds is not None:
        if args.seeds < 1:
            raise SystemExit("nemo-paced demo: --seeds must be >= 1")
        config = dataclasses.replace(config, seeds=tuple(range(args.seeds)))
    if args.prepare_only:
        prepared = prepare(config, args.out, args.cache)
        print(f"prepared: {args.out / 'prepared.json'}\n  teacher {prepared.teacher}\n  student {prepared.student}\n"
              f"  problems {prepared.problems} (pool {prepared.pool})")
        return 0

    if args.study:
        from nemo_paced.demo.study import StudyConfig, format_study, run_study, scaled, write_study_plot

        study = StudyConfig() if args.seeds is None else scaled(StudyConfig(), seeds=tuple(range(args.seeds)))
        report = run_study(study, args.out / "study", args.cache, workers=args.workers)
        print()
        print(format_study(report))
        print(f"plot: {write_study_plot(report, args.out / 'study')}")
        print(f"report: {args.out / 'study' / 'report.json'} ({report['seconds']:.0f} s)")
        return 0

    if args.self_distillation:
        from nemo_paced.atomic import atomic_write_json
        from nemo_paced.demo.report import machine
        from nemo_paced.demo.self_distillation import format_summary, run_self_distillation, summary

        block = {"machine": machine(), **summary(run_self_distillation(config, args.out / "self", args.cache,
                                                                       progress=not args.no_progress))}
        atomic_write_json(args.out / "self" / "report.json", block)
        print()
        print(format_summary(block))
        print(f"report: {args.out / 'self' / 'report.json'} ({block['seconds']:.0f} s)")
        return 0

    from nemo_paced.demo.plots import write_plots
    from nemo_paced.demo.report import format_table

    report = run_demo(config, args.out, args.cache, progress=not args.no_progress, workers=args.workers)
    print()
    print(format_table(report))
    for path in write_plots(report, args.out):
        print(f"plot: {path}")
    print(f"report: {args.out / 'report.json'} ({report['timings_s']['total']:.0f} s)")
    return 0
