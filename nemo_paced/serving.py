"""The HTTP machinery every nemo-paced service shares (the rollout service, the teacher service):
bearer-token auth, a bound on the request body, strict JSON (no NaN/Infinity, no coerced types),
4xx error replies that name the field, a TCP_NODELAY listening socket, the bearer-token and
address-file conventions, and running uvicorn on that socket.

A service builds its FastAPI app with `create_api`, declares request bodies as `Strict` models,
raises `RequestError(field, message)` for values a model cannot check, and wraps the app in
`Guard`. Every refusal then has the same JSON shape,

    {"detail": [{"loc": ["body", "k"], "msg": "...", "type": "..."}]}

which the clients turn into "field 'k': ...".
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import os
import socket
from pathlib import Path
from typing import Any, Callable, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict

class RequestError(ValueError):
    """A request that names a valid shape but an unacceptable value; `field` names the culprit."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.status = field, status


class Strict(BaseModel):
    """Request bodies: unknown fields are refused (a misspelt option is an error, not a default) and
    types are strict (`"k": true` or `"n": "2"` is an error, not 1 or 2; an int is still a float)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def nonfinite_path(value: Any, path: tuple = ()) -> tuple | None:
    """The location of the first NaN or infinite number in parsed JSON, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = nonfinite_path(item, (*path, key))
        if found is not None:
            return found
    return None


def error_body(loc: list, msg: str, kind: str) -> dict[str, Any]:
    return {"detail": [{"loc": loc, "msg": msg, "type": kind}]}


class Guard:
    """ASGI middleware in front of a service's app: the bearer token, then a bound on the body, then
    the body must be JSON without non-finite numbers.

    The body is read here (up to the bound) and replayed to the app, so an oversized body is refused
    with 413 before anything parses it, whether or not the client sent Content-Length. Python's JSON
    parser accepts NaN, Infinity and 1e400 (as inf); they are refused here, by field, because a model
    would refuse them only to fail echoing them back (500). The scheme of the Authorization header is
    case-insensitive (RFC 7235); the token is compared in constant time.
    """

    def __init__(self, app, token: str | None, max_bytes: int, on_request: Callable[[], None] | None = None) -> None:
        self.app, self.max_bytes, self.on_request = app, max_bytes, on_request
        self.token = None if token is None else token.encode()

    def authorised(self, header: bytes) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.on_request is not None:
            self.on_request()
        headers = dict(scope["headers"])
        if not self.authorised(headers.get(b"authorization", b"")):
            return await reply(send, 401, {"detail": "missing or wrong bearer token (header Authorization)"},
                               [(b"www-authenticate", b"Bearer")])
        too_big = {"detail": f"request body over {self.max_bytes} bytes"}
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await reply(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await reply(send, 413, too_big)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if body.strip():
            refusal = _json_refusal(body)
            if refusal is not None:
                return await reply(send, 422, refusal)

        async def replay():
            nonlocal body
            message, body = {"type": "http.request", "body": body, "more_body": False}, b""
            return message

        await self.app(scope, replay, send)


def _json_refusal(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as e:  # includes JSONDecodeError, bad UTF-8 and over-long integers
        return error_body(["body"], f"not valid JSON: {e}", "json_invalid")
    where = nonfinite_path(parsed)
    if where is None:
        return None
    return error_body(["body", *where], "must be a finite number (JSON NaN, Infinity and numbers beyond the "
                                        "float range such as 1e400 are refused)", "finite_number")


async def reply(send, status: int, payload: dict, headers: list | None = None) -> None:
    """Send a complete JSON response from ASGI middleware."""
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def create_api(title: str, lifespan=None) -> FastAPI:
    """A FastAPI app whose refusals are all `error_body`-shaped 4xx replies: `RequestError` raised by
    a handler, and validation errors (reported without the offending input, which may not serialise)."""
    app = FastAPI(title=title, lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse(status_code=error.status,
                            content=error_body(["body" if error.status == 422 else "path", error.field], str(error),
                                               "value_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        detail = [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in error.errors()]
        return JSONResponse(status_code=422, content={"detail": detail})

    return app


class Service(Protocol):
    """What `create_service_api` needs of a service: a worker to start and stop, its health and metrics,
    a request counter, and a config holding its bearer token and body bound."""

    requests: int
    config: Any  # .token, .max_request_bytes

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def health(self) -> dict[str, Any]: ...
    def metrics(self) -> str: ...


def create_service_api(title: str, service: Service,
                       on_shutdown: Callable[[], None] | None = None) -> tuple[FastAPI, Guard]:
    """`create_api` for a service: its lifespan starts the service's worker and, after it stops, runs
    `on_shutdown` (the place to release engines: uvicorn re-raises SIGTERM afterwards, so no later code
    runs); GET /health and /metrics answer from the service. Returns the app, for the service's own
    routes, and the `Guard` around it (auth, body bound, request counter), which is what to serve.
    Handlers are plain functions: FastAPI runs them on its thread pool, so a long request does not
    block /health."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.stop()
        if on_shutdown is not None:
            on_shutdown()

    app = create_api(title, lifespan)

    @app.get("/health")
    def health():
        return service.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        return service.metrics()

    def count():
        service.requests += 1  # approximate under concurrency; a metric, not an invariant

    return app, Guard(app, service.config.token, service.config.max_request_bytes, count)


# --- the network side ---------------------------------------------------------------------------


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket for `run`; port 0 picks a free port.

    It is created with proto IPPROTO_TCP, not 0, because asyncio sets TCP_NODELAY only on such
    sockets' connections; without it every response waits ~40 ms for a delayed ACK (Nagle), as
    bench/rollout_bench.py measured. Connections made before uvicorn serves wait in the backlog.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(1024)
    return sock


def run(app, sock: socket.socket, log_level: str = "info") -> None:
    """Run uvicorn on `sock` until SIGINT/SIGTERM. The app's lifespan shutdown is the place to release
    resources: uvicorn re-raises the signal afterwards, so no code after this call runs on SIGTERM."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False)).run(sockets=[sock])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def read_token(token_file: str | None, token_env: str) -> tuple[str | None, dict[str, str]]:
    """The bearer token (from `token_file`, else the variable `token_env`) and how an address file
    tells clients to find it: {"token_file": PATH} or {"token_env": NAME}, never the token itself.
    Raises ValueError for an empty token file."""
    if token_file:
        with open(token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"--token-file {token_file} is empty")
        return token, {"token_file": os.path.abspath(token_file)}
    token = os.environ.get(token_env) or None
    return token, ({"token_env": token_env} if token else {})


def address_record(host: str, port: int, **extra: Any) -> dict[str, Any]:
    """What an address file holds: {url, host, port, pid, hostname, **extra}. A wildcard host
    (0.0.0.0, ::) is published as this machine's name, which other nodes can reach."""
    url_host = socket.gethostname() if is_unspecified(host) else host
    url_host = f"[{url_host}]" if ":" in url_host else url_host
    return {"url": f"http://{url_host}:{port}", "host": host, "port": port, "pid": os.getpid(),
            "hostname": socket.gethostname(), **extra}


def remove_address_if_ours(path: str | os.PathLike) -> None:
    """On shutdown, remove an address file unless a newer service has replaced it."""
    path = Path(path)
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass



# --- the command line side ----------------------------------------------------------------------


def add_server_arguments(parser, token_env: str, default_port: int = 8000) -> None:
    """--host, --port, --address-file, --token-file, --token-env, --max-request-bytes, --log-level."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=default_port,
                        help=f"port (default {default_port}; 0 picks a free one)")
    parser.add_argument("--address-file", help="after binding, write {url, host, port, pid, hostname, token_file or "
                                               "token_env, ...} here atomically, for clients to find the service")
    parser.add_argument("--token-file", help="file holding the bearer token")
    parser.add_argument("--token-env", default=token_env,
                        help=f"environment variable holding the bearer token (default {token_env})")
    parser.add_argument("--max-request-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    parser.add_argument("--log-level", default="info", help="uvicorn and service log level (default info)")


def server_token(args, command: str) -> tuple[str | None, dict[str, str]]:
    """`read_token` for parsed `add_server_arguments` options; off loopback a token is required.
    Errors exit with a message naming `command`."""
    try:
        token, hint = read_token(args.token_file, args.token_env)
    except (OSError, ValueError) as e:
        raise SystemExit(f"nemo-paced {command}: {e}") from None
    if token is None and not is_loopback(args.host):
        raise SystemExit(f"nemo-paced {command}: --host {args.host} is not a loopback address, so a bearer "
                         f"token is required: set ${args.token_env} or pass --token-file")
    return token, hint


def listen(args, command: str, **address: Any) -> tuple[socket.socket, dict[str, Any]]:
    """Bind --host/--port and publish the address (with `address` extras) to --address-file, if any."""
    from nemo_paced.atomic import atomic_write_json

    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        raise SystemExit(f"nemo-paced {command}: cannot bind {args.host}:{args.port}: {e}") from None
    record = address_record(args.host, sock.getsockname()[1], **address)
    if args.address_file:
        atomic_write_json(args.address_file, record)
    return sock, record
