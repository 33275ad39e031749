"""Split-conformal prediction sets (modeconn/contract/conformal.py, training/ensembles/conformal.py):
scores and sets against a hand computation, the inputs' u against its definition, the quantile rule against a direct one, the coverage
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
from scipy.stats import kstest

from modeconn.contract import conformal
from modeconn.contract.manifest import ManifestError, parse_manifest
from modeconn.serving import prediction_sets as served_sets
from modeconn.training.ensembles import conformal as calibrate_sets
from modeconn.training.ensembles.calibration import calibrate
from tests.support import conformal_set, conformal_u

# rows sorted by hand: [0.5, 0.3, 0.2] and a tie [0.4, 0.4, 0.2] (ties go in class order)
PROBS = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]])
U = np.array([0.5, 0.25])


def test_scores_by_hand() -> None:
    # row 0 (u 0.5): order 1, 2, 0, scores 0.25, 0.5 + 0.15, 0.8 + 0.1
    # row 1 (u 0.25): order 0, 2, 1, scores 0.1, 0.4 + 0.1, 0.8 + 0.05
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([2, 2]), U), [0.65, 0.5])
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([0, 1]), U), [0.9, 0.85])
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([1, 0]), U), [0.25, 0.1])
    # RAPS, k_reg 1, penalty 0.1: + 0.1 * max(0, rank - 1)
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([2, 1]), U, 1, 0.1), [0.75, 1.05])
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([1, 0]), U, 1, 0.1), [0.25, 0.1])
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([0, 2]), U, 2, 0.1), [1.0, 0.5])
    # u = 1: the true class's whole probability counts (the non-randomised score)
    np.testing.assert_allclose(conformal.scores(PROBS, np.array([2, 2]), np.ones(2)), [0.8, 0.8])


def test_sets_by_hand() -> None:
    assert conformal.set_lists(PROBS, U, 0.6) == [[1], [0, 2]]
    assert conformal.set_lists(PROBS, U, 0.2) == [[], [0]]  # row 0's top class scores 0.25: empty
    assert conformal.set_lists(PROBS, U, 0.05) == [[], []]
    assert conformal.set_lists(PROBS, U, 1.0) == [[1, 2, 0], [0, 2, 1]]
    assert conformal.set_lists(PROBS, U, 0.62, 1, 0.1) == [[1], [0, 2]]  # row 1's second: 0.5 + 0.1
    np.testing.assert_array_equal(conformal.set_mask(PROBS, U, 0.6), [[False, True, False], [True, False, True]])
    # a class is in the set exactly when its score, were it the true class, is <= the threshold;
    # and the sets are those written out one class at a time (tests/support.py)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6) * 0.5, size=200)
    u = rng.random(200)
    for k_reg, penalty, tau in ((0, 0.0, 0.7), (2, 0.05, 0.9), (1, 0.3, 1.2), (0, 0.0, 0.3)):
        mask = conformal.set_mask(probs, u, tau, k_reg, penalty)
        each = np.stack([conformal.scores(probs, np.full(200, c), u, k_reg, penalty) for c in range(6)], axis=1)
        np.testing.assert_array_equal(mask, each <= tau)
        lists = conformal.set_lists(probs, u, tau, k_reg, penalty)
        assert [sorted(r) for r in lists] == [np.flatnonzero(row).tolist() for row in mask]
        assert lists == [conformal_set(p, ui, tau, k_reg, penalty) for p, ui in zip(probs, u, strict=True)]
    assert not all(conformal.set_mask(probs, u, 0.3).any(axis=1))  # some empty sets at a low threshold


def test_input_uniforms_are_a_hash_of_the_values() -> None:
    """u equals the definition written out with Python integers, depends on the values only
    (not on the array's layout or the batch it comes in), and is uniform over [0, 1) and
    unrelated to the input for signals, sparse images and near-identical rows alike."""
    rng = np.random.default_rng(4)
    signals = rng.normal(size=(20000, 40)).astype(np.float32)
    images = (rng.random((20000, 1, 8, 8)) < 0.1).astype(np.float32) * rng.random((20000, 1, 8, 8), dtype=np.float32)
    near = np.repeat(signals[:1], 20000, axis=0)
    near[np.arange(20000), rng.integers(0, 40, 20000)] += np.float32(1e-3) * rng.integers(1, 1000, 20000)
    for x in (signals, images, near):
        u = conformal.input_uniforms(x)
        assert u.dtype == np.float64 and ((0 <= u) & (u < 1)).all()
        assert [conformal_u(row) for row in x[:5]] == u[:5].tolist()
        np.testing.assert_array_equal(conformal.input_uniforms(x[7:9]), u[7:9])  # batch-independent
        assert kstest(u, "uniform").pvalue > 1e-3
        assert abs(np.corrcoef(u, x.reshape(len(x), -1).sum(axis=1))[0, 1]) < 0.05
    fortran = np.asfortranarray(signals[:10])
    np.testing.assert_array_equal(conformal.input_uniforms(fortran), conformal.input_uniforms(signals[:10]))
    np.testing.assert_array_equal(conformal.input_uniforms(signals[:10].astype(np.float64)),
                                  conformal.input_uniforms(signals[:10]))  # the float32 values count


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
    """Over many calibration/test draws the sets hold the true class with mean frequency in
    [1 - alpha, 1 - alpha + 1/(n + 1)], within the simulation's error, also at a target below
    the accuracy (there some sets are empty); a set holds the true class exactly when its
    score is <= the threshold."""
    rng = np.random.default_rng(2)
    n, m, trials = 200, 1000, 300
    for coverage in (0.8, 0.9, 0.95):
        covered, accuracy, empty = [], [], []
        for _ in range(trials):
            probs, labels = _synthetic(rng, n + m)
            u = rng.random(n + m)
            tau = conformal.threshold(conformal.scores(probs[:n], labels[:n], u[:n], k_reg, penalty), coverage)
            test, y, ut = probs[n:], labels[n:], u[n:]
            mask = conformal.set_mask(test, ut, tau, k_reg, penalty)
            held = mask[np.arange(m), y]
            np.testing.assert_array_equal(held, conformal.scores(test, y, ut, k_reg, penalty) <= tau)
            covered.append(held.mean())
            accuracy.append((test.argmax(axis=1) == y).mean())
            empty.append((~mask.any(axis=1)).mean())
        mean, error = np.mean(covered), 4 * np.std(covered) / math.sqrt(trials)
        assert coverage - error <= mean <= coverage + 1 / (n + 1) + error, (coverage, mean, error)
        if coverage < np.mean(accuracy):  # below the accuracy only empty sets bring coverage down to the target
            assert np.mean(empty) > 0.01, (coverage, np.mean(accuracy), np.mean(empty))


def test_exported_thresholds_are_the_recomputed_ones() -> None:
    """prediction_sets() on synthetic validation/test probabilities: the thresholds are the
    quantile rule on the right calibration examples, RAPS's pair is the grid's smallest mean size
    on half A, and the test coverage is measured with the stored thresholds."""
    rng = np.random.default_rng(3)
    probs, labels = _synthetic(rng, 3000)
    val, test = torch.from_numpy(probs[:1000]), torch.from_numpy(probs[1000:])
    y_val, y_test = torch.from_numpy(labels[:1000]), torch.from_numpy(labels[1000:])
    temperature = 1.3
    u = rng.random(3000)
    fields = calibrate_sets.prediction_sets(val, y_val, u[:1000], temperature, test, y_test, u[1000:])
    assert fields is not None and fields["randomisation"] == conformal.RANDOMISATION
    scaled, scaled_test = calibrate(val, temperature).numpy(), calibrate(test, temperature).numpy()
    a, b = calibrate_sets.halves(1000)
    assert sorted([*a, *b]) == list(range(1000)) and len(a) == fields["raps_selection_examples"] == 500
    assert fields["coverages"] == list(conformal.COVERAGES) and fields["aps_examples"] == 1000
    k_reg, penalty = fields["raps_k_reg"], fields["raps_penalty"]
    sizes = {}
    for p, k in calibrate_sets.RAPS_GRID:
        tau = conformal.threshold(conformal.scores(scaled[a], labels[a], u[a], k, p), 0.9)
        sizes[(k, p)] = conformal.set_mask(scaled[a], u[a], tau, k, p).sum(axis=1).mean()
    assert sizes[(k_reg, penalty)] == pytest.approx(min(sizes.values()), abs=1e-12)
    for i, coverage in enumerate(fields["coverages"]):
        aps = np.sort(conformal.scores(scaled, labels[:1000], u[:1000]))[math.ceil(1001 * coverage - 1e-9) - 1]
        raps = np.sort(conformal.scores(scaled[b], labels[b], u[b], k_reg, penalty))[math.ceil(501 * coverage - 1e-9) - 1]
        assert fields["aps"][i] == aps and fields["raps"][i] == raps
        mask = conformal.set_mask(scaled_test, u[1000:], aps)
        assert fields["test_coverage"]["aps"][i] == mask[np.arange(2000), labels[1000:]].mean()
        assert fields["test_mean_size"]["aps"][i] == mask.sum(axis=1).mean()
        # 2000 test examples: within 4 standard deviations of the target, on either side
        sd = math.sqrt(coverage * (1 - coverage) * (1 / 2000 + 1 / 500))
        for method in ("aps", "raps"):
            assert abs(fields["test_coverage"][method][i] - coverage) < 4 * sd, (method, coverage)
    # too few validation examples for any stored coverage: no thresholds
    assert calibrate_sets.prediction_sets(val[:6], y_val[:6], u[:6], temperature, test, y_test, u[1000:]) is None


@pytest.fixture(scope="module")
def exported(built_artifact: Path) -> dict[str, Any]:
    return json.loads((built_artifact / "manifest.json").read_text())


def test_test_artifact_has_thresholds_that_cover(exported: dict[str, Any]) -> None:
    """The exporter's own test-split measurement on the tests' artifact (3-epoch networks, 1000
    validation and 12000 test signals): coverage within 4 sd of the conditional-on-calibration
    spread of every target (APS on 1000 examples, RAPS on 500), for the ensemble and SWA."""
    for model in ("ensemble", "swa"):
        sets = exported[model]["prediction_sets"]
        assert sets["coverages"] == list(conformal.COVERAGES)
        assert sets["aps_examples"] == 1000 and sets["raps_examples"] == 500
        for method, n in (("aps", 1000), ("raps", 500)):
            sizes = sets["test_mean_size"][method]
            assert sizes == sorted(sizes) and 0 < sizes[0] and sizes[-1] <= 10, sizes  # grow with the coverage
            for coverage, got in zip(sets["coverages"], sets["test_coverage"][method], strict=True):
                sd = math.sqrt(coverage * (1 - coverage) * (1 / 12000 + 1 / n))
                assert abs(got - coverage) < 4 * sd, (model, method, coverage, got)
        assert sets["randomisation"] == conformal.RANDOMISATION
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


def test_thresholds_without_randomisation_are_not_served(exported: dict[str, Any]) -> None:
    """Thresholds of an earlier, non-randomised calibration load, but the service treats them as
    absent (its scores would not be the ones they were calibrated on)."""
    old = copy.deepcopy(exported)
    del old["ensemble"]["prediction_sets"]["randomisation"]
    spec = parse_manifest(old)
    assert spec.ensemble.prediction_sets is not None and spec.ensemble.prediction_sets.randomisation is None
    assert served_sets.section(spec, "ensemble") is None
    assert served_sets.section(spec, "swa") is not None
    status, sentence = served_sets.problem(spec, "ensemble", served_sets.SetRequest(0.9))
    assert status == 404 and "lacks 'randomisation'" in sentence


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
