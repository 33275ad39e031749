"""The service's OpenAPI document, built from the served artifact's manifest.

BentoML 1.4 derives /docs.json from the request models alone (_bentoml_sdk/service/
openapi.py) and offers no hook to change it: `inputs` there is "an array of anything",
every API is said to answer 400/404/500 with BentoML's exception schemas (whose `detail`
is a string, while its real 400 carries a list), and mounted non-FastAPI routes such as
GET /info are missing. This document states what the service really accepts and answers:

- `inputs`: 1..max_rows rows, each nested arrays of exactly the manifest's input shape
  (minItems = maxItems per dimension) of numbers of magnitude <= MAX_ABS_INPUT;
- `t` in [0, 1], or `ts`: 1..max_ts values in [0, 1]; exactly one of them (oneOf);
- `model` on /predict: only the models this artifact has (ensemble, and swa when exported);
- `coverage`: only the coverages the artifact has prediction-set thresholds for (absent from the
  document when it has none), `set_method` only with it (dependentRequired), and on
  /predict_curve only with one `t`;
- answers: probabilities with one entry per class, predictions and labels from the
  manifest's classes; every error (400/404/413/415/500/503) with the one `ErrorResponse`;
- GET and POST /info with the model card, and BentoML's health and metrics routes;
- the binary request bodies (serving/encodings.py) in each prediction operation's
  `x-binary-bodies` (media type -> what the bytes must be) and its description, not in
  `requestBody.content`: JSON Schema cannot say which bytes are valid (N rows of finite
  float32, a .npy header, an image of one size), so a `format: binary` schema there would
  declare every byte string valid, and a binary curve request needs `t`/`ts` in the query
  string, which a JSON request must not have (its fields are in the body: a query
  parameter on it is a 400);
- 405 with `Allow` for a method a path does not take, 415 for a media type it does not.

serving/middleware.py serves it at GET /docs.json (BentoML's route for the same path is
registered before any mounted app could shadow it). The validation it describes is
serving/schemas.py's; tests/test_contract.py fuzzes the live server against it.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from pydantic import BaseModel

from modeconn.contract.artifact import Artifact

from . import encodings, prediction_sets
from .schemas import (
    MAX_ABS_INPUT,
    MAX_REQUEST_ROWS,
    MAX_TS,
    CurvePredictResponse,
    ErrorResponse,
    InfoResponse,
    PredictResponse,
)

OPENAPI_VERSION = "3.1.0"  # JSON Schema 2020-12: pydantic's schemas (null in anyOf) fit as they are
_REF = "#/components/schemas/{model}"
_CALIBRATED = {
    "type": "boolean",
    "default": True,
    "description": "temperature-scaled probabilities (GET /info lists the temperatures); false: raw",
}


def openapi_document(
    artifact: Artifact,
    *,
    max_body_bytes: int,
    max_rows: int = MAX_REQUEST_ROWS,
    max_ts: int = MAX_TS,
    version: str = "None",
) -> dict[str, Any]:
    """The whole document for `artifact` (a dict ready for JSON)."""
    shape, classes = artifact.input_shape, list(artifact.class_names)
    components: dict[str, Any] = {}
    for model in (ErrorResponse, InfoResponse, PredictResponse, CurvePredictResponse):
        components.update(_model_schemas(model))
    for name in ("PredictResponse", "CurvePredictResponse"):
        components[name] = _tighten_answer(components[name], classes, max_rows)
    components["CurvePredictResponse"]["properties"]["ts"].update(_unit_array(max_ts))
    models = artifact.models
    components["PredictResponse"]["properties"]["model"] = {"type": "string", "enum": models}
    ensemble_sets, curve_sets = (prediction_sets.section(artifact.spec, m) for m in ("ensemble", "curve"))
    components["PredictResponse"] = _sets_answer(components["PredictResponse"], ensemble_sets, classes)
    components["CurvePredictResponse"] = _sets_answer(components["CurvePredictResponse"], curve_sets, classes)
    components["PredictRequest"] = {
        "title": "PredictRequest",
        "type": "object",
        "properties": {
            "inputs": inputs_schema(shape, max_rows),
            "calibrated": _CALIBRATED,
            "model": {
                "type": "string",
                "enum": models,
                "default": "ensemble",
                "description": "ensemble: the members' mean softmax; swa: the one averaged network "
                "(its own temperature; mutual_information 0, agreement 1)",
            },
        },
        "required": ["inputs"],
        "additionalProperties": False,
    }
    _sets_request(components["PredictRequest"], ensemble_sets)
    components["CurvePredictRequest"] = {
        "title": "CurvePredictRequest",
        "type": "object",
        "properties": {
            "inputs": inputs_schema(shape, max_rows),
            "calibrated": _CALIBRATED,
            "t": {**_unit(), "description": "one point on the curve"},
            "ts": {
                **_unit_array(max_ts),
                "description": "several points; the answer is the mean of their softmax outputs",
            },
        },
        "required": ["inputs"],
        "oneOf": [
            {"title": "one t", "required": ["t"]},
            {"title": "several ts", "required": ["ts"]},
        ],
        "additionalProperties": False,
    }
    _sets_request(components["CurvePredictRequest"], curve_sets)
    if curve_sets is not None:  # thresholds are for one t: coverage and ts never together
        components["CurvePredictRequest"]["not"] = {"required": ["ts", "coverage"]}
    limits = (
        f"at most {max_rows} rows and {max_ts} `ts` values per request, "
        f"bodies up to {max_body_bytes} bytes"
    )
    errors = _error_responses(max_body_bytes)
    post_errors = {k: errors[k] for k in ("400", "413", "415", "500", "503")}
    binary = binary_bodies(shape, artifact.input_range, max_rows, artifact.spec.input.image)
    paths = {
        "/predict": {
            "post": _operation(
                "predict",
                "Mean softmax of the ensemble members, with entropy and member agreement"
                + ("; or the SWA network's softmax (`model`: swa)." if artifact.has_swa else "."),
                request="PredictRequest",
                answer="PredictResponse",
                errors={**post_errors, "404": errors["404"]},
                binary=binary,
                binary_note=" With a binary body, `?calibrated=false` asks for raw probabilities"
                + (", `?model=swa` for the SWA network" if artifact.has_swa else "")
                + (", `?coverage=0.9&set_method=raps` for prediction sets" if ensemble_sets else "") + ".",
            )
        },
        "/predict_curve": {
            "post": _operation(
                "predict_curve",
                "Softmax of the curve model at phi(t), or the mean softmax over several t."
                + ("" if artifact.has_curve else " This artifact has no curve: always 404."),
                request="CurvePredictRequest",
                answer="CurvePredictResponse",
                errors={**post_errors, "404": errors["404"]},
                binary=binary,
                binary_note=" With a binary body, give `t` or `ts` in the query string: "
                "`?t=0.3` or `?ts=0.2,0.5,0.8` (exactly one; values in [0, 1], at most "
                f"{max_ts}); `&calibrated=false` for raw probabilities"
                + ("; `&coverage=0.9` (one `t` only) and `&set_method=raps` for prediction sets." if curve_sets else "."),
            )
        },
        "/info": {
            "get": _operation(
                "info", "The model card.", answer="InfoResponse", errors={"500": errors["500"]}
            ),
            "post": _operation(
                "info_post",
                "The model card (the same as GET); any JSON object as body, or none.",
                answer="InfoResponse",
                errors={k: errors[k] for k in ("400", "413", "415", "500")},
                body={"type": "object"},
            ),
        },
        **_infra_paths(),
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "modeconn",
            "version": version,
            "description": (
                f"Serves artifact `{artifact.name}`: inputs of shape [N, "
                f"{', '.join(map(str, shape))}] (float32; the training data's range is "
                f"{list(artifact.input_range)}), {len(classes)} classes, "
                f"{artifact.num_members} members, curve: {'yes' if artifact.has_curve else 'no'}, "
                f"SWA network: {'yes' if artifact.has_swa else 'no'}. "
                f"Limits: {limits}."
            ),
        },
        "servers": [{"url": "."}],
        "paths": paths,
        "components": {"schemas": components},
    }


def inputs_schema(shape: tuple[int, ...], max_rows: int) -> dict[str, Any]:
    """`inputs` as JSON Schema: rows of nested arrays of exactly `shape`, bounded numbers."""
    node: dict[str, Any] = {"type": "number", "minimum": -MAX_ABS_INPUT, "maximum": MAX_ABS_INPUT}
    for size in reversed(shape):
        node = {"type": "array", "items": node, "minItems": size, "maxItems": size}
    return {
        "type": "array",
        "items": node,
        "minItems": 1,
        "maxItems": max_rows,
        "description": f"N rows of shape [{', '.join(map(str, shape))}], raw values, "
        f"|x| <= {MAX_ABS_INPUT:g}",
    }


def binary_bodies(
    shape: tuple[int, ...], value_range: tuple[float, float], max_rows: int, image: Any = None
) -> dict[str, Any]:
    """The non-JSON request bodies this artifact takes, as OpenAPI media types; `image`: the
    manifest's input.image (how training read image files), when it has one."""
    dims = " x ".join(map(str, shape))
    bodies = {
        encodings.RAW: f"little-endian float32 in C order, N x {dims} values "
        f"(N = bytes / {4 * math.prod(shape)}, 1..{max_rows})",
        encodings.NPY: f"one .npy array (numpy.save) of shape [N, {', '.join(map(str, shape))}] "
        f"or [{', '.join(map(str, shape))}], float32 (float64/float16 cast; no integers, no pickles)",
    }
    if encodings.image_shape(shape, value_range) is not None:
        colour = "RGB" if shape[0] == 3 else "grayscale"
        if image is not None and image.resize is not None:
            text = (f"one image of any size, converted to {colour} and resized to {shape[2]}x{shape[1]} "
                    "(Pillow bilinear) as the training images were; scaled to [0, 1]")
        elif image is not None:
            text = f"one image of {shape[2]}x{shape[1]} pixels, converted to {colour}; scaled to [0, 1], not resized"
        else:
            text = f"one image of {shape[2]}x{shape[1]} pixels, {colour}; scaled to [0, 1], not resized"
        for kind in encodings.IMAGE_TYPES:
            bodies[kind] = text
    return {kind: {"description": text} for kind, text in bodies.items()}


def _unit() -> dict[str, Any]:
    return {"type": "number", "minimum": 0.0, "maximum": 1.0}


def _unit_array(max_items: int) -> dict[str, Any]:
    return {"type": "array", "items": _unit(), "minItems": 1, "maxItems": max_items}


def _model_schemas(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=_REF)
    defs = schema.pop("$defs", {})
    return {model.__name__: schema, **defs}


def _tighten_answer(schema: dict[str, Any], classes: list[str], max_rows: int) -> dict[str, Any]:
    """Per-row fields of a prediction answer, with this artifact's classes."""
    schema = copy.deepcopy(schema)
    props = schema["properties"]
    rows = {"minItems": 1, "maxItems": max_rows}
    props["probabilities"].update(rows)
    props["probabilities"]["items"] = {
        "type": "array",
        "items": _unit(),
        "minItems": len(classes),
        "maxItems": len(classes),
    }
    last = len(classes) - 1
    props["predictions"].update(rows, items={"type": "integer", "minimum": 0, "maximum": last})
    props["labels"].update(rows, items={"type": "string", "enum": sorted(set(classes))})
    for name in ("entropy", "expected_entropy", "mutual_information"):
        props[name].update(rows, items={"type": "number", "minimum": 0.0})
    props["agreement"].update(rows, items=_unit())
    schema["additionalProperties"] = False
    return schema


def _sets_request(schema: dict[str, Any], sets: Any) -> None:
    """`coverage` and `set_method` on a request schema, when the artifact has thresholds for it."""
    if sets is None:
        return
    schema["properties"]["coverage"] = {
        "type": "number", "enum": list(sets.coverages),
        "description": "also answer `prediction_sets`: conformal label sets holding the true class with this "
        "probability (the coverages this artifact has thresholds for)"}
    schema["properties"]["set_method"] = {
        "type": "string", "enum": ["aps", "raps"], "default": "aps",
        "description": "the conformal score: aps, or raps (penalises unlikely labels); only with coverage"}
    schema["dependentRequired"] = {"set_method": ["coverage"]}


def _sets_answer(schema: dict[str, Any], sets: Any, classes: list[str]) -> dict[str, Any]:
    """The prediction-set fields of an answer: present only when the request gave `coverage`, so
    never null; left out of the document when the artifact has no thresholds."""
    props = schema["properties"]
    if sets is None:
        for name in ("prediction_sets", "coverage", "set_method"):
            del props[name]
        return schema
    labels = {"type": "string", "enum": sorted(set(classes))}
    props["prediction_sets"] = {
        "type": "array", "items": {"type": "array", "items": labels, "minItems": 0, "maxItems": len(classes)},
        "description": props["prediction_sets"]["description"]}
    props["coverage"] = {"type": "number", "enum": list(sets.coverages), "description": props["coverage"]["description"]}
    props["set_method"] = {"type": "string", "enum": ["aps", "raps"], "description": props["set_method"]["description"]}
    return schema


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model=ref)}}}


def _error_responses(max_body_bytes: int) -> dict[str, dict[str, Any]]:
    retry_after = {
        "Retry-After": {
            "description": "seconds to wait (sent while loading and when the queue is full)",
            "schema": {"type": "integer", "minimum": 0},
        }
    }
    described = {
        "400": "the request is not valid for this model; `error` names the field or element",
        "404": "this artifact has no curve (/predict_curve), no SWA network (/predict with model swa), "
        "or no prediction-set thresholds (a request with coverage)",
        "413": f"the body is larger than {max_body_bytes} bytes",
        "415": "a content type this route does not take (JSON needs application/json), or an "
        "image for a model that takes no images",
        "500": "a bug; the server log has the traceback",
        "503": "still loading, failed to load, or the batching queue is full",
    }
    responses = {
        code: {"description": text, "content": _json("ErrorResponse")}
        for code, text in described.items()
    }
    responses["503"]["headers"] = retry_after
    return responses


def _operation(
    operation_id: str,
    description: str,
    *,
    answer: str,
    errors: dict[str, Any],
    request: str | None = None,
    body: dict[str, Any] | None = None,
    binary: dict[str, Any] | None = None,
    binary_note: str = "",
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "tags": ["Service APIs"],
        "description": description,
        "responses": {"200": {"description": "success", "content": _json(answer)}, **errors},
    }
    if request is not None:
        op["requestBody"] = {"required": True, "content": _json(request)}
        if binary:
            op["x-binary-bodies"] = binary
            op["description"] += (
                " Bodies: JSON (application/json), or " + ", ".join(binary)
                + " (x-binary-bodies; README, HTTP API)." + binary_note
            )
    elif body is not None:
        op["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    return op


def _infra_paths() -> dict[str, Any]:
    """BentoML's own routes, as BentoML serves them (plain text, not JSON)."""

    def route(operation_id: str, description: str, unavailable: str | None) -> dict[str, Any]:
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
        }
        if unavailable:
            responses["503"] = {"description": unavailable}
        return {
            "get": {
                "operationId": operation_id,
                "tags": ["Infrastructure"],
                "description": description,
                "responses": responses,
            }
        }

    return {
        "/healthz": route("healthz", "Health check (deprecated alias of /livez).", "not alive"),
        "/livez": route("livez", "Liveness: 200 unless loading the artifact failed.", "not alive"),
        "/readyz": route(
            "readyz", "Readiness: 200 once the sessions are loaded and warmed up.", "not ready"
        ),
        "/metrics": route("metrics", "Prometheus metrics.", None),
    }
