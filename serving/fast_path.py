"""This middleware replaces BentoML's request parsing for the bodies of POST /predict and
/predict_curve, JSON and binary alike, and answers them through the same Predictor.answer that
the service's @bentoml.api methods call. It is kept because BentoML's parsing and dispatch cost
a batch-1 JSON request about as much server CPU again as all the rest of it, nearly halving
throughput at 64 clients (benchmarks/results/serving_peers-2026-12-02.md: modeconn's json rows,
then parsed by BentoML, against its binary rows, already read here).

BentoML would also read a binary body (serving/encodings.py) as JSON. A JSON body is validated
with the route's request model (serving/schemas.py), as BentoML would, and a refusal answered as
a 400 naming the field (serving/errors.py: one error shape and no traceback in the log, where
BentoML logs one for every body its model refuses); a binary body takes its options from the
query string. The middleware sits innermost: RouteRules has refused other methods and media
types, the size limits hold, and the metrics and the error boundary see every answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from starlette.responses import Response

from . import encodings
from .errors import error_response, fault, validation_error
from .middleware import header, read_body
from .predictor import CURVE, JSON, PREDICT, Ask, Predictor
from .schemas import CurvePredictRequest, InputError, PredictRequest

Scope = dict[str, Any]


class PredictionBodies:
    def __init__(self, app: Any, predictor: Predictor, test_fault: tuple[str, ...] = ()) -> None:
        self.app = app
        self.predictor = predictor
        self.test_fault = test_fault  # MODECONN_TEST_FAULT: json, binary (serving/errors.py)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in (PREDICT, CURVE):
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:  # the client went away
            return
        kind = encodings.media_type(header(scope, b"content-type").decode("latin-1"))
        if kind == JSON:
            ask = self._json(scope["path"], body)
        else:  # RouteRules let only JSON and the binary types through
            ask = self._binary(scope["path"], kind, body, scope.get("query_string", b"").decode("latin-1"))
        answer = await self.predictor.answer(ask) if isinstance(ask, Ask) else ask
        if not isinstance(answer, Response):  # whole, with its length: BentoML would stream a model in chunks
            # exclude_none: the prediction-set fields appear only when asked for (no other field is null)
            answer = Response(answer.model_dump_json(exclude_none=True), media_type=JSON)
        await answer(scope, receive, send)

    def _json(self, route: str, body: bytes) -> Ask | Response:
        fault(self.test_fault, "json")
        if (refusal := self.predictor.refuse_unloaded()) is not None:
            return refusal
        model = PredictRequest if route == PREDICT else CurvePredictRequest
        try:
            request = model.model_validate_json(body)
        except ValidationError as exc:
            return validation_error(exc, list(model.model_fields))
        return Ask.from_request(route, request)

    def _binary(self, route: str, kind: str, body: bytes, query: str) -> Ask | Response:
        fault(self.test_fault, "binary")
        if (refusal := self.predictor.refuse_unloaded()) is not None:
            return refusal
        try:
            if route == PREDICT:
                calibrated, model, sets = encodings.predict_query(query)
                return Ask(route, body, kind, calibrated=calibrated, model=model, sets=sets)
            ts, calibrated, sets = encodings.curve_query(query)
        except InputError as exc:
            return error_response(400, str(exc))
        return Ask(route, body, kind, calibrated=calibrated, ts=tuple(ts), sets=sets)
