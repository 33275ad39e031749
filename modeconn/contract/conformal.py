"""Split-conformal prediction sets: the one definition of the scores, thresholds and sets that the
exporter calibrates with (training/export/conformal.py) and the service answers with, so a
served set is exactly the set the calibration was about. numpy only (the service has no torch).

Scores, from the CALIBRATED probabilities p (the temperature applies first), the classes
sorted by decreasing p (ties in class order), the class y at rank r (1-based):
- APS (Romano et al. 2020): s(x, y) = p_(1) + ... + p_(r), the mass down to and including y.
  Non-randomised: y's whole probability counts, which makes the sets conservative (never
  smaller than the randomised version's).
- RAPS (Angelopoulos et al. 2021): the APS score + penalty * max(0, r - k_reg), which discourages
  the long tails of unlikely classes that APS adds when the probabilities are flat.

Threshold for coverage 1 - alpha from n calibration scores: the ceil((n + 1)(1 - alpha))-th
smallest (none when that exceeds n). Then for a new exchangeable example
P(s(X, Y) <= threshold) >= 1 - alpha (the finite-sample guarantee).

Set: {y : s(x, y) <= threshold}, the classes in order of probability while the cumulative
(penalised) score stays at or below the threshold (a prefix, since the score grows with the
rank), and always the top class. This is exactly the event the guarantee is about; Romano's
non-randomised set also adds the class that crosses the threshold, which only over-covers.
"""

from __future__ import annotations

import math

import numpy as np

# the target coverages an artifact stores thresholds for (the service answers only these)
COVERAGES = (0.8, 0.85, 0.9, 0.95, 0.99)
METHODS = ("aps", "raps")
# relative slack of ceil((n + 1) * coverage): 0.8 * 5 is 4.000000000000001 in floating point
_RANK_SLACK = 1e-9


def ranked(probs: np.ndarray, k_reg: int = 0, penalty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """For [N, C] probabilities: the classes by decreasing probability [N, C] (ties in class
    order) and the cumulative penalised score at each rank [N, C], float64."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    cumulative = np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1)
    if penalty:
        ranks = np.arange(1, probs.shape[1] + 1)
        cumulative += penalty * np.maximum(0, ranks - k_reg)
    return order, cumulative


def scores(probs: np.ndarray, labels: np.ndarray, k_reg: int = 0, penalty: float = 0.0) -> np.ndarray:
    """s(x_i, y_i) for each row: the cumulative penalised score at the rank of the true class."""
    order, cumulative = ranked(probs, k_reg, penalty)
    rank = np.argmax(order == np.asarray(labels)[:, None], axis=1)  # 0-based rank of y
    return cumulative[np.arange(len(rank)), rank]


def quantile_rank(n: int, coverage: float) -> int:
    """k = ceil((n + 1) * coverage): the threshold is the k-th smallest of n scores."""
    return math.ceil((n + 1) * coverage * (1 - _RANK_SLACK))


def threshold(calibration_scores: np.ndarray, coverage: float) -> float | None:
    """The conformal threshold for `coverage`; None when n is too small for it (k > n)."""
    n = len(calibration_scores)
    k = quantile_rank(n, coverage)
    if not 1 <= k <= n:
        return None
    return float(np.partition(np.asarray(calibration_scores, dtype=np.float64), k - 1)[k - 1])


def set_mask(probs: np.ndarray, tau: float, k_reg: int = 0, penalty: float = 0.0) -> np.ndarray:
    """[N, C] bool: class c is in row i's set (s(x_i, c) <= tau, and always the top class)."""
    order, cumulative = ranked(probs, k_reg, penalty)
    taken = cumulative <= tau
    taken[:, 0] = True
    mask = np.zeros(taken.shape, dtype=bool)
    np.put_along_axis(mask, order, taken, axis=1)
    return mask


def set_lists(probs: np.ndarray, tau: float, k_reg: int = 0, penalty: float = 0.0) -> list[list[int]]:
    """Each row's set as class indices in order of decreasing probability."""
    order, cumulative = ranked(probs, k_reg, penalty)
    sizes = np.maximum((cumulative <= tau).sum(axis=1), 1)  # a prefix: the score grows with the rank
    return [row[:size].tolist() for row, size in zip(order, sizes, strict=True)]


def interpolated(values: list[float], t: float) -> float:
    """Values at the grid points t = i / (n - 1), linearly interpolated at t, as T(t) and the
    curve graph's BN statistics are."""
    grid = np.arange(len(values)) / (len(values) - 1)
    return float(np.interp(t, grid, values))
