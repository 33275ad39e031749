"""ASGI middleware in front of BentoML: refuse what it would turn into a 500 or read whole,
and serve the service's own OpenAPI document. (errors.ErrorBoundary, outermost, answers bugs.)

RouteRules, before any body is read:

- a method a route does not take -> 405 with `Allow` naming the ones it does (OPTIONS too);
- a prediction body whose media type is neither application/json nor a binary encoding
  (text/plain, a form, none at all) -> 415 naming the accepted types; a POST /info body
  likewise needs application/json;
- a query parameter a route does not take -> 400: JSON bodies carry every field in the body,
  so a JSON request takes none; binary bodies' parameters are checked by serving/encodings.py.

RequestGuardMiddleware:

- Bodies held at once by this worker above a budget -> 503 + Retry-After, before the body
  is read (the declared Content-Length, or one whole body's limit when chunked, is reserved
  until the answer is sent); bodies of at most 64 KiB have 16 MiB of their own beyond it,
  so that slow uploads of large bodies cannot shut out ordinary requests. Once the last body is released after a burst, glibc is asked
  to give freed memory back (malloc_trim): its arenas otherwise keep the peak.
- Body above a byte limit -> 413.
- multipart/* or BentoML's pickle media type -> 415: the APIs take JSON only, and BentoML
  1.4.40 answers multipart without a boundary with a 500 (it parses any other media type,
  even a missing or text/plain one, as JSON, which is fine).

BentoML reads the whole body into memory before validating it, so the limit has to sit in
front of it. The middleware buffers the body itself (it is read whole anyway), then replays
it to the app. A body over the limit is drained (up to `drain_factor` times the limit) before
the 413 is sent: a client still uploading when the server answers and closes often sees a
connection reset instead of the status code.

InfoBodies: a POST /info body must be empty or a JSON object before it goes on to BentoML
(which logs a traceback for any other); whitespace alone is no body. The prediction routes'
bodies never reach BentoML: serving/fast_path.py answers them, inside these layers.

OpenAPIMiddleware answers GET /docs.json with the document serving/openapi.py builds from
the served artifact (BentoML registers its own, less true, /docs.json route before any
mounted app, so only a middleware can take its place); until the artifact is read
the request falls through to BentoML's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from .encodings import BINARY_TYPES, media_type

Scope = dict[str, Any]
Message = dict[str, Any]


_REFUSED_MEDIA_PREFIXES = (b"multipart/", b"application/vnd.bentoml+pickle")


logger = logging.getLogger("bentoml.serve.modeconn")
TRIM_AFTER_BYTES = 16 << 20  # bodies released since the last trim before the next one is worth it
SMALL_BODY_BYTES = 64 << 10  # a small request (a few hundred rows of JSON)
SMALL_SLICE_BYTES = 16 << 20  # held by small requests beyond the budget: 256 of them


class RequestGuardMiddleware:
    def __init__(self, app: Any, max_bytes: int, budget_bytes: int | None = None,
                 drain_factor: int = 4) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.budget_bytes = budget_bytes if budget_bytes is not None else 8 * max_bytes
        self.drain_bytes = max_bytes * drain_factor
        self.in_flight = 0  # body bytes reserved by requests not yet answered (this worker)
        self._released = 0

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reserved = self._reservation(scope)
        # small bodies have a slice of their own beyond the budget, so that slow uploads of
        # large bodies cannot shut out ordinary requests
        room = self.budget_bytes + (SMALL_SLICE_BYTES if reserved <= SMALL_BODY_BYTES else 0)
        if reserved and self.in_flight and self.in_flight + reserved > room:
            message = (f"this worker holds {self.in_flight} bytes of request bodies; this one "
                       f"({reserved} bytes) would exceed its budget of {self.budget_bytes}; retry shortly")
            # no `connection: close`: uvicorn then reads and drops the unread body (holding
            # none of it), so the client sees the 503 rather than a reset while it still sends
            await _send_json(send, 503, message, [(b"retry-after", b"1")], close=False)
            return
        self.in_flight += reserved
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= reserved
            self._released += reserved
            if not self.in_flight and self._released >= TRIM_AFTER_BYTES:
                self._released = 0
                _malloc_trim()

    def _reservation(self, scope: Scope) -> int:
        """What a request's body may hold: its Content-Length (bounded: a larger one is a 413),
        one whole body when chunked or unreadable, nothing when it has no body."""
        length = header(scope, b"content-length")
        if length:
            try:
                return min(int(length), self.max_bytes)
            except ValueError:
                return self.max_bytes
        return self.max_bytes if header(scope, b"transfer-encoding") else 0

    async def _guarded(self, scope: Scope, receive: Any, send: Any) -> None:
        media_type = header(scope, b"content-type").strip().lower()
        if media_type.startswith(_REFUSED_MEDIA_PREFIXES):
            await self._drain(receive, already=0)
            shown = media_type.decode(errors="replace")
            accepted = ", ".join(("application/json", *BINARY_TYPES))
            await _send_json(send, 415, f"content type {shown!r} is not accepted; send {accepted}")
            return
        try:
            declared: int | None = int(header(scope, b"content-length") or b"-1")
        except ValueError:
            declared = None
        if declared is not None and declared > self.max_bytes:
            await self._drain(receive, already=0)
            await self._refuse(send, declared)
            return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await self._drain(receive, already=size)
                await self._refuse(send, size)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _drain(self, receive: Any, already: int) -> None:
        size = already
        while size <= self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send: Any, size: int) -> None:
        message = (
            f"request body is {size} bytes or more; the limit is {self.max_bytes} bytes "
            "(split the batch into smaller requests)"
        )
        await _send_json(send, 413, message)


PREDICTION_ROUTES = ("/predict", "/predict_curve")
JSON = "application/json"
# The routes the document declares, with their methods (HEAD goes with GET), and the query
# parameters each takes (prediction routes with a binary body: serving/encodings.py).
ROUTES: dict[str, tuple[str, ...]] = {
    "/predict": ("POST",), "/predict_curve": ("POST",), "/info": ("GET", "POST"),
    "/docs.json": ("GET",), "/healthz": ("GET",), "/livez": ("GET",), "/readyz": ("GET",),
    "/metrics": ("GET",),
}
QUERY: dict[str, tuple[str, ...]] = {"/metrics": ("name[]",)}  # prometheus_client's filter


class RouteRules:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (methods := ROUTES.get(scope["path"])) is not None:
            refusal = _refusal(scope, methods)
            if refusal is not None:
                status, message, extra = refusal
                await _send_json(send, status, message, extra)
                return
        await self.app(scope, receive, send)


def _refusal(scope: Scope, methods: tuple[str, ...]) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
    method, path = scope["method"], scope["path"]
    allowed = (*methods, "HEAD") if "GET" in methods else methods
    if method not in allowed:
        allow = ", ".join(methods)
        return 405, f"{method} is not allowed on {path}; use {allow}", [(b"allow", allow.encode())]
    kind = media_type(header(scope, b"content-type").decode("latin-1"))
    has_body = header(scope, b"content-length") not in (b"", b"0") or bool(header(scope, b"transfer-encoding"))
    if method == "POST" and path in PREDICTION_ROUTES and kind not in (JSON, *BINARY_TYPES):
        shown = f"content type {kind!r} is" if kind else "a body without a content type is"
        accepted = ", ".join(BINARY_TYPES)
        return 415, f"{shown} not accepted on {path}; send JSON as {JSON}, or one of {accepted}", []
    if method == "POST" and path == "/info" and has_body and kind != JSON:
        shown = f"content type {kind!r} is" if kind else "a body without a content type is"
        return 415, f"{shown} not accepted on /info; send no body or a JSON object as {JSON}", []
    query = scope.get("query_string", b"").decode("latin-1")
    if not query or (path in PREDICTION_ROUTES and kind in BINARY_TYPES):
        return None
    names = [name for name, _ in parse_qsl(query, keep_blank_values=True)] or [query]
    unknown = [name for name in names if name not in QUERY.get(path, ())]
    if not unknown:
        return None
    takes = ", ".join(QUERY.get(path, ())) or "none"
    why = "; a JSON body carries every field itself" if path in PREDICTION_ROUTES else ""
    return 400, f"unknown query parameter {unknown[0]!r} on {method} {path} (it takes {takes}){why}", []


class InfoBodies:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/info":
            body = await read_body(receive)
            if body is None:  # the client went away
                return
            # whitespace alone is not JSON either: refused here, in the one error shape (BentoML
            # would answer its own pydantic dump)
            if body and not _json_object(body):
                await _send_json(send, 400, "the body of POST /info must be empty or a JSON object")
                return
            receive = _replay([{"type": "http.request", "body": body, "more_body": False}], receive)
        await self.app(scope, receive, send)


def _json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


async def read_body(receive: Any) -> bytes | None:
    """The whole body (RequestGuardMiddleware, outside, has bounded it already)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class ProbeReasons:
    """/livez and /readyz of a worker whose load failed: 503 with the reason as JSON
    ({"error": ...}) instead of BentoML's plain-text 'returns False'."""

    def __init__(self, app: Any, load_error: Callable[[], str | None]) -> None:
        self.app = app
        self.load_error = load_error

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] in ("/livez", "/readyz"):
            if (error := self.load_error()) is not None:
                await _send(send, 503, json.dumps({"error": f"model failed to load: {error}"}).encode())
                return
        await self.app(scope, receive, send)


class OpenAPIMiddleware:
    def __init__(
        self, app: Any, document: Callable[[], dict[str, Any] | None], path: str = "/docs.json"
    ) -> None:
        self.app = app
        self.document = document
        self.path = path
        self._body: bytes | None = None  # built once: the artifact does not change

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == self.path and scope["method"] == "GET":
            if self._body is None and (document := self.document()) is not None:
                self._body = json.dumps(document).encode()
            if self._body is not None:
                await _send(send, 200, self._body)
                return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, message: str,
                     extra: list[tuple[bytes, bytes]] | None = None, close: bool = True) -> None:
    body = json.dumps({"error": message}).encode()
    # connection: close by default, since the body may not have been read to its end
    await _send(send, status, body, [*([(b"connection", b"close")] if close else []), *(extra or [])])


def _malloc_trim() -> None:
    """Return freed heap memory to the system (glibc only; elsewhere nothing to do)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


async def _send(
    send: Any, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope.get("headers", []):
        if key == name:
            return value
    return b""


def _replay(messages: list[Message], receive: Any) -> Any:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()  # after the body: wait for http.disconnect as usual

    return replay
