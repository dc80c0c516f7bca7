"""`ServiceClient`: the HTTP client side both services share (rollout service and teacher service).

One connection to a `nemo_paced.serving` server: made from a URL or an address file (the token from the
file, else an environment variable), requests with exponential-backoff retries of refused connections
and 502/503/504, 4xx answers raised as `RequestRejected` naming the field, and, when a connection is
refused, a re-read of the address file so the client follows a service restarted on another port.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, TypeVar

import httpx

log = logging.getLogger(__name__)
RETRY_STATUS = {502, 503, 504}
Client = TypeVar("Client", bound="ServiceClient")


class ServiceUnavailable(ConnectionError):
    """The service could not be reached (after retries) or answered with a server error."""


class RequestRejected(ValueError):
    """The service refused a request (4xx); the message carries its explanation, naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def read_address(path: str | Path) -> tuple[str, str | None]:
    """(url, token) from an address file written by a service's `--address-file`."""
    address = json.loads(Path(path).read_text(encoding="utf-8"))
    token = None
    if address.get("token_file"):
        token = Path(address["token_file"]).read_text(encoding="utf-8").strip()
    elif address.get("token_env"):
        token = os.environ.get(address["token_env"])
        if token is None:
            raise ValueError(f"{path}: the service wants a token from ${address['token_env']}, which is not set")
    return address["url"], token


class ServiceClient:
    """Subclasses name their service (`service_name`) and the variable holding its token (`token_env`)."""

    service_name = "service"
    token_env = ""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, retries: int = 4,
                 backoff: float = 0.5, address_file: str | Path | None = None) -> None:
        self.timeout, self.retries, self.backoff, self.address_file = timeout, retries, backoff, address_file
        self._open(url, token)

    @classmethod
    def connect(cls: type[Client], service: str | Path, token: str | None = None, **options: Any) -> Client:
        """From a URL or an address file; the token defaults to the address file's, then `$token_env`."""
        if str(service).startswith(("http://", "https://")):
            return cls(str(service), token or os.environ.get(cls.token_env), **options)
        url, file_token = read_address(service)
        return cls(url, token or file_token or os.environ.get(cls.token_env), address_file=service, **options)

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
            log.info("%s moved from %s to %s", self.service_name, self.url, url)
            self._http.close()
            self._open(url, token or self._token)

    def close(self) -> None:
        self._http.close()

    def __enter__(self: Client) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health").json()

    def metrics(self) -> str:
        return self._call("GET", "/metrics").text

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
                error = ServiceUnavailable(f"HTTP {response.status_code}: {detail(response)}")
                continue
            if response.status_code >= 500:
                raise ServiceUnavailable(f"{self.service_name} at {self.url}: {method} {path} failed with HTTP "
                                         f"{response.status_code}: {detail(response)}")
            if response.status_code >= 400:
                raise RequestRejected(response.status_code, f"{self.service_name} at {self.url} refused {method} "
                                                            f"{path} (HTTP {response.status_code}): {detail(response)}")
            return response
        raise ServiceUnavailable(f"cannot reach the {self.service_name} at {self.url} ({method} {path}, "
                                 f"{attempt + 1} attempt(s)): {type(error).__name__}: {error}")


def detail(response: httpx.Response) -> str:
    """A 4xx/5xx body's explanation: FastAPI's `detail` list as "field 'a.b': message; ..."."""
    try:
        body = response.json().get("detail", response.text)
    except ValueError:
        return response.text[:500]
    if isinstance(body, list):
        return "; ".join(f"field '{'.'.join(str(p) for p in d.get('loc', [])[1:])}': {d.get('msg')}" for d in body)
    return str(body)
