"""`RolloutClient`: what trainers, callbacks and the SLURM chain use to talk to the rollout service.

    client = RolloutClient.connect("runs/x/rollout.json")   # an address file, or "http://host:port"
    client.load_weights("ckpt/step-200", step=200)          # new student weights, then
    client.wait(client.estimate())                          # re-estimate every problem
    table = client.refresh_table()                          # the service's table, merged locally
    batch = client.sample(["p1", "p7"], n=1)                # on-policy rollouts for reverse KL

Calls time out, and connection failures and 502/503/504 answers are retried with exponential backoff
before `ServiceUnavailable` says which address could not be reached. A client made from an address
file re-reads it when a connection fails, so it follows a service restarted on another port, and
`wait` rides out outages of up to `patience` seconds. The client keeps a local copy
of the pass-rate table: `refresh_table` fetches only the records changed since the version it holds
and, when the service is down, returns the last good copy and logs how stale it is (`staleness()`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from nemo_paced.passrates import PassRateTable
from nemo_paced.rollout import TOKEN_ENV
from nemo_paced.rollout.estimate import ProblemRollouts
from nemo_paced.service_client import RequestRejected, ServiceClient, ServiceUnavailable

log = logging.getLogger(__name__)
__all__ = ["JobFailed", "OnPolicyBatch", "RequestRejected", "RolloutClient", "ServiceUnavailable"]


class JobFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class OnPolicyBatch:
    """Samples from one /sample call: `checkpoint` and `step` name the weights that produced them."""

    checkpoint: str
    step: int | None
    table_version: int
    problems: list[ProblemRollouts]


class RolloutClient(ServiceClient):
    service_name = "rollout service"
    token_env = TOKEN_ENV

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, sample_timeout: float = 3600.0,
                 retries: int = 4, backoff: float = 0.5, address_file: str | Path | None = None) -> None:
        """`timeout` bounds quick calls; `sample_timeout` bounds /sample (generation) and /weights."""
        super().__init__(url, token, timeout=timeout, retries=retries, backoff=backoff, address_file=address_file)
        self.sample_timeout = sample_timeout
        self.table = PassRateTable()
        self.last_refresh: float | None = None

    # --- API ----------------------------------------------------------------------------------

    def estimate(self, ids: Sequence[str] | None = None, k: int | None = None) -> str:
        """Queue an estimation of `ids` (None: every problem) at the current weights; returns the job id."""
        body = {"ids": None if ids is None else list(ids), "k": k}
        return self._call("POST", "/estimate", json_body=body, retry_sent=False).json()["job_id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/jobs/{job_id}").json()

    def wait(self, job_id: str, poll: float = 1.0, timeout: float | None = None, progress=None,
             patience: float = 600.0) -> dict[str, Any]:
        """Block until the job is done and return its final status; raises JobFailed or TimeoutError.
        The service persists its jobs, so a restart does not lose this one: an outage of up to
        `patience` seconds is waited out (then ServiceUnavailable)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        down_since = None
        while True:
            try:
                status = self.job(job_id)
                down_since = None
            except ServiceUnavailable:
                down_since = time.monotonic() if down_since is None else down_since
                if time.monotonic() - down_since > patience:
                    raise
                time.sleep(poll)
                continue
            if progress is not None:
                progress(status)
            if status["status"] == "done":
                return status
            if status["status"] == "failed":
                raise JobFailed(f"estimation job {job_id} failed: {status['error']}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"estimation job {job_id} not done after {timeout} s: "
                                   f"{status['done']}/{status['total']} problems")
            time.sleep(poll)

    def table_since(self, version: int = 0) -> tuple[int, list]:
        """(service table version, records updated after `version`) without touching the local copy."""
        payload = self._call("GET", "/table", params={"since": version}).json()
        records = [PassRateTable.record_from_row(row, f"record {i} from {self.url}")
                   for i, row in enumerate(payload["records"])]
        return payload["version"], records

    def refresh_table(self) -> PassRateTable:
        """Bring the local table up to date; on failure keep the last good copy and log its staleness."""
        try:
            version, records = self.table_since(self.table.version)
        except ServiceUnavailable as e:
            log.warning("rollout service unreachable, keeping pass-rate table version %d (%s old): %s",
                        self.table.version, _age(self.staleness()), e)
            return self.table
        if version < self.table.version:  # the service's table was replaced: start over
            self.table = PassRateTable()
            version, records = self.table_since(0)
        self.table.merge(records, version)
        self.last_refresh = time.time()
        return self.table

    def staleness(self) -> float:
        """Seconds since the local table was last refreshed from the service (inf: never)."""
        return float("inf") if self.last_refresh is None else time.time() - self.last_refresh

    def sample(self, ids: Sequence[str], n: int = 1, *, temperature: float | None = None,
               top_p: float | None = None, max_tokens: int | None = None, seed: int | None = None,
               fold: bool = True) -> OnPolicyBatch:
        """n on-policy samples per problem from the current weights, with token ids, log-probs
        (the model's own, see `engines.base.Sample`) and verifier scores; `fold` pools the scores
        into the pass-rate table. Unset sampling settings take the service's defaults."""
        body = {"ids": list(ids), "n": n, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens,
                "seed": seed, "fold": fold}
        payload = self._call("POST", "/sample", json_body=body, timeout=self.sample_timeout,
                             retry_sent=not fold).json()
        return OnPolicyBatch(payload["checkpoint"], payload["step"], payload["table_version"],
                             [ProblemRollouts.from_row(row) for row in payload["problems"]])

    def load_weights(self, path: str | Path, step: int | None = None) -> dict[str, Any]:
        """Load a checkpoint directory (a path on the service's machine, Hugging Face format)."""
        return self._call("POST", "/weights", json_body={"path": str(path), "step": step},
                          timeout=self.sample_timeout).json()


def _age(seconds: float) -> str:
    return "never refreshed" if seconds == float("inf") else f"{seconds:.0f} s"
