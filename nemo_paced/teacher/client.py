"""`TeacherClient`: what the cache builder and the reverse-KL stage use to ask the teacher service.

    teacher = TeacherClient.connect("runs/x/teacher.addr")     # an address file, or "http://host:port"
    topk = teacher.score([prompt + response], [len(prompt)], k=64)[0]   # TopK over the response tokens

Large requests are split to the service's --max-sequences and --max-request-bytes. Refused connections and 502/503/504
(503 is also the service's "queue full") are retried with exponential backoff; scoring is idempotent,
so a request that may have reached the service is retried too. A client made from an address file
re-reads it after a refused connection, following a service restarted on another port.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import httpx

from nemo_paced.rollout.client import RequestRejected, ServiceUnavailable, read_address
from nemo_paced.teacher.engines import TopK

TOKEN_ENV = "NEMO_PACED_TEACHER_TOKEN"  # default variable holding the teacher service's bearer token
RETRY_STATUS = {502, 503, 504}


class TeacherClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 3600.0, retries: int = 6,
                 backoff: float = 0.5, address_file: str | Path | None = None) -> None:
        self.timeout, self.retries, self.backoff, self.address_file = timeout, retries, backoff, address_file
        self._open(url, token)
        self._info: dict[str, Any] | None = None

    @classmethod
    def connect(cls, service: str | Path, token: str | None = None, **options: Any) -> "TeacherClient":
        """From a URL or an address file; the token defaults to the address file's, then $NEMO_PACED_TEACHER_TOKEN."""
        if str(service).startswith(("http://", "https://")):
            return cls(str(service), token or os.environ.get(TOKEN_ENV), **options)
        url, file_token = read_address(service)
        return cls(url, token or file_token or os.environ.get(TOKEN_ENV), address_file=service, **options)

    def _open(self, url: str, token: str | None) -> None:
        self.url, self._token = url.rstrip("/"), token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self.timeout)

    def _follow_address(self) -> None:
        if self.address_file is None:
            return
        try:
            url, token = read_address(self.address_file)
        except (OSError, ValueError, KeyError):
            return
        if url.rstrip("/") != self.url:
            self._http.close()
            self._open(url, token or self._token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        error: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                response = self._http.request(method, path, json=body)
            except httpx.TransportError as e:
                error = e
                if isinstance(e, httpx.ConnectError):
                    self._follow_address()
                continue
            if response.status_code in RETRY_STATUS:
                error = ServiceUnavailable(f"HTTP {response.status_code}: {_detail(response)}")
                continue
            if response.status_code >= 500:
                raise ServiceUnavailable(f"teacher service at {self.url}: {method} {path} failed with HTTP "
                                         f"{response.status_code}: {_detail(response)}")
            if response.status_code >= 400:
                raise RequestRejected(response.status_code, f"teacher service at {self.url} refused {method} "
                                                            f"{path} (HTTP {response.status_code}): {_detail(response)}")
            return response.json() if path != "/metrics" else response.text
        raise ServiceUnavailable(f"cannot reach the teacher service at {self.url} ({method} {path}, "
                                 f"{attempt + 1} attempt(s)): {type(error).__name__}: {error}")

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def metrics(self) -> str:
        return self._call("GET", "/metrics")

    @property
    def info(self) -> dict[str, Any]:
        """The service's /health as first seen: model, vocab_size, tokenizer fingerprint and limits."""
        if self._info is None:
            self._info = self.health()
        return self._info

    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int], k: int) -> list[TopK]:
        """TopK over tokens[start:] of every sequence (see nemo_paced.teacher.engines)."""
        if len(sequences) != len(starts):
            raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
        rows = [{"tokens": [int(t) for t in tokens], "start": int(start)} for tokens, start in zip(sequences, starts)]
        results: list[TopK] = []
        for part in pack(rows, int(self.info.get("max_sequences", len(rows))),
                         int(self.info.get("max_request_bytes", 1 << 62))):
            results += [TopK.from_json(row) for row in self._call("POST", "/score", {"k": k, "sequences": part})["results"]]
        return results


def pack(rows: list[dict[str, Any]], max_rows: int, max_bytes: int) -> list[list[dict[str, Any]]]:
    """Split request rows, in order, into parts of at most `max_rows` rows whose JSON body stays under
    `max_bytes` (the service's --max-sequences and --max-request-bytes). A row too big on its own goes
    alone, for the service to refuse by name."""
    parts: list[list[dict[str, Any]]] = []
    size = 0
    budget = max_bytes - 64  # {"k": ..., "sequences": [...]} around the rows
    for row in rows:
        row_bytes = len(json.dumps(row)) + 2
        if not parts or len(parts[-1]) >= max(1, max_rows) or size + row_bytes > budget:
            parts.append([])
            size = 0
        parts[-1].append(row)
        size += row_bytes
    return parts


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):
        return "; ".join(f"field '{'.'.join(str(p) for p in d.get('loc', [])[1:])}': {d.get('msg')}" for d in detail)
    return str(detail)
