"""The `openai` engine: a separate OpenAI-compatible completions server (`vllm serve`) as the backend.

Exact token ids and per-token log-probs come from vLLM's extension `return_tokens_as_token_ids`
(each log-prob entry names its token as "token_id:N"), so a server must support it; plain OpenAI
text completions are not enough for reverse KL. Weights are reloaded in place through vLLM's
development endpoints (`/collective_rpc` reload_weights, then `/reset_prefix_cache`), which exist
only when the server runs with VLLM_SERVER_DEV_MODE=1; without them `load_weights` fails clearly.
Prompts are tokenised here with the model's tokenizer and sent as token ids, as in the other engines.
"""

from __future__ import annotations

from typing import Any

import httpx

from nemo_paced.rollout.engines.base import Generation, Sample, SamplingParams


class OpenAIEngine:
    name = "openai"

    def __init__(self, model: str, url: str, tokenizer: str | None = None, api_key: str | None = None,
                 served_model: str | None = None, timeout: float = 3600.0) -> None:
        """`model` is the local checkpoint directory the server was started from (for its tokenizer
        and as the checkpoint name); `url` the server's base URL, e.g. http://node:8000."""
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        eos = self._tokenizer.eos_token_id
        self.eos_ids = [eos] if eos is not None else []
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.served_model = served_model or self._call("GET", "/v1/models")["data"][0]["id"]
        self.checkpoint = str(model)

    @property
    def tokenizer(self):
        return self._tokenizer

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise ConnectionError(f"completions server at {self._http.base_url}: {method} {path}: {e}") from e
        if response.status_code == 404 and path in ("/collective_rpc", "/reset_prefix_cache"):
            raise RuntimeError(f"{self._http.base_url} has no {path}: start `vllm serve` with "
                               "VLLM_SERVER_DEV_MODE=1 to reload weights in place")
        if response.status_code >= 400:
            raise RuntimeError(f"completions server at {self._http.base_url}: {method} {path} failed with HTTP "
                               f"{response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        encoded = [self._tokenizer(p)["input_ids"] for p in prompts]
        body = {"model": self.served_model, "prompt": encoded, "n": params.n, "temperature": params.temperature,
                "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": params.seed, "logprobs": 0,
                "return_tokens_as_token_ids": True, "stop_token_ids": self.eos_ids}
        choices = sorted(self._call("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts) * params.n:
            raise RuntimeError(f"asked for {len(prompts)} x {params.n} completions, got {len(choices)}")
        return [Generation(ids, [self._sample(c) for c in choices[i * params.n:(i + 1) * params.n]])
                for i, ids in enumerate(encoded)]

    def _sample(self, choice: dict) -> Sample:
        logprobs = choice.get("logprobs") or {}
        names = logprobs.get("tokens") or []
        if any(not name.startswith("token_id:") for name in names):
            raise RuntimeError("the server ignored return_tokens_as_token_ids: token ids are unavailable")
        tokens = [int(name[len("token_id:"):]) for name in names]
        text = self._tokenizer.decode(tokens, skip_special_tokens=True)
        return Sample(text, tokens, [float(v) for v in logprobs.get("token_logprobs") or []],
                      "stop" if choice.get("finish_reason") == "stop" else "length")

    def load_weights(self, path: str) -> None:
        """Reload the server's weights in place from `path` (a directory on the server's machine)."""
        self._call("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(path)}})
        self._call("POST", "/reset_prefix_cache")
        self.checkpoint = str(path)
