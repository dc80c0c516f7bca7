"""The rollout service: one engine holding the student's current weights, serving pass-rate
estimation, on-policy samples and weight reloads over HTTP.

HTTP API (JSON bodies; every request carries `Authorization: Bearer TOKEN` when a token is set):

    GET  /health                 engine, checkpoint, step, table version, queue length
    GET  /metrics                Prometheus text: rollouts, rollouts/s, queue length, table version
    POST /estimate               {"ids": [...] | null (all), "k": K | null}  ->  {"job_id", "total", ...}
    GET  /jobs/{job_id}          {"status": queued|running|done|failed, "done", "total", "error", ...}
    GET  /table?since=V          {"header", "version", "records": [records updated after version V]}
    POST /sample                 {"ids", "n", "temperature", "top_p", "max_tokens", "seed", "fold"}
                                 -> {"checkpoint", "step", "table_version", "problems": [ProblemRollouts rows]}
    POST /weights                {"path": DIR, "step": S | null}  ->  {"checkpoint", "step"}

Estimation jobs run one at a time on a worker thread, a batch of problems per engine call; after
every batch the results are folded into the `PassRateTable` and the table is saved atomically, then
the job's progress is saved, so a crash loses at most the batch in flight and a restart resumes the
table, the loaded checkpoint and the unfinished jobs (temp files a crash left mid-save are removed at
start). `service.json` holds only the unfinished jobs; a finished job is appended once to
`jobs.jsonl`, of which the newest `max_history` are kept. On-policy samples are graded too; their
scores are pooled per problem until K have arrived and then folded in as one K-trial estimate, so a
single sample never overwrites an estimate from K rollouts. The pool holds scores of the weights
being served only: a weight reload drops it (and scores of samples drawn before the reload), so
evidence of one checkpoint is never recorded under another, nor carried from one training run into
the next (a pool not yet full is also lost on restart). A /sample or /weights request waits at most
one estimation batch for the engine.

`/weights` loads any directory unless `weights_roots` names the directories it may load from; any
other path gets one message, whether or not it exists.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from fastapi import Query
from pydantic import Field, field_validator

from nemo_paced.atomic import atomic_write_json, atomic_write_text, remove_stale_temps
from nemo_paced.passrates import Outcome, PassRateTable, UpdateMode
from nemo_paced.problems import Problem
from nemo_paced.rollout import adaptive
from nemo_paced.rollout.adaptive import AdaptiveConfig
from nemo_paced.rollout.engines.base import MIN_TEMPERATURE, SEED_RANGE, Engine, SamplingParams
from nemo_paced.rollout.estimate import ProblemRollouts, batched, rollout
from nemo_paced.rollout.verifiers import Verifier
from nemo_paced.serving import RequestError, Strict, bind_socket, create_service_api

__all__ = ["RolloutService", "ServiceConfig", "RequestError", "bind_socket", "create_app"]

log = logging.getLogger(__name__)

TABLE_FILE = "passrates.jsonl"
STATE_FILE = "service.json"
HISTORY_FILE = "jobs.jsonl"


@dataclass(frozen=True)
class ServiceConfig:
    """Sampling defaults and the bounds every request is held to."""

    k: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    template: str = "plain"
    batch_problems: int = 16  # problems per engine call in estimation jobs
    seed: int | None = None
    update_mode: str = "replace"
    decay: float = 0.5
    max_k: int = 64  # largest K (estimation) or n (sampling) a request may ask for
    max_batch: int = 1024  # most problems per /sample request
    max_request_bytes: int = 4 << 20
    token: str | None = None  # bearer token; None accepts unauthenticated requests (loopback only)
    adaptive: AdaptiveConfig | None = None  # estimation jobs: sequential K and re-checks (rollout/adaptive.py)
    weights_roots: tuple[str, ...] = ()  # directories /weights may load from (resolved); () = anywhere
    max_history: int = 1000  # finished jobs kept (in memory and in jobs.jsonl)

    def __post_init__(self) -> None:
        UpdateMode(self.update_mode)
        SamplingParams(self.k, self.temperature, self.top_p, self.max_tokens, self.seed)
        object.__setattr__(self, "weights_roots", tuple(os.path.realpath(r) for r in self.weights_roots))
        for root in self.weights_roots:
            if not os.path.isdir(root):
                raise ValueError(f"weights root {root} is not a directory")
        for name in ("batch_problems", "max_k", "max_batch", "max_request_bytes", "max_history"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.k > self.max_k:
            raise ValueError(f"k ({self.k}) must not exceed max_k ({self.max_k})")


@dataclass
class Job:
    id: str
    ids: list[str]  # the problems still to estimate are ids[done:]; emptied when the job ends
    k: int
    total: int = 0
    done: int = 0
    status: str = "queued"  # queued | running | done | failed
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    checkpoints: list[str] = field(default_factory=list)  # weights that produced its estimates
    table_version: int | None = None  # table version after its last batch
    rollouts: int = 0  # rollouts spent on its estimates
    left_out: int = 0  # problems an adaptive job left with their current estimate

    @property
    def saved(self) -> int:
        """Rollouts saved against K for every problem asked for."""
        return (self.total + self.left_out) * self.k - self.rollouts if self.status == "done" else 0

    def view(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("ids")
        return {"job_id": row.pop("id"), **row, "saved": self.saved}


class RolloutService:
    """Engine, problems, table and jobs; `create_app` puts HTTP in front of it."""

    def __init__(self, engine: Engine, problems: Sequence[Problem], verifier: Verifier, state_dir: str | Path,
                 config: ServiceConfig = ServiceConfig()) -> None:
        self.engine, self.verifier, self.config = engine, verifier, config
        self.problems = {p.id: p for p in problems}
        self.state_dir = Path(state_dir)
        self.table_path = self.state_dir / TABLE_FILE
        self.state_path = self.state_dir / STATE_FILE
        self.history_path = self.state_dir / HISTORY_FILE
        stale = [p for path in (self.table_path, self.state_path, self.history_path) for p in remove_stale_temps(path)]
        if stale:
            log.info("removed %d temp file(s) left by an interrupted save: %s", len(stale),
                     ", ".join(p.name for p in stale))
        self.table = (PassRateTable.load(self.table_path) if self.table_path.exists()
                      else PassRateTable(config.update_mode, config.decay))
        if (self.table.update_mode.value, self.table.decay) != (config.update_mode, config.decay):
            log.warning("%s keeps update mode %s (decay %g), not the configured %s (decay %g)", self.table_path,
                        self.table.update_mode.value, self.table.decay, config.update_mode, config.decay)
        self.step: int | None = None
        self.jobs: dict[str, Job] = {}  # unfinished jobs, then the newest max_history finished ones
        self._history_lines = 0  # lines in jobs.jsonl; compacted to max_history when twice that
        self._queue: queue.Queue[str] = queue.Queue()
        self._pool: dict[str, list[int]] = {}  # on-policy scores not yet folded: id -> [successes, trials]
        self._pool_weights: tuple[int, str, int | None] | None = None  # (generation, checkpoint, step) pooled
        self._generation = 0  # weight loads so far: tells the weights that drew a sample apart
        # The engine serves one call at a time; reentrant so `sample` can read the generation and draw
        # under one hold. Lock order: _engine_lock before _lock.
        self._engine_lock = threading.RLock()
        self._lock = threading.Lock()  # table, jobs, pool, counters and the state files
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.started = time.time()
        self.rollouts = 0
        self.tokens = 0
        self.engine_seconds = 0.0
        self.requests = 0
        self._resume()

    # --- state on disk ------------------------------------------------------------------------

    def _resume(self) -> None:
        self._load_history()
        if not self.state_path.exists():
            return
        state = json.loads(self.state_path.read_text(encoding="utf-8"))
        checkpoint = state.get("checkpoint")
        if checkpoint and checkpoint != self.engine.checkpoint and Path(checkpoint).is_dir():
            log.info("resuming with the last loaded weights %s", checkpoint)
            self.engine.load_weights(checkpoint)
        if checkpoint == self.engine.checkpoint:
            self.step = state.get("step")
        else:
            log.warning("last loaded weights %s are gone; serving %s", checkpoint, self.engine.checkpoint)
        for row in state.get("jobs", []):
            job = Job(**row)
            if job.status in ("queued", "running"):
                job.status = "queued"
                self.jobs[job.id] = job
                self._queue.put(job.id)
            else:  # a finished job in a state file written before jobs.jsonl existed
                self._archive(job)
        resumed = sum(j.status == "queued" for j in self.jobs.values())
        log.info("resumed table version %d (%d problems) and %d unfinished jobs",
                 self.table.version, len(self.table), resumed)

    def _save_state(self) -> None:
        """Caller holds self._lock. Small whatever the history: the weights and the unfinished jobs."""
        atomic_write_json(self.state_path, {"checkpoint": self.engine.checkpoint, "step": self.step,
                                            "jobs": [asdict(j) for j in self.jobs.values() if not _finished(j)]})

    def _load_history(self) -> None:
        if not self.history_path.exists():
            return
        lines = self.history_path.read_text(encoding="utf-8").splitlines()
        self._history_lines = len(lines)
        first = max(0, len(lines) - self.config.max_history)
        for number, line in enumerate(lines[first:], start=first + 1):
            try:
                job = Job(**json.loads(line), ids=[])
            except (ValueError, TypeError) as e:  # a line cut short by a crash mid-append
                log.warning("%s:%d: skipped an unreadable job record: %s", self.history_path, number, e)
                continue
            self.jobs[job.id] = job
        self._trim_history()

    def _archive(self, job: Job) -> None:
        """Caller holds self._lock (or is the constructor). Append a finished job to jobs.jsonl once."""
        self.jobs[job.id] = job
        row = asdict(job)
        row.pop("ids")
        with open(self.history_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self._history_lines += 1
        self._trim_history()

    def _trim_history(self) -> None:
        """Drop finished jobs beyond max_history from memory; rewrite jobs.jsonl when it holds twice
        that, so appends stay amortised O(1) per job."""
        finished = [job_id for job_id, job in self.jobs.items() if _finished(job)]
        for job_id in finished[:max(0, len(finished) - self.config.max_history)]:
            del self.jobs[job_id]
        if self._history_lines > 2 * self.config.max_history:
            kept = [j for j in self.jobs.values() if _finished(j)]
            atomic_write_text(self.history_path, "".join(
                json.dumps({k: v for k, v in asdict(j).items() if k != "ids"}) + "\n" for j in kept))
            self._history_lines = len(kept)

    def _fold(self, outcomes: list[Outcome], checkpoint: str, step: int | None) -> int:
        """Caller holds self._lock. Update the table and save it before anyone can read the new version."""
        version = self.table.update(outcomes, checkpoint=checkpoint, step=step)
        self.table.save(self.table_path)
        return version

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="rollout-estimation", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.join()

    # --- operations ---------------------------------------------------------------------------

    def _problems(self, ids: Sequence[str], name: str = "ids") -> list[Problem]:
        unknown = [i for i in ids if i not in self.problems]
        if unknown:
            shown = ", ".join(repr(i) for i in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise RequestError(name, f"{len(unknown)} unknown problem id(s): {shown}")
        return [self.problems[i] for i in ids]

    def _k(self, value: int | None, name: str) -> int:
        value = self.config.k if value is None else value
        if not 1 <= value <= self.config.max_k:
            raise RequestError(name, f"must lie in 1..{self.config.max_k} (the service's --max-k), got {value}")
        return value

    def _rollout(self, problems: Sequence[Problem],
                 params: SamplingParams) -> tuple[list[ProblemRollouts], int | None]:
        """Graded samples and the training step of the weights that drew them."""
        with self._engine_lock:
            start = time.perf_counter()
            results = rollout(self.engine, problems, self.verifier, params, self.config.template)
            elapsed = time.perf_counter() - start
            step = self.step
        with self._lock:
            self.engine_seconds += elapsed
            self.rollouts += sum(r.trials for r in results)
            self.tokens += sum(len(s.token_ids) for r in results for s in r.samples)
        return results, step

    def submit(self, ids: Sequence[str] | None = None, k: int | None = None) -> Job:
        """Queue an estimation of `ids` (all problems when None) with K samples each."""
        ids = list(self.problems) if ids is None else list(dict.fromkeys(ids))
        if not ids:
            raise RequestError("ids", "must not be empty (omit it to estimate every problem)")
        self._problems(ids)
        with self._lock:
            left_out: list[str] = []
            if self.config.adaptive is not None:
                ids, left_out = adaptive.select(ids, self.table, self.config.adaptive, np.random.default_rng(
                    None if self.config.seed is None else [self.config.seed, self.table.version]))
            job = Job(uuid.uuid4().hex[:12], ids, self._k(k, "k"), total=len(ids), left_out=len(left_out))
            self.jobs[job.id] = job
            self._save_state()
        self._queue.put(job.id)
        return job

    def job(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self.jobs:
                raise RequestError("job_id", f"no job {job_id!r} among this service's unfinished jobs and its "
                                             f"{self.config.max_history} most recent finished ones", 404)
            return self.jobs[job_id]

    def queue_length(self) -> int:
        with self._lock:
            return self._unfinished()

    def _unfinished(self) -> int:
        """Caller holds self._lock."""
        return sum(not _finished(j) for j in self.jobs.values())

    def sample(self, ids: Sequence[str], n: int = 1, temperature: float | None = None, top_p: float | None = None,
               max_tokens: int | None = None, seed: int | None = None, fold: bool = True) -> dict[str, Any]:
        """On-policy samples for `ids` from the current weights, graded; scores pooled into the table."""
        if len(ids) > self.config.max_batch:
            raise RequestError("ids", f"at most {self.config.max_batch} problems per request, got {len(ids)}")
        if max_tokens is not None and max_tokens > self.config.max_tokens:
            raise RequestError("max_tokens", f"must not exceed {self.config.max_tokens} (the service's "
                                             f"--max-tokens), got {max_tokens}")
        if not ids:
            raise RequestError("ids", "must name at least one problem")
        problems = self._problems(ids)
        params = SamplingParams(self._k(n, "n"), self.config.temperature if temperature is None else temperature,
                                self.config.top_p if top_p is None else top_p,
                                self.config.max_tokens if max_tokens is None else max_tokens, seed)
        with self._engine_lock:
            generation = self._generation
            results, step = self._rollout(problems, params)
        with self._lock:
            if fold:
                self._pool_scores(results, (generation, results[0].checkpoint, step))
            return {"checkpoint": results[0].checkpoint, "step": step, "table_version": self.table.version,
                    "problems": [r.to_row() for r in results]}

    def _pool_scores(self, results: list[ProblemRollouts], weights: tuple[int, str, int | None]) -> None:
        """Caller holds self._lock. Pool scores drawn by `weights` (generation, checkpoint, step); scores
        from weights replaced since are dropped, so a pool never mixes two checkpoints."""
        if weights[0] != self._generation:
            log.info("dropped on-policy scores of %d problems: drawn by %s, replaced since", len(results), weights[1])
            return
        if weights != self._pool_weights:
            self._pool, self._pool_weights = {}, weights
        ready = []
        for r in results:
            pooled = self._pool.setdefault(r.problem_id, [0, 0])
            pooled[0] += r.successes
            pooled[1] += r.trials
            if pooled[1] >= self.config.k:
                ready.append(Outcome(r.problem_id, *self._pool.pop(r.problem_id)))
        if ready:
            self._fold(ready, weights[1], weights[2])

    def _check_root(self, path: str) -> None:
        """Refuse a path outside the weights roots with one message, whether or not it exists."""
        roots = self.config.weights_roots
        real = os.path.realpath(path)
        if roots and not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
            raise RequestError("path", "is not inside a directory this service loads weights from (--weights-root)")

    def load_weights(self, path: str, step: int | None = None) -> dict[str, Any]:
        self._check_root(path)
        if not Path(path).is_dir():
            raise RequestError("path", f"{path!r} is not a directory on the service's machine")
        with self._engine_lock:
            try:
                self.engine.load_weights(path)
            except (OSError, ValueError, RuntimeError) as e:
                raise RequestError("path", f"cannot load weights from {path!r}: {type(e).__name__}: {e}") from e
            self.step = step  # changes with the weights, under the same lock, so samples report the right step
            with self._lock:
                self._generation += 1
                if self._pool:
                    log.info("dropped the on-policy pool of %d problems: its weights were replaced", len(self._pool))
                self._pool, self._pool_weights = {}, None
                self._save_state()
        log.info("loaded weights %s (step %s)", path, step)
        return {"checkpoint": self.engine.checkpoint, "step": step}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "engine": self.engine.name, "checkpoint": self.engine.checkpoint, "step": self.step,
                "table_version": self.table.version, "problems": len(self.problems), "estimated": len(self.table),
                "queue": self.queue_length(), "k": self.config.k}

    def table_rows(self, since: int = 0) -> dict[str, Any]:
        with self._lock:
            # A reader ahead of us (the table was replaced under it) gets everything.
            since = 0 if since > self.table.version else since
            return {"header": self.table.header(), "version": self.table.version, "since": since,
                    "records": self.table.to_rows(since)}

    def metrics(self) -> str:
        with self._lock:
            rate = self.rollouts / self.engine_seconds if self.engine_seconds else 0.0
            values = [
                ("rollouts_total", "counter", "samples generated and graded", self.rollouts),
                ("generated_tokens_total", "counter", "tokens generated", self.tokens),
                ("engine_seconds_total", "counter", "seconds the engine spent generating", self.engine_seconds),
                ("rollouts_per_second", "gauge", "rollouts per second of engine time", rate),
                ("queue_length", "gauge", "estimation jobs queued or running", self._unfinished()),
                ("table_version", "gauge", "pass-rate table version", self.table.version),
                ("table_problems", "gauge", "problems with an estimate", len(self.table)),
                ("requests_total", "counter", "HTTP requests received", self.requests),
                ("uptime_seconds", "gauge", "seconds since the service started", time.time() - self.started),
            ]
        lines = []
        for name, kind, help_text, value in values:
            lines += [f"# HELP nemo_paced_{name} {help_text}", f"# TYPE nemo_paced_{name} {kind}",
                      f"nemo_paced_{name} {value}"]
        return "\n".join(lines) + "\n"

    # --- the estimation worker ----------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.jobs[self._queue.get(timeout=0.2)]
            except queue.Empty:
                continue
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - a failed job is reported, the service keeps serving
                log.exception("estimation job %s failed", job.id)
                with self._lock:
                    job.status, job.error, job.finished = "failed", f"{type(e).__name__}: {e}", time.time()
                    job.ids = []
                    self._archive(job)
                    self._save_state()

    def _run(self, job: Job) -> None:
        job.status = "running"
        params = SamplingParams(job.k, self.config.temperature, self.config.top_p, self.config.max_tokens,
                                self.config.seed)
        sequential = self.config.adaptive
        if sequential is not None:
            with self._lock:
                prior = adaptive.table_prior(self.table, sequential)

            def draw(ids, n, round_):
                seed = None if params.seed is None else params.seed + round_  # fresh samples every round
                return self._rollout([self.problems[i] for i in ids], replace(params, n=n, seed=seed))
        for ids in batched(job.ids[job.done:], self.config.batch_problems):
            if self._stop.is_set():
                return  # stays "running"; queued again on restart
            if sequential is None:
                results, step = self._rollout([self.problems[i] for i in ids], params)
                outcomes, checkpoint = [r.outcome() for r in results], results[0].checkpoint
            else:
                outcomes, checkpoint, step = adaptive.estimate_batch(ids, draw, sequential, prior)
            with self._lock:
                job.table_version = self._fold(outcomes, checkpoint, step)
                job.rollouts += sum(o.trials for o in outcomes)
                job.done += len(ids)
                if checkpoint not in job.checkpoints:
                    job.checkpoints.append(checkpoint)
                self._save_state()
        with self._lock:
            job.status, job.finished, job.ids = "done", time.time(), []
            self._archive(job)
            self._save_state()


def _finished(job: Job) -> bool:
    return job.status in ("done", "failed")


# --- HTTP ---------------------------------------------------------------------------------------


class EstimateRequest(Strict):
    ids: list[str] | None = None
    k: int | None = None


class SampleRequest(Strict):
    ids: list[str] = Field(min_length=1)
    n: int = 1
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    fold: bool = True

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}: below it logits / temperature "
                             f"overflow, got {value}")
        return value


class WeightsRequest(Strict):
    path: str = Field(min_length=1)
    step: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value


def create_app(service: RolloutService, on_shutdown: Callable[[], None] | None = None):
    """The ASGI app: the shared service API (nemo_paced.serving) with the rollout routes; its lifespan
    runs the estimation worker, then `on_shutdown` (release the engine there)."""
    app, guarded = create_service_api("nemo-paced rollout service", service, on_shutdown)

    @app.post("/estimate")
    def estimate(request: EstimateRequest):
        return service.submit(request.ids, request.k).view()

    @app.get("/jobs/{job_id}")
    def job(job_id: str):
        return service.job(job_id).view()

    @app.get("/table")
    def table(since: int = Query(0, ge=0)):
        return service.table_rows(since)

    @app.post("/sample")
    def sample(request: SampleRequest):
        return service.sample(**request.model_dump())

    @app.post("/weights")
    def weights(request: WeightsRequest):
        return service.load_weights(request.path, request.step)

    return guarded
