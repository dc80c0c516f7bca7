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

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import httpx

from nemo_paced.passrates import PassRateTable
from nemo_paced.rollout import TOKEN_ENV
from nemo_paced.rollout.estimate import ProblemRollouts

log = logging.getLogger(__name__)
RETRY_STATUS = {502, 503, 504}


class ServiceUnavailable(ConnectionError):
    """The service could not be reached (after retries) or answered with a server error."""


class RequestRejected(ValueError):
    """The service refused a request (4xx); the message carries its explanation, naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JobFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class OnPolicyBatch:
    """Samples from one /sample call: `checkpoint` and `step` name the weights that produced them."""

    checkpoint: str
    step: int | None
    table_version: int
    problems: list[ProblemRollouts]


def read_address(path: str | Path) -> tuple[str, str | None]:
    """(url, token) from an address file written by `nemo-paced serve-rollouts --address-file`."""
    address = json.loads(Path(path).read_text(encoding="utf-8"))
    token = None
    if address.get("token_file"):
        token = Path(address["token_file"]).read_text(encoding="utf-8").strip()
    elif address.get("token_env"):
        token = os.environ.get(address["token_env"])
        if token is None:
            raise ValueError(f"{path}: the service wants a token from ${address['token_env']}, which is not set")
    return address["url"], token


class RolloutClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, sample_timeout: float = 3600.0,
                 retries: int = 4, backoff: float = 0.5, address_file: str | Path | None = None) -> None:
        """`timeout` bounds quick calls; `sample_timeout` bounds /sample (generation) and /weights."""
        self.timeout, self.sample_timeout = timeout, sample_timeout
        self.retries, self.backoff = retries, backoff
        self.address_file = address_file
        self._open(url, token)
        self.table = PassRateTable()
        self.last_refresh: float | None = None

    def _open(self, url: str, token: str | None) -> None:
        self.url, self._token = url.rstrip("/"), token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)

    def _follow_address(self) -> None:
        """After a refused connection: if the address file now names another URL, switch to it."""
        if self.address_file is None:
            return
        try:
            url, token = read_address(self.address_file)
        except (OSError, ValueError, KeyError):
            return  # not rewritten yet
        if url.rstrip("/") != self.url:
            log.info("rollout service moved from %s to %s", self.url, url)
            self._http.close()
            self._open(url, token or self._token)

    @classmethod
    def connect(cls, service: str | Path, token: str | None = None, **options: Any) -> "RolloutClient":
        """From a URL or an address file; the token defaults to the address file's, then $NEMO_PACED_ROLLOUT_TOKEN."""
        if str(service).startswith(("http://", "https://")):
            return cls(str(service), token or os.environ.get(TOKEN_ENV), **options)
        url, file_token = read_address(service)
        return cls(url, token or file_token or os.environ.get(TOKEN_ENV), address_file=service, **options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- transport ----------------------------------------------------------------------------

    def _call(self, method: str, path: str, *, json_body: Any = None, params: dict | None = None,
              timeout: float | None = None, retry_sent: bool = True) -> httpx.Response:
        """One request with retries. A request that may have reached the service is retried only when
        `retry_sent` (it is idempotent); a refused connection is always retried."""
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                response = self._http.request(method, path, json=json_body, params=params,
                                              timeout=timeout or self.timeout)
            except httpx.ConnectError as e:
                error = e
                self._follow_address()
                continue
            except httpx.TransportError as e:
                error = e
                if retry_sent:
                    continue
                break
            if response.status_code in RETRY_STATUS and retry_sent:
                error = ServiceUnavailable(f"{method} {path}: HTTP {response.status_code}")
                continue
            if response.status_code >= 500:
                raise ServiceUnavailable(f"rollout service at {self.url}: {method} {path} failed with HTTP "
                                         f"{response.status_code}: {_detail(response)}")
            if response.status_code >= 400:
                raise RequestRejected(response.status_code, f"rollout service at {self.url} refused {method} {path} "
                                                            f"(HTTP {response.status_code}): {_detail(response)}")
            return response
        raise ServiceUnavailable(f"cannot reach the rollout service at {self.url} ({method} {path}, "
                                 f"{attempt + 1} attempt(s)): {type(error).__name__}: {error}")

    # --- API ----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health").json()

    def metrics(self) -> str:
        return self._call("GET", "/metrics").text

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


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):  # FastAPI validation errors: name each field
        return "; ".join(f"field '{'.'.join(str(p) for p in d.get('loc', [])[1:])}': {d.get('msg')}" for d in detail)
    return str(detail)


def _age(seconds: float) -> str:
    return "never refreshed" if seconds == float("inf") else f"{seconds:.0f} s"
