"""Split-conformal thresholds for the manifest (modeconn/contract/conformal.py defines the
scores and sets; the service answers with them).

On the validation split, from the calibrated probabilities (the temperature the service applies)
and each input's u (`conformal.input_uniforms` of its raw float32 values, as the service draws it):
- APS: thresholds calibrated on the whole validation split (it has no parameter to choose).
- RAPS: the validation split is halved by a seeded permutation; (k_reg, penalty) is chosen on
  half A from RAPS_GRID as the pair whose sets, at RAPS_SELECTION_COVERAGE calibrated on half A
  itself, are smallest on average (the first such pair in grid order, penalty 0 first: plain APS
  wins ties); the thresholds are then calibrated on half B, which the choice never saw.
A coverage is stored only when both calibration sets are large enough for it (k <= n).

The temperature was fitted on the same validation split; it is one scalar, but strictly the
finite-sample guarantee needs a score fixed before the calibration data are seen, so the test
split's coverage (stored beside the thresholds) is the check.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from modeconn.contract import conformal
from modeconn.training.core.data import Dataset, input_batches
from modeconn.training.ensembles.calibration import calibrate

RAPS_K_REG = (0, 1, 2, 3, 5)
RAPS_PENALTY = (0.0, 0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
RAPS_GRID = tuple(itertools.product(RAPS_PENALTY, RAPS_K_REG))  # penalty first: 0 (APS) is tried first
RAPS_SELECTION_COVERAGE = 0.9
SPLIT_SEED = 0


def halves(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices of half A (the first n // 2 of a seeded permutation) and half B (the rest)."""
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // 2], order[n // 2:]


def split_uniforms(data: Dataset, split: str) -> np.ndarray:
    """Each input's u over a whole split, in order (streamed splits batch by batch)."""
    parts = [conformal.input_uniforms(x.cpu().numpy()) for x, _ in input_batches(data, split)]
    return np.concatenate(parts) if parts else np.zeros(0)


def mean_size(probs: np.ndarray, u: np.ndarray, tau: float, k_reg: int = 0, penalty: float = 0.0) -> float:
    return float(conformal.set_mask(probs, u, tau, k_reg, penalty).sum(axis=1).mean())


def choose_raps(probs_a: list[np.ndarray], y_a: np.ndarray, u_a: np.ndarray) -> tuple[int, float]:
    """(k_reg, penalty) with the smallest mean set size at RAPS_SELECTION_COVERAGE, calibrated and
    measured on half A; summed over several networks (a curve's grid points) when given several."""
    best, best_size = (0, 0.0), float("inf")
    for penalty, k_reg in RAPS_GRID:
        if penalty == 0.0 and k_reg:
            continue  # without a penalty k_reg changes nothing
        size = 0.0
        for probs in probs_a:
            tau = conformal.threshold(conformal.scores(probs, y_a, u_a, k_reg, penalty), RAPS_SELECTION_COVERAGE)
            size += mean_size(probs, u_a, np.inf if tau is None else tau, k_reg, penalty)  # None: every class
        if size < best_size - 1e-12:
            best, best_size = (k_reg, penalty), size
    return best


def _coverages(n_aps: int, n_raps: int) -> list[float]:
    return [c for c in conformal.COVERAGES
            if conformal.quantile_rank(min(n_aps, n_raps), c) <= min(n_aps, n_raps)]


def _thresholds(probs: np.ndarray, y: np.ndarray, u: np.ndarray, coverages: list[float], k_reg: int = 0,
                penalty: float = 0.0) -> list[float]:
    calibration = conformal.scores(probs, y, u, k_reg, penalty)
    return [float(conformal.threshold(calibration, c)) for c in coverages]  # type: ignore[arg-type]


def set_report(probs: np.ndarray, y: np.ndarray, u: np.ndarray, taus: list[float], k_reg: int = 0,
               penalty: float = 0.0) -> tuple[list[float], list[float]]:
    """Empirical coverage and mean set size on (probs, y) at each threshold."""
    coverage, size = [], []
    for tau in taus:
        mask = conformal.set_mask(probs, u, tau, k_reg, penalty)
        coverage.append(float(mask[np.arange(len(y)), y].mean()))
        size.append(float(mask.sum(axis=1).mean()))
    return coverage, size


def _calibration_fields(n: int, k_reg: int, penalty: float) -> dict[str, Any] | None:
    a, b = halves(n)
    coverages = _coverages(n, len(b))
    if not len(a) or not coverages:
        return None
    return {"coverages": coverages, "randomisation": conformal.RANDOMISATION, "split_seed": SPLIT_SEED, "aps_examples": n, "raps_selection_examples": len(a),
            "raps_examples": len(b), "raps_k_reg": k_reg, "raps_penalty": penalty}


def prediction_sets(val_probs: torch.Tensor, y_val: torch.Tensor, u_val: np.ndarray, temperature: float,
                    test_probs: torch.Tensor, y_test: torch.Tensor, u_test: np.ndarray) -> dict[str, Any] | None:
    """The manifest's `PredictionSets` fields for one model (its raw validation and test
    probabilities, scaled here by its `temperature`, and the inputs' u: `split_uniforms`); None
    when validation is too small."""
    val = calibrate(val_probs, temperature).numpy()
    test = calibrate(test_probs, temperature).numpy()
    y, yt = y_val.cpu().numpy(), y_test.cpu().numpy()
    a, b = halves(len(y))
    k_reg, penalty = choose_raps([val[a]], y[a], u_val[a]) if len(a) else (0, 0.0)
    fields = _calibration_fields(len(y), k_reg, penalty)
    if fields is None:
        return None
    coverages = fields["coverages"]
    aps = _thresholds(val, y, u_val, coverages)
    raps = _thresholds(val[b], y[b], u_val[b], coverages, k_reg, penalty)
    aps_test, raps_test = set_report(test, yt, u_test, aps), set_report(test, yt, u_test, raps, k_reg, penalty)
    return {**fields, "aps": aps, "raps": raps,
            "test_coverage": {"aps": aps_test[0], "raps": raps_test[0]},
            "test_mean_size": {"aps": aps_test[1], "raps": raps_test[1]}}


def curve_prediction_sets(val_probs: list[torch.Tensor], y_val: torch.Tensor, u_val: np.ndarray,
                          temperatures: list[float]) -> dict[str, Any] | None:
    """The manifest's `CurvePredictionSets` fields: thresholds at each BN grid point, one (k_reg,
    penalty) for the whole curve (chosen on half A over all grid points)."""
    val = [calibrate(p, temperature).numpy() for p, temperature in zip(val_probs, temperatures, strict=True)]
    y = y_val.cpu().numpy()
    a, b = halves(len(y))
    k_reg, penalty = choose_raps([p[a] for p in val], y[a], u_val[a]) if len(a) else (0, 0.0)
    fields = _calibration_fields(len(y), k_reg, penalty)
    if fields is None:
        return None
    coverages = fields["coverages"]
    return {**fields, "aps": [_thresholds(p, y, u_val, coverages) for p in val],
            "raps": [_thresholds(p[b], y[b], u_val[b], coverages, k_reg, penalty) for p in val]}
