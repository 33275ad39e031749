"""modeconn's own Prometheus metrics, served by BentoML on /metrics beside its generic ones.

BentoML runs prometheus_client in multiprocess mode: every worker writes its values to files
in PROMETHEUS_MULTIPROC_DIR and whichever worker answers /metrics adds up all of them. Each
series carries a `worker` label (BentoML's worker index, 1..workers; a replacement takes the
index of the worker it replaces), so one worker can be told from another and `sum without
(worker)` gives the server's total. Counters and histograms keep counting across a
replacement; gauges show the most recent value written for that worker index.

| metric | kind | labels | what |
|---|---|---|---|
| modeconn_request_seconds | histogram | endpoint, status | time from request to the end of the response |
| modeconn_session_seconds | histogram | graph | one onnxruntime call (ensemble, swa, curve): per-model latency |
| modeconn_session_rows | histogram | graph | rows per onnxruntime call, i.e. the batch size |
| modeconn_queue_rows | gauge | graph | rows waiting in the batcher, sampled as each batch ends |
| modeconn_refusals_total | counter | endpoint, status, reason | answers with status >= 400, by reason |
| modeconn_curve_cache_events_total | counter | event | fixed-t sessions: hit, miss, build, eviction |
| modeconn_curve_cache_sessions | gauge | | fixed-t sessions cached now |
| modeconn_artifact_info | gauge | tag | 1 for the artifact this worker serves |

prometheus_client is imported on first use, inside the worker: it picks multiprocess mode
at import from PROMETHEUS_MULTIPROC_DIR, which BentoML sets for its workers.
"""

from __future__ import annotations

import threading
import time
from functools import cache
from typing import Any

_PROBES = frozenset({"/metrics", "/readyz", "/livez", "/healthz"})
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_CACHE_EVENTS = {"hits": "hit", "misses": "miss", "builds": "build", "evictions": "eviction"}
_BODY_PEEK = 512  # bytes of an error body kept to tell its reason

_state = {"enabled": True}
_written: dict[str, int] = {}
_cache_lock = threading.Lock()
_register_lock = threading.Lock()


def _instruments() -> dict[str, Any]:
    # The first callers may be the loader's thread, a batcher's and the event loop at once;
    # registering a metric twice raises (prometheus_client's DuplicateTimeseries).
    with _register_lock:
        return _registered()


@cache
def _registered() -> dict[str, Any]:
    import prometheus_client as prom  # here: after BentoML set PROMETHEUS_MULTIPROC_DIR

    def histogram(name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> Any:
        return prom.Histogram(name, doc, [*labels, "worker"], buckets=buckets)

    return {
        "request": histogram("modeconn_request_seconds", "request latency", ["endpoint", "status"], _SECONDS_BUCKETS),
        "session": histogram("modeconn_session_seconds", "one onnxruntime call", ["graph"], _SECONDS_BUCKETS),
        "rows": histogram("modeconn_session_rows", "rows per onnxruntime call (batch size)", ["graph"], _ROWS_BUCKETS),
        "queue": prom.Gauge("modeconn_queue_rows", "rows waiting in the batcher", ["graph", "worker"],
                            multiprocess_mode="mostrecent"),
        "refusals": prom.Counter("modeconn_refusals", "answers with status >= 400",
                                 ["endpoint", "status", "reason", "worker"]),
        "cache": prom.Counter("modeconn_curve_cache_events", "fixed-t session cache events", ["event", "worker"]),
        "cache_size": prom.Gauge("modeconn_curve_cache_sessions", "fixed-t sessions cached", ["worker"],
                                 multiprocess_mode="mostrecent"),
        "info": prom.Gauge("modeconn_artifact_info", "the artifact served", ["tag", "worker"],
                           multiprocess_mode="mostrecent"),
    }


@cache
def _series(name: str, *labels: str) -> Any:
    """The child of instrument `name` for `labels` and this worker, looked up once."""
    return _instruments()[name].labels(*labels, worker())


@cache
def worker() -> str:
    """This worker's index (1..workers) as BentoML numbers it; "0" outside a BentoML worker."""
    import bentoml

    return str(bentoml.server_context.worker_index or 0)


def observe_run(graph: str, rows: int, seconds: float) -> None:
    """One session call (serving/runtime.py calls this once per batch)."""
    if _state["enabled"]:
        _series("session", graph).observe(seconds)
        _series("rows", graph).observe(rows)


def artifact_loaded(tag: str) -> None:
    if _state["enabled"]:
        _series("info", tag).set(1)


def refusal_reason(status: int, body: bytes) -> str:
    """A short reason for an error answer, from its status and the start of its message."""
    text = body[:_BODY_PEEK].decode("utf-8", "replace").lower()
    if status == 503:
        for words, reason in (("overloaded", "overloaded"), ("still loading", "loading"),
                              ("failed to load", "load_failed")):
            if words in text:
                return reason
        return "unavailable"
    return {400: "bad_request", 404: "not_found", 405: "method", 413: "too_large", 415: "media_type",
            422: "bad_request", 429: "too_many", 500: "error"}.get(status, f"status_{status}")


def sample(predictor: Any) -> None:
    """Queue depth of each batcher and the fixed-t cache's counters of `predictor`
    (serving/predictor.py), now; a value is written only when it changed (each write goes to
    a shared file)."""
    with _cache_lock:
        for graph, batcher in predictor.batchers.items():
            if _written.get(graph) != (rows := batcher.pending_rows):
                _series("queue", graph).set(rows)
                _written[graph] = rows
        cache = None if predictor.runtime is None else predictor.runtime.curve_cache
        if cache is None:
            return
        stats = cache.stats.as_dict()
        for field, event in _CACHE_EVENTS.items():  # counters move by what changed since the last sample
            if (delta := stats[field] - _written.get(field, 0)) > 0:
                _series("cache", event).inc(delta)
                _written[field] = stats[field]
        if _written.get("size") != stats["size"]:
            _series("cache_size").set(stats["size"])
            _written["size"] = stats["size"]


class MetricsMiddleware:
    """Times every request but the probes and /metrics, counts error answers by reason, and
    samples the queues and the curve cache before /metrics answers, so a scrape sees this
    worker's latest values (and as each request ends when nothing batches; batches sample
    themselves)."""

    def __init__(self, app: Any, predictor: Any, enabled: bool = True) -> None:
        self.app = app
        self.predictor = predictor
        _state["enabled"] = enabled

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _state["enabled"]:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in _PROBES:
            self._sample()
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "body": b""}

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body" and answer["status"] >= 400:
                answer["body"] = (answer["body"] + message.get("body", b""))[:_BODY_PEEK]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self._record(path, answer, time.perf_counter() - started)

    def _record(self, path: str, answer: dict[str, Any], seconds: float) -> None:
        endpoint = path if path in ("/predict", "/predict_curve", "/info", "/docs.json") else "other"
        status = answer["status"]
        _series("request", endpoint, str(status)).observe(seconds)
        if status >= 400:
            _series("refusals", endpoint, str(status), refusal_reason(status, answer["body"])).inc()
        if not self.predictor.batchers:  # with batching, each batch samples (Predictor._sample)
            self._sample()

    def _sample(self) -> None:
        sample(self.predictor)
