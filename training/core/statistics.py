"""Statistics for comparisons: per-example losses, paired bootstrap intervals, mean ± std over seeds.

Two models A and B are compared on the same n test examples through their per-example
losses (error indicator in %, NLL, Brier; see `per_example_losses`). The paired bootstrap
(docs/design.md) draws `resamples` sets of n indices with replacement from
numpy.random.default_rng(seed), row by row (resample r is the r-th call of
`rng.integers(0, n, size=n)`; drawing them in chunks gives the same stream), and takes
mean(loss_A − loss_B) over each; the 2.5 and 97.5 percentiles (numpy's linear
interpolation) are the 95 % interval.

Over seeds (one A and one B per seed, all on the same test set): mean ± std of the per-seed
values, and the interval of the seed-mean difference, which resamples the test examples
once for all seeds: each resample's statistic is the mean over seeds of the per-example
differences at the same indices (a test example is one draw; the seeds are not resampled).
That interval covers test sampling only. `two_level_bootstrap` covers training randomness too:
each resample draws S seeds with replacement, then n test examples with replacement (the same
examples for both methods), and averages the per-example differences over both draws
(docs/evidence.md says which table uses which).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
LOSSES = ("error", "nll", "brier")
_CHUNK_VALUES = 4_000_000  # drawn indices per chunk of resamples (bounds memory, not the result)


@dataclass(frozen=True)
class Interval:
    """A difference (the mean over the test set) with its paired bootstrap interval."""

    mean: float
    low: float
    high: float
    resamples: int
    seed: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 2) -> str:
        """`diff [low, high]` with a sign, as the tables show it."""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def per_example_losses(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> dict[str, np.ndarray]:
    """[N, C] probabilities -> per-example error (0 or 100, so the mean is error %), NLL, Brier.

    Their means are classification_metrics' error, nll and brier.
    """
    probs, labels = probs.detach().double().cpu(), labels.detach().cpu()
    picked = probs.gather(1, labels[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return {
        "error": ((probs.argmax(dim=1) != labels).double() * 100.0).numpy(),
        "nll": (-torch.log(picked.clamp_min(eps))).numpy(),
        "brier": ((probs - onehot) ** 2).sum(dim=1).numpy(),
    }


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, n] indices with replacement, the stream the module docstring describes."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_means(
    differences: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> list[Interval]:
    """Intervals of the mean of each row of `differences` [M, n] (or one row [n]).

    All rows share the same resampled indices, so the intervals of error, NLL and Brier
    of one comparison come from the same bootstrap draws.
    """
    d = np.atleast_2d(np.asarray(differences, dtype=np.float64))
    means = _resampled_means(d, resamples, seed)
    tail = (1.0 - level) / 2 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail], axis=1)
    return [Interval(float(d[r].mean()), float(low[r]), float(high[r]), resamples, seed) for r in range(len(d))]


def bootstrap_max_of_means(
    values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Interval:
    """Interval of max_r mean(values[r]) for `values` [M, n] (M statistics on the same n examples,
    e.g. a barrier: the largest mean rise over the points of a path), from the same resampled
    examples for every row. A percentile interval of a maximum leans high when rows tie."""
    d = np.atleast_2d(np.asarray(values, dtype=np.float64))
    maxima = _resampled_means(d, resamples, seed).max(axis=0)
    tail = (1.0 - level) / 2 * 100.0
    low, high = np.percentile(maxima, [tail, 100.0 - tail])
    return Interval(float(d.mean(axis=1).max()), float(low), float(high), resamples, seed)


def _resampled_means(d: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """[M, resamples]: each row's mean over each bootstrap resample of its n columns."""
    rows, n = d.shape
    if n == 0:
        raise ValueError("a bootstrap over 0 examples")
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_VALUES // n)
    means = np.empty((rows, resamples))
    for start in range(0, resamples, chunk):  # a loop over chunks of resamples; examples are vectorised
        size = min(chunk, resamples - start)
        index = rng.integers(0, n, size=(size, n))
        # a resample's mean is (how often each example was drawn) . values / n: one bincount and
        # one matrix product, several times faster than gathering the drawn values
        flat = (index + np.arange(size)[:, None] * n).ravel()
        counts = np.bincount(flat, minlength=size * n).reshape(size, n).astype(np.float64)
        means[:, start:start + size] = (counts @ d.T).T / n
    return means


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Interval:
    """Interval of mean(a − b) for per-example values a, b of shape [n], or [S, n] over S seeds
    (then of the seed-mean difference: the mean over seeds of the per-example differences)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same shape, got {a.shape} and {b.shape}")
    d = a - b
    if d.ndim == 2:
        d = d.mean(axis=0)
    return bootstrap_means(d, resamples, seed, level)[0]


def two_level_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> Interval:
    """Interval of the seed-mean difference mean(a − b) over per-seed, per-example values
    [S, n], resampling seeds and test examples. The draws: first all seed indices,
    `rng.integers(0, S, size=(resamples, S))`, then the example indices of each resample in
    turn, `rng.integers(0, n, size=n)` (in chunks; the same stream)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"two-level bootstrap needs two [seeds, examples] arrays of one shape, got {a.shape}, {b.shape}")
    d = a - b
    seeds, n = d.shape
    if n == 0 or seeds == 0:
        raise ValueError("a bootstrap over no seeds or no examples")
    rng = np.random.default_rng(seed)
    seed_counts = np.stack([np.bincount(row, minlength=seeds) for row in rng.integers(0, seeds, size=(resamples, seeds))])
    chunk = max(1, _CHUNK_VALUES // n)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        index = rng.integers(0, n, size=(size, n))
        flat = (index + np.arange(size)[:, None] * n).ravel()
        counts = np.bincount(flat, minlength=size * n).reshape(size, n).astype(np.float64)
        per_seed = counts @ d.T / n  # [size, seeds]: each seed's mean over this resample's examples
        means[start:start + size] = (per_seed * seed_counts[start:start + size]).sum(axis=1) / seeds
    tail = (1.0 - level) / 2 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return Interval(float(d.mean()), float(low), float(high), resamples, seed)


def deep_ensemble_equivalent(nll: float, ensemble_nlls: Sequence[float]) -> float:
    """Deep Ensemble Equivalent (Ashukha et al. 2020): the smallest l ≥ 1 at which an ensemble
    of l independent full-budget networks reaches `nll`, with `ensemble_nlls[k - 1]` the
    (calibrated) NLL of k networks and linear interpolation between k and k + 1. 1 when one
    network already does; inf when even the largest measured ensemble does not."""
    curve = [float(v) for v in ensemble_nlls]
    if not curve:
        raise ValueError("the deep ensemble's NLL curve is empty")
    if curve[0] <= nll:
        return 1.0
    for k in range(1, len(curve)):
        if curve[k] <= nll:
            above, below = curve[k - 1], curve[k]
            return k + (above - nll) / (above - below)
    return float("inf")


def equal_budget_epochs(budget_epochs: int, members: int) -> list[int]:
    """Epochs of each of `members` independent networks sharing `budget_epochs` in all (as even
    as whole epochs allow: the first ones take the remainder)."""
    if members < 1 or budget_epochs < members:
        raise ValueError(f"{budget_epochs} epochs cannot train {members} networks of at least one epoch")
    base, extra = divmod(budget_epochs, members)
    return [base + (1 if k < extra else 0) for k in range(members)]


def loss_differences(
    a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], resamples: int = RESAMPLES, seed: int = SEED,
    keys: Sequence[str] = LOSSES,
) -> dict[str, Interval]:
    """Intervals of A − B for every loss in `keys` (per-example values [n] or [S, n]), same draws."""
    d = np.stack([np.asarray(a[k], dtype=np.float64) - np.asarray(b[k], dtype=np.float64) for k in keys])
    if d.ndim == 3:  # [loss, seed, n]: the seed-mean difference
        d = d.mean(axis=1)
    return dict(zip(keys, bootstrap_means(d, resamples, seed), strict=True))


def compare_probs(
    probs_a: torch.Tensor, probs_b: torch.Tensor, labels: torch.Tensor, resamples: int = RESAMPLES, seed: int = SEED
) -> dict[str, Interval]:
    """Intervals of A − B (error in percentage points, NLL, Brier) for two models' test probabilities."""
    return loss_differences(per_example_losses(probs_a, labels), per_example_losses(probs_b, labels), resamples, seed)


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """Mean and sample standard deviation (0 for one value) over seeds."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def intervals_json(intervals: Mapping[str, Interval]) -> dict[str, dict[str, float | int]]:
    return {k: v.as_dict() for k, v in intervals.items()}


DIGITS = {"error": 2, "nll": 4, "brier": 4, "cnll": 4}
LABELS = {"error": "error (pp)", "nll": "NLL", "brier": "Brier", "cnll": "calibrated NLL"}


def differences_text(intervals: Mapping[str, Interval]) -> str:
    """`error (pp) -0.40 [-0.80, -0.05], NLL ..., Brier ...` for a log line."""
    return ", ".join(f"{LABELS[k]} {v.text(DIGITS[k])}" for k, v in intervals.items())
