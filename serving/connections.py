"""Connections of one worker: bounded in number and in how long they may idle or trickle.

BentoML 1.4 starts each worker's uvicorn itself (_bentoml_impl/worker/service.py) and passes
it only `--timeout-keep-alive` (default 5 s) and the backlog: no `limit_concurrency`, no way
to choose the HTTP protocol class. uvicorn's own keep-alive timer runs only between a
response and the next byte, so a connection that never sends, or sends its request head or
body a byte at a time (slowloris), stays open for ever, holding a descriptor; with the
descriptor limit reached, every request times out. And uvicorn's `limit_concurrency` would
answer a plain-text 503 without Retry-After.

GuardedH11Protocol is uvicorn's h11 protocol with deadlines and a cap:
- the request head must be whole within `header_timeout_s` of the connection opening or of
  the previous response ending (not reset by each byte received);
- the body must be whole within `body_timeout_s` of its head;
- idle keep-alive connections close after `keep_alive_s` (uvicorn's own timer);
- above `max_connections` open connections in this worker, a new connection is answered
  503 with Retry-After as soon as its request head arrives (and closed), and is given at
  most REFUSED_HEAD_S to send that head.
A connection past a deadline is closed; an app waiting for its body sees a disconnect.
Request heads are bounded by h11 (16 KiB); bodies by the service's middleware.

Lingering close (as nginx's `lingering_close`): when a response is answered before the
client has sent its whole body (a 503 over the body budget, a 413) and the connection is to
close, closing at once makes the kernel reset it, and a client still sending sees the reset,
not the answer. So the worker shuts its side for writing and reads and drops what still
comes, for at most LINGER_S (LINGER_GAP_S without data ends it sooner), then closes.

`install` makes uvicorn use it: BentoML builds the worker's uvicorn.Config with the default
protocol "auto" after importing the service, so the service module points that name here.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REFUSED_HEAD_S = 2.0
LINGER_S, LINGER_GAP_S = 30.0, 5.0  # nginx's lingering_time and lingering_timeout


@dataclass(frozen=True)
class ConnectionLimits:
    keep_alive_s: int = 5
    header_timeout_s: int = 10
    body_timeout_s: int = 60
    max_connections: int = 256


async def _refuse(scope: Any, receive: Any, send: Any) -> None:
    body = json.dumps({"error": "too many connections to this worker; retry shortly"}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class GuardedH11Protocol(H11Protocol):
    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = self.limits.keep_alive_s
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "head"
        self._linger_until = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))
        if len(self.connections) > self.limits.max_connections:
            self.app = _refuse  # answered once its head arrives; uvicorn then closes it
            self._arm("head", REFUSED_HEAD_S)
        else:
            self._arm("head", self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._phase == "linger":  # answered and closing: the rest of the body is dropped
            self._arm("linger", LINGER_S, gap=LINGER_GAP_S)
            return
        super().data_received(data)
        self._follow()

    def linger(self, transport: asyncio.Transport) -> bool:
        """Instead of closing now: half-close and drop what comes (see the module's docstring).
        False when there is nothing to wait for, so the caller closes at once."""
        if self._phase == "linger":
            return True
        if self.app is _refuse or self.conn.their_state is not h11.SEND_BODY or not transport.can_write_eof():
            return False  # a connection over the cap holds no descriptor longer than it must
        transport.write_eof()
        transport.resume_reading()  # uvicorn may have paused reading while the body waited
        self._linger_until = self.loop.time() + LINGER_S
        self._arm("linger", LINGER_S, gap=LINGER_GAP_S)
        return True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm("head", self.limits.header_timeout_s)
            self._follow()  # a pipelined request may have started already

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _follow(self) -> None:
        """Move the deadline along with the request: head -> body -> none while the app works."""
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase == "head":
            self._arm("body", self.limits.body_timeout_s)
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) and self._phase in ("head", "body"):
            self._cancel()
            self._phase = "app"

    def _arm(self, phase: str, seconds: float, gap: float | None = None) -> None:
        self._cancel()
        self._phase = phase
        if gap is not None:  # lingering: the sooner of the overall end and `gap` without data
            seconds = max(0.0, min(self._linger_until - self.loop.time(), gap))
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        transport = self.transport.raw if isinstance(self.transport, _LingeringTransport) else self.transport
        if not transport.is_closing():
            transport.close()


class _LingeringTransport:
    """The connection's transport, whose close() lingers when the client is still sending."""

    def __init__(self, raw: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        self.raw, self._protocol = raw, protocol
        # what uvicorn calls on every request, bound once rather than looked up by __getattr__
        self.write, self.get_extra_info = raw.write, raw.get_extra_info
        self.pause_reading, self.resume_reading = raw.pause_reading, raw.resume_reading

    def close(self) -> None:
        if not self.raw.is_closing() and not self._protocol.linger(self.raw):
            self.raw.close()

    def is_closing(self) -> bool:
        return self.raw.is_closing() or self._protocol._phase == "linger"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def install(limits: ConnectionLimits) -> None:
    """Make this process's uvicorn (a BentoML worker's) serve HTTP with GuardedH11Protocol."""
    from uvicorn import config

    GuardedH11Protocol.limits = limits
    config.HTTP_PROTOCOLS["auto"] = f"{__name__}:GuardedH11Protocol"
