"""The teacher service: a frontier teacher on its own nodes, scoring token sequences over HTTP.

HTTP API (JSON bodies; every request carries `Authorization: Bearer TOKEN` when a token is set):

    GET  /health     {"status", "engine", "model", "vocab_size", "tokenizer", "max_k", "max_tokens", "pending"}
    GET  /metrics    Prometheus text: sequences and tokens scored, engine seconds, batches, busy refusals
    POST /score      {"sequences": [{"tokens": [ids], "start": S}, ...], "k": K}
                     -> {"model", "vocab_size", "k", "results": [{"ids", "logprobs", "token_logprobs"}, ...]}

`start` is the index of the first response token; each result covers tokens[start:] (see
nemo_paced.teacher.engines for what the numbers are). Requests are validated before they queue: a bad
token id, start, k or length is a 422 naming the sequence and position. Queued requests are merged into
engine calls of at most `batch_tokens` tokens by one worker thread (the engine serves one call at a
time); at most `max_pending` requests wait, and one more is refused with 503 and Retry-After, which
the client retries, so a burst of trainers backs off instead of piling up memory on the service.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

from pydantic import Field

from nemo_paced.serving import RequestError, Strict
from nemo_paced.teacher.engines import Scorer, TopK, tokenizer_fingerprint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherServiceConfig:
    """The bounds every request is held to."""

    max_k: int = 256  # largest k a request may ask for
    max_tokens: int = 32768  # longest sequence (prompt + response), in tokens
    max_sequences: int = 512  # most sequences per request
    batch_tokens: int = 65536  # most tokens per engine call when merging queued requests
    max_pending: int = 16  # requests waiting for the engine; one more gets 503
    max_request_bytes: int = 64 << 20
    token: str | None = None  # bearer token; None accepts unauthenticated requests (loopback only)

    def __post_init__(self) -> None:
        for name in ("max_k", "max_tokens", "max_sequences", "batch_tokens", "max_pending", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class _Pending:
    sequences: list[list[int]]
    starts: list[int]
    k: int
    future: Future

    @property
    def tokens(self) -> int:
        return sum(map(len, self.sequences))


class TeacherService:
    """The scorer, a bounded request queue and the worker that batches it; `create_app` adds HTTP."""

    def __init__(self, scorer: Scorer, config: TeacherServiceConfig = TeacherServiceConfig()) -> None:
        self.scorer, self.config = scorer, config
        self.fingerprint = tokenizer_fingerprint(scorer.tokenizer)
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._slots = threading.BoundedSemaphore(config.max_pending)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.started = time.time()
        self.sequences = self.tokens = self.batches = self.busy = self.requests = 0
        self.engine_seconds = 0.0

    def start(self) -> None:
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="teacher-scoring", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join()

    # --- requests -------------------------------------------------------------------------------

    def check(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> None:
        """RequestError naming the first thing out of bounds."""
        limit = min(self.config.max_k, self.scorer.vocab_size)
        if not 1 <= k <= limit:
            raise RequestError("k", f"must lie in 1..{limit} (the service's --max-k and the teacher's vocabulary), "
                                  f"got {k}")
        if not sequences:
            raise RequestError("sequences", "must hold at least one sequence")
        if len(sequences) > self.config.max_sequences:
            raise RequestError("sequences", f"at most {self.config.max_sequences} per request (the service's "
                                          f"--max-sequences), got {len(sequences)}")
        vocab = self.scorer.vocab_size
        for i, (tokens, start) in enumerate(zip(sequences, starts)):
            if len(tokens) > self.config.max_tokens:
                raise RequestError(f"sequences[{i}].tokens", f"{len(tokens)} tokens, over the service's --max-tokens "
                                                           f"{self.config.max_tokens}")
            if self.scorer.max_tokens is not None and len(tokens) > self.scorer.max_tokens:
                raise RequestError(f"sequences[{i}].tokens",
                                   f"{len(tokens)} tokens, over the {self.scorer.max_tokens} the {self.scorer.name} "
                                   "engine can score (its max_model_len, less the one token it must generate)")
            if not 1 <= start < len(tokens):
                raise RequestError(f"sequences[{i}].start", f"must lie in 1..{len(tokens) - 1} (a prompt token before "
                                                          f"the response and a response token), got {start}")
            bad = next((t for t, token in enumerate(tokens) if not 0 <= token < vocab), None)
            if bad is not None:
                raise RequestError(f"sequences[{i}].tokens[{bad}]",
                                 f"token id {tokens[bad]} is outside the teacher's vocabulary 0..{vocab - 1}")

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[TopK]:
        """Top-k teacher log-probs for every response token; blocks until the worker has scored them."""
        self.check(sequences, starts, k)
        if not self._slots.acquire(blocking=False):
            with self._lock:
                self.busy += 1
            raise RequestError("sequences", f"the teacher is busy ({self.config.max_pending} requests waiting); "
                                          "retry later", status=503)
        try:
            pending = _Pending([list(s) for s in sequences], list(starts), k, Future())
            self._queue.put(pending)
            return pending.future.result()
        finally:
            self._slots.release()

    # --- the worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        held: _Pending | None = None
        while not self._stop.is_set():
            try:
                first = held or self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch, budget, held = [first], self.config.batch_tokens - first.tokens, None
            while True:  # merge whatever else is waiting, up to the token budget
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt.tokens > budget:
                    held = nxt
                    break
                batch.append(nxt)
                budget -= nxt.tokens
            self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        k = max(p.k for p in batch)
        sequences = [s for p in batch for s in p.sequences]
        starts = [s for p in batch for s in p.starts]
        begin = time.perf_counter()
        try:
            results = self.scorer.score(sequences, starts, k)
        except Exception as e:  # noqa: BLE001 - reported to every request in the batch; the service keeps serving
            log.exception("scoring a batch of %d sequences failed", len(sequences))
            for p in batch:
                p.future.set_exception(e)
            return
        elapsed = time.perf_counter() - begin
        with self._lock:
            self.engine_seconds += elapsed
            self.batches += 1
            self.sequences += len(sequences)
            self.tokens += sum(len(s) - start for s, start in zip(sequences, starts))
        offset = 0
        for p in batch:
            mine = results[offset:offset + len(p.sequences)]
            offset += len(p.sequences)
            p.future.set_result([TopK(r.ids[:, :p.k], r.logprobs[:, :p.k], r.token_logprobs) for r in mine])

    # --- status ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "engine": self.scorer.name, "model": self.scorer.model,
                "vocab_size": self.scorer.vocab_size, "tokenizer": self.fingerprint, "max_k": self.config.max_k,
                "max_tokens": min(self.config.max_tokens, self.scorer.max_tokens or self.config.max_tokens),
                "max_sequences": self.config.max_sequences,
                "max_request_bytes": self.config.max_request_bytes,
                "pending": self._queue.qsize()}

    def metrics(self) -> str:
        with self._lock:
            values = [
                ("teacher_sequences_total", "counter", "sequences scored", self.sequences),
                ("teacher_tokens_total", "counter", "response tokens scored", self.tokens),
                ("teacher_batches_total", "counter", "engine calls", self.batches),
                ("teacher_engine_seconds_total", "counter", "seconds the engine spent scoring", self.engine_seconds),
                ("teacher_busy_total", "counter", "requests refused with 503 because the queue was full", self.busy),
                ("teacher_pending", "gauge", "requests waiting for the engine", self._queue.qsize()),
                ("requests_total", "counter", "HTTP requests received", self.requests),
                ("uptime_seconds", "gauge", "seconds since the service started", time.time() - self.started),
            ]
        lines = []
        for name, kind, help_text, value in values:
            lines += [f"# HELP nemo_paced_{name} {help_text}", f"# TYPE nemo_paced_{name} {kind}",
                      f"nemo_paced_{name} {value}"]
        return "\n".join(lines) + "\n"


# --- HTTP ---------------------------------------------------------------------------------------


class SequenceIn(Strict):
    tokens: list[int] = Field(min_length=2)
    start: int


class ScoreRequest(Strict):
    sequences: list[SequenceIn] = Field(min_length=1)
    k: int


def create_app(service: TeacherService, on_shutdown=None):
    """The ASGI app: the shared service API (nemo_paced.serving) with POST /score; its lifespan runs
    the worker, then `on_shutdown` (release the engine there)."""
    from nemo_paced.serving import create_service_api

    app, guarded = create_service_api("nemo-paced teacher service", service, on_shutdown)

    @app.post("/score")
    def score(request: ScoreRequest):
        sequences = [s.tokens for s in request.sequences]
        results = service.score(sequences, [s.start for s in request.sequences], request.k)
        return {"model": service.scorer.model, "vocab_size": service.scorer.vocab_size, "k": request.k,
                "results": [r.to_json() for r in results]}

    return guarded
