"""The rollout service on loopback for the demo: the real HTTP service, run in a thread of this process.

Every call starts from a fresh state directory (anything left there by an earlier run is removed),
so no table, job or pooled on-policy score crosses from one run into the next. `Usage` counts what
the student generated, split by purpose (estimation jobs, on-policy samples, evaluation) and by the
training step of the weights that drew it, for the demo's compute accounting.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from nemo_paced.problems import Problem

KINDS = ("estimate", "onpolicy", "eval")


class Usage:
    """Student rollouts counted by (kind, weights step): samples, prompt tokens, generated tokens."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, int | None], collections.Counter[str]] = collections.defaultdict(
            collections.Counter)

    def add(self, kind: str, step: int | None, samples: int, prompt_tokens: int, generated_tokens: int) -> None:
        with self._lock:
            counter = self.counts[(kind, step)]
            counter.update(samples=samples, prompt_tokens=prompt_tokens, generated_tokens=generated_tokens)

    def total(self, kind: str, before_step: int | None = None) -> dict[str, int]:
        """Totals of one kind; with `before_step`, only from weights of earlier steps (start = step None)."""
        out: collections.Counter[str] = collections.Counter()
        with self._lock:
            for (k, step), counter in self.counts.items():
                if k == kind and (before_step is None or step is None or step < before_step):
                    out.update(counter)
        return {name: int(out[name]) for name in ("samples", "prompt_tokens", "generated_tokens")}


@contextlib.contextmanager
def loopback_service(model: str, problems: Sequence[Problem], state_dir: str | Path, *, k: int = 8,
                     max_tokens: int = 64, batch_problems: int = 128, engine_batch: int = 1024,
                     verifier: str = "exact", seed: int | None = 0, usage: Usage | None = None,
                     snapshots: dict[int, Path] | None = None) -> Iterator[str]:
    """Serve `problems` with the hf engine on 127.0.0.1 (a free port) from an emptied `state_dir`;
    yields the service URL. `seed` makes estimation reproducible for given weights (None: fresh
    randomness). `usage` receives the rollout counts; `snapshots` {step: dir} keeps a copy of the
    weights the service is given at those training steps (they are pruned by the trainer)."""
    import uvicorn

    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.rollout.service import ServiceConfig, bind_socket, create_app
    from nemo_paced.rollout.verifiers import resolve

    state_dir = Path(state_dir)
    shutil.rmtree(state_dir, ignore_errors=True)  # a fresh service: nothing resumed from an earlier run
    config = ServiceConfig(k=k, max_tokens=max_tokens, template="raw", batch_problems=batch_problems,
                           max_batch=4096, seed=seed)
    service = _service_class()(HFEngine(model, device="cpu", batch_size=engine_batch), problems, resolve(verifier),
                               state_dir, config)
    service.usage, service.snapshots = usage, dict(snapshots or {})
    sock = bind_socket("127.0.0.1", 0)  # TCP_NODELAY-capable: no ~40 ms delayed-ACK wait per request
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="rollout-service")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the loopback rollout service did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _service_class():
    """The rollout service with the demo's accounting and weight snapshots (defined lazily: the
    service module imports the web stack)."""
    from nemo_paced.rollout.service import RolloutService

    class CountingService(RolloutService):
        usage: Usage | None = None
        snapshots: dict[int, Path] = {}
        _kind = threading.local()

        def sample(self, ids, *args, fold: bool = True, **kwargs) -> dict[str, Any]:
            self._kind.value = "onpolicy" if fold else "eval"
            try:
                return super().sample(ids, *args, fold=fold, **kwargs)
            finally:
                self._kind.value = None

        def _rollout(self, problems, params):
            results, step = super()._rollout(problems, params)
            if self.usage is not None:
                self.usage.add(getattr(self._kind, "value", None) or "estimate", step,
                               sum(r.trials for r in results),
                               sum(len(r.prompt_token_ids) * r.trials for r in results),
                               sum(len(s.token_ids) for r in results for s in r.samples))
            return results, step

        def load_weights(self, path: str, step: int | None = None) -> dict[str, Any]:
            if step in self.snapshots:
                shutil.copytree(path, self.snapshots[step], dirs_exist_ok=True)
            return super().load_weights(path, step)

    return CountingService
