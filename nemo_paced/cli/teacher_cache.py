"""`nemo-paced teacher-cache`: top-k teacher log-probs on every reference, for a forward-KL stage
without the teacher in the job (see nemo_paced.teacher.cache for the format)."""

from __future__ import annotations

import argparse
import sys

from nemo_paced.cli.serve_teacher import add_scorer_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "teacher-cache", help="cache the teacher's top-k log-probs on the references (forward KL without a teacher)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Score every verified reference with the teacher and write, per response token, its k most "
                    "likely next tokens (ids int32) with their log-probs (float16 or bfloat16) and the actual "
                    "token's log-prob: 6k+2 bytes a token, in sharded safetensors files with an index.json. "
                    "Problems whose weight is 0 under --passrates are not scored (teacher compute saved); they "
                    "are recorded as skipped, and a later run with a newer table scores only what is missing.",
        epilog="Each shard is written atomically and then entered in the index: after an interruption run the "
               "same command again and it continues. Score in-process (--teacher DIR with --engine) or through a "
               "running teacher service (--service ADDR; --teacher then only names the tokenizer).\n\n"
               "Example:\n"
               "  nemo-paced teacher-cache --teacher /models/DeepSeek-V3 --service $RUN/teacher.addr \\\n"
               "      --problems data/dapo17k.jsonl --references data/dapo17k.refs.jsonl \\\n"
               "      --passrates $RUN/passrates.jsonl --k 64 --out $RUN/teacher-cache")
    add_scorer_arguments(parser)
    parser.add_argument("--service", help="score through this teacher service (address file or URL) instead of "
                                          "loading the teacher here")
    parser.add_argument("--problems", required=True, help="the problem file the references were made for")
    parser.add_argument("--references", required=True, help="references file (nemo-paced make-references)")
    parser.add_argument("--passrates", help="pass-rate table: problems at weight 0 under it are not scored "
                                            "(default: score every problem)")
    parser.add_argument("--alpha", type=float, default=1.0, help="kernel exponent alpha (default 1)")
    parser.add_argument("--beta", type=float, default=1.0, help="kernel exponent beta (default 1)")
    parser.add_argument("--weight-mode", choices=["loss", "sample", "filter", "uniform"], default="loss",
                        help="the training run's weight mode (default loss)")
    parser.add_argument("--unknown", choices=["exclude", "peak", "mean"], default="exclude",
                        help="weight of problems the table never estimated (default exclude: 0, skipped)")
    parser.add_argument("--template", choices=["raw", "plain", "chat"], default="plain",
                        help="prompt rendering, as the training run renders it (default plain)")
    parser.add_argument("--k", type=int, default=64, help="teacher log-probs kept per token (default 64)")
    parser.add_argument("--logprob-dtype", choices=["float16", "bfloat16"], default="float16",
                        help="log-prob storage (default float16)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 20,
                        help="response tokens per shard (default 1048576, ~390 MB at k=64)")
    parser.add_argument("--batch-sequences", type=int, default=64, help="sequences per scoring call (default 64)")
    parser.add_argument("--out", required=True, help="cache directory")
    parser.set_defaults(handler=teacher_cache_command)


def teacher_cache_command(args: argparse.Namespace) -> int:
    import logging

    from transformers import AutoTokenizer

    from nemo_paced.batches import BatchBuilder
    from nemo_paced.passrates import PassRateTable
    from nemo_paced.problems import load_problems
    from nemo_paced.references import ReferenceBatches, load_references
    from nemo_paced.teacher.cache import CacheConfig, CacheError, build_cache, reference_items
    from nemo_paced.teacher.engines import tokenizer_fingerprint
    from nemo_paced.weighting import WeightConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = CacheConfig(k=args.k, dtype=args.logprob_dtype, shard_tokens=args.shard_tokens,
                         batch_sequences=args.batch_sequences)
    problems = load_problems(args.problems)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher)
    references = ReferenceBatches(problems, load_references(args.references),
                                  BatchBuilder(tokenizer, seq_length=1 << 30), args.template)
    items = reference_items(references)
    weights, passrates = None, None
    if args.passrates:
        table = PassRateTable.load(args.passrates)
        ids = references.problem_ids
        weighting = WeightConfig(mode=args.weight_mode, alpha=args.alpha, beta=args.beta)
        weights = dict(zip(ids, table.weights(ids, weighting, args.unknown).tolist()))
        passrates = {"path": args.passrates, "version": table.version}
    fingerprint = tokenizer_fingerprint(tokenizer)
    if args.service:
        from nemo_paced.teacher.client import TeacherClient

        scorer = TeacherClient.connect(args.service)
        info = scorer.info
        if info["tokenizer"] != fingerprint:
            raise CacheError(f"the teacher service's tokenizer ({info['tokenizer']}) is not --teacher's "
                             f"({fingerprint}): its ids would not mean the same tokens")
        teacher = {"model": info["model"], "engine": f"service:{info['engine']}", "vocab_size": info["vocab_size"],
                   "tokenizer": fingerprint}
    else:
        from nemo_paced.cli.serve_teacher import build_scorer

        scorer = build_scorer(args, args.k)
        teacher = {"model": scorer.model, "engine": scorer.name, "vocab_size": scorer.vocab_size,
                   "tokenizer": tokenizer_fingerprint(scorer.tokenizer)}

    def progress(done: int, total: int) -> None:
        print(f"{done}/{total} sequences", file=sys.stderr, flush=True)

    try:
        summary = build_cache(scorer.score, teacher, items, weights, args.out, config,
                              settings={"template": args.template}, passrates=passrates, progress=progress)
    finally:
        scorer.close()
    print(f"{args.out}: {summary.report()}; {config.bytes_per_token} bytes per cached token")
    return 0
