"""Out-of-distribution detection and selective prediction from predicted probabilities (numpy only).

OOD detection: a score per input, higher meaning "more likely out of distribution": the entropy
of the (averaged) softmax, or minus its largest probability. AUROC is the probability that an
OOD input scores higher than an in-distribution one, ties counted one half: the Mann–Whitney U
statistic over (in-distribution count × OOD count), computed from average ranks.

Selective prediction (Geifman & El-Yaniv 2017/2018; Ding et al. 2020): sort the test inputs by
confidence (the largest probability), most confident first; the selective risk at coverage i/n
is the error rate among the i most confident. AURC is the mean of the risk over the n prefixes
(the area under the risk–coverage curve over coverage in (0, 1]). Inputs of equal confidence
have no order, so the risk at a position inside a group of ties is its expectation over the
group's orders (the group's errors spread evenly over its positions): the result does not depend
on the order the inputs came in. E-AURC = AURC − the AURC of the best possible ranking for the
same errors (every error after every correct prediction), so 0 is a perfect ranking.
Risks are fractions (0..1), not %.

Intervals: a percentile bootstrap over test examples (`bootstrap_interval`; statistics.py's
resamples, seed and level): AURC and E-AURC resample the n test examples; AUROC resamples the
in-distribution and the OOD inputs, each set with replacement from itself. They cover test
sampling only. A bootstrap draw is a multiset; its duplicates are exact ties, which the weighted
forms below treat as the definitions above do, so each resample costs O(n) after one sort.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from modeconn.training.core import statistics

SCORES = ("entropy", "max_prob")  # the OOD scores reported


@dataclass(frozen=True)
class Estimate:
    """A metric on the test set with its percentile bootstrap interval."""

    value: float
    low: float
    high: float
    resamples: int
    seed: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


# ---------------------------------------------------------------- scores
def entropy(probs: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Predictive entropy (nats) of each row of [N, C] probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    return -(p * np.log(np.clip(p, eps, None))).sum(axis=1)


def confidence(probs: np.ndarray) -> np.ndarray:
    """The largest probability of each row of [N, C] probabilities."""
    return np.asarray(probs, dtype=np.float64).max(axis=1)


def ood_score(probs: np.ndarray, score: str) -> np.ndarray:
    """Higher = more likely out of distribution: the entropy, or minus the largest probability."""
    if score == "entropy":
        return entropy(probs)
    if score == "max_prob":
        return -confidence(probs)
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


# ---------------------------------------------------------------- AUROC
def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `values`, ties given the mean of the ranks they span (as scipy's rankdata)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)]  # one past each group's end
    ranks = np.empty(len(values))
    ranks[order] = ((first + 1 + last) / 2.0)[group]
    return ranks


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(an OOD input's score > an in-distribution input's), ties one half (Mann–Whitney U / n_in n_out)."""
    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    if not len(a) or not len(b):
        raise ValueError("AUROC needs in-distribution and OOD inputs")
    ranks = _average_ranks(np.concatenate([a, b]))
    u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def _auroc_weighted(in_sorted: np.ndarray, out_scores: np.ndarray
                    ) -> Callable[[np.ndarray, np.ndarray], float]:
    """AUROC of a bootstrap draw given as counts (per sorted in-distribution input, per OOD input)."""
    below = np.searchsorted(in_sorted, out_scores, side="left")
    upto = np.searchsorted(in_sorted, out_scores, side="right")

    def value(w_in: np.ndarray, w_out: np.ndarray) -> float:
        c = np.r_[0.0, np.cumsum(w_in)]
        beaten = c[below] + 0.5 * (c[upto] - c[below])  # in-distribution weight under each OOD input
        return float(w_out @ beaten / (c[-1] * w_out.sum()))

    return value


def auroc_interval(in_scores: np.ndarray, out_scores: np.ndarray, resamples: int = statistics.RESAMPLES,
                   seed: int = statistics.SEED, level: float = statistics.LEVEL) -> Estimate:
    """AUROC with its percentile bootstrap interval: each resample draws the in-distribution
    inputs with replacement (`rng.integers(0, n_in, n_in)`), then the OOD inputs (`n_out`)."""
    a, b = np.asarray(in_scores, dtype=np.float64), np.asarray(out_scores, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    weighted = _auroc_weighted(a[order], b)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for r in range(resamples):
        w_in = np.bincount(rng.integers(0, len(a), len(a)), minlength=len(a))[order].astype(np.float64)
        w_out = np.bincount(rng.integers(0, len(b), len(b)), minlength=len(b)).astype(np.float64)
        draws[r] = weighted(w_in, w_out)
    return _estimate(auroc(a, b), draws, resamples, seed, level)


# ---------------------------------------------------------------- risk-coverage
def _harmonic(n: int) -> np.ndarray:
    """H_0..H_n (H_0 = 0)."""
    return np.r_[0.0, np.cumsum(1.0 / np.arange(1, n + 1))]


def _tie_groups(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order most confident first, and each sorted position's group of equal confidence."""
    order = np.argsort(-conf, kind="stable")
    ordered = conf[order]
    return order, np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1


def _aurc_of_groups(weight: np.ndarray, errors: np.ndarray, harmonic: np.ndarray) -> float:
    """AURC from per-group counts and errors (groups most confident first).

    Inside a group of W inputs and E errors after N inputs with A errors, position p's expected
    risk is (A + p E/W) / (N + p) = b + (A − b N)/(N + p) with b = E/W; summed over p = 1..W:
    W b + (A − b N)(H_{N+W} − H_N)."""
    keep = weight > 0
    weight, errors = weight[keep], errors[keep]
    n_before = np.r_[0.0, np.cumsum(weight)[:-1]]
    e_before = np.r_[0.0, np.cumsum(errors)[:-1]]
    b = errors / weight
    total = weight.sum()
    ends = (n_before + weight).astype(np.int64)
    sums = weight * b + (e_before - b * n_before) * (harmonic[ends] - harmonic[n_before.astype(np.int64)])
    return float(sums.sum() / total)


def optimal_aurc(n: int, errors: float, harmonic: np.ndarray | None = None) -> float:
    """AURC of the best ranking of n inputs with `errors` wrong: the k = n − errors correct ones
    first, so the risk at i > k is (i − k)/i; mean over i: ((n − k) − k (H_n − H_k)) / n."""
    h = _harmonic(n) if harmonic is None else harmonic
    k = int(round(n - errors))
    return float(((n - k) - k * (h[n] - h[k])) / n)


def risk_coverage(conf: np.ndarray, wrong: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage i/n, selective risk of the i most confident) for i = 1..n, ties as their expectation."""
    conf, wrong = np.asarray(conf, dtype=np.float64), np.asarray(wrong, dtype=np.float64)
    order, group = _tie_groups(conf)
    n = len(conf)
    sizes = np.bincount(group).astype(np.float64)
    group_errors = np.bincount(group, weights=wrong[order])
    spread = (group_errors / sizes)[group]  # each position's share of its group's errors
    risk = np.cumsum(spread) / np.arange(1, n + 1)
    return np.arange(1, n + 1) / n, risk


def aurc(conf: np.ndarray, wrong: np.ndarray) -> float:
    """Area under the risk–coverage curve: the mean over the n prefixes of their error rate."""
    conf, wrong = np.asarray(conf, dtype=np.float64), np.asarray(wrong, dtype=np.float64)
    if not len(conf):
        raise ValueError("AURC of no inputs")
    order, group = _tie_groups(conf)
    weight = np.bincount(group).astype(np.float64)
    return _aurc_of_groups(weight, np.bincount(group, weights=wrong[order]), _harmonic(len(conf)))


def excess_aurc(conf: np.ndarray, wrong: np.ndarray) -> float:
    """E-AURC: AURC − the AURC of the best ranking of the same errors."""
    return aurc(conf, wrong) - optimal_aurc(len(conf), float(np.sum(wrong)))


def aurc_intervals(conf: np.ndarray, wrong: np.ndarray, resamples: int = statistics.RESAMPLES,
                   seed: int = statistics.SEED, level: float = statistics.LEVEL) -> dict[str, Estimate]:
    """AURC and E-AURC with percentile bootstrap intervals from the same draws of the n test
    examples (`rng.integers(0, n, n)` per resample)."""
    conf, wrong = np.asarray(conf, dtype=np.float64), np.asarray(wrong, dtype=np.float64)
    n = len(conf)
    order, group = _tie_groups(conf)
    wrong_sorted = wrong[order]
    h = _harmonic(n)
    rng = np.random.default_rng(seed)
    draws = np.empty((2, resamples))
    groups = group[-1] + 1
    for r in range(resamples):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)[order].astype(np.float64)
        weight = np.bincount(group, weights=counts, minlength=groups)
        errors = np.bincount(group, weights=counts * wrong_sorted, minlength=groups)
        draws[0, r] = _aurc_of_groups(weight, errors, h)
        draws[1, r] = draws[0, r] - optimal_aurc(n, errors.sum(), h)
    value = aurc(conf, wrong)
    return {"aurc": _estimate(value, draws[0], resamples, seed, level),
            "eaurc": _estimate(value - optimal_aurc(n, float(wrong.sum()), h), draws[1], resamples, seed, level)}


def _estimate(value: float, draws: np.ndarray, resamples: int, seed: int, level: float) -> Estimate:
    tail = (1.0 - level) / 2 * 100.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return Estimate(float(value), float(low), float(high), resamples, seed)


# ---------------------------------------------------------------- what the reports show
def selective_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AURC and E-AURC of [N, C] probabilities, confidence = the largest probability."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf, wrong = confidence(p), (p.argmax(axis=1) != y).astype(np.float64)
    return {"aurc": aurc(conf, wrong), "eaurc": excess_aurc(conf, wrong)}


def ood_metrics(in_probs: np.ndarray, out_probs: np.ndarray) -> dict[str, float]:
    """AUROC of each score in SCORES, in-distribution probabilities against OOD ones."""
    return {f"auroc_{s}": auroc(ood_score(in_probs, s), ood_score(out_probs, s)) for s in SCORES}


def selective_report(probs: np.ndarray, labels: np.ndarray, ood_probs: dict[str, np.ndarray] | None = None,
                     resamples: int = statistics.RESAMPLES, seed: int = statistics.SEED) -> dict[str, object]:
    """AURC and E-AURC on the test set, and each OOD set's AUROCs, each with its bootstrap interval."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    wrong = (p.argmax(axis=1) != y).astype(np.float64)
    intervals = aurc_intervals(confidence(p), wrong, resamples, seed)
    ood = {}
    for name, out in (ood_probs or {}).items():
        out = np.asarray(out, dtype=np.float64)
        ood[name] = {"size": len(out), **{f"auroc_{s}": auroc_interval(ood_score(p, s), ood_score(out, s),
                                                                       resamples, seed).as_dict()
                                          for s in SCORES}}
    return {"test_size": len(y), "confidence": "max_prob",
            **{k: v.as_dict() for k, v in intervals.items()}, "ood": ood}
