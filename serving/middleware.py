"""ASGI middleware in front of BentoML: refuse what it would turn into a 500 or read whole,
and serve the service's own OpenAPI document.

RequestGuardMiddleware:

- Body above a byte limit -> 413.
- multipart/* or BentoML's pickle media type -> 415: the APIs take JSON only, and BentoML
  1.4.40 answers multipart without a boundary with a 500 (it parses any other media type,
  even a missing or text/plain one, as JSON, which is fine).

BentoML reads the whole body into memory before validating it, so the limit has to sit in
front of it. The middleware buffers the body itself (it is read whole anyway), then replays
it to the app. A body over the limit is drained (up to `drain_factor` times the limit) before
the 413 is sent: a client still uploading when the server answers and closes often sees a
connection reset instead of the status code.

PredictionBodies takes POST /predict and /predict_curve away from BentoML's request parsing:
a binary media type (serving/encodings.py: raw float32, .npy, PNG/JPEG), which BentoML would
read as JSON, and application/json, whose handler answers a body its request model accepts
and hands anything else back (None): the body is then replayed to BentoML, whose answer to a
malformed request stays the one error format. Why JSON too: BentoML's per-request parsing
cost about 0.3 ms of server CPU per batch-1 request, a quarter of the throughput at 64
clients (benchmarks/results/serving_peers-*). Every other request goes on to BentoML.

OpenAPIMiddleware answers GET /docs.json with the document serving/openapi.py builds from
the served artifact (BentoML registers its own, less true, /docs.json route before any
mounted app, so only a middleware can take its place); until the service instance exists
the request falls through to BentoML's.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from .encodings import BINARY_TYPES, media_type

Scope = dict[str, Any]
Message = dict[str, Any]


_REFUSED_MEDIA_PREFIXES = (b"multipart/", b"application/vnd.bentoml+pickle")


class RequestGuardMiddleware:
    def __init__(self, app: Any, max_bytes: int, drain_factor: int = 4) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = max_bytes * drain_factor

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        media_type = _header(scope, b"content-type").strip().lower()
        if media_type.startswith(_REFUSED_MEDIA_PREFIXES):
            await self._drain(receive, already=0)
            shown = media_type.decode(errors="replace")
            accepted = ", ".join(("application/json", *BINARY_TYPES))
            await _send_json(send, 415, f"content type {shown!r} is not accepted; send {accepted}")
            return
        try:
            declared: int | None = int(_header(scope, b"content-length") or b"-1")
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


BinaryHandler = Callable[[str, str, bytes, str], Awaitable[Any]]
JsonHandler = Callable[[str, bytes], Awaitable[Any]]
PREDICTION_ROUTES = ("/predict", "/predict_curve")
JSON = "application/json"


class PredictionBodies:
    def __init__(self, app: Any, binary: BinaryHandler, json_body: JsonHandler) -> None:
        self.app = app
        self.binary = binary
        self.json_body = json_body

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PREDICTION_ROUTES:
            kind = media_type(_header(scope, b"content-type").decode("latin-1"))
            if kind in BINARY_TYPES or kind == JSON:
                body = await _read_body(receive)
                if body is None:  # the client went away
                    return
                if kind == JSON:
                    response = await self.json_body(scope["path"], body)
                else:
                    query = scope.get("query_string", b"").decode("latin-1")
                    response = await self.binary(scope["path"], kind, body, query)
                if response is not None:
                    await response(scope, receive, send)
                    return
                receive = _replay([{"type": "http.request", "body": body, "more_body": False}], receive)
        await self.app(scope, receive, send)


async def _read_body(receive: Any) -> bytes | None:
    """The whole body (RequestGuardMiddleware, outside, has bounded it already)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


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


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    # connection: close, since the body may not have been read to its end
    await _send(send, status, body, [(b"connection", b"close")])


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


def _header(scope: Scope, name: bytes) -> bytes:
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
