"""The rollout service on loopback for the demo: the real HTTP service, run in a thread of this process."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

from nemo_paced.problems import Problem


@contextlib.contextmanager
def loopback_service(model: str, problems: Sequence[Problem], state_dir: str | Path, *, k: int = 8,
                     max_tokens: int = 64, batch_problems: int = 128, engine_batch: int = 1024,
                     verifier: str = "exact", seed: int | None = 0) -> Iterator[str]:
    """Serve `problems` with the hf engine on 127.0.0.1 (a free port); yields the service URL.
    `seed` makes estimation reproducible for given weights (None: fresh randomness)."""
    import uvicorn

    from nemo_paced.rollout.engines.hf import HFEngine
    from nemo_paced.rollout.service import RolloutService, ServiceConfig, bind_socket, create_app
    from nemo_paced.rollout.verifiers import resolve

    config = ServiceConfig(k=k, max_tokens=max_tokens, template="raw", batch_problems=batch_problems,
                           max_batch=4096, seed=seed)
    service = RolloutService(HFEngine(model, device="cpu", batch_size=engine_batch), problems, resolve(verifier),
                             state_dir, config)
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
