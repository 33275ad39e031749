"""Error answers: one body shape, quiet user errors, and bugs answered at once with an id.

Every error answer is `{"error": "<sentence>", "field"?: "...", "detail"?: [...], "id"?: "..."}`
(schemas.ErrorResponse). A 4xx is the client's mistake: it writes one log line at INFO, never
a traceback (an operator's alerting should not fire on bad requests). A bug (any exception
in any path) is logged once at ERROR with its traceback and an id, and answered at once with
`{"error": "internal error", "id": ...}` carrying the same id, so a client quoting the id
finds the traceback; it never waits for BentoML's traffic timeout.

ErrorBoundary is the outermost of the service's middleware: it sees every exception the
others and BentoML's routes let through, and every 4xx on its way out (a non-JSON one, such
as Starlette's plain-text 404/405, is rewritten into the one shape). `guarded` does the same
for the BentoML API methods, whose exceptions BentoML itself would otherwise answer (with
a body of its own and no id). `fault` is a hook for tests only: MODECONN_TEST_FAULT names
paths that raise, so a test can prove that path answers a bug with a 500 at once.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, TypeVar

from pydantic import ValidationError
from starlette.responses import JSONResponse

logger = logging.getLogger("bentoml.serve.modeconn")

FAULT_PATHS = ("json", "bentoml", "binary", "curve")
_MAX_LOGGED_BODY = 4096
T = TypeVar("T")


def error_response(status: int, message: str, *, field: str | None = None,
                   detail: list[dict[str, Any]] | None = None, **headers: str) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    if detail:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers or None)


def internal_error(where: str) -> JSONResponse:
    """Log the exception being handled (traceback, id) and answer 500 with that id."""
    error_id = uuid.uuid4().hex[:16]
    logger.exception("internal error id=%s in %s", error_id, where)
    return JSONResponse({"error": "internal error", "id": error_id}, status_code=500)


class InjectedFault(RuntimeError):
    """Raised by `fault` where MODECONN_TEST_FAULT asks for it (tests only)."""


def fault(active: tuple[str, ...], path: str) -> None:
    if path in active:
        raise InjectedFault(f"injected test fault in the {path} path (MODECONN_TEST_FAULT)")


def faulty(active: tuple[str, ...], path: str, run: Callable[..., T]) -> Callable[..., T]:
    """`run`, raising first where MODECONN_TEST_FAULT names `path` (in the batcher's thread)."""
    if path not in active:
        return run

    @functools.wraps(run)
    def failing(*args: Any, **kwargs: Any) -> T:
        fault(active, path)
        return run(*args, **kwargs)

    return failing


def guarded(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """An async BentoML API method whose exceptions become a 500 with an id (not BentoML's)."""

    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except Exception:
            return internal_error(f"the BentoML API {method.__name__}")

    return wrapper


# -- pydantic's errors as one sentence ----------------------------------------------------------


def where(loc: tuple[Any, ...]) -> str | None:
    """('ts', 2) -> 'ts[2]'; () -> None (the body as a whole)."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def validation_error(exc: ValidationError, fields: list[str]) -> JSONResponse:
    """A request model's refusal as a 400: the first problem as a sentence naming the field,
    every problem in `detail` (type, loc, msg: no inputs echoed, no documentation links)."""
    errors = exc.errors(include_url=False, include_context=True, include_input=True)
    # an unknown field is most often a misspelt one: name it before the field then missing
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    field = where(tuple(first["loc"]))
    detail = [{"type": e["type"], "loc": list(e["loc"]), "msg": _plain(e["msg"])} for e in errors]
    return error_response(400, _sentence(first, field, fields), field=field, detail=detail)


def _plain(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _sentence(error: dict[str, Any], field: str | None, fields: list[str]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "json_invalid" and not (value.decode("utf-8", "replace") if isinstance(value, bytes)
                                       else str(value or "")).strip():
        return "the body is empty; send a JSON object, e.g. {\"inputs\": [[...]]}"
    if kind == "json_invalid":
        return f"the body is not valid JSON ({ctx.get('error', error['msg'])})"
    if kind in ("model_type", "model_attributes_type", "dict_type") and field is None:
        return "the body must be a JSON object, e.g. {\"inputs\": [[...]]}"
    if kind == "missing":
        return f"'{field}' is required"
    if kind == "extra_forbidden":
        return f"unknown field '{field}' (this route takes {', '.join(fields)})"
    if kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        limit = "at least" if kind == "too_short" else "at most"
        return f"{field} has {ctx.get('actual_length')} items; {limit} {bound} allowed"
    if kind in ("less_than_equal", "greater_than_equal", "less_than", "greater_than"):
        return f"{field} = {value!r}: {_lower(error['msg'])}"
    if field is None:
        return _lower(_plain(error["msg"]))
    return f"{field}: {_lower(_plain(error['msg']))}"


def _lower(text: str) -> str:
    return text[:1].lower() + text[1:]


# -- the outermost middleware ---------------------------------------------------------------------


class ErrorBoundary:
    """Catches what every inner layer lets through (500 with an id, traceback logged once), and
    logs each 4xx as one INFO line, rewriting a non-JSON 4xx body into the one shape."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = _Exchange(scope, send)

        async def watched_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect":
                state.disconnected = True
            return message

        try:
            await self.app(scope, watched_receive, state.send)
        except Exception:
            response = internal_error(f"{scope['method']} {scope['path']}")
            if not state.started:
                await response(scope, receive, send)
            return
        if not state.started and not state.disconnected:  # an answer lost to a bug
            try:
                raise RuntimeError("the application returned without answering")
            except RuntimeError:
                await internal_error(f"{scope['method']} {scope['path']}")(scope, receive, send)


class _Exchange:
    """The response on its way out: whether it started, and a 4xx held until its body is whole."""

    def __init__(self, scope: dict[str, Any], send: Any) -> None:
        self.scope = scope
        self._send = send
        self.started = False
        self.disconnected = False
        self._held: dict[str, Any] | None = None
        self._body = b""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if 400 <= message["status"] < 500:
                self._held = message
                return
        elif message["type"] == "http.response.body" and self._held is not None:
            self._body += message.get("body", b"")
            if message.get("more_body", False) and len(self._body) <= _MAX_LOGGED_BODY:
                return
            await self._client_error(message.get("more_body", False))
            return
        await self._send(message)

    async def _client_error(self, more: bool) -> None:
        start, self._held = self._held, None
        assert start is not None
        status, headers = start["status"], list(start.get("headers", []))
        content_type = dict(headers).get(b"content-type", b"")
        message = None
        if content_type.startswith(b"application/json"):
            try:
                message = json.loads(self._body).get("error")
            except (ValueError, AttributeError):
                message = None
        if message is None and not more:  # Starlette's plain-text 404/405 and the like
            message = self._sentence(status, headers)
            self._body = json.dumps({"error": message}).encode()
            headers = [(k, v) for k, v in headers if k not in (b"content-type", b"content-length")]
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(self._body)).encode())]
        logger.info("%s %s -> %d: %s", self.scope["method"], self.scope["path"], status, message)
        await self._send({**start, "headers": headers})
        await self._send({"type": "http.response.body", "body": self._body, "more_body": more})

    def _sentence(self, status: int, headers: list[tuple[bytes, bytes]]) -> str:
        method, path = self.scope["method"], self.scope["path"]
        if status == 404:
            return f"no route {method} {path} (GET /docs.json lists them)"
        if status == 405:
            allowed = dict(headers).get(b"allow", b"").decode("latin-1")
            return f"{method} is not allowed on {path}; use {allowed or 'another method'}"
        text = self._body.decode("utf-8", errors="replace").strip()[:200]
        return f"{HTTPStatus(status).phrase.lower()}: {text}" if text else HTTPStatus(status).phrase.lower()
