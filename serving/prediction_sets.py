"""Prediction sets on request (`coverage`, `set_method`): the manifest's split-conformal
thresholds applied to the calibrated probabilities a batch already has
(modeconn/contract/conformal.py defines the scores and sets; docs/http-api.md the fields).

Which thresholds: the ensemble's or the SWA network's for /predict; for /predict_curve at one t,
the thresholds at the BN grid points interpolated linearly in t, as T(t) and the BN statistics
are (one RAPS k_reg and penalty serve the whole curve, so the interpolated thresholds belong to
one score). At a grid t the thresholds are the calibrated ones; between grid points the network
and its scores change continuously, and the interpolation is the same approximation the graph
makes. A mean over several ts has no calibrated thresholds: such requests are refused.

The sets are always those of the calibrated probabilities (the thresholds were calibrated on
them), also when a request asks for raw probabilities, and each row's u is drawn from the row's
own values exactly as the exporter drew it for the validation inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from modeconn.contract import conformal
from modeconn.contract.manifest import CurvePredictionSets, Manifest, PredictionSets


@dataclass(frozen=True)
class SetRequest:
    """What a request asked for: a coverage among the manifest's, and the score."""

    coverage: float
    method: str = "aps"


def section(spec: Manifest, model: str) -> PredictionSets | CurvePredictionSets | None:
    """The thresholds of `model` (ensemble, swa, or curve); None when the manifest has none, or
    only thresholds of scores drawn otherwise than this service draws them."""
    owner = {"ensemble": spec.ensemble, "swa": spec.swa, "curve": spec.curve}[model]
    found = None if owner is None else owner.prediction_sets
    return found if found is not None and found.randomisation == conformal.RANDOMISATION else None


def problem(spec: Manifest, model: str, asked: SetRequest) -> tuple[int, str] | None:
    """(status, sentence) when `asked` cannot be answered for `model`; None when it can."""
    found = section(spec, model)
    if found is None:
        return 404, (f"this artifact has no prediction-set thresholds for the {model} (manifest "
                     f"'{model}.prediction_sets' is absent, or lacks 'randomisation': exported without a "
                     "validation split, or by an earlier modeconn); ask without 'coverage'")
    if asked.coverage not in found.coverages:
        return 400, (f"coverage = {asked.coverage!r} has no calibrated thresholds; this artifact has "
                     f"{', '.join(map(repr, found.coverages))}")
    return None


def threshold(found: PredictionSets | CurvePredictionSets, asked: SetRequest, t: float | None = None) -> float:
    index = found.coverages.index(asked.coverage)
    table = found.aps if asked.method == "aps" else found.raps
    if isinstance(found, CurvePredictionSets):
        assert t is not None
        return conformal.interpolated([row[index] for row in table], t)  # type: ignore[index]
    return table[index]  # type: ignore[return-value]


def answer(found: PredictionSets | CurvePredictionSets, asked: SetRequest, calibrated: np.ndarray, x: np.ndarray,
           class_names: list[str] | tuple[str, ...], t: float | None = None) -> dict[str, Any]:
    """The response fields: each row's set as labels (by decreasing probability; empty when no
    label is needed for the coverage), and what was asked. `x`: the rows the model answered."""
    k_reg, penalty = (found.raps_k_reg, found.raps_penalty) if asked.method == "raps" else (0, 0.0)
    rows = conformal.set_lists(calibrated, conformal.input_uniforms(x), threshold(found, asked, t), k_reg, penalty)
    return {"prediction_sets": [[class_names[c] for c in row] for row in rows],
            "coverage": asked.coverage, "set_method": asked.method}


def card(spec: Manifest) -> dict[str, Any] | None:
    """/info's `prediction_sets`: per model, the coverages, RAPS's parameters and the test metrics."""
    models = {}
    for model in ("ensemble", "swa", "curve"):
        found = section(spec, model)
        if found is None:
            continue
        entry = found.model_dump(mode="json", exclude={"aps", "raps"})
        models[model] = entry
    if not models:
        return None
    return {"methods": list(conformal.METHODS),
            "method": "split conformal on the validation split (randomised APS; RAPS with k_reg and penalty "
                      "chosen on half of it and calibrated on the other half), from the calibrated probabilities; "
                      "each input's u is a hash of its values, so an input always gets the same set",
            **models}
