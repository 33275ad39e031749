"""BentoML service for an exported modeconn artifact (docs/manifest.md).

Endpoints
  POST /predict        {"inputs": N x input_shape}            -> ensemble.onnx
                       {..., "model": "swa"} (binary: ?model=swa) -> swa.onnx, the one averaged
                       network, when the manifest has `swa` (else 404)
  POST /predict_curve  {"inputs": ..., "t": 0.3} | {"ts": [..]} -> the curve at phi(t) / mean over ts
                       (a cached fixed-t session, else the general curve graph)
  Both return temperature-scaled probabilities (the manifest's temperatures, serving/calibration.py;
  SWA at its own T) when the artifact has them, raw ones with "calibrated": false (binary bodies:
  ?calibrated=false) or for a format-1 artifact. The uncertainty fields describe the raw models'
  mixture; for one network (SWA, one t) that is its entropy, with mutual_information 0.
  GET|POST /info       model card + execution provider + batching settings
  GET /docs.json       the OpenAPI document, built from the artifact (serving/openapi.py)
  BentoML's own /healthz /livez /readyz /metrics stay as they are.
  Every error answer is {"error": "...", "field"?, "detail"?, "id"?} (schemas.ErrorResponse);
  4xx: one INFO log line; a bug: 500 with an id, the traceback logged with it (serving/errors.py).

Process model and batching (the numbers the benchmark compares):
  workers: MODECONN_WORKERS (default settings.DEFAULT_WORKERS; benchmarks/results/worker_kill-*).
    Each worker holds a copy of every graph (and a GPU context) and its own batcher; they
    share one listening socket. With two or more, a worker killed with SIGKILL loses only
    the requests it had in flight while the others keep answering, and the arbiter starts
    a replacement, which accepts connections only once it can answer them
    (serving/startup.py). With one, every crash is an outage until the replacement loads.
  threads: the APIs are async, so BentoML's thread pool for sync APIs is unused. Each graph
    gets one dedicated thread that runs onnxruntime, whose intra-op pool uses the cores
    (with several workers, each worker's share of them unless MODECONN_ORT_THREADS is set).
  Adaptive batching (serving/batching.py), on unless MODECONN_BATCHING=0: requests are
    validated first, then queued per graph; when the session is free, what is queued runs
    as one batch of at most MODECONN_MAX_BATCH_ROWS rows (default 1024), after its oldest
    request has waited MODECONN_MAX_WAIT_MS (default 0: no waiting).
    Pending rows above MODECONN_MAX_QUEUE_ROWS (default 32768) get 503 + Retry-After instead
    of queueing without bound; a curve request's ts are admitted or refused together.
    With MODECONN_BATCHING=0 each request runs its own session call in a thread.
  Limits per request: 1024 rows, 16 values in `ts`, body MODECONN_MAX_BODY_BYTES (8 MiB); per
  worker: bodies held, connections, head/body/idle deadlines (serving/connections.py,
  middleware.py; docs/operations.md "Limits and errors"). No BentoML max_concurrency (it
  sheds with 503 "process is overloaded"); traffic timeout 60 s.

Start-up and readiness: before any worker starts, the `bentoml serve` process copies the
artifact into a private read-only folder and verifies the copy (sha256 of every file, the
manifest, no data outside the folder, every graph's names, shapes and classes against the
manifest: serving/contract_check.py), or stops with one line naming the model and the file;
workers load only that copy (serving/startup.py). A worker verifies it again in __init__, then
a background thread opens and warms up the sessions; /readyz turns 200 only after that, and
requests that arrive earlier get 503. A worker whose load fails stays up rather than crash-
looping: alone, it answers 503 with the reason; a replacement beside serving siblings retries
inside __init__, taking no connection. Metrics on /metrics: serving/metrics.py.

Request bodies: JSON ({"inputs": ...}, as application/json), or raw float32, .npy, PNG/JPEG
with `t`/`ts` in the query string (serving/encodings.py). PredictionBodies, a middleware in
front of BentoML's request parsing, decodes binary bodies and answers JSON ones (predict_json,
a refusal as a 400 naming the field). Every way ends in the same handlers (_answer_predict,
_answer_curve); BentoML's metrics, timeout and access log sit outside the middleware.

Settings: one ServiceSettings (serving/settings.py), read from MODECONN_* variables once at
import. MODECONN_CURVE_CACHE bounds the fixed-t curve sessions (serving/fixed_t.py);
MODECONN_CURVE_PRELOAD builds some of them before the worker says it is ready.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from typing import Any

import bentoml
import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from modeconn.contract.artifact import Artifact, ArtifactError, load_artifact

from . import encodings, metrics, middleware, startup
from .batching import MicroBatcher, Overloaded
from .calibration import calibration_card, curve_temperature, scale
from .connections import install as install_connection_limits
from .errors import ErrorBoundary, fault, faulty, guarded, validation_error
from .errors import error_response as _error
from .openapi import openapi_document
from .runtime import Runtime, choose_providers, summarize
from .schemas import (
    MAX_REQUEST_ROWS,
    MAX_TS,
    CurvePredictRequest,
    CurvePredictResponse,
    InfoResponse,
    InputError,
    PredictRequest,
    PredictResponse,
    parse_inputs,
)
from .settings import ServiceSettings
from .startup import mark_served, siblings_have_served, verify_before_workers

logger = logging.getLogger("bentoml.serve.modeconn")

SETTINGS = ServiceSettings.from_env()
MODEL_NAME = SETTINGS.model
WARMUP_BATCH_SIZES = (1, 8, 32, 64)
TRAFFIC_TIMEOUT_S = 60

# Per-request observability, each a layer every request and response passes through
# (benchmarks/results/http_serving-*: together about a third of the server's time per
# request at batch 1). Prometheus /metrics stays on; the access log (one INFO line per
# request) and OpenTelemetry spans for the prediction routes are opt-in. BentoML's
# tracing samples nothing unless configured, so by default those spans were never kept.
_UNTRACED = [] if SETTINGS.trace_predictions else ["/predict", "/predict_curve", "/info"]


def _ok(body: BaseModel) -> Response:
    """A whole JSON body with its length. Returning the model itself makes BentoML stream
    it in chunks, one more trip through every middleware per response."""
    return Response(body.model_dump_json(), media_type="application/json")


def _non_finite(probabilities: np.ndarray) -> JSONResponse | None:
    """A 500 naming the rows whose output is not finite (JSON has no NaN; the contract
    promises numbers). Inputs are bounded so that this should not happen."""
    bad = np.flatnonzero(~np.isfinite(probabilities).all(axis=1))
    if not len(bad):
        return None
    logger.error("non-finite model output for rows %s", bad.tolist())
    return _error(500, f"the model's output is not finite for inputs rows {bad[:10].tolist()}")


@bentoml.service(
    name="modeconn",
    workers=SETTINGS.workers,
    traffic={"timeout": TRAFFIC_TIMEOUT_S},
    logging={"access": {"enabled": SETTINGS.access_log}},
    metrics={"enabled": SETTINGS.metrics},
    tracing={"excluded_urls": ["/readyz", "/livez", "/healthz", "/metrics", *_UNTRACED]},
)
class ModeConnService:
    model = bentoml.models.BentoModel(MODEL_NAME)

    @bentoml.on_deployment
    def _verify_before_workers() -> None:
        """Once, in the `bentoml serve` process, before any worker is spawned."""
        verify_before_workers(MODEL_NAME)

    def __init__(self) -> None:
        self.settings = SETTINGS
        self.batching = SETTINGS.batching
        self.runtime: Runtime | None = None
        self.artifact: Artifact | None = None
        self._batchers: dict[str, MicroBatcher] = {}
        self._load_error: str | None = None
        self._ready = threading.Event()
        if not siblings_have_served():  # load in the background, so /readyz can answer 503 meanwhile
            if self._verify():
                threading.Thread(target=self._load, name="modeconn-load", daemon=True).start()
        elif self.settings.workers > 1:  # siblings take every connection until __init__ returns
            startup.retry_until(lambda: self._verify() and self._load(), "loading the artifact")
        else:  # alone: answer 503 with the reason rather than leave connections unanswered
            self._verify() and self._load()

    def _verify(self) -> bool:
        """Read this server's verified copy of the artifact (serving/startup.py)."""
        self._load_error = None
        try:
            self.artifact = load_artifact(startup.served_folder(self.model.path))
        except ArtifactError as exc:  # raising here would make the arbiter respawn us forever
            self._load_error = f"ArtifactError: {exc}"
            logger.error("cannot serve model %s: %s", startup.served_tag(self.model.tag), exc)
            return False
        logger.info("artifact %s verified (%d members, curve: %s, swa: %s); loading sessions", self.artifact.name,
                    self.artifact.num_members, self.artifact.has_curve, self.artifact.has_swa)
        return True

    def _load(self) -> bool:
        assert self.artifact is not None
        try:
            started = time.perf_counter()
            runtime = Runtime(
                self.artifact,
                choose_providers(self.settings.provider),
                self.settings.onnxruntime,
                curve_cache=self.settings.curve_cache,
                curve_build_after=self.settings.curve_build_after,
            )
            runtime.warmup(WARMUP_BATCH_SIZES)
            runtime.preload_curve(self.settings.curve_preload_ts, WARMUP_BATCH_SIZES)
            runtime.observe = metrics.observe_run  # from here on: warm-up runs are not traffic
            if self.batching.enabled:
                self._batchers["ensemble"] = MicroBatcher(
                    runtime.run_ensemble, split_axes=(0, 1), settings=self.batching, name="ensemble"
                )
                if runtime.curve is not None:
                    run_curve = faulty(self.settings.test_fault, "curve", runtime.run_curve)
                    self._batchers["curve"] = MicroBatcher(
                        run_curve, split_axes=(0,), settings=self.batching, name="curve"
                    )
                if runtime.swa is not None:
                    self._batchers["swa"] = MicroBatcher(
                        runtime.run_swa, split_axes=(0,), settings=self.batching, name="swa"
                    )
            self.runtime = runtime
            self._ready.set()
            mark_served()
            logger.info(
                "ready in %.2f s: providers %s, batching %s",
                time.perf_counter() - started,
                runtime.providers,
                self.batching,
            )
            metrics.artifact_loaded(startup.served_tag(self.model.tag))
            return True
        except Exception as exc:  # a dead loader must not look like a slow one
            self._load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the artifact failed")
            return False

    async def __is_ready__(self) -> bool:
        return self._ready.is_set()

    async def __is_alive__(self) -> bool:
        return self._load_error is None

    @bentoml.on_shutdown
    def _close(self) -> None:
        for batcher in self._batchers.values():
            batcher.close()
        if self.runtime is not None:
            self.runtime.close()

    # -- endpoints -------------------------------------------------------------------------

    @bentoml.api(route="/predict", input_spec=PredictRequest, output_spec=PredictResponse)
    @guarded
    async def predict(self, inputs: list[Any], calibrated: bool = True, model: str = "ensemble") -> Response:
        """Mean softmax of the ensemble members, with entropy and member agreement; or,
        with "model": "swa", the softmax of the one averaged network."""
        return await self._answer_predict(inputs, calibrated, model)

    async def _answer_predict(self, inputs: list[Any], calibrated: bool, model: str) -> Response:
        if (refusal := self._refuse_early() or self._refuse_model(model)) is not None:
            return refusal
        try:
            x = parse_inputs(inputs, self.artifact.input_shape)
        except InputError as exc:
            return _error(400, str(exc))
        return await self._predict(x, calibrated, model)

    @bentoml.api(
        route="/predict_curve", input_spec=CurvePredictRequest, output_spec=CurvePredictResponse
    )
    @guarded
    async def predict_curve(
        self,
        inputs: list[Any],
        t: float | None = None,
        ts: list[float] | None = None,
        calibrated: bool = True,
    ) -> Response:
        """Softmax of the curve model at phi(t), or the mean softmax over several t."""
        return await self._answer_curve(inputs, t, ts, calibrated)

    async def _answer_curve(self, inputs: list[Any], t: float | None, ts: list[float] | None,
                            calibrated: bool) -> Response:
        if (refusal := self._refuse_early()) is not None:
            return refusal
        if not self.artifact.has_curve:
            return _error(404, "this artifact has no curve (manifest 'curve' is null)")
        try:
            x = parse_inputs(inputs, self.artifact.input_shape)
        except InputError as exc:
            return _error(400, str(exc))
        return await self._predict_curve(x, [t] if t is not None else list(ts or []), calibrated)

    async def predict_json(self, path: str, body: bytes) -> Response:
        """/predict or /predict_curve with a JSON body, answered as the API would; a body its
        request model refuses gets a 400 naming the field (errors.validation_error)."""
        fault(self.settings.test_fault, "json")
        model = PredictRequest if path == "/predict" else CurvePredictRequest
        try:
            request = model.model_validate_json(body)
        except ValidationError as exc:
            return validation_error(exc, list(model.model_fields))
        if isinstance(request, PredictRequest):
            return await self._answer_predict(request.inputs, request.calibrated, request.model)
        return await self._answer_curve(request.inputs, request.t, request.ts, request.calibrated)

    async def predict_binary(self, path: str, kind: str, body: bytes, query: str) -> Response:
        """/predict or /predict_curve with a binary body (serving/encodings.py)."""
        fault(self.settings.test_fault, "binary")
        if (refusal := self._refuse_early()) is not None:
            return refusal
        if path == "/predict_curve" and not self.artifact.has_curve:
            return _error(404, "this artifact has no curve (manifest 'curve' is null)")
        shape = self.artifact.input_shape
        if kind in encodings.IMAGE_TYPES and self._image_shape is None:
            return _error(
                415,
                f"this model's input shape {list(shape)} with range {list(self.artifact.input_range)} "
                f"is not an image; send JSON, {encodings.RAW} or {encodings.NPY}",
            )
        model = "ensemble"
        try:
            if path == "/predict":
                calibrated, model = encodings.predict_query(query)
            else:
                t_values, calibrated = encodings.curve_query(query)
        except InputError as exc:
            return _error(400, str(exc))
        if (refusal := self._refuse_model(model)) is not None:
            return refusal
        try:
            x = encodings.decode(kind, body, shape)
        except InputError as exc:
            return _error(400, str(exc))
        if path == "/predict":
            return await self._predict(x, calibrated, model)
        return await self._predict_curve(x, t_values, calibrated)

    async def _predict(self, x: np.ndarray, calibrated: bool, model: str = "ensemble") -> Response:
        spec = self.artifact.spec
        try:
            if model == "swa":  # one network: its own entropy, mutual information 0, agreement 1
                (mean,) = await self._run("swa", None, x)
                members, temperature = mean[None], spec.swa_temperature
            else:
                mean, members = await self._run("ensemble", None, x)
                temperature = spec.ensemble_temperature
        except Overloaded as exc:
            return _error(503, f"overloaded: {exc}; retry shortly", **{"Retry-After": "1"})
        if (refusal := _non_finite(mean)) is not None:
            return refusal
        answered = mean
        if calibrated and temperature is not None:
            answered = scale(mean, temperature)  # the argmax, so predictions and agreement, is unchanged
        fields = summarize(mean, members, self.artifact.class_names, answered)
        return _ok(PredictResponse(**fields, model=model))

    async def _predict_curve(self, x: np.ndarray, t_values: list[float], calibrated: bool) -> Response:
        try:  # every t queued at once, or none (batching.MicroBatcher.submit_many)
            per_t = (await self._batchers["curve"].submit_many(t_values, x) if self.batching.enabled
                     else await asyncio.gather(*(self._run("curve", tv, x) for tv in t_values)))
        except Overloaded as exc:
            return _error(503, f"overloaded: {exc}; retry shortly", **{"Retry-After": "1"})
        stacked = np.stack([out[0] for out in per_t])  # [T, N, C]
        mean = stacked[0] if len(t_values) == 1 else stacked.mean(axis=0, dtype=np.float64)
        if (refusal := _non_finite(mean)) is not None:
            return refusal
        answered = mean
        if calibrated and (temperatures := self.artifact.spec.curve_temperatures) is not None:
            answered = np.mean(  # each t at its own T(t), then the mean over the ts
                [scale(p, curve_temperature(temperatures, tv)) for p, tv in zip(stacked, t_values, strict=True)],
                axis=0, dtype=np.float64)
        fields = summarize(mean, stacked, self.artifact.class_names, answered)
        return _ok(CurvePredictResponse(**fields, ts=t_values))

    @property
    def _image_shape(self) -> tuple[int, int, int] | None:
        assert self.artifact is not None
        return encodings.image_shape(self.artifact.input_shape, self.artifact.input_range)

    @bentoml.api(route="/info", output_spec=InfoResponse)
    @guarded
    async def info(self) -> InfoResponse | JSONResponse:
        """Model card (also served at GET /info)."""
        fault(self.settings.test_fault, "bentoml")
        return self._refuse_unloaded() or self.model_card()

    # -- helpers ---------------------------------------------------------------------------

    def _refuse_unloaded(self) -> JSONResponse | None:
        if self.artifact is None:  # nothing to describe: the manifest itself was refused
            return _error(503, f"model failed to load: {self._load_error}")
        return None

    def _refuse_model(self, model: str) -> JSONResponse | None:
        """404 for a model this artifact lacks (BentoML's request model already refused other names)."""
        assert self.artifact is not None
        if model == "swa" and not self.artifact.has_swa:
            return _error(404, "this artifact has no SWA network (manifest 'swa' is absent); "
                          f"/predict models here: {', '.join(self.artifact.models)}")
        return None

    def _refuse_early(self) -> JSONResponse | None:
        if self._load_error is not None:
            return _error(503, f"model failed to load: {self._load_error}")
        if not self._ready.is_set():
            return _error(503, "model is still loading; poll /readyz", **{"Retry-After": "1"})
        return None

    async def _run(self, graph: str, key: Any, x: np.ndarray) -> list[np.ndarray]:
        if self.batching.enabled:
            return await self._batchers[graph].submit(key, x)
        assert self.runtime is not None
        run = {"ensemble": self.runtime.run_ensemble, "curve": self.runtime.run_curve, "swa": self.runtime.run_swa}[graph]
        return await asyncio.get_running_loop().run_in_executor(None, run, key, x)

    def model_card(self) -> InfoResponse:
        assert self.artifact is not None
        m = self.artifact.manifest
        ensemble = m["ensemble"]
        curve = m["curve"]
        swa = m.get("swa")  # absent in artifacts exported without it
        return InfoResponse(
            name=m["name"],
            created_at=m["created_at"],
            versions=m["versions"],
            architecture=m["architecture"],
            dataset={
                "name": m["dataset"].get("name"),
                "num_classes": self.artifact.num_classes,
                "class_names": list(self.artifact.class_names),
            },
            input=m["input"],
            num_members=self.artifact.num_members,
            member_metrics=[member.get("metrics", {}) for member in m["members"]],
            ensemble={k: ensemble.get(k) for k in ("kind", "num_members", "settings", "metrics")},
            curve=None if curve is None else {
                k: curve.get(k) for k in ("type", "num_bends", "bn_grid_points", "settings", "metrics")},
            swa=None if swa is None else {k: swa.get(k) for k in ("kind", "averaged", "bn_recomputed", "metrics")},
            models=self.artifact.models,
            execution_providers={} if self.runtime is None else self.runtime.providers,
            batching={
                **dataclasses.asdict(self.batching),
                "workers": self.settings.workers,
                "worker_pid": os.getpid(),
                "worker_index": int(metrics.worker()),
                "session_threads_per_graph": 1,
                "onnxruntime": dataclasses.asdict(self.settings.onnxruntime),
                "stats": {name: b.stats.as_dict() for name, b in self._batchers.items()},
                "curve_cache": self._curve_cache_stats(),
            },
            limits={
                "max_rows_per_request": MAX_REQUEST_ROWS,
                "max_ts_per_request": MAX_TS,
                "max_body_bytes": self.settings.max_body_bytes,
                "content_types": ["application/json", encodings.RAW, encodings.NPY]
                + ([encodings.PNG, encodings.JPEG] if self._image_shape else []),
            },
            ready=self._ready.is_set(),
            calibration=calibration_card(self.artifact.spec),
        )

    def _curve_cache_stats(self) -> dict[str, Any] | None:
        cache = None if self.runtime is None else self.runtime.curve_cache
        if cache is None:
            return None
        # new_t_blocked: a t not cached runs on the blocked kernels (serving/nchwc.py); exact: a
        # cached t answers bit for bit what the same t not cached does (serving/runtime.py)
        return {**cache.stats.as_dict(), "ts": cache.keys(), "new_t_blocked": self.runtime.curve_blocked,
                "exact": self.runtime.curve_exact}


async def _get_info(_: Request) -> JSONResponse:
    service = bentoml.get_current_service()
    return service._refuse_unloaded() or JSONResponse(service.model_card().model_dump(mode="json"))


def _load_error() -> str | None:
    return getattr(bentoml.get_current_service(), "_load_error", None)


def _openapi() -> dict[str, Any] | None:
    """The document for the served artifact; None before the service instance exists."""
    try:
        service = bentoml.get_current_service()
    except bentoml.exceptions.BentoMLException:
        return None
    artifact = getattr(service, "artifact", None)
    if artifact is None:  # a worker whose artifact failed to load: every route answers 503
        return None
    version = f"{artifact.name} {artifact.manifest['created_at']}"
    return openapi_document(artifact, max_body_bytes=SETTINGS.max_body_bytes, version=version)


async def _predict_binary(path: str, kind: str, body: bytes, query: str) -> Response:
    service = bentoml.get_current_service()
    if getattr(service, "artifact", None) is None:  # the manifest itself was refused
        return _error(503, f"model failed to load: {getattr(service, '_load_error', None)}")
    return await service.predict_binary(path, kind, body, query)


async def _predict_json(path: str, body: bytes) -> Response:
    service = bentoml.get_current_service()
    if getattr(service, "artifact", None) is None:  # the manifest itself was refused
        return _error(503, f"model failed to load: {getattr(service, '_load_error', None)}")
    return await service.predict_json(path, body)


# BentoML APIs are POST only; GET /info comes from a one-route app mounted beside them
# (Starlette tries the POST route first, sees a method mismatch, and falls through to it).
ModeConnService.mount_asgi_app(Starlette(routes=[Route("/info", _get_info, methods=["GET"])]))
# Outermost first: the metrics see every answer; bugs anywhere inside answer at once; methods,
# media types and query parameters are refused before any body is read; the size limits apply
# to every body.
ModeConnService.add_asgi_middleware(metrics.MetricsMiddleware, enabled=SETTINGS.metrics)
ModeConnService.add_asgi_middleware(ErrorBoundary)
ModeConnService.add_asgi_middleware(middleware.RouteRules)
ModeConnService.add_asgi_middleware(middleware.RequestGuardMiddleware, max_bytes=SETTINGS.max_body_bytes,
                                    budget_bytes=SETTINGS.body_budget_bytes)
ModeConnService.add_asgi_middleware(middleware.ProbeReasons, load_error=_load_error)
ModeConnService.add_asgi_middleware(middleware.OpenAPIMiddleware, document=_openapi)
ModeConnService.add_asgi_middleware(middleware.PredictionBodies, binary=_predict_binary, json_body=_predict_json)
install_connection_limits(SETTINGS.connections)  # this worker's uvicorn (serving/connections.py)
