"""Split-conformal prediction sets: the one definition of the scores, thresholds and sets that the
exporter calibrates with (training/ensembles/conformal.py) and the service answers with, so a
served set is exactly the set the calibration was about. numpy only (the service has no torch).

Scores, from the CALIBRATED probabilities p (the temperature applies first), the classes
sorted by decreasing p (ties in class order), the class y at rank r (1-based), and a number
u in [0, 1) drawn for the input x:
- APS, randomised (Romano et al. 2020): s(x, y, u) = p_(1) + ... + p_(r-1) + u * p_(r).
- RAPS (Angelopoulos et al. 2021): the APS score + penalty * max(0, r - k_reg), which discourages
  the long tails of unlikely classes that APS adds when the probabilities are flat.

Why randomised: without u, the true class's whole probability counts, so a confidently right
prediction scores near 1, the threshold lands near 1 and every uncertain row gets a long set,
while a rule that keeps the top class covers every right prediction: coverage can then be no
lower than the accuracy. With u the score of a right prediction is spread over [0, p_(1)] and the
coverage is the target, from below and above.

u comes from the input itself (`input_uniforms`: a hash of its float32 values), not from a
random generator: the same input always gets the same set, the exporter calibrates with the u
the service will draw, and across inputs u behaves as uniform and independent of (x, y), which is
all the guarantee needs.

Threshold for coverage 1 - alpha from n calibration scores: the ceil((n + 1)(1 - alpha))-th
smallest (none when that exceeds n). Then for a new exchangeable example
1 - alpha <= P(s(X, Y, U) <= threshold) <= 1 - alpha + 1 / (n + 1).

Set: {y : s(x, y, u) <= threshold}, the classes in order of probability while the score stays at
or below the threshold (a prefix: the score grows with the rank). A set may be empty: for a
target below the accuracy some inputs must hold no label, or the right predictions alone would
cover more than asked.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# the target coverages an artifact stores thresholds for (the service answers only these)
COVERAGES = (0.8, 0.85, 0.9, 0.95, 0.99)
METHODS = ("aps", "raps")
# how u is drawn: stored in the manifest, so a service never applies thresholds calibrated with
# another u (or none) to its own
RANDOMISATION = "input-hash-1"
_HASH_SEED = 20261207
# relative slack of ceil((n + 1) * coverage): 0.8 * 5 is 4.000000000000001 in floating point
_RANK_SLACK = 1e-9


def input_uniforms(x: np.ndarray) -> np.ndarray:
    """u in [0, 1) for each row of `x` [N, ...], a function of the row's float32 values alone:
    a multilinear hash of the values' bits with fixed random odd multipliers (mod 2**64), then
    the splitmix64 finaliser, whose top 53 bits make the float64."""
    rows = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
    bits = rows.view(np.uint32).astype(np.uint64)
    mixed = (bits * _multipliers(bits.shape[1])).sum(axis=1, dtype=np.uint64)  # wraps mod 2**64
    mixed ^= mixed >> np.uint64(30)
    mixed *= np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(27)
    mixed *= np.uint64(0x94D049BB133111EB)
    mixed ^= mixed >> np.uint64(31)
    return (mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53


@functools.lru_cache(maxsize=8)
def _multipliers(width: int) -> np.ndarray:
    values = np.random.default_rng([_HASH_SEED, width]).integers(0, 2**64, size=width, dtype=np.uint64)
    return values | np.uint64(1)


def ranked(probs: np.ndarray, u: np.ndarray, k_reg: int = 0, penalty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """For [N, C] probabilities and each row's u [N]: the classes by decreasing probability
    [N, C] (ties in class order) and the score of each rank [N, C], float64."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    ordered = np.take_along_axis(probs, order, axis=1)
    score = np.cumsum(ordered, axis=1) - (1.0 - np.asarray(u, dtype=np.float64))[:, None] * ordered
    if penalty:
        ranks = np.arange(1, probs.shape[1] + 1)
        score += penalty * np.maximum(0, ranks - k_reg)
    return order, score


def scores(probs: np.ndarray, labels: np.ndarray, u: np.ndarray, k_reg: int = 0, penalty: float = 0.0) -> np.ndarray:
    """s(x_i, y_i, u_i) for each row: the score at the rank of the true class."""
    order, score = ranked(probs, u, k_reg, penalty)
    rank = np.argmax(order == np.asarray(labels)[:, None], axis=1)  # 0-based rank of y
    return score[np.arange(len(rank)), rank]


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


def set_mask(probs: np.ndarray, u: np.ndarray, tau: float, k_reg: int = 0, penalty: float = 0.0) -> np.ndarray:
    """[N, C] bool: class c is in row i's set (s(x_i, c, u_i) <= tau)."""
    order, score = ranked(probs, u, k_reg, penalty)
    mask = np.zeros(score.shape, dtype=bool)
    np.put_along_axis(mask, order, score <= tau, axis=1)
    return mask


def set_lists(probs: np.ndarray, u: np.ndarray, tau: float, k_reg: int = 0, penalty: float = 0.0) -> list[list[int]]:
    """Each row's set as class indices in order of decreasing probability (possibly empty)."""
    order, score = ranked(probs, u, k_reg, penalty)
    sizes = (score <= tau).sum(axis=1)  # a prefix: the score grows with the rank
    return [row[:size].tolist() for row, size in zip(order, sizes, strict=True)]


def interpolated(values: list[float], t: float) -> float:
    """Values at the grid points t = i / (n - 1), linearly interpolated at t, as T(t) and the
    curve graph's BN statistics are."""
    grid = np.arange(len(values)) / (len(values) - 1)
    return float(np.interp(t, grid, values))
