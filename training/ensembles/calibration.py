"""Temperature scaling (Guo et al. 2017; for ensembles, Ashukha et al. 2020, "Pitfalls of
in-domain uncertainty estimation"): one scalar T per model, fitted on the VALIDATION split by
minimising NLL, so that models are compared at their best temperature (the calibrated NLL).

Everything works on probabilities: calibrated = softmax(log p / T). For one network p is
softmax(z), log p = z − logsumexp(z), and the shift cancels in the softmax, so this is
exactly softmax(z / T). For an ensemble, p is the mean of the members' softmax outputs and T
scales its log, as Ashukha et al. do. The service applies the same formula to the graphs'
probabilities (serving/calibration.py), so served and offline calibrated outputs agree.

T is searched as log T in [log T_MIN, log T_MAX] (bounded Brent, scipy); the NLL is convex in
1/T, so there is one minimum. T = 1 is also evaluated and kept when the search does not beat
it, so the calibrated validation NLL is never above the raw one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from modeconn.training.core.metrics import classification_metrics

T_MIN, T_MAX = 0.05, 20.0
LOG_T_TOLERANCE = 1e-5  # the search's resolution in log T (relative resolution of T)
_TINY = 1e-300  # log(0) would be -inf: a zero probability stays (numerically) zero at any T


def log_probs(probs: torch.Tensor) -> torch.Tensor:
    """log of probabilities in float64, zeros clamped to a tiny positive value."""
    return probs.double().clamp_min(_TINY).log()


def calibrate(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T) over the last axis, in float64."""
    return torch.softmax(log_probs(probs) / temperature, dim=-1)


def nll_at(logp: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    """Mean NLL (nats) of softmax(logp / T) for the true classes."""
    scaled = torch.log_softmax(logp / temperature, dim=1)
    return float(-scaled.gather(1, labels[:, None].to(scaled.device)).mean())


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (T_MIN, T_MAX)) -> float:
    """The T in `bounds` that minimises the NLL of softmax(log probs / T) on (probs, labels)."""
    if len(labels) == 0:
        raise ValueError("fit_temperature needs at least one example (the validation split is empty)")
    logp = log_probs(probs)
    result = minimize_scalar(lambda u: nll_at(logp, labels, math.exp(u)), method="bounded",
                             bounds=(math.log(bounds[0]), math.log(bounds[1])),
                             options={"xatol": LOG_T_TOLERANCE})
    best = math.exp(float(result.x))
    # the bounded search may stop near, not at, T = 1; never return a T worse than no scaling
    return best if nll_at(logp, labels, best) <= nll_at(logp, labels, 1.0) else 1.0


def calibrated_nll(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The NLL of `probs` at the temperature fitted on them (probs, labels), and that temperature:
    how settings and ensembles are judged on validation."""
    temperature = fit_temperature(probs, labels)
    return nll_at(log_probs(probs), labels, temperature), temperature


def calibration_report(val_probs: torch.Tensor, y_val: torch.Tensor, test_probs: torch.Tensor,
                       y_test: torch.Tensor) -> dict[str, Any]:
    """T fitted on validation; raw and calibrated NLL on validation; calibrated test metrics
    (the manifest's `Calibration` fields, modeconn/contract/manifest.py)."""
    calibrated, temperature = calibrated_nll(val_probs, y_val)
    return {
        "temperature": temperature,
        "val_examples": len(y_val),
        "val_nll": nll_at(log_probs(val_probs), y_val, 1.0),
        "calibrated_val_nll": calibrated,
        "calibrated_metrics": classification_metrics(calibrate(test_probs, temperature), y_test),
    }


def calibrated_columns(report: dict[str, Any] | None) -> dict[str, float]:
    """A report as table columns: temperature and the calibrated test NLL, ECE and Brier (the
    error does not change: scaling keeps every argmax). Empty without a report."""
    if report is None:
        return {}
    cal = report["calibrated_metrics"]
    return {"temperature": report["temperature"], **{f"calibrated_test_{k}": cal[k] for k in ("nll", "ece", "brier")}}


def grid_temperatures(val_probs: list[torch.Tensor], y_val: torch.Tensor) -> dict[str, Any]:
    """T(t) at each grid point of a curve (the manifest's `CurveCalibration` fields)."""
    temperatures, raw, calibrated = [], [], []
    for probs in val_probs:
        temperature = fit_temperature(probs, y_val)
        logp = log_probs(probs)
        temperatures.append(temperature)
        raw.append(nll_at(logp, y_val, 1.0))
        calibrated.append(nll_at(logp, y_val, temperature))
    return {"temperatures": temperatures, "val_examples": len(y_val), "val_nll": raw, "calibrated_val_nll": calibrated}


def interpolated_temperature(temperatures: list[float], t: float) -> float:
    """T(t) between grid points i / (n − 1): linear, like the curve graph's BN statistics."""
    n = len(temperatures)
    position = min(max(t, 0.0), 1.0) * (n - 1)
    low = min(int(np.floor(position)), n - 2)
    weight = position - low
    return (1 - weight) * temperatures[low] + weight * temperatures[low + 1]
