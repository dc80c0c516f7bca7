"""Rollout throughput of the service's `hf` engine against a plain loop of transformers `generate`
calls, on the same model and prompts, and the HTTP service's overhead per request.

    .venv/bin/python bench/rollout_bench.py [--problems 64] [--k 8] [--max-tokens 32] [--hidden 128]

Rows (all in this process, same random model, same prompts, temperature 1, no early stop):
  loop      one `model.generate(num_return_sequences=K)` call per prompt: the baseline
  engine    HFEngine.generate over all prompts (left-padded batches of --batch-size sequences)
  service   an estimation job through the HTTP service on 127.0.0.1 (engine + grading + table saves)
Then the latency of tiny requests (1 problem, 1 sample, 1 token) direct on the engine and over HTTP:
their difference is the service's overhead per request.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from nemo_paced.console import quiet_third_party; quiet_third_party()  # noqa: E702  (before torch & co. warn)
import torch


def build(path: Path, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_paced.tasks.tokenizer import char_tokenizer

    tokenizer = char_tokenizer("0123456789+-.=")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_interleaved(repeats: int, rows: dict) -> dict[str, float]:
    """Best time of each row, the rows taking turns, so load from other processes hits them alike."""
    best = {name: float("inf") for name in rows}
    for _ in range(repeats):
        for name, fn in rows.items():
            best[name] = min(best[name], timed(fn))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="engine sequences per generate call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    args = parser.parse_args()

    import httpx
    import transformers
    import uvicorn

    from nemo_paced.problems import Problem
    from nemo_paced.rollout.engines import SamplingParams, create_engine
    from nemo_paced.rollout.service import RolloutService, ServiceConfig, bind_socket, create_app
    from nemo_paced.rollout.verifiers import exact

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # silence the warning about the eos id -1 below
    root = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    build(root / "model", args.hidden, args.layers)
    rng = torch.Generator().manual_seed(0)
    problems = [Problem(f"p{i}", "".join(str(d) for d in torch.randint(0, 10, (6,), generator=rng).tolist()) + "=",
                        "0") for i in range(args.problems)]
    engine = create_engine("hf", str(root / "model"), batch_size=args.batch_size)
    engine.eos_ids = {-1}  # no early stop: every row generates exactly problems x K x max_tokens tokens
    params = SamplingParams(n=args.k, max_tokens=args.max_tokens, seed=0)
    rollouts = args.problems * args.k
    model, tokenizer = engine.model, engine.tokenizer

    def loop():
        for problem in problems:
            ids = torch.tensor([tokenizer(problem.prompt)["input_ids"]])
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                           num_return_sequences=args.k, max_new_tokens=args.max_tokens,
                           min_new_tokens=args.max_tokens, pad_token_id=0)

    state = root / "state"
    config = ServiceConfig(k=args.k, max_tokens=args.max_tokens, template="raw", batch_problems=args.problems,
                           seed=0, max_k=max(64, args.k))
    service = RolloutService(engine, problems, exact, state, config)
    sock = bind_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    http = httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=600)

    def through_service():
        job = http.post("/estimate", json={}).json()["job_id"]
        while (status := http.get(f"/jobs/{job}").json()["status"]) != "done":
            assert status != "failed"
            time.sleep(0.005)

    best = best_interleaved(args.repeats, {
        "loop": loop, "engine": lambda: engine.generate([p.prompt for p in problems], params),
        "service": through_service})

    tiny = SamplingParams(n=1, max_tokens=1, seed=0)
    direct = [timed(lambda: engine.generate([problems[0].prompt], tiny)) for _ in range(20)]
    over_http = [timed(lambda: http.post("/sample", json={"ids": ["p0"], "n": 1, "max_tokens": 1, "seed": 0,
                                                              "fold": False}).raise_for_status())
                 for _ in range(20)]
    health = [timed(lambda: http.get("/health").raise_for_status()) for _ in range(50)]
    server.should_exit = True
    thread.join()

    tokens = rollouts * args.max_tokens
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers; {args.problems} prompts x K={args.k}, "
          f"{args.max_tokens} tokens each; torch threads {torch.get_num_threads()}; best of {args.repeats}")
    print(f"{'path':<9} {'seconds':>8} {'rollouts/s':>11} {'tokens/s':>10} {'vs loop':>8}")
    for name, seconds in best.items():
        print(f"{name:<9} {seconds:8.3f} {rollouts / seconds:11.1f} {tokens / seconds:10.0f} "
              f"{best['loop'] / seconds:7.2f}x")
    d, h = statistics.median(direct) * 1e3, statistics.median(over_http) * 1e3
    print(f"tiny request (1 problem, 1 sample, 1 token), median of 20: engine {d:.2f} ms, over HTTP {h:.2f} ms, "
          f"overhead {h - d:.2f} ms per request; GET /health median {statistics.median(health) * 1e3:.2f} ms")
    print(f"service vs engine on the estimation job: {best['engine'] / best['service']:.2f}x the engine's rollouts/s "
          f"(grading, table saves, polling)")


if __name__ == "__main__":
    main()
