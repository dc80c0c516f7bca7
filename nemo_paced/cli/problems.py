"""`nemo-paced problems prepare`: normalise a problem set once, so every stage reads the same ids."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("problems", help="prepare problem sets",
                                   description="Prepare problem sets for the rollout service and the trainers.")
    commands = parser.add_subparsers(dest="problems_command", metavar="ACTION", required=True)
    prepare = commands.add_parser(
        "prepare", help="validate, map fields, optionally deduplicate, and write JSON Lines",
        description="Read a problem set (JSONL/JSON/Parquet file, local dataset directory or Hugging Face "
                    "dataset name), validate every row (errors name the row and field), map its fields to "
                    "id/prompt/answer, optionally drop repeated problems, and write {id, prompt, answer, meta} "
                    "JSON Lines atomically. Point serve-rollouts, make-references and the recipes at the "
                    "result so they all see the same problem ids.",
        epilog="Example (DAPO-Math-17k, which repeats each problem under new ids):\n"
               "  nemo-paced problems prepare BytedTsinghua-SIA/DAPO-Math-17k --dedupe --out data/dapo17k.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("source", help="problem file, dataset directory or Hugging Face dataset name")
    prepare.add_argument("--out", required=True, help="JSON Lines file to write")
    prepare.add_argument("--fields", help="where fields live in the rows, e.g. "
                                          "id=uid,prompt=question,answer=reward_model.ground_truth")
    prepare.add_argument("--split", default="train", help="split of a Hugging Face dataset (default train)")
    prepare.add_argument("--limit", type=int, help="keep only the first N problems")
    prepare.add_argument("--dedupe", action="store_true",
                         help="drop rows whose question and answer repeat an earlier row (first id kept)")
    prepare.set_defaults(handler=prepare_problems)


def prepare_problems(args: argparse.Namespace) -> int:
    from nemo_paced.problems import FieldMap, load_problems, save_problems

    try:
        fields = FieldMap() if args.fields is None else FieldMap.parse(args.fields)
        problems = load_problems(args.source, fields=fields, split=args.split, limit=args.limit, dedupe=args.dedupe)
    except ValueError as e:
        print(f"nemo-paced problems prepare: {e}", file=sys.stderr)
        return 2
    save_problems(args.out, problems)
    print(f"{args.out}: {len(problems)} problems")
    return 0
