"""training/core/statistics.py and the Brier score against independent computations (no training, fast).

The reference bootstrap here is a plain-Python loop: resample r draws its n indices with
`rng.integers(0, n, size=n)` from numpy.random.default_rng(seed) (the stream the module
documents), averages the differences by hand, and takes the percentile by sorting and
interpolating linearly between neighbours.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modeconn.training.core import statistics as st
from modeconn.training.core.metrics import brier_score, classification_metrics


def percentile_by_hand(values: list[float], q: float) -> float:
    """numpy's default ("linear") percentile, written out."""
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def bootstrap_by_hand(a: list[list[float]], b: list[list[float]], resamples: int, seed: int) -> tuple[float, float]:
    """a, b: per seed, per example. Each resample: the same indices for every seed."""
    rng = np.random.default_rng(seed)
    n, seeds = len(a[0]), len(a)
    means = []
    for _ in range(resamples):
        index = [int(i) for i in rng.integers(0, n, size=n)]
        per_seed = [sum(a[s][i] - b[s][i] for i in index) / n for s in range(seeds)]
        means.append(sum(per_seed) / seeds)
    return percentile_by_hand(means, 2.5), percentile_by_hand(means, 97.5)


def test_bootstrap_of_four_examples_equals_a_plain_python_loop() -> None:
    a = [100.0, 0.0, 100.0, 100.0]  # error indicators (%) of model A on 4 examples
    b = [0.0, 0.0, 100.0, 0.0]
    got = st.paired_bootstrap(np.array(a), np.array(b), resamples=2000, seed=7)
    low, high = bootstrap_by_hand([a], [b], 2000, 7)
    assert got.mean == pytest.approx(50.0)  # (100 + 0 + 0 + 100) / 4
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    assert (got.resamples, got.seed) == (2000, 7)


def test_bootstrap_percentiles_of_a_case_checked_by_hand() -> None:
    # d = [0, 0, 0, 4]: a resample's mean is (number of draws of the 4th example), X ~ Binomial(4, 1/4).
    # P(X <= 0) = 0.316, P(X <= 2) = 0.949, P(X <= 3) = 0.996: the 2.5 % quantile is 0, the 97.5 % one 3.
    got = st.paired_bootstrap(np.array([0.0, 0.0, 0.0, 4.0]), np.zeros(4), resamples=10_000, seed=0)
    assert (got.mean, got.low, got.high) == (1.0, 0.0, 3.0)


def test_bootstrap_over_seeds_resamples_examples_once_for_all_seeds() -> None:
    g = np.random.default_rng(11)
    a = g.normal(size=(3, 9)).tolist()
    b = g.normal(size=(3, 9)).tolist()
    got = st.paired_bootstrap(np.array(a), np.array(b), resamples=500, seed=3)
    low, high = bootstrap_by_hand(a, b, 500, 3)
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    assert got.mean == pytest.approx(sum(sum(x) - sum(y) for x, y in zip(a, b, strict=True)) / 27)
    # each seed on its own: that seed's rows
    one = st.paired_bootstrap(np.array(a[1]), np.array(b[1]), resamples=500, seed=3)
    assert (one.low, one.high) == pytest.approx(bootstrap_by_hand([a[1]], [b[1]], 500, 3), abs=1e-12)


def test_identical_models_give_a_zero_interval() -> None:
    values = np.random.default_rng(0).random(50)
    got = st.paired_bootstrap(values, values.copy())
    assert (got.mean, got.low, got.high) == (0.0, 0.0, 0.0)
    assert not got.excludes_zero()
    probs = torch.softmax(torch.randn(40, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    labels = torch.arange(40) % 5
    for interval in st.compare_probs(probs, probs.clone(), labels).values():
        assert (interval.mean, interval.low, interval.high) == (0.0, 0.0, 0.0)


def test_an_obvious_difference_excludes_zero() -> None:
    n = 500
    labels = torch.arange(n) % 10
    good = torch.nn.functional.one_hot(labels, 10).double() * 0.9 + 0.01  # right on every example
    bad = good.clone()
    wrong = torch.arange(n) % 10 < 3  # 30 % of the examples get another top class
    bad[wrong] = torch.roll(good[wrong], 1, dims=1)
    diff = st.compare_probs(bad, good, labels, resamples=1000, seed=0)
    assert diff["error"].mean == pytest.approx(30.0)
    assert diff["error"].excludes_zero() and 20.0 < diff["error"].low < 30.0 < diff["error"].high < 40.0
    assert diff["nll"].low > 0 and diff["brier"].low > 0
    reverse = st.compare_probs(good, bad, labels, resamples=1000, seed=0)
    assert reverse["error"].high == pytest.approx(-diff["error"].low)


def test_losses_share_the_draws_and_chunking_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    g = np.random.default_rng(5)
    a = {k: g.random(300) for k in st.LOSSES}
    b = {k: g.random(300) for k in st.LOSSES}
    together = st.loss_differences(a, b, resamples=1000, seed=2)
    def bounds(intervals: dict[str, st.Interval]) -> list[float]:
        return [x for key in st.LOSSES for x in (intervals[key].low, intervals[key].high)]

    alone = {key: st.paired_bootstrap(a[key], b[key], resamples=1000, seed=2) for key in st.LOSSES}
    assert bounds(together) == pytest.approx(bounds(alone), abs=1e-12)  # summation order only
    monkeypatch.setattr(st, "_CHUNK_VALUES", 1000)  # chunks of 3 resamples x 300 examples
    assert bounds(st.loss_differences(a, b, resamples=1000, seed=2)) == pytest.approx(bounds(together), abs=1e-12)


def test_per_example_losses_average_to_the_metrics() -> None:
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(200, 7, generator=g, dtype=torch.float64) * 3, dim=1)
    labels = torch.randint(0, 7, (200,), generator=g)
    losses = st.per_example_losses(probs, labels)
    metrics = classification_metrics(probs, labels)
    for key in st.LOSSES:
        assert losses[key].mean() == pytest.approx(metrics[key], rel=1e-12)
    assert set(np.unique(losses["error"])) <= {0.0, 100.0}


def test_brier_score_against_numpy() -> None:
    g = np.random.default_rng(8)
    logits = g.normal(size=(300, 4)) * 2
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = g.integers(0, 4, size=300)
    expected = float(np.mean(np.sum((p - np.eye(4)[y]) ** 2, axis=1)))
    probs, labels = torch.from_numpy(p), torch.from_numpy(y)
    assert brier_score(probs, labels) == pytest.approx(expected, rel=1e-12)
    assert classification_metrics(probs.float(), labels)["brier"] == pytest.approx(expected, rel=1e-6)
    assert st.per_example_losses(probs, labels)["brier"] == pytest.approx(np.sum((p - np.eye(4)[y]) ** 2, axis=1))
    # the extremes: a certain right answer scores 0, a certain wrong one 2
    assert brier_score(torch.eye(4, dtype=torch.float64), torch.arange(4)) == 0.0
    assert brier_score(torch.eye(4, dtype=torch.float64), torch.tensor([1, 2, 3, 0])) == 2.0


def test_mean_std_over_seeds_and_the_table_text() -> None:
    assert st.mean_std([1.0, 2.0, 4.0]) == pytest.approx({"mean": 7 / 3, "std": float(np.std([1, 2, 4], ddof=1)), "n": 3})
    assert st.mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    interval = st.Interval(-0.5, -1.25, 0.125, 1000, 0)
    assert interval.text() == "-0.50 [-1.25, +0.12]"
    assert interval.as_dict() == {"mean": -0.5, "low": -1.25, "high": 0.125, "resamples": 1000, "seed": 0}
    with pytest.raises(ValueError, match="same shape"):
        st.paired_bootstrap(np.zeros(3), np.zeros(4))


def test_two_level_bootstrap_equals_a_direct_computation() -> None:
    from modeconn.training.core.statistics import two_level_bootstrap

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 30)), rng.normal(size=(4, 30)) + 0.1
    got = two_level_bootstrap(a, b, resamples=200, seed=7)
    # the same draws, one resample at a time, as the docstring defines them
    draw = np.random.default_rng(7)
    seed_idx = draw.integers(0, 4, size=(200, 4))
    means = []
    for r in range(200):
        ex = draw.integers(0, 30, size=30)
        means.append(np.mean([(a[s] - b[s])[ex].mean() for s in seed_idx[r]]))
    assert got.mean == pytest.approx((a - b).mean(), abs=1e-12)
    assert got.low == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert got.high == pytest.approx(np.percentile(means, 97.5), abs=1e-12)


def test_two_level_interval_is_wider_than_test_sampling_alone_when_seeds_disagree() -> None:
    from modeconn.training.core.statistics import paired_bootstrap, two_level_bootstrap

    rng = np.random.default_rng(0)
    offsets = np.array([-1.0, 0.0, 1.0, 2.0, -2.0])[:, None]  # training randomness between seeds
    a = rng.normal(size=(5, 400)) * 0.1 + offsets
    b = np.zeros_like(a)
    one = paired_bootstrap(a, b)
    two = two_level_bootstrap(a, b)
    assert two.high - two.low > 5 * (one.high - one.low)


def test_deep_ensemble_equivalent_interpolates_by_hand() -> None:
    from modeconn.training.core.statistics import deep_ensemble_equivalent

    curve = [0.30, 0.26, 0.24, 0.23]  # NLL of 1, 2, 3, 4 independent networks
    assert deep_ensemble_equivalent(0.25, curve) == pytest.approx(2.5)  # halfway from 0.26 to 0.24
    assert deep_ensemble_equivalent(0.27, curve) == pytest.approx(1.75)  # 0.30 - 0.27 = 3/4 of 0.04
    assert deep_ensemble_equivalent(0.24, curve) == pytest.approx(3.0)
    assert deep_ensemble_equivalent(0.31, curve) == 1.0  # worse than one network: DEE's floor
    assert deep_ensemble_equivalent(0.20, curve) == float("inf")  # beyond the measured ensembles


def test_equal_budget_members_sum_to_the_budget() -> None:
    from modeconn.training.core.statistics import equal_budget_epochs

    for budget in (30, 60, 90, 31):
        for m in (1, 2, 3, 4):
            epochs = equal_budget_epochs(budget, m)
            assert sum(epochs) == budget and len(epochs) == m and max(epochs) - min(epochs) <= 1
    with pytest.raises(ValueError):
        equal_budget_epochs(2, 3)


def test_bootstrap_of_a_maximum_equals_a_direct_computation() -> None:
    """bootstrap_max_of_means: in each resample (the module's index stream) the largest of the
    rows' means, and its percentiles; the estimate is the largest row mean."""
    rng = np.random.default_rng(7)
    values = rng.normal(size=(4, 60)) + np.array([[0.0], [0.3], [0.1], [0.25]])
    got = st.bootstrap_max_of_means(values, resamples=500, seed=3)
    index = st.bootstrap_indices(60, 500, 3)
    maxima = np.max([[row[i].mean() for row in values] for i in index], axis=1)
    assert got.mean == pytest.approx(values.mean(axis=1).max(), abs=1e-12)
    assert (got.low, got.high) == pytest.approx(tuple(np.percentile(maxima, [2.5, 97.5])), abs=1e-12)
