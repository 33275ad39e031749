"""Request/response models of the service, and the per-request input check.

Requests forbid unknown fields. `inputs` is typed loosely (nested lists) because its
shape comes from the artifact's manifest, known only at worker start; `parse_inputs`
checks it against that shape and names the first offending element, so a bad request is
refused with a precise 400 before it can reach (and poison) a shared batch.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serving.errors import ModeconnError

MAX_REQUEST_ROWS = 1024  # rows per request; larger jobs should be split by the client
MAX_TS = 16  # t values per /predict_curve request (each costs one pass over the batch)

UnitFloat = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]


class InputError(ModeconnError):
    """A request whose content is well-formed JSON but not a valid input for this model."""


class _Request(BaseModel):
    # allow_inf_nan=False covers `t`/`ts`; `inputs` is checked by parse_inputs.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PredictRequest(_Request):
    # BentoML wraps request models in a "<Name>IODescriptor" subclass; a title keeps that
    # internal name out of the 400 message ("1 validation error for PredictRequest").
    model_config = ConfigDict(title="PredictRequest")

    inputs: list[Any] = Field(
        min_length=1,
        max_length=MAX_REQUEST_ROWS,
        description="N rows, each of the model's input shape (see GET /info), raw values",
    )


class CurvePredictRequest(PredictRequest):
    model_config = ConfigDict(title="CurvePredictRequest")

    t: UnitFloat | None = Field(default=None, description="one point on the curve, in [0, 1]")
    ts: list[UnitFloat] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TS,
        description="several points; the response is the mean of their softmax outputs",
    )

    @model_validator(mode="after")
    def _exactly_one_of_t_ts(self) -> CurvePredictRequest:
        if (self.t is None) == (self.ts is None):
            raise ValueError("give exactly one of 't' (a number) or 'ts' (a list of numbers)")
        return self


class PredictResponse(BaseModel):
    probabilities: list[list[float]] = Field(description="N x C, mean softmax")
    predictions: list[int] = Field(description="argmax class index per row")
    labels: list[str] = Field(description="class name of each prediction")
    entropy: list[float] = Field(description="predictive entropy of the mean distribution, nats")
    agreement: list[float] = Field(
        description="fraction of the averaged models whose top class equals the prediction"
    )


class CurvePredictResponse(PredictResponse):
    ts: list[float] = Field(description="the t values used")


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
    execution_providers: dict[str, str]
    batching: dict[str, Any]
    limits: dict[str, Any]
    ready: bool


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_TYPE_NAMES = {str: "a string", bool: "a boolean", type(None): "null", dict: "an object"}


def parse_inputs(
    inputs: list[Any], shape: tuple[int, ...], max_rows: int = MAX_REQUEST_ROWS
) -> np.ndarray:
    """Check nested lists against `[N, *shape]` and return them as a float32 array.

    Raises InputError naming the first problem, e.g. "inputs[3] has length 39; expected 40".
    """
    expected = f"expected {len(shape) + 1}-d inputs of shape [N, {', '.join(map(str, shape))}]"
    if not isinstance(inputs, list):
        raise InputError(f"inputs must be a list of rows; {expected}")
    if not inputs:
        raise InputError("inputs is empty; send at least one row")
    if len(inputs) > max_rows:
        raise InputError(f"inputs has {len(inputs)} rows; the maximum per request is {max_rows}")
    for i, row in enumerate(inputs):
        _check_nested(row, shape, f"inputs[{i}]", expected)
    array = np.asarray(inputs, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        index = tuple(int(k) for k in np.argwhere(~finite)[0])
        value = inputs
        for k in index:
            value = value[k]
        where = "inputs" + "".join(f"[{k}]" for k in index)
        reason = "is not finite" if not np.isfinite(value) else "overflows float32"
        raise InputError(f"{where} = {value!r} {reason}; values must be finite numbers")
    return array


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
