"""A small OpenAI-compatible completions server for the `openai` engine's tests, run as a process.

It speaks the subset the engine uses, as `vllm serve` does: GET /v1/models, /health; POST
/v1/completions with token-id prompts, n, max_tokens, seed, stop_token_ids and vLLM's
return_tokens_as_token_ids; POST /collective_rpc (reload_weights) and /reset_prefix_cache.
Completions are a deterministic function of (weights, prompt, seed, sample index) (`completion`),
so a test can recompute what any replica returns. GET /stats counts completed requests, those in flight and the most served at once.

    python openai_toy_server.py --port-file F [--delay S]   # F receives the port once it listens
"""

import argparse
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VOCAB = range(2, 17)  # the char tokenizer's ids of "0123456789+-.=" and "#"; 1 is EOS
EOS = 1


def completion(weights: str, prompt: list[int], seed, index: int, max_tokens: int) -> list[int]:
    """The token ids of sample `index` for `prompt`: 1..max_tokens tokens, ending on EOS when shorter."""
    digest = hashlib.sha256(json.dumps([weights, prompt, seed, index]).encode()).digest()
    length = 1 + digest[0] % max_tokens
    tokens = [VOCAB[b % len(VOCAB)] for b in digest[1:1 + length]]
    return tokens[:-1] + [EOS] if length < max_tokens else tokens


class Handler(BaseHTTPRequestHandler):
    server_version = "toy-completions"

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        state = self.server.state
        if self.path == "/v1/models":
            return self._reply(200, {"object": "list", "data": [{"id": "toy", "object": "model"}]})
        if self.path == "/health":
            return self._reply(200, {})
        if self.path == "/stats":
            return self._reply(200, {"completions": state["completions"], "peak_in_flight": state["peak"],
                                     "in_flight": state["running"], "weights": state["weights"]})
        self._reply(404, {"detail": "not found"})

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        if self.path == "/collective_rpc":
            state["weights"] = body["kwargs"]["weights_path"]
            return self._reply(200, {"results": [None]})
        if self.path == "/reset_prefix_cache":
            return self._reply(200, {})
        if self.path != "/v1/completions":
            return self._reply(404, {"detail": "not found"})
        prompt = body["prompt"]
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)) or not body.get(
                "return_tokens_as_token_ids"):
            return self._reply(400, {"detail": "this server takes one token-id prompt with return_tokens_as_token_ids"})
        with state["lock"]:
            state["running"] += 1
            state["peak"] = max(state["peak"], state["running"])
        time.sleep(state["delay"])
        choices = []
        for index in range(body.get("n", 1)):
            tokens = completion(state["weights"], prompt, body.get("seed"), index, body["max_tokens"])
            choices.append({"index": index, "text": "", "finish_reason": "stop" if tokens[-1] == EOS else "length",
                            "logprobs": {"tokens": [f"token_id:{t}" for t in tokens],
                                         "token_logprobs": [-0.5] * len(tokens)}})
        with state["lock"]:
            state["completions"] += 1
            state["running"] -= 1
        self._reply(200, {"id": "cmpl-toy", "object": "text_completion", "model": "toy", "choices": choices})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each completions request takes")
    parser.add_argument("--weights", default="start")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.state = {"weights": args.weights, "delay": args.delay, "completions": 0, "running": 0, "peak": 0,
                    "lock": threading.Lock()}
    temp = f"{args.port_file}.tmp"
    with open(temp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(temp, args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
