"""`nemo-paced make-references`: teacher reference responses for the forward-KL stage."""

from __future__ import annotations

import argparse
import sys


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
    parser.add_argument("--teacher", required=True, help="teacher model directory (Hugging Face format)")
    parser.add_argument("--problems", required=True, help="problems: JSONL/JSON/Parquet file or dataset name")
    parser.add_argument("--out", required=True, help="references file to write (.jsonl)")
    parser.add_argument("--n", type=int, default=1, help="responses sampled per problem (default 1)")
    parser.add_argument("--keep", choices=["verified", "all"], default="verified",
                        help="verified: keep responses the verifier accepts (default); all: keep every "
                             "response with its score")
    parser.add_argument("--fields", help="where fields live in the data rows, e.g. "
                                         "id=uid,prompt=question,answer=reward_model.ground_truth")
    parser.add_argument("--split", default="train", help="split of a Hugging Face dataset (default train)")
    parser.add_argument("--limit", type=int, help="use only the first N problems")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="hf: transformers (CPU or GPU, default); vllm: in-process vLLM (GPU)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --teacher)")
    parser.add_argument("--dtype", help="weights dtype (hf default float32, vllm default auto)")
    parser.add_argument("--device", help="hf engine device (default cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="hf engine: most sequences (prompts x samples) per generate call (default 64)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm engine: tensor parallelism")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm engine (default 0.9)")
    parser.add_argument("--max-model-len", type=int, help="vllm engine: context length (default: the model's)")
    parser.add_argument("--verifier", default="math_boxed",
                        help="math_boxed (default), exact, integer, or an import path package.module:function")
    parser.add_argument("--template", choices=["raw", "plain", "chat"], default="plain",
                        help="prompt rendering for the teacher: raw, plain = question + the paper's \\boxed{} "
                             "suffix (default), chat = the teacher tokenizer's chat template")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0; 0 = greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest response in tokens (default 1024)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: fresh randomness)")
    parser.add_argument("--batch-problems", type=int, default=16, help="problems per engine call and journal "
                                                                       "write (default 16)")
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
    args.model = args.teacher  # build_engine's name for the model directory
    engine = build_engine(args)

    def progress(done: int, total: int) -> None:
        print(f"{done}/{total} problems", file=sys.stderr, flush=True)

    try:
        summary = make_references(engine, problems, verifier, args.out, config,
                                  settings={"teacher": args.teacher, "verifier": args.verifier}, progress=progress)
    except ValueError as e:
        print(f"nemo-paced make-references: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary.report()}")
    return 0
