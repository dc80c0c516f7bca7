"""`nemo-paced serve-teacher`: run the teacher service (see nemo_paced.teacher.service)."""

from __future__ import annotations

import argparse
import os
import sys

from nemo_paced.serving import add_server_arguments
from nemo_paced.teacher.client import TOKEN_ENV


def add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    """Teacher options shared by serve-teacher and teacher-cache; the model lands in `args.teacher`."""
    parser.add_argument("--engine", choices=["hf", "vllm", "openai"], default="hf",
                        help="hf: transformers (CPU or GPU); vllm: in-process vLLM with prompt_logprobs; openai: a "
                             "separate `vllm serve` at --openai-url (started with --max-logprobs >= the largest k). "
                             "Default hf")
    parser.add_argument("--teacher", required=True,
                        help="teacher directory (Hugging Face format, safetensors); with --engine openai, the one "
                             "the server was started from (for its tokenizer and vocabulary)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: --teacher)")
    parser.add_argument("--dtype", default=None, help="weights dtype (hf default float32, vllm default auto)")
    parser.add_argument("--device", help="hf engine device (default cuda if available, else cpu)")
    parser.add_argument("--batch-tokens", type=int, default=16384,
                        help="hf engine: most padded tokens per forward pass (default 16384)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm engine: tensor parallelism")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1, help="vllm engine: pipeline parallelism")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm engine (default 0.9)")
    parser.add_argument("--max-model-len", type=int, help="vllm engine: context length (default: the model's)")
    parser.add_argument("--openai-url", help="openai engine: base URL of the completions server, http://host:port")
    parser.add_argument("--openai-key-env", default="OPENAI_API_KEY",
                        help="openai engine: variable holding the server's API key, if it wants one")
    parser.add_argument("--vllm-option", action="append", default=[], metavar="KEY=VALUE",
                        help="vllm engine: any other vllm.LLM argument, VALUE read as JSON when it parses; repeatable")


def build_scorer(args: argparse.Namespace, max_k: int):
    from nemo_paced.cli.serve import _vllm_option
    from nemo_paced.teacher.engines import create_scorer

    if args.engine == "hf":
        options = {"tokenizer": args.tokenizer, "device": args.device, "dtype": args.dtype or "float32",
                   "batch_tokens": args.batch_tokens}
    elif args.engine == "openai":
        if not args.openai_url:
            raise SystemExit("nemo-paced: --engine openai needs --openai-url")
        options = {"tokenizer": args.tokenizer, "url": args.openai_url, "api_key": os.environ.get(args.openai_key_env)}
    else:
        options = {"tokenizer": args.tokenizer, "dtype": args.dtype or "auto", "max_logprobs": max_k,
                   "tensor_parallel_size": args.tensor_parallel_size,
                   "pipeline_parallel_size": args.pipeline_parallel_size,
                   "gpu_memory_utilization": args.gpu_memory_utilization,
                   **({"max_model_len": args.max_model_len} if args.max_model_len else {}),
                   **dict(_vllm_option(o) for o in args.vllm_option)}
    return create_scorer(args.engine, args.teacher, **options)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve-teacher", help="serve a teacher's top-k log-probs over HTTP (frontier teachers on their own nodes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Hold the teacher in an inference engine and serve, over HTTP, its top-k next-token "
                    "log-probs (normalised over the full vocabulary) and the log-prob of the actual token at "
                    "every response position of the token sequences it is sent (POST /score), with /health "
                    "and /metrics. Requests waiting at the same time are merged into one engine call.",
        epilog="The service binds 127.0.0.1 unless --host says otherwise; any other address needs a bearer "
               f"token (--token-file, or the variable named by --token-env, default ${TOKEN_ENV}).\n\n"
               "Example (a DeepSeek-V3-class teacher on its own node, vLLM, tensor parallel 8):\n"
               "  nemo-paced serve-teacher --engine vllm --teacher /models/DeepSeek-V3 --tensor-parallel-size 8 \\\n"
               "      --max-k 64 --host $(hostname -I | cut -d' ' -f1) --port 0 \\\n"
               "      --token-file $RUN/teacher.token --address-file $RUN/teacher.addr")
    add_scorer_arguments(parser)
    parser.add_argument("--max-k", type=int, default=256, help="largest k a request may ask for (default 256)")
    parser.add_argument("--max-tokens", type=int, default=32768,
                        help="longest sequence (prompt + response) in tokens (default 32768)")
    parser.add_argument("--max-sequences", type=int, default=512, help="most sequences per request (default 512)")
    parser.add_argument("--max-pending", type=int, default=16,
                        help="requests that may wait for the engine; more are refused with 503 (default 16)")
    parser.add_argument("--merge-tokens", type=int, default=65536,
                        help="most tokens of waiting requests merged into one engine call (default 65536)")
    add_server_arguments(parser, TOKEN_ENV, default_port=8001)
    parser.set_defaults(handler=serve_teacher)


def serve_teacher(args: argparse.Namespace) -> int:
    import logging

    from nemo_paced.serving import listen, remove_address_if_ours, run, server_token
    from nemo_paced.teacher.service import TeacherService, TeacherServiceConfig, create_app

    token, token_hint = server_token(args, "serve-teacher")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = TeacherServiceConfig(max_k=args.max_k, max_tokens=args.max_tokens, max_sequences=args.max_sequences,
                                      batch_tokens=args.merge_tokens, max_pending=args.max_pending,
                                      max_request_bytes=args.max_request_bytes, token=token)
    except ValueError as e:
        raise SystemExit(f"nemo-paced serve-teacher: {e}") from None
    service = TeacherService(build_scorer(args, args.max_k), config)
    sock, address = listen(args, "serve-teacher", **token_hint)
    print(f"teacher service on {address['url']} (engine {args.engine}, {args.teacher}, vocabulary "
          f"{service.scorer.vocab_size})", file=sys.stderr, flush=True)

    def cleanup() -> None:
        if args.address_file:
            remove_address_if_ours(args.address_file)
        service.scorer.close()

    run(create_app(service, on_shutdown=cleanup), sock, args.log_level)
    return 0
