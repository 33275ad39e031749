"""Request/response models of the service, and the per-request input check.

Requests forbid unknown fields. `inputs` is typed loosely (nested lists) because its
shape comes from the artifact's manifest, known only at worker start; `parse_inputs`
checks it against that shape and names the first offending element, so a bad request is
refused with a precise 400 before it can reach (and poison) a shared batch. The contract
these checks enforce is declared, with the manifest's shape, by serving/openapi.py.

Every error answer has one body, `ErrorResponse`: {"error": "<sentence>"}, with "field" and
"detail" when a body fails these models, "id" for a 500 (serving/errors.py builds them).
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from modeconn.contract.errors import ModeconnError

MAX_REQUEST_ROWS = 1024  # rows per request; larger jobs should be split by the client
MAX_TS = 16  # t values per /predict_curve request (each costs one pass over the batch)
# Largest accepted |input|. Far beyond any real input, and 23 decades below float32's limit,
# so a network's activations cannot overflow: fed values near 1e38 the demo ensemble answered
# NaN probabilities (a 200 with nulls where the contract promises numbers).
MAX_ABS_INPUT = 1e15

UnitFloat = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
# What /predict can answer with: the ensemble graph (the default) or the SWA network (manifest `swa`).
MODELS = ("ensemble", "swa")
ModelName = Literal["ensemble", "swa"]
SetMethod = Literal["aps", "raps"]
SETS_NEED_ONE_T = ("'coverage' needs one 't': thresholds are calibrated for the network at one t, "
                   "not for a mean over several")


class InputError(ModeconnError):
    """A request whose content is well-formed JSON but not a valid input for this model."""


class _Request(BaseModel):
    # allow_inf_nan=False covers `t`/`ts`; `inputs` is checked by parse_inputs.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# How BentoML's /schema.json describes `inputs` to its own clients: as a numpy tensor, so
# `bentoml.SyncHTTPClient(url).predict(inputs=array)` sends `array.tolist()` (BentoML's
# TensorSchema.encode) instead of failing with "Object of type ndarray is not JSON
# serializable"; lists are sent as they are. Only the schema says "tensor": the server
# still validates `inputs` as nested lists (parse_inputs), so JSON strings or booleans are
# refused rather than cast by numpy.
_BENTOML_CLIENT_TENSOR = {"type": "tensor", "format": "numpy-array"}


class _PredictionRequest(_Request):
    """The fields both prediction routes take."""

    inputs: list[Any] = Field(
        min_length=1,
        max_length=MAX_REQUEST_ROWS,
        description="N rows, each of the model's input shape (see GET /info), raw values",
        json_schema_extra=_BENTOML_CLIENT_TENSOR,
    )
    calibrated: bool = Field(
        default=True,
        strict=True,  # the document says boolean: 0, 1 or "true" are refused, not coerced
        description="temperature-scaled probabilities (the manifest's temperatures; GET /info); false: raw",
    )
    coverage: float | None = Field(
        default=None,
        strict=True,  # a number: "0.9" is refused, not coerced
        gt=0.0,
        lt=1.0,
        description="answer `prediction_sets` too: label sets that hold the true class with this probability "
        "(split conformal; only the coverages the artifact has thresholds for, GET /info `prediction_sets`)",
    )
    set_method: SetMethod = Field(
        default="aps", description="the conformal score of the sets: aps, or raps (fewer unlikely labels); "
        "only with `coverage`")

    @model_validator(mode="before")
    @classmethod
    def _coverage_not_null(cls, data: Any) -> Any:
        if isinstance(data, dict) and "coverage" in data and data["coverage"] is None:
            raise ValueError("'coverage' is null; leave it out or give a value")
        return data

    @model_validator(mode="after")
    def _method_with_coverage(self) -> _PredictionRequest:
        if "set_method" in self.model_fields_set and self.coverage is None:
            raise ValueError("'set_method' is given without 'coverage'; give the coverage the sets should have")
        return self


class PredictRequest(_PredictionRequest):
    # BentoML wraps request models in a "<Name>IODescriptor" subclass; a title keeps that
    # internal name out of the 400 message ("1 validation error for PredictRequest").
    model_config = ConfigDict(title="PredictRequest")

    model: ModelName = Field(
        default="ensemble",
        description="ensemble: the members' mean softmax; swa: the one averaged network, when the "
        "artifact has it (GET /info `models`)",
    )


class CurvePredictRequest(_PredictionRequest):
    model_config = ConfigDict(title="CurvePredictRequest")

    t: UnitFloat | None = Field(default=None, description="one point on the curve, in [0, 1]")
    ts: list[UnitFloat] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TS,
        description="several points; the response is the mean of their softmax outputs",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_explicit_null(cls, data: Any) -> Any:
        # Leaving `t` or `ts` out means "not given"; an explicit null is a malformed request
        # (the declared contract has no null), not a second way to say the same.
        if isinstance(data, dict):
            for name in ("t", "ts"):
                if name in data and data[name] is None:
                    raise ValueError(f"'{name}' is null; leave it out or give a value")
        return data

    @model_validator(mode="after")
    def _exactly_one_of_t_ts(self) -> CurvePredictRequest:
        if (self.t is None) == (self.ts is None):
            raise ValueError("give exactly one of 't' (a number) or 'ts' (a list of numbers)")
        if self.coverage is not None and self.ts is not None:
            raise ValueError(SETS_NEED_ONE_T)
        return self


class _Answer(BaseModel):
    probabilities: list[list[float]] = Field(
        description="N x C, mean softmax (one network's softmax for model swa), temperature-scaled "
        "unless the request says calibrated: false"
    )
    predictions: list[int] = Field(description="argmax class index per row")
    labels: list[str] = Field(description="class name of each prediction")
    entropy: list[float] = Field(
        description="total uncertainty: entropy of the mean distribution H(mean p), nats"
    )
    expected_entropy: list[float] = Field(
        description="aleatoric part: mean of the averaged models' entropies, mean H(p_m), nats"
    )
    mutual_information: list[float] = Field(
        description="epistemic part: entropy - expected_entropy (>= 0; 0 for a single model), nats"
    )
    agreement: list[float] = Field(
        description="fraction of the averaged models whose top class equals the prediction"
    )
    # present only when the request gave `coverage` (left out of the JSON otherwise: exclude_none)
    prediction_sets: list[list[str]] | None = Field(
        default=None,
        description="per row, the labels of its conformal prediction set, by decreasing probability "
        "(empty for some rows when the coverage is below the model's accuracy: docs/http-api.md); only with `coverage`",
    )
    coverage: float | None = Field(default=None, description="the target coverage of the sets; only with `coverage`")
    set_method: SetMethod | None = Field(default=None, description="aps or raps; only with `coverage`")


class PredictResponse(_Answer):
    model: ModelName = Field(description="what answered: the ensemble, or the SWA network (one model: "
                             "mutual_information 0, agreement 1)")


class CurvePredictResponse(_Answer):
    ts: list[float] = Field(description="the t values used")


class ValidationIssue(BaseModel):
    """One entry of `detail`: one problem pydantic found in the body."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="pydantic error type, e.g. missing, extra_forbidden")
    loc: list[str | int] = Field(description="path to the offending field")
    msg: str


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer (serving/errors.py)."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="what is wrong, as a sentence naming the field, element or limit")
    field: str | None = Field(default=None, description="the offending field, e.g. ts[2], when one is")
    detail: list[ValidationIssue] | None = Field(
        default=None, description="every problem, when the body failed the request model (400)"
    )
    id: str | None = Field(
        default=None, description="500 only: the id the server log holds with the traceback"
    )


class InfoResponse(BaseModel):
    """The model card: manifest facts plus how this worker runs them."""

    name: str
    created_at: str
    versions: dict[str, Any]
    architecture: dict[str, Any]
    dataset: dict[str, Any]
    input: dict[str, Any]
    num_members: int
    member_metrics: list[dict[str, Any]]
    ensemble: dict[str, Any]
    curve: dict[str, Any] | None
    swa: dict[str, Any] | None = Field(
        default=None, description="the SWA network (/predict with model swa): its kind, averaged checkpoints, metrics")
    models: list[str] = Field(default_factory=lambda: ["ensemble"], description="the `model` values /predict takes")
    execution_providers: dict[str, str]
    batching: dict[str, Any]
    limits: dict[str, Any]
    ready: bool
    calibration: dict[str, Any] | None = Field(
        default=None, description="temperatures, NLL before/after on validation, calibrated test metrics"
    )
    prediction_sets: dict[str, Any] | None = Field(
        default=None, description="the coverages `coverage` takes, per model, RAPS's parameters, and the "
        "sets' coverage and mean size on the test split; null: the artifact has no thresholds"
    )


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_TYPE_NAMES = {str: "a string", bool: "a boolean", type(None): "null", dict: "an object"}


def parse_inputs(
    inputs: list[Any], shape: tuple[int, ...], max_rows: int = MAX_REQUEST_ROWS
) -> np.ndarray:
    """Check nested lists against `[N, *shape]` and return them as a float32 array.

    numpy converts and checks the shape in one pass; only a request that fails is walked
    element by element, to name the first problem, e.g. "inputs[3] has length 39; expected 40".
    """
    expected = f"expected {len(shape) + 1}-d inputs of shape [N, {', '.join(map(str, shape))}]"
    if not isinstance(inputs, list):
        raise InputError(f"inputs must be a list of rows; {expected}")
    if not inputs:
        raise InputError("inputs is empty; send at least one row")
    if len(inputs) > max_rows:
        raise InputError(f"inputs has {len(inputs)} rows; the maximum per request is {max_rows}")
    try:
        values = np.asarray(inputs)
    except ValueError:  # ragged nesting
        values = None
    numeric = values is not None and values.dtype.kind in "if"
    if not numeric or values.shape != (len(inputs), *shape) or _may_hold_booleans(values, inputs):
        for i, row in enumerate(inputs):  # raises, naming the element
            _check_nested(row, shape, f"inputs[{i}]", expected)
        # All numbers of the right shape (ints beyond int64 made numpy fall back to objects).
        values = np.asarray(inputs, dtype=np.float64)
    bounded = np.abs(values) <= MAX_ABS_INPUT  # False for NaN and infinities too
    if not bounded.all():
        index = tuple(int(k) for k in np.argwhere(~bounded)[0])
        value = inputs
        for k in index:
            value = value[k]
        where = "inputs" + "".join(f"[{k}]" for k in index)
        if not math.isfinite(value):  # value is a Python int or float (ints may exceed int64)
            reason = "is not finite; values must be finite numbers"
        elif abs(value) > _FLOAT32_MAX:
            reason = "overflows float32"
        else:
            reason = f"is beyond the accepted magnitude ({MAX_ABS_INPUT:g})"
        raise InputError(f"{where} = {value!r} {reason}")
    return values.astype(np.float32)


def check_values(values: np.ndarray) -> np.ndarray:
    """`values` (any float dtype, already of the right shape) as float32, refusing NaN,
    infinities and magnitudes beyond MAX_ABS_INPUT with the index of the first one. One
    vectorised pass; the binary encodings (serving/encodings.py) use it."""
    bounded = np.abs(values) <= MAX_ABS_INPUT  # False for NaN and infinities too
    if not bounded.all():
        index = tuple(int(k) for k in np.argwhere(~bounded)[0])
        value = float(values[index])
        where = "inputs" + "".join(f"[{k}]" for k in index)
        reason = (
            "is not finite; values must be finite numbers"
            if not math.isfinite(value)
            else f"is beyond the accepted magnitude ({MAX_ABS_INPUT:g})"
        )
        raise InputError(f"{where} = {value!r} {reason}")
    return np.ascontiguousarray(values, dtype=np.float32)


def _may_hold_booleans(values: np.ndarray, inputs: list[Any]) -> bool:
    """JSON true/false become 1/0 beside numbers, so only a request holding an exact 0 or 1
    needs its element types looked at (at C speed: no Python loop per element)."""
    if not ((values == 0) | (values == 1)).any():
        return False
    flat: Any = inputs
    for _ in range(values.ndim - 1):
        flat = itertools.chain.from_iterable(flat)
    return bool in set(map(type, flat))


def _check_nested(node: Any, shape: tuple[int, ...], where: str, expected: str) -> None:
    if type(node) is not list:
        raise InputError(f"{where} is {_describe(node)}; {expected}")
    if len(node) != shape[0]:
        raise InputError(f"{where} has length {len(node)}; expected {shape[0]}")
    if len(shape) > 1:
        for j, child in enumerate(node):
            _check_nested(child, shape[1:], f"{where}[{j}]", expected)
        return
    # Innermost level: exact types, so JSON true/false or "1.0" are refused, not coerced.
    for j, value in enumerate(node):
        if type(value) is float:
            continue
        if type(value) is not int:
            raise InputError(f"{where}[{j}] is {_describe(value)}; expected a number")
        if abs(value) > _FLOAT32_MAX:  # huge JSON ints would overflow the float32 cast
            raise InputError(f"{where}[{j}] = {value} overflows float32")


def _describe(value: Any) -> str:
    if type(value) in (int, float):
        return "a number"
    if type(value) is list:
        return f"a list of length {len(value)}"
    return _TYPE_NAMES.get(type(value), type(value).__name__)
