"""The `openai` engine: OpenAI-compatible completions servers (`vllm serve`) as the backend.

Scale-out is vLLM's own: one `vllm serve --data-parallel-size N` deployment spreads requests over N
engines (GPUs, across nodes) behind one URL, and several URLs (replicas, or the ranks of an
externally balanced deployment) may be listed too. This engine only keeps the servers busy and
survives losing one: each prompt is its own request (n samples), at most `max_in_flight` requests
are outstanding, each goes to the live replica with the fewest in flight, and a request whose
replica fails (connection refused or reset, timeout, HTTP 5xx) is sent again to another replica.
A prompt's result is taken from the one request that completes, and `generate` returns only when
every prompt has one, so a retry never adds samples: nothing is counted twice. A failed replica
rests for `cooldown` seconds, then gets requests again (after a weight reload if it missed one).

Exact token ids and per-token log-probs come from vLLM's extension `return_tokens_as_token_ids`
(each log-prob entry names its token as "token_id:N"), so a server must support it; plain OpenAI
text completions are not enough for reverse KL. Weights are reloaded in place through vLLM's
development endpoints (`/collective_rpc` reload_weights, then `/reset_prefix_cache`), which exist
only when the server runs with VLLM_SERVER_DEV_MODE=1; without them `load_weights` fails clearly.
Prompts are tokenised here with the model's tokenizer and sent as token ids, as in the other engines.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from nemo_paced.rollout.engines.base import Generation, Sample, SamplingParams

log = logging.getLogger(__name__)


class ReplicaError(ConnectionError):
    """A replica failed a request in a way another replica may not (transport error, HTTP 5xx)."""


@dataclass
class Replica:
    url: str
    http: httpx.Client
    checkpoint: str
    in_flight: int = 0
    down_until: float = 0.0  # monotonic time before which it gets no requests
    failures: int = 0


class OpenAIEngine:
    name = "openai"

    def __init__(self, model: str, url: str | Sequence[str], tokenizer: str | None = None,
                 api_key: str | None = None, served_model: str | None = None, timeout: float = 3600.0,
                 max_in_flight: int = 64, retries: int = 3, cooldown: float = 10.0,
                 startup_timeout: float = 0.0) -> None:
        """`model` is the local checkpoint directory the servers were started from (for its tokenizer
        and as the checkpoint name); `url` a server's base URL, e.g. http://node:8000, a comma-separated
        list or a sequence of them. `retries`: how often one request may be sent again after a replica
        failed it. `startup_timeout`: seconds to wait for a replica's /v1/models to answer (servers
        still loading), 0 to ask once."""
        from transformers import AutoTokenizer

        urls = [u.strip().rstrip("/") for u in (url.split(",") if isinstance(url, str) else url) if u.strip()]
        if not urls:
            raise ValueError("url: name at least one completions server, e.g. http://node:8000")
        if max_in_flight < 1 or retries < 0 or cooldown < 0:
            raise ValueError(f"need max_in_flight >= 1, retries >= 0 and cooldown >= 0; got {max_in_flight}, "
                             f"{retries}, {cooldown}")
        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
        eos = self._tokenizer.eos_token_id
        self.eos_ids = [eos] if eos is not None else []
        self.max_in_flight, self.retries, self.cooldown = max_in_flight, retries, cooldown
        self.checkpoint = str(model)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
        self.replicas = [Replica(u, httpx.Client(base_url=u, headers=headers, timeout=timeout, limits=limits),
                                 self.checkpoint) for u in urls]
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="openai-engine")
        self.retried = 0  # requests sent again after a replica failed them
        self.served_model = served_model or self._first_model(startup_timeout)

    @property
    def tokenizer(self):
        return self._tokenizer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for replica in self.replicas:
            replica.http.close()

    # --- one request on one replica ------------------------------------------------------------

    def _call(self, replica: Replica, method: str, path: str, body: dict | None = None) -> Any:
        try:
            response = replica.http.request(method, path, json=body)
        except httpx.TransportError as e:
            raise ReplicaError(f"completions server at {replica.url}: {method} {path}: {type(e).__name__}: {e}") from e
        if response.status_code == 404 and path in ("/collective_rpc", "/reset_prefix_cache"):
            raise RuntimeError(f"{replica.url} has no {path}: start `vllm serve` with "
                               "VLLM_SERVER_DEV_MODE=1 to reload weights in place")
        if response.status_code >= 400:
            kind = ReplicaError if response.status_code >= 500 else RuntimeError
            raise kind(f"completions server at {replica.url}: {method} {path} failed with HTTP "
                       f"{response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def _first_model(self, startup_timeout: float) -> str:
        """The served model's name, from the first replica that answers (waiting for loading servers)."""
        deadline = time.monotonic() + startup_timeout
        while True:
            errors = []
            for replica in self.replicas:
                try:
                    return self._call(replica, "GET", "/v1/models")["data"][0]["id"]
                except ReplicaError as e:
                    errors.append(e)
            if time.monotonic() >= deadline:
                raise errors[-1]
            time.sleep(min(2.0, max(0.05, deadline - time.monotonic())))

    # --- choosing a replica -------------------------------------------------------------------

    def _acquire(self, avoid: set[str], deadline: float) -> Replica:
        """The live replica with the fewest requests in flight (those in `avoid` only if nothing else
        lives); waits while every replica rests or the in-flight bound is reached."""
        with self._free:
            while True:
                now = time.monotonic()
                if sum(r.in_flight for r in self.replicas) < self.max_in_flight:
                    live = [r for r in self.replicas if r.down_until <= now]
                    fresh = [r for r in live if r.url not in avoid] or live
                    if fresh:
                        replica = min(fresh, key=lambda r: r.in_flight)
                        replica.in_flight += 1
                        return replica
                if now >= deadline:
                    raise ReplicaError(f"no completions server answered before the retry deadline; last states: "
                                       + ", ".join(f"{r.url} ({r.failures} failures)" for r in self.replicas))
                wake = min([r.down_until for r in self.replicas if r.down_until > now] + [now + 1.0])
                self._free.wait(max(0.01, min(wake, deadline) - now))

    def _release(self, replica: Replica, failed: bool) -> None:
        with self._free:
            replica.in_flight -= 1
            if failed:
                replica.failures += 1
                replica.down_until = time.monotonic() + self.cooldown
            self._free.notify_all()

    def _catch_up(self, replica: Replica) -> None:
        """A replica that missed a weight reload while it was down reloads before it serves."""
        checkpoint = self.checkpoint
        if replica.checkpoint != checkpoint:
            self._reload(replica, checkpoint)

    def _reload(self, replica: Replica, path: str) -> None:
        self._call(replica, "POST", "/collective_rpc", {"method": "reload_weights",
                                                        "kwargs": {"weights_path": str(path)}})
        self._call(replica, "POST", "/reset_prefix_cache")
        replica.checkpoint = str(path)

    def _request(self, body: dict) -> dict:
        """POST /v1/completions on some replica, again on another when one fails (up to `retries`)."""
        tried: set[str] = set()
        # A request may wait for a resting replica for at most the cooldown after its last failure.
        deadline = float("inf")
        for attempt in range(self.retries + 1):
            replica = self._acquire(tried, deadline)
            try:
                self._catch_up(replica)
                result = self._call(replica, "POST", "/v1/completions", body)
            except ReplicaError as e:
                self._release(replica, failed=True)
                tried.add(replica.url)
                deadline = time.monotonic() + self.cooldown + 1.0
                if attempt == self.retries:
                    raise
                with self._lock:
                    self.retried += 1
                log.warning("%s; sending the request again (%d/%d)", e, attempt + 1, self.retries)
                continue
            except BaseException:
                self._release(replica, failed=False)
                raise
            self._release(replica, failed=False)
            return result
        raise AssertionError("unreachable")

    # --- the Engine interface -----------------------------------------------------------------

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Generation]:
        encoded = [self._tokenizer(p)["input_ids"] for p in prompts]
        base = {"model": self.served_model, "n": params.n, "temperature": params.temperature,
                "top_p": params.top_p, "max_tokens": params.max_tokens, "seed": params.seed, "logprobs": 0,
                "return_tokens_as_token_ids": True, "stop_token_ids": self.eos_ids}
        futures = [self._pool.submit(self._request, {**base, "prompt": ids}) for ids in encoded]
        try:
            replies = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        generations = []
        for ids, reply in zip(encoded, replies):
            choices = sorted(reply["choices"], key=lambda c: c["index"])
            if len(choices) != params.n:
                raise RuntimeError(f"asked for {params.n} completions of one prompt, got {len(choices)}")
            generations.append(Generation(ids, [self._sample(c) for c in choices]))
        return generations

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
        """Reload every live replica's weights in place from `path` (a directory on the servers' machines).
        A replica that fails now reloads before its next request; if none reloads, the old weights stay."""
        loaded, errors = 0, []
        for replica in self.replicas:
            try:
                self._reload(replica, path)
                loaded += 1
            except ReplicaError as e:
                errors.append(str(e))
                with self._lock:
                    replica.failures += 1
                    replica.down_until = time.monotonic() + self.cooldown
        if not loaded:
            raise ConnectionError(f"no completions server reloaded {path}: " + "; ".join(errors))
        self.checkpoint = str(path)
