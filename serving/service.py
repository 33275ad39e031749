"""The BentoML service over an exported artifact (docs/manifest.md): its typed APIs, and the
ASGI layers in front of them. The model, its loading and readiness, and the one prediction
path are serving/predictor.py's; what each route takes and answers is in docs/http-api.md, and
how to run it (start-up, workers, batching, limits, metrics) in docs/operations.md.
"""

from __future__ import annotations

from typing import Any

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from . import metrics, middleware
from .connections import install as install_connection_limits
from .errors import ErrorBoundary, fault, guarded
from .fast_path import PredictionBodies
from .prediction_sets import SetRequest
from .predictor import CURVE, PREDICT, Ask, Predictor
from .schemas import (
    CurvePredictRequest,
    CurvePredictResponse,
    InfoResponse,
    PredictRequest,
    PredictResponse,
)
from .settings import ServiceSettings
from .startup import verify_before_workers

SETTINGS = ServiceSettings.from_env()
MODEL_NAME = SETTINGS.model
TRAFFIC_TIMEOUT_S = 60
# The access log (one INFO line per request) and OpenTelemetry spans of the prediction routes are
# opt-in: layers every request passes through (benchmarks/results/http_serving-*). BentoML's
# tracing samples nothing unless configured, so by default those spans were never kept.
_UNTRACED = [] if SETTINGS.trace_predictions else ["/predict", "/predict_curve", "/info"]
# This worker's model. One per process, as the service instance is; the ASGI layers below are
# given it when the class is defined, before BentoML makes that instance.
PREDICTOR = Predictor(SETTINGS)


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
        """Once, in the `bentoml serve` process, before any worker is spawned (serving/startup.py)."""
        verify_before_workers(MODEL_NAME)

    def __init__(self) -> None:
        self.predictor = PREDICTOR
        self.predictor.start(self.model.path, self.model.tag)

    async def __is_ready__(self) -> bool:
        return self.predictor.ready

    async def __is_alive__(self) -> bool:
        return self.predictor.load_error is None

    @bentoml.on_shutdown
    def _close(self) -> None:
        self.predictor.close()

    @bentoml.api(route=PREDICT, input_spec=PredictRequest, output_spec=PredictResponse)
    @guarded
    async def predict(
        self, inputs: list[Any], calibrated: bool = True, model: str = "ensemble", coverage: float | None = None,
        set_method: str = "aps",
    ) -> PredictResponse | JSONResponse:
        """Mean softmax of the ensemble members, with entropy and member agreement; or, with
        "model": "swa", the softmax of the one averaged network."""
        sets = None if coverage is None else SetRequest(coverage, set_method)
        return await self.predictor.answer(Ask(PREDICT, inputs, calibrated=calibrated, model=model, sets=sets))

    @bentoml.api(route=CURVE, input_spec=CurvePredictRequest, output_spec=CurvePredictResponse)
    @guarded
    async def predict_curve(
        self, inputs: list[Any], t: float | None = None, ts: list[float] | None = None, calibrated: bool = True,
        coverage: float | None = None, set_method: str = "aps",
    ) -> CurvePredictResponse | JSONResponse:
        """Softmax of the curve model at phi(t), or the mean softmax over several t."""
        points = (t,) if t is not None else tuple(ts or ())
        sets = None if coverage is None else SetRequest(coverage, set_method)
        return await self.predictor.answer(Ask(CURVE, inputs, calibrated=calibrated, ts=points, sets=sets))

    @bentoml.api(route="/info", output_spec=InfoResponse)
    @guarded
    async def info(self) -> InfoResponse | JSONResponse:
        """Model card (also served at GET /info)."""
        fault(SETTINGS.test_fault, "bentoml")
        return self.predictor.refuse_unloaded() or self.predictor.model_card()


async def _get_info(_: Request) -> JSONResponse:
    return PREDICTOR.refuse_unloaded() or JSONResponse(PREDICTOR.model_card().model_dump(mode="json"))


# BentoML APIs are POST only; GET /info comes from a one-route app mounted beside them
# (Starlette tries the POST route first, sees a method mismatch, and falls through to it).
ModeConnService.mount_asgi_app(Starlette(routes=[Route("/info", _get_info, methods=["GET"])]))
# Outermost first: the metrics see every answer; bugs anywhere inside answer at once; methods,
# media types and query parameters are refused before any body is read; the size limits apply
# to every body; the prediction bodies are answered innermost (serving/fast_path.py).
ModeConnService.add_asgi_middleware(metrics.MetricsMiddleware, predictor=PREDICTOR, enabled=SETTINGS.metrics)
ModeConnService.add_asgi_middleware(ErrorBoundary)
ModeConnService.add_asgi_middleware(middleware.RouteRules)
ModeConnService.add_asgi_middleware(middleware.RequestGuardMiddleware, max_bytes=SETTINGS.max_body_bytes,
                                    budget_bytes=SETTINGS.body_budget_bytes)
ModeConnService.add_asgi_middleware(middleware.ProbeReasons, load_error=lambda: PREDICTOR.load_error)
ModeConnService.add_asgi_middleware(middleware.OpenAPIMiddleware, document=PREDICTOR.openapi)
ModeConnService.add_asgi_middleware(PredictionBodies, predictor=PREDICTOR, test_fault=SETTINGS.test_fault)
ModeConnService.add_asgi_middleware(middleware.InfoBodies)
install_connection_limits(SETTINGS.connections)  # this worker's uvicorn (serving/connections.py)
