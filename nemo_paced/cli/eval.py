"""`nemo-paced eval`: benchmark accuracy (mean over n samples ± std) on the rollout engines."""

from __future__ import annotations

import argparse
import sys

from nemo_paced.cli.serve import add_engine_arguments, build_engine, field_map


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a model: mean accuracy over n samples per problem, per benchmark",
        description="Sample n answers per problem with the chosen engine, grade them with the verifier and "
                    "report, per benchmark, the mean accuracy over the n samples and its standard deviation "
                    "across them (the paper's metric with n = 8), as a table on stdout and a JSON file. "
                    "Uses the same sampling and grading code as the rollout service.")
    add_engine_arguments(parser)
    parser.add_argument("--benchmarks", nargs="+", required=True, metavar="DATA",
                        help="benchmark files or dataset names, optionally named: math500=data/math500.jsonl")
    parser.add_argument("--n", type=int, default=8, help="samples per problem (default 8)")
    parser.add_argument("--limit", type=int, help="use only the first N problems of each benchmark")
    parser.add_argument("--out", required=True, help="JSON report (written atomically)")
    parser.set_defaults(handler=evaluate_command, split="test")


def evaluate_command(args: argparse.Namespace) -> int:
    from dataclasses import asdict
    from pathlib import Path

    from nemo_paced.atomic import atomic_write_json
    from nemo_paced.problems import load_problems
    from nemo_paced.rollout.engines import SamplingParams
    from nemo_paced.rollout.evaluate import evaluate, format_table
    from nemo_paced.rollout.verifiers import resolve

    try:
        params = SamplingParams(args.n, args.temperature, args.top_p, args.max_tokens, args.seed)
        verifier = resolve(args.verifier)
        benchmarks = {}
        for spec in args.benchmarks:
            name, sep, source = spec.partition("=")
            name, source = (name, source) if sep else (Path(spec).stem or spec, spec)
            if name in benchmarks:
                raise ValueError(f"benchmark name {name!r} given twice; name them: NAME=DATA")
            benchmarks[name] = load_problems(source, fields=field_map(args.fields), split=args.split,
                                             limit=args.limit)
    except ValueError as e:
        raise SystemExit(f"nemo-paced eval: {e}") from None
    engine = build_engine(args)

    def progress(name: str, done: int, total: int) -> None:
        print(f"  {name}: {done}/{total}", file=sys.stderr, flush=True)

    try:
        results = evaluate(engine, benchmarks, verifier, params, args.template, args.batch_problems, progress)
    finally:
        engine.close()
    print(format_table(results))
    if results and all(r.mean == 0 for r in results):
        print("warning: every answer was graded wrong. If the model is not simply untrained, check that "
              "--template, --verifier and --max-tokens fit it (see the warnings above, if any)", file=sys.stderr)
    atomic_write_json(args.out, {"model": args.model, "engine": args.engine, "verifier": args.verifier,
                                 "template": args.template, "sampling": asdict(params),
                                 "benchmarks": {r.name: asdict(r) for r in results}})
    return 0
