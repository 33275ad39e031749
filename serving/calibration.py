"""The manifest's temperatures applied to the graphs' probabilities (numpy; no torch).

calibrated = softmax(log p / T) in float64, the formula training/ensembles/calibration.py
fits and reports with: for one network (a member, the SWA network) p = softmax(z) and this
is softmax(z / T) exactly; for the ensemble, T scales the log of the averaged member
probabilities. The curve's T(t) is interpolated linearly between its BN grid points
(t = i / (n - 1)), like the curve graph's BN statistics. Why the service and not the
graphs: the graphs stay the same (format-1 artifacts keep working), and raw probabilities
cost nothing extra on request.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modeconn.contract.manifest import Manifest

_TINY = 1e-300  # the same clamp as training's calibration: log(0) stays finite


def scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log probs / T) over the last axis, float64."""
    logits = np.log(np.maximum(probs.astype(np.float64), _TINY)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=-1, keepdims=True)


def curve_temperature(temperatures: list[float], t: float) -> float:
    """T(t) from T at the grid t = i / (n - 1)."""
    grid = np.arange(len(temperatures)) / (len(temperatures) - 1)
    return float(np.interp(t, grid, temperatures))


def calibration_card(spec: Manifest) -> dict[str, Any]:
    """/info's `calibration`: the temperatures, and NLL before/after on validation, metrics on test."""
    ensemble = spec.ensemble.calibration
    curve = None if spec.curve is None else spec.curve.calibration
    return {
        "applied_by_default": ensemble is not None,
        "method": "temperature scaling fitted on the validation split (NLL); calibrated = softmax(log p / T)",
        "ensemble": None if ensemble is None else {
            **ensemble.model_dump(mode="json"), "metrics": spec.ensemble.metrics},
        "members": [None if m.calibration is None else {**m.calibration.model_dump(mode="json"), "metrics": m.metrics}
                    for m in spec.members],
        "curve": None if curve is None else curve.model_dump(mode="json"),
        "swa": None if spec.swa is None or spec.swa.calibration is None else {
            **spec.swa.calibration.model_dump(mode="json"), "metrics": spec.swa.metrics},
    }
