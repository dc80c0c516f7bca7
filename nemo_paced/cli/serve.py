"""`nemo-paced serve-rollouts`: run the rollout service (see nemo_paced.rollout.service)."""

from __future__ import annotations

import argparse
import os
import sys

from nemo_paced.rollout import TOKEN_ENV
from nemo_paced.serving import add_server_arguments, server_token


def add_engine_arguments(parser: argparse.ArgumentParser, model_flag: str = "--model") -> None:
    """Engine, sampling and problem-set options shared by serve-rollouts, eval and make-references
    (which names the model `--teacher`); the model directory always lands in `args.model`."""
    parser.add_argument("--engine", choices=["hf", "vllm", "openai"], default="hf",
                        help="hf: transformers (CPU or GPU); vllm: in-process vLLM (production); openai: a "
                             "separate `vllm serve` at --openai-url (reloads need VLLM_SERVER_DEV_MODE=1 there). "
                             "Default hf")
    parser.add_argument(model_flag, dest="model", required=True, metavar="DIR",
                        help="model directory (Hugging Face format, safetensors); "
                             "with --engine openai, the one the server was started from")
    parser.add_argument("--tokenizer", help=f"tokenizer directory (default: {model_flag})")
    parser.add_argument("--dtype", default=None, help="weights dtype (hf default float32, vllm default auto)")
    parser.add_argument("--device", help="hf engine device (default cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="hf engine: most sequences (prompts x samples) per generate call (default 64)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm engine: tensor parallelism")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm engine (default 0.9)")
    parser.add_argument("--max-model-len", type=int, help="vllm engine: context length (default: the model's)")
    parser.add_argument("--openai-url", help="openai engine: base URL of the completions server, http://host:port "
                                             "(one `vllm serve --data-parallel-size N` deployment), or several "
                                             "comma-separated (replicas; a failed one's requests go to the others)")
    parser.add_argument("--max-in-flight", type=int, default=64,
                        help="openai engine: most completions requests outstanding at once, one per prompt "
                             "(default 64; raise it with the deployment's GPUs)")
    parser.add_argument("--openai-startup-timeout", type=float, default=0.0,
                        help="openai engine: seconds to wait for a server that is still loading (default 0)")
    parser.add_argument("--openai-key-env", default="OPENAI_API_KEY",
                        help="openai engine: variable holding the server's API key, if it wants one")
    parser.add_argument("--vllm-option", action="append", default=[], metavar="KEY=VALUE",
                        help="vllm engine: any other vllm.LLM argument, VALUE read as JSON when it parses "
                             "(e.g. enforce_eager=true, max_num_seqs=256); repeatable")
    parser.add_argument("--verifier", default="math_boxed",
                        help="math_boxed (default), exact, integer, or an import path package.module:function "
                             "taking (completion, answer) and returning true/false")
    parser.add_argument("--template", choices=["raw", "plain", "chat"], default="plain",
                        help="prompt rendering: raw question; plain = question + the paper's \\boxed{} suffix "
                             "(default); chat = the tokenizer's chat template around the plain text")
    parser.add_argument("--fields", help="where fields live in the data rows, e.g. "
                                         "id=uid,prompt=question,answer=reward_model.ground_truth")
    parser.add_argument("--split", default="train", help="split of a Hugging Face dataset (default train)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="longest response in tokens (default 1024)")
    parser.add_argument("--batch-problems", type=int, default=16, help="problems per engine call (default 16)")
    parser.add_argument("--seed", type=int, help="sampling seed (default: fresh randomness)")


def build_engine(args: argparse.Namespace):
    from nemo_paced.localpaths import require_dir
    from nemo_paced.rollout.engines import create_engine

    if args.engine != "openai":  # a mistyped local directory must not become a Hub download
        require_dir(args.model, "model")
    if args.engine == "hf":
        options = {"tokenizer": args.tokenizer, "device": args.device, "dtype": args.dtype or "float32",
                   "batch_size": args.batch_size}
    elif args.engine == "openai":
        if not args.openai_url:
            raise SystemExit("nemo-paced: --engine openai needs --openai-url")
        options = {"tokenizer": args.tokenizer, "url": args.openai_url,
                   "api_key": os.environ.get(args.openai_key_env), "max_in_flight": args.max_in_flight,
                   "startup_timeout": args.openai_startup_timeout}
    else:
        options = {"tokenizer": args.tokenizer, "dtype": args.dtype or "auto", "seed": args.seed or 0,
                   "tensor_parallel_size": args.tensor_parallel_size,
                   "gpu_memory_utilization": args.gpu_memory_utilization,
                   **({"max_model_len": args.max_model_len} if args.max_model_len else {}),
                   **dict(_vllm_option(o) for o in args.vllm_option)}
    return create_engine(args.engine, args.model, **options)


def _vllm_option(spec: str) -> tuple[str, object]:
    import json

    key, sep, value = spec.partition("=")
    if not sep or not key.isidentifier():
        raise SystemExit(f"nemo-paced: --vllm-option {spec!r}: expected KEY=VALUE with KEY an argument name")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def field_map(spec: str | None):
    from nemo_paced.problems import FieldMap

    return FieldMap() if spec is None else FieldMap.parse(spec)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve-rollouts", help="serve student rollouts, pass-rate estimation and on-policy samples over HTTP",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hold the student's current weights in an inference engine and serve, over HTTP: "
                    "pass-rate estimation jobs (K verified samples per problem, merged into a pass-rate "
                    "table saved atomically after every batch), the table itself, on-policy samples with "
                    "token ids and log-probs for reverse KL, weight reloads, /health and /metrics.",
        epilog="The service binds 127.0.0.1 unless --host says otherwise; any other address needs a bearer "
               f"token (--token-file, or the variable named by --token-env, default ${TOKEN_ENV}), which "
               "every request must then carry. State (the table passrates.jsonl, loaded checkpoint and "
               "unfinished jobs) lives in --state-dir; a restart resumes from it.\n\n"
               "Example (standalone):\n"
               "  nemo-paced serve-rollouts --model student/ --problems train.jsonl --state-dir runs/rollout \\\n"
               "      --port 0 --address-file runs/rollout/address.json\n"
               "  nemo-paced estimate --service runs/rollout/address.json --wait")
    add_engine_arguments(parser)
    parser.add_argument("--problems", required=True, help="training problems: JSONL/JSON/Parquet file or dataset name")
    parser.add_argument("--limit", type=int, help="use only the first N problems")
    parser.add_argument("--state-dir", required=True, help="directory for the pass-rate table and service state")
    parser.add_argument("--k", type=int, default=8, help="samples per problem for estimation (default 8)")
    parser.add_argument("--update-mode", choices=["replace", "accumulate"], default="replace",
                        help="replace: new estimates replace old ones (default); accumulate: old counts decay "
                             "by --decay and new ones add")
    parser.add_argument("--decay", type=float, default=0.5, help="decay of old counts in accumulate mode")
    parser.add_argument("--max-k", type=int, default=64, help="largest K or n a request may ask for (default 64)")
    parser.add_argument("--max-batch", type=int, default=1024, help="most problems per /sample request")
    parser.add_argument("--weights-root", action="append", default=[], metavar="DIR",
                        help="a directory POST /weights may load checkpoints from (inside it, symlinks resolved); "
                             "repeatable. Any other path is refused with one message, whether or not it exists. "
                             "Default: any directory")
    parser.add_argument("--job-history", type=int, default=1000,
                        help="finished estimation jobs kept for GET /jobs (in STATE_DIR/jobs.jsonl; default 1000)")
    parser.add_argument("--allow-settings-change", action="store_true",
                        help="resume STATE_DIR's table although --model, --template, --verifier, --k or --max-tokens "
                             "differ from those it was estimated with (refused by default)")
    add_adaptive_arguments(parser)
    add_server_arguments(parser, TOKEN_ENV)
    parser.set_defaults(handler=serve)


def add_adaptive_arguments(parser: argparse.ArgumentParser) -> None:
    from nemo_paced.rollout.adaptive import AdaptiveConfig

    default = AdaptiveConfig()
    group = parser.add_argument_group(
        "adaptive estimation", "with --adaptive, estimation jobs spend fewer rollouts: every problem gets "
        "--adaptive-first, then --adaptive-step more while the posterior sd of w(p) exceeds --adaptive-tolerance, "
        "up to --adaptive-max-k; problems confidently at p = 0 or 1 keep their estimate and are re-estimated "
        "with probability --recheck per job. Jobs report the rollouts spent and saved against K (--k)")
    group.add_argument("--adaptive", action="store_true", help="turn the rules on (default off: K for every problem)")
    group.add_argument("--adaptive-first", type=int, default=default.first,
                       help=f"rollouts every problem gets first (default {default.first})")
    group.add_argument("--adaptive-step", type=int, default=default.step,
                       help=f"rollouts added per round (default {default.step})")
    group.add_argument("--adaptive-max-k", type=int, default=default.max_k,
                       help=f"most rollouts per problem and job (default {default.max_k})")
    group.add_argument("--adaptive-tolerance", type=float, default=default.tolerance,
                       help=f"posterior sd of w(p) at which a problem stops (default {default.tolerance})")
    group.add_argument("--recheck", type=float, default=default.recheck,
                       help=f"probability a confident p = 0 or 1 problem is re-estimated (default {default.recheck})")


def adaptive_config(args: argparse.Namespace):
    from nemo_paced.rollout.adaptive import AdaptiveConfig

    if not args.adaptive:
        return None
    return AdaptiveConfig(first=args.adaptive_first, step=args.adaptive_step, max_k=args.adaptive_max_k,
                          tolerance=args.adaptive_tolerance, recheck=args.recheck)


def serve(args: argparse.Namespace) -> int:
    import logging

    token, token_hint = server_token(args, "serve-rollouts")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from nemo_paced.problems import load_problems
    from nemo_paced.rollout.service import RolloutService, ServiceConfig, create_app
    from nemo_paced.rollout.settings import check_resumed
    from nemo_paced.rollout.verifiers import resolve
    from nemo_paced.serving import listen, remove_address_if_ours, run

    try:
        config = ServiceConfig(k=args.k, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                               template=args.template, batch_problems=args.batch_problems, seed=args.seed,
                               update_mode=args.update_mode, decay=args.decay, max_k=args.max_k,
                               max_batch=args.max_batch, max_request_bytes=args.max_request_bytes, token=token,
                               weights_roots=tuple(args.weights_root), max_history=args.job_history,
                               adaptive=adaptive_config(args))
        verifier = resolve(args.verifier)
        problems = load_problems(args.problems, fields=field_map(args.fields), split=args.split, limit=args.limit)
    except ValueError as e:
        raise SystemExit(f"nemo-paced serve-rollouts: {e}") from None
    check_resumed(args.state_dir, {"model": os.path.realpath(args.model) if os.path.exists(args.model) else args.model,
                                   "template": args.template, "verifier": args.verifier, "k": args.k,
                                   "max_tokens": args.max_tokens}, args.allow_settings_change)
    service = RolloutService(build_engine(args), problems, verifier, args.state_dir, config)

    sock, address = listen(args, "serve-rollouts", state_dir=os.path.abspath(args.state_dir), **token_hint)
    print(f"rollout service on {address['url']} ({len(problems)} problems, engine {args.engine}, "
          f"table version {service.table.version})", file=sys.stderr, flush=True)

    def cleanup() -> None:
        if args.address_file:
            remove_address_if_ours(args.address_file)
        service.engine.close()

    run(create_app(service, on_shutdown=cleanup), sock, args.log_level)
    return 0
