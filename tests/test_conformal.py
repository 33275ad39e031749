"""Split-conformal prediction sets (modeconn/contract/conformal.py, training/ensembles/conformal.py):
scores and sets against a hand computation, the quantile rule against a direct one, the coverage
guarantee by simulation, the exported thresholds against a recomputation, and old manifests
without them. The served sets are checked in tests/test_service.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modeconn.contract import conformal
from modeconn.contract.manifest import ManifestError, parse_manifest
from modeconn.training.ensembles import conformal as calibrate_sets
from modeconn.training.ensembles.calibration import calibrate

# rows sorted by hand: [0.5, 0.3, 0.2] and a tie [0.4, 0.4, 0.2] (ties go in class order)
PROBS = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]])


def test_scores_by_hand() -> None:
    # row 0: order 1, 2, 0 with cumulative 0.5, 0.8, 1.0; row 1: order 0, 2, 1 with 0.4, 0.8, 1.0
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([2, 2])), [0.8, 0.8])
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([0, 1])), [1.0, 1.0])
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([1, 0])), [0.5, 0.4])
    # RAPS, k_reg 1, penalty 0.1: + 0.1 * max(0, rank - 1)
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([2, 1]), 1, 0.1), [0.9, 1.2])
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([1, 0]), 1, 0.1), [0.5, 0.4])
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([0, 2]), 2, 0.1), [1.1, 0.8])


def test_sets_by_hand() -> None:
    assert conformal.set_lists(PROBS, 0.85) == [[1, 2], [0, 2]]
    assert conformal.set_lists(PROBS, 0.45) == [[1], [0]]  # row 0: 0.5 > 0.45, yet the top class stays
    assert conformal.set_lists(PROBS, 0.1) == [[1], [0]]
    assert conformal.set_lists(PROBS, 1.0) == [[1, 2, 0], [0, 2, 1]]
    assert conformal.set_lists(PROBS, 0.85, 1, 0.1) == [[1], [0]]  # the second classes score 0.8 + 0.1 > 0.85
    np.testing.assert_array_equal(conformal.set_mask(PROBS, 0.85), [[False, True, True], [True, False, True]])
    # a class is in the set exactly when its score, were it the true class, is <= the threshold
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6) * 0.5, size=200)
    for k_reg, penalty, tau in ((0, 0.0, 0.7), (2, 0.05, 0.9), (1, 0.3, 1.2)):
        mask = conformal.set_mask(probs, tau, k_reg, penalty)
        each = np.stack([conformal.scores(probs, np.full(200, c), k_reg, penalty) for c in range(6)], axis=1)
        top = probs.argmax(axis=1)
        want = each <= tau
        want[np.arange(200), top] = True
        np.testing.assert_array_equal(mask, want)
        assert [sorted(r) for r in conformal.set_lists(probs, tau, k_reg, penalty)] == [
            np.flatnonzero(row).tolist() for row in want]


def test_quantile_rule_is_the_ceil_n_plus_1_order_statistic() -> None:
    rng = np.random.default_rng(1)
    for n in (4, 19, 99, 500, 1000):
        values = rng.random(n)
        for coverage in conformal.COVERAGES:
            k = math.ceil((n + 1) * coverage - 1e-12)  # 0.8 * 5 = 4.000000000000001
            got = conformal.threshold(values, coverage)
            if k > n:
                assert got is None, (n, coverage)
            else:
                assert got == np.sort(values)[k - 1], (n, coverage)
    assert conformal.quantile_rank(4, 0.8) == 4 and conformal.threshold(np.arange(4.0), 0.8) == 3.0
    assert conformal.threshold(np.arange(18.0), 0.95) is None  # ceil(19 * 0.95) = 19 > 18
    assert conformal.threshold(np.arange(19.0), 0.95) == 18.0


def _synthetic(rng: np.random.Generator, n: int, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of random sharpness, and labels drawn from them (the model is calibrated)."""
    logits = rng.normal(size=(n, classes)) * rng.uniform(0.5, 4.0, size=(n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(max=classes - 1)
    return probs, labels


@pytest.mark.parametrize(("k_reg", "penalty"), [(0, 0.0), (2, 0.05)])
def test_coverage_guarantee_by_simulation(k_reg: int, penalty: float) -> None:
    """Over many calibration/test draws the true class's score is <= the threshold with mean
    frequency in [1 - alpha, 1 - alpha + 1/(n + 1)] (continuous scores), within the simulation's
    error; a set holds the true class exactly then, or when it is the top class (kept always),
    which only adds coverage."""
    rng = np.random.default_rng(2)
    n, m, trials = 200, 1000, 300
    for coverage in (0.8, 0.9, 0.95):
        events, covered = [], []
        for _ in range(trials):
            probs, labels = _synthetic(rng, n + m)
            tau = conformal.threshold(conformal.scores(probs[:n], labels[:n], k_reg, penalty), coverage)
            test, y = probs[n:], labels[n:]
            event = conformal.scores(test, y, k_reg, penalty) <= tau
            held = conformal.set_mask(test, tau, k_reg, penalty)[np.arange(m), y]
            np.testing.assert_array_equal(held, event | (y == test.argmax(axis=1)))
            events.append(event.mean())
            covered.append(held.mean())
        mean, error = np.mean(events), 4 * np.std(events) / math.sqrt(trials)
        assert coverage - error <= mean <= coverage + 1 / (n + 1) + error, (coverage, mean, error)
        assert np.mean(covered) >= mean


def test_exported_thresholds_are_the_recomputed_ones() -> None:
    """prediction_sets() on synthetic validation/test probabilities: the thresholds are the
    quantile rule on the right calibration examples, RAPS's pair is the grid's smallest mean size
    on half A, and the test coverage is measured with the stored thresholds."""
    rng = np.random.default_rng(3)
    probs, labels = _synthetic(rng, 3000)
    val, test = torch.from_numpy(probs[:1000]), torch.from_numpy(probs[1000:])
    y_val, y_test = torch.from_numpy(labels[:1000]), torch.from_numpy(labels[1000:])
    temperature = 1.3
    fields = calibrate_sets.prediction_sets(val, y_val, temperature, test, y_test)
    assert fields is not None
    scaled, scaled_test = calibrate(val, temperature).numpy(), calibrate(test, temperature).numpy()
    a, b = calibrate_sets.halves(1000)
    assert sorted([*a, *b]) == list(range(1000)) and len(a) == fields["raps_selection_examples"] == 500
    assert fields["coverages"] == list(conformal.COVERAGES) and fields["aps_examples"] == 1000
    k_reg, penalty = fields["raps_k_reg"], fields["raps_penalty"]
    sizes = {}
    for p, k in calibrate_sets.RAPS_GRID:
        tau = conformal.threshold(conformal.scores(scaled[a], labels[a], k, p), 0.9)
        sizes[(k, p)] = conformal.set_mask(scaled[a], tau, k, p).sum(axis=1).mean()
    assert sizes[(k_reg, penalty)] == pytest.approx(min(sizes.values()), abs=1e-12)
    for i, coverage in enumerate(fields["coverages"]):
        aps = np.sort(conformal.scores(scaled, labels[:1000]))[math.ceil(1001 * coverage - 1e-9) - 1]
        raps = np.sort(conformal.scores(scaled[b], labels[b], k_reg, penalty))[math.ceil(501 * coverage - 1e-9) - 1]
        assert fields["aps"][i] == aps and fields["raps"][i] == raps
        mask = conformal.set_mask(scaled_test, aps)
        assert fields["test_coverage"]["aps"][i] == mask[np.arange(2000), labels[1000:]].mean()
        assert fields["test_mean_size"]["aps"][i] == mask.sum(axis=1).mean()
        # 2000 test examples: not below the target by more than 4 standard deviations (above it by
        # more where the top class alone holds more than the threshold: it is kept anyway)
        sd = math.sqrt(coverage * (1 - coverage) * (1 / 2000 + 1 / 500))
        for method in ("aps", "raps"):
            assert fields["test_coverage"][method][i] > coverage - 4 * sd, (method, coverage)
    # too few validation examples for any stored coverage: no thresholds
    assert calibrate_sets.prediction_sets(val[:6], y_val[:6], temperature, test, y_test) is None


@pytest.fixture(scope="module")
def exported(built_artifact: Path) -> dict[str, Any]:
    return json.loads((built_artifact / "manifest.json").read_text())


def test_test_artifact_has_thresholds_that_cover(exported: dict[str, Any]) -> None:
    """The exporter's own test-split measurement on the tests' artifact (3-epoch networks, 1000
    validation and 12000 test signals): coverage not below any target by more than 4 sd of the
    conditional-on-calibration spread (APS on 1000 examples, RAPS on 500), for the ensemble and
    SWA (above it the sets may go further: the top class is always in them)."""
    for model in ("ensemble", "swa"):
        sets = exported[model]["prediction_sets"]
        assert sets["coverages"] == list(conformal.COVERAGES)
        assert sets["aps_examples"] == 1000 and sets["raps_examples"] == 500
        for method, n in (("aps", 1000), ("raps", 500)):
            sizes = sets["test_mean_size"][method]
            assert sizes == sorted(sizes) and 1 <= sizes[0] and sizes[-1] <= 10, sizes  # grow with the coverage
            for coverage, got in zip(sets["coverages"], sets["test_coverage"][method], strict=True):
                sd = math.sqrt(coverage * (1 - coverage) * (1 / 12000 + 1 / n))
                assert got > coverage - 4 * sd, (model, method, coverage, got)
    curve = exported["curve"]["prediction_sets"]
    assert len(curve["aps"]) == len(curve["raps"]) == exported["curve"]["bn_grid_points"] == 11
    assert all(len(row) == len(curve["coverages"]) for row in curve["aps"])
    assert all(row == sorted(row) for row in curve["aps"] + curve["raps"])  # thresholds grow with the coverage


def test_manifest_without_prediction_sets_still_loads(exported: dict[str, Any]) -> None:
    old = copy.deepcopy(exported)
    for name in ("ensemble", "swa", "curve"):
        del old[name]["prediction_sets"]
    spec = parse_manifest(old)
    assert spec.ensemble.prediction_sets is None and spec.swa.prediction_sets is None
    assert spec.curve is not None and spec.curve.prediction_sets is None
    assert parse_manifest(exported).ensemble.prediction_sets is not None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["ensemble"]["prediction_sets"]["aps"].pop(), "prediction_sets has 4 thresholds for 5 coverages"),
        (lambda m: m["ensemble"]["prediction_sets"].update(coverages=[0.9, 0.8, 0.85, 0.95, 0.99]),
         "coverages must be increasing values in"),
        (lambda m: m["curve"]["prediction_sets"]["raps"].pop(), "11 APS and 10 RAPS grid points"),
        (lambda m: m["swa"]["prediction_sets"].update(raps_penalty=-0.1), r"swa\.prediction_sets\.raps_penalty"),
    ],
)  # fmt: skip
def test_bad_prediction_sets_are_refused_by_name(exported: dict[str, Any], edit: Any, message: str) -> None:
    manifest = copy.deepcopy(exported)
    edit(manifest)
    with pytest.raises(ManifestError, match=message):
        parse_manifest(manifest)
