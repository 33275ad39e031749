"""The served model: one worker's verified artifact, its onnxruntime sessions and batchers,
its readiness, and the one prediction path every request body takes.

Loading (docs/operations.md, "A running server and its store"): `start` reads the server's
verified copy of the artifact (serving/startup.py), then opens and warms up the sessions in a
background thread, so that /readyz can answer 503 meanwhile; a worker that replaces a dead one
beside serving siblings loads inside `start` instead and retries until it can (it takes no
connection meanwhile), and a lone worker whose load fails stays up and answers 503 with the
reason rather than crash-loop.

Every body, JSON (nested lists) or binary (serving/encodings.py: raw float32, .npy, PNG/JPEG),
arrives as an `Ask`: the route, its options and the rows as sent. `answer` refuses what this
worker cannot serve (503 loading or failed, 404 no curve or no SWA network, 415 an image for a
model that takes none), decodes the rows into checked float32 and hands them to the route's
one prediction function, `predict` or `predict_curve`, which return the response model or the
uniform error (serving/errors.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.responses import JSONResponse

from modeconn.contract import hooks
from modeconn.contract.artifact import Artifact, ArtifactError, load_artifact

from . import encodings, metrics, prediction_sets, startup
from .batching import MicroBatcher, Overloaded
from .calibration import calibration_card, curve_temperature, scale
from .errors import error_response, faulty
from .openapi import openapi_document
from .prediction_sets import SetRequest
from .runtime import SPLIT_AXES, RowAnswers, Runtime, choose_providers, summarize
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

logger = logging.getLogger("bentoml.serve.modeconn")

PREDICT, CURVE = "/predict", "/predict_curve"
JSON = "application/json"
WARMUP_BATCH_SIZES = (1, 8, 32, 64)


@dataclass(frozen=True)
class Ask:
    """One prediction request before its rows are decoded. `rows`: JSON's nested lists when
    `kind` is application/json, else the body of that binary media type."""

    route: str
    rows: list[Any] | bytes
    kind: str = JSON
    calibrated: bool = True
    model: str = "ensemble"
    ts: tuple[float, ...] = ()
    sets: SetRequest | None = None  # prediction sets asked for (`coverage`)

    @classmethod
    def from_request(cls, route: str, request: PredictRequest | CurvePredictRequest) -> Ask:
        """A JSON body its request model accepted."""
        sets = None if request.coverage is None else SetRequest(request.coverage, request.set_method)
        if isinstance(request, PredictRequest):
            return cls(route, request.inputs, calibrated=request.calibrated, model=request.model, sets=sets)
        ts = (request.t,) if request.t is not None else tuple(request.ts or ())
        return cls(route, request.inputs, calibrated=request.calibrated, ts=ts, sets=sets)


class Predictor:
    """One worker's model: inert until `start`, which the service's __init__ calls."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.batching = settings.batching
        self.artifact: Artifact | None = None
        self.runtime: Runtime | None = None
        self.batchers: dict[str, MicroBatcher] = {}
        self.runs: dict[str, Any] = {}  # graph -> its run for a batch of rows (_runs)
        self.load_error: str | None = None
        self.tag = ""
        self._folder = Path()
        self._ready = threading.Event()

    # -- loading and readiness -------------------------------------------------------------

    def start(self, stored: str | Path, tag: object) -> None:
        """Serve the model stored at `stored` (its verified copy under `bentoml serve`)."""
        self._folder, self.tag = startup.served_folder(stored), startup.served_tag(tag)
        if not startup.siblings_have_served():  # load in the background: /readyz answers 503 meanwhile
            if self._verify():
                threading.Thread(target=self._load, name="modeconn-load", daemon=True).start()
        elif self.settings.workers > 1:  # siblings take every connection until __init__ returns
            startup.retry_until(lambda: self._verify() and self._load(), "loading the artifact")
        else:  # alone: answer 503 with the reason rather than leave connections unanswered
            self._verify() and self._load()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def _verify(self) -> bool:
        self.load_error = None
        try:
            self.artifact = load_artifact(self._folder)
        except ArtifactError as exc:  # raising here would make the arbiter respawn us forever
            self.load_error = f"ArtifactError: {exc}"
            logger.error("cannot serve model %s: %s", self.tag, exc)
            return False
        logger.info("artifact %s verified (%d members, curve: %s, swa: %s); loading sessions", self.artifact.name,
                    self.artifact.num_members, self.artifact.has_curve, self.artifact.has_swa)
        return True

    def _load(self) -> bool:
        assert self.artifact is not None
        hooks.hold_point("serve:load")  # tests only (modeconn/contract/hooks.py): a worker held while loading
        try:
            started = time.perf_counter()
            runtime = Runtime(self.artifact, choose_providers(self.settings.provider), self.settings.onnxruntime,
                              curve_cache=self.settings.curve_cache, curve_build_after=self.settings.curve_build_after)
            runtime.warmup(WARMUP_BATCH_SIZES)
            runtime.preload_curve(self.settings.curve_preload_ts, WARMUP_BATCH_SIZES)
            runtime.observe = metrics.observe_run  # from here on: warm-up runs are not traffic
            self.runs = self._runs(runtime)
            if self.batching.enabled:
                for graph, run in self.runs.items():
                    self.batchers[graph] = MicroBatcher(run, split_axes=(0,) if graph == "curve" else SPLIT_AXES,
                                                        settings=self.batching, name=graph, on_batch=self._sample)
            self.runtime = runtime
            self._ready.set()
            startup.mark_served()
            logger.info("ready in %.2f s: providers %s, batching %s", time.perf_counter() - started,
                        runtime.providers, self.batching)
            metrics.artifact_loaded(self.tag)
            return True
        except Exception as exc:  # a dead loader must not look like a slow one
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("loading the artifact failed")
            return False

    def _runs(self, runtime: Runtime) -> dict[str, Any]:
        """Each graph's run for a batch of rows: the ensemble and SWA answered in full
        (RowAnswers, raw and calibrated), the curve as probabilities (its ts are mixed per request)."""
        assert self.artifact is not None
        spec = self.artifact.spec

        def ensemble(key: Any, x: np.ndarray) -> RowAnswers:
            mean, members = runtime.run_ensemble(key, x)
            return RowAnswers.of(mean, members, spec.ensemble_temperature)

        def swa(key: Any, x: np.ndarray) -> RowAnswers:
            (mean,) = runtime.run_swa(key, x)
            return RowAnswers.of(mean, mean[None], spec.swa_temperature)

        runs: dict[str, Any] = {"ensemble": ensemble}
        if runtime.curve is not None:
            runs["curve"] = faulty(self.settings.test_fault, "curve", runtime.run_curve)
        if runtime.swa is not None:
            runs["swa"] = swa
        return runs

    def _sample(self) -> None:
        metrics.sample(self)  # queue depths and the curve cache, after every batch

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()
        if self.runtime is not None:
            self.runtime.close()

    # -- refusals --------------------------------------------------------------------------

    def refuse_unloaded(self) -> JSONResponse | None:
        """503 when there is not even a manifest to describe (it was refused)."""
        if self.artifact is None:
            return error_response(503, f"model failed to load: {self.load_error}")
        return None

    def refuse(self, route: str, model: str = "ensemble", sets: SetRequest | None = None) -> JSONResponse | None:
        """503 while loading or after a failed load; 404 for a graph (or prediction-set thresholds)
        this artifact lacks; 400 for a coverage it has no thresholds for."""
        if self.load_error is not None:
            return error_response(503, f"model failed to load: {self.load_error}")
        if not self._ready.is_set():
            return error_response(503, "model is still loading; poll /readyz", **{"Retry-After": "1"})
        assert self.artifact is not None
        if route == CURVE and not self.artifact.has_curve:
            return error_response(404, "this artifact has no curve (manifest 'curve' is null)")
        if model == "swa" and not self.artifact.has_swa:  # the request model refused other names
            return error_response(404, "this artifact has no SWA network (manifest 'swa' is absent); "
                                  f"/predict models here: {', '.join(self.artifact.models)}")
        if sets is not None:
            owner = "curve" if route == CURVE else model
            if (problem := prediction_sets.problem(self.artifact.spec, owner, sets)) is not None:
                return error_response(*problem, field="coverage")
        return None

    # -- the one prediction path -----------------------------------------------------------

    async def answer(self, ask: Ask) -> PredictResponse | CurvePredictResponse | JSONResponse:
        """`ask` refused, or its rows decoded and predicted."""
        if (refusal := self.refuse(ask.route, ask.model, ask.sets)) is not None:
            return refusal
        assert self.artifact is not None
        if ask.kind in encodings.IMAGE_TYPES and self.image_shape is None:
            return error_response(
                415, f"this model's input shape {list(self.artifact.input_shape)} with range "
                f"{list(self.artifact.input_range)} is not an image; send JSON, {encodings.RAW} or {encodings.NPY}")
        try:
            x = self.decode(ask)
        except InputError as exc:
            return error_response(400, str(exc))
        if ask.route == PREDICT:
            return await self.predict(x, ask.calibrated, ask.model, ask.sets)
        return await self.predict_curve(x, list(ask.ts), ask.calibrated, ask.sets)

    def decode(self, ask: Ask) -> np.ndarray:
        """The rows as checked float32 [N, *input_shape]; an InputError names the first problem."""
        assert self.artifact is not None
        rows, shape = ask.rows, self.artifact.input_shape
        if isinstance(rows, bytes):
            return encodings.decode(ask.kind, rows, shape, image=self.artifact.spec.input.image)
        return parse_inputs(rows, shape)

    async def predict(self, x: np.ndarray, calibrated: bool, model: str = "ensemble",
                      sets: SetRequest | None = None) -> PredictResponse | JSONResponse:
        """The ensemble's mean softmax, or the SWA network's softmax, for the rows `x` (SWA: its
        own entropy, mutual information 0, agreement 1); with `sets`, the rows' prediction sets
        (serving/prediction_sets.py; `refuse` checked the artifact has their thresholds)."""
        assert self.artifact is not None
        try:
            answers = RowAnswers(*await self._run(model, None, x))
        except Overloaded as exc:
            return error_response(503, f"overloaded: {exc}; retry shortly", **{"Retry-After": "1"})
        if (refusal := _non_finite(answers.finite)) is not None:
            return refusal
        extra = {} if sets is None else prediction_sets.answer(
            prediction_sets.section(self.artifact.spec, model), sets, answers.calibrated, x,
            self.artifact.class_names)
        return PredictResponse(**answers.fields(self.artifact.class_names, calibrated), model=model, **extra)

    async def predict_curve(self, x: np.ndarray, ts: list[float], calibrated: bool,
                            sets: SetRequest | None = None) -> CurvePredictResponse | JSONResponse:
        """The curve's softmax at phi(t), or the mean over several t, for the rows `x`; with `sets`
        (one t: the request model and the query refuse several), the rows' prediction sets."""
        assert self.artifact is not None
        try:  # every t queued at once, or none (batching.MicroBatcher.submit_many)
            per_t = (await self.batchers["curve"].submit_many(ts, x) if self.batching.enabled
                     else await asyncio.gather(*(self._run("curve", t, x) for t in ts)))
        except Overloaded as exc:
            return error_response(503, f"overloaded: {exc}; retry shortly", **{"Retry-After": "1"})
        stacked = np.stack([out[0] for out in per_t])  # [T, N, C]
        mean = stacked[0] if len(ts) == 1 else stacked.mean(axis=0, dtype=np.float64)
        if (refusal := _non_finite(np.isfinite(mean).all(axis=1))) is not None:
            return refusal
        answered = mean
        if calibrated and (temperatures := self.artifact.spec.curve_temperatures) is not None:
            answered = np.mean(  # each t at its own T(t), then the mean over the ts
                [scale(p, curve_temperature(temperatures, t)) for p, t in zip(stacked, ts, strict=True)],
                axis=0, dtype=np.float64)
        extra = {}
        if sets is not None:
            temperatures = self.artifact.spec.curve_temperatures
            assert temperatures is not None and len(ts) == 1  # thresholds come with temperatures
            probs = answered if calibrated else scale(mean, curve_temperature(temperatures, ts[0]))
            extra = prediction_sets.answer(prediction_sets.section(self.artifact.spec, "curve"), sets, probs, x,
                                           self.artifact.class_names, t=ts[0])
        return CurvePredictResponse(**summarize(mean, stacked, self.artifact.class_names, answered), ts=ts, **extra)

    async def _run(self, graph: str, key: Any, x: np.ndarray) -> Any:
        if self.batching.enabled:
            return await self.batchers[graph].submit(key, x)
        return await asyncio.get_running_loop().run_in_executor(None, self.runs[graph], key, x)

    # -- descriptions ----------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        assert self.artifact is not None
        return encodings.image_shape(self.artifact.input_shape, self.artifact.input_range)

    def openapi(self) -> dict[str, Any] | None:
        """The OpenAPI document of the served artifact; None before it is read or when it was
        refused (every route then answers 503)."""
        if (artifact := self.artifact) is None:
            return None
        version = f"{artifact.name} {artifact.manifest['created_at']}"
        return openapi_document(artifact, max_body_bytes=self.settings.max_body_bytes, version=version)

    def model_card(self) -> InfoResponse:
        assert self.artifact is not None
        m = self.artifact.manifest
        ensemble, curve = m["ensemble"], m["curve"]
        swa = m.get("swa")  # absent in artifacts exported without it
        return InfoResponse(
            name=m["name"],
            created_at=m["created_at"],
            versions=m["versions"],
            architecture=m["architecture"],
            dataset={"name": m["dataset"].get("name"), "num_classes": self.artifact.num_classes,
                     "class_names": list(self.artifact.class_names)},
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
                "stats": {name: b.stats.as_dict() for name, b in self.batchers.items()},
                "curve_cache": self._curve_cache_stats(),
            },
            limits={
                "max_rows_per_request": MAX_REQUEST_ROWS,
                "max_ts_per_request": MAX_TS,
                "max_body_bytes": self.settings.max_body_bytes,
                "content_types": [JSON, encodings.RAW, encodings.NPY]
                + ([encodings.PNG, encodings.JPEG] if self.image_shape else []),
            },
            ready=self._ready.is_set(),
            calibration=calibration_card(self.artifact.spec),
            prediction_sets=prediction_sets.card(self.artifact.spec),
        )

    def _curve_cache_stats(self) -> dict[str, Any] | None:
        cache = None if self.runtime is None else self.runtime.curve_cache
        if cache is None:
            return None
        # new_t_blocked: a t not cached runs on the blocked kernels (serving/nchwc.py); exact: a
        # cached t answers bit for bit what the same t not cached does (serving/runtime.py)
        return {**cache.stats.as_dict(), "ts": cache.keys(), "new_t_blocked": self.runtime.curve_blocked,
                "exact": self.runtime.curve_exact}


def _non_finite(finite: np.ndarray) -> JSONResponse | None:
    """A 500 naming the rows whose output is not finite (`finite`: per row; JSON has no NaN,
    and the contract promises numbers). Inputs are bounded so that this should not happen."""
    bad = np.flatnonzero(~finite)
    if not len(bad):
        return None
    logger.error("non-finite model output for rows %s", bad.tolist())
    return error_response(500, f"the model's output is not finite for inputs rows {bad[:10].tolist()}")
