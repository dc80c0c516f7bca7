"""`nemo-paced make-references`: teacher reference responses for the forward-KL stage."""

from __future__ import annotations

import argparse
import sys

from nemo_paced.cli.serve import add_engine_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-references", help="generate verified teacher responses for the forward-KL stage",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample --n responses per problem from the teacher, grade them with the verifier and "
                    "write them to OUT (JSON Lines, see nemo_paced.references). With --keep verified (the "
                    "default) only accepted responses are kept; problems with none are reported, and the "
                    "forward-KL stage trains only on problems that have a reference.",
        epilog="Progress is journalled to OUT.partial after every batch of problems; run the same command "
               "again after an interruption and it continues where it stopped. OUT itself is written "
               "atomically once every problem is done.\n\n"
               "Example (DAPO-Math-17k on a GPU node):\n"
               "  nemo-paced make-references --teacher Qwen/Qwen3-8B --problems data/dapo17k.jsonl \\\n"
               "      --out data/dapo17k.refs.jsonl --engine vllm --template chat --max-tokens 8192")
    add_engine_arguments(parser, model_flag="--teacher")
    parser.add_argument("--problems", required=True, help="problems: JSONL/JSON/Parquet file or dataset name")
    parser.add_argument("--out", required=True, help="references file to write (.jsonl)")
    parser.add_argument("--n", type=int, default=1, help="responses sampled per problem (default 1)")
    parser.add_argument("--keep", choices=["verified", "all"], default="verified",
                        help="verified: keep responses the verifier accepts (default); all: keep every "
                             "response with its score")
    parser.add_argument("--limit", type=int, help="use only the first N problems")
    parser.set_defaults(handler=make_references_command)


def make_references_command(args: argparse.Namespace) -> int:
    import logging

    from nemo_paced.cli.serve import build_engine, field_map
    from nemo_paced.problems import load_problems
    from nemo_paced.references import ReferenceConfig, make_references
    from nemo_paced.rollout.verifiers import resolve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ReferenceConfig(n=args.n, keep=args.keep, template=args.template, temperature=args.temperature,
                                 top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                                 batch_problems=args.batch_problems)
        verifier = resolve(args.verifier)
        problems = load_problems(args.problems, fields=field_map(args.fields), split=args.split, limit=args.limit)
    except ValueError as e:
        print(f"nemo-paced make-references: {e}", file=sys.stderr)
        return 2
    engine = build_engine(args)

    def progress(done: int, total: int) -> None:
        print(f"{done}/{total} problems", file=sys.stderr, flush=True)

    try:
        summary = make_references(engine, problems, verifier, args.out, config,
                                  settings={"teacher": args.model, "verifier": args.verifier}, progress=progress)
    except ValueError as e:
        print(f"nemo-paced make-references: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary.report()}")
    if summary.problems and not summary.with_reference:
        print("warning: no problem has a verified reference, so the forward-KL stage has nothing to train on. "
              "Check that --template, --verifier and --max-tokens fit the teacher (see the warnings above, if "
              "any), or keep unverified responses with --keep all", file=sys.stderr)
    return 0
