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
from pathlib import Path
from typing import Any, Sequence

from nemo_paced.service_client import ServiceClient
from nemo_paced.teacher.engines import TopK

TOKEN_ENV = "NEMO_PACED_TEACHER_TOKEN"  # default variable holding the teacher service's bearer token


class TeacherClient(ServiceClient):
    service_name = "teacher service"
    token_env = TOKEN_ENV

    def __init__(self, url: str, token: str | None = None, timeout: float = 3600.0, retries: int = 6,
                 backoff: float = 0.5, address_file: str | Path | None = None) -> None:
        super().__init__(url, token, timeout=timeout, retries=retries, backoff=backoff, address_file=address_file)
        self._info: dict[str, Any] | None = None

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
            answer = self._call("POST", "/score", json_body={"k": k, "sequences": part}).json()
            results += [TopK.from_json(row) for row in answer["results"]]
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
