"""OOD detection (AUROC) and selective prediction (AURC, E-AURC): training/ensembles/selective.py
against direct computations, the built-in OOD sets, and what `ensemble-eval` reports.

The expected values are computed here without the module's formulas: AUROC by counting every
(in, out) pair (and by scikit-learn), AURC as the mean of the prefix error rates written out by
hand and, with ties, averaged over every order of the tied inputs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from modeconn.training.cli import main
from modeconn.training.core.checkpoint import model_checkpoint, save_checkpoint
from modeconn.training.core.config import load_config
from modeconn.training.core.data import DataError, ood_inputs, ood_names, ood_split
from modeconn.training.core.networks import (
    architecture_spec,
    build_network,
    dataset_spec,
    load_data,
    load_network,
    predict_probs,
)
from modeconn.training.ensembles import selective

# the published MNIST-1D (1000 test signals) and a narrow network: seconds
SETTINGS = {"device": "cpu", "data.generation": {}, "data.val_size": 400, "model.kwargs.width": 8}


# ---------------------------------------------------------------- AUROC
def pairwise_auroc(a: np.ndarray, b: np.ndarray) -> float:
    """P(out > in) + P(out = in) / 2 by counting every pair."""
    return float(np.mean([(y > x) + 0.5 * (y == x) for x in a for y in b]))


def test_auroc_equals_the_pairwise_count_and_sklearn_with_ties() -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, 40).astype(float)  # few distinct values: many ties, also across the two sets
    b = rng.integers(2, 8, 25).astype(float)
    expected = pairwise_auroc(a, b)
    assert selective.auroc(a, b) == pytest.approx(expected, abs=1e-12)
    assert selective.auroc(a, b) == pytest.approx(roc_auc_score(np.r_[np.zeros(40), np.ones(25)], np.r_[a, b]), abs=1e-12)
    assert selective.auroc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert selective.auroc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert selective.auroc([1.0, 1.0], [1.0]) == 0.5


def test_ood_scores_rank_uncertain_inputs_as_out_of_distribution() -> None:
    confident, flat = np.array([[0.98, 0.01, 0.01]]), np.full((1, 3), 1 / 3)
    assert selective.ood_score(flat, "entropy")[0] == pytest.approx(np.log(3))
    assert selective.ood_score(flat, "entropy")[0] > selective.ood_score(confident, "entropy")[0]
    assert selective.ood_score(flat, "max_prob")[0] == pytest.approx(-1 / 3)
    assert selective.ood_metrics(confident, flat) == {"auroc_entropy": 1.0, "auroc_max_prob": 1.0}


def test_auroc_interval_resamples_each_set_as_documented() -> None:
    """With one resample the interval is that resample's AUROC: the in-distribution draw first,
    then the OOD draw, from numpy.random.default_rng(seed)."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 10, 50).astype(float), rng.integers(3, 12, 30).astype(float)
    for seed in (0, 7):
        draw = np.random.default_rng(seed)
        ia, ib = draw.integers(0, 50, 50), draw.integers(0, 30, 30)
        got = selective.auroc_interval(a, b, resamples=1, seed=seed)
        assert got.low == pytest.approx(pairwise_auroc(a[ia], b[ib]), abs=1e-12)
        assert got.value == pytest.approx(pairwise_auroc(a, b), abs=1e-12)
    wide = selective.auroc_interval(a, b)
    assert wide.low <= wide.value <= wide.high and wide.resamples == 1000


# ---------------------------------------------------------------- risk-coverage
def test_aurc_of_five_examples_by_hand() -> None:
    conf = np.array([0.6, 0.95, 0.7, 0.9, 0.8])
    wrong = np.array([1, 0, 0, 1, 0])
    # most confident first: 0.95 (right), 0.9 (wrong), 0.8 (right), 0.7 (right), 0.6 (wrong)
    risks = [0 / 1, 1 / 2, 1 / 3, 1 / 4, 2 / 5]
    assert selective.aurc(conf, wrong) == pytest.approx(sum(risks) / 5, abs=1e-12)
    coverage, risk = selective.risk_coverage(conf, wrong)
    assert coverage.tolist() == [0.2, 0.4, 0.6, 0.8, 1.0] and risk == pytest.approx(risks)
    # the best ranking of 2 errors in 5: [0, 0, 0, 1/4, 2/5]
    assert selective.optimal_aurc(5, 2) == pytest.approx((1 / 4 + 2 / 5) / 5, abs=1e-12)
    assert selective.excess_aurc(conf, wrong) == pytest.approx((sum(risks) - 1 / 4 - 2 / 5) / 5, abs=1e-12)


def test_aurc_with_ties_is_the_mean_over_the_orders_of_the_tied_inputs() -> None:
    conf = np.array([0.9, 0.9, 0.8, 0.8, 0.8, 0.5, 0.5])
    wrong = np.array([1, 0, 0, 1, 1, 0, 1])
    values = []
    for order in itertools.permutations(range(7)):
        if all(conf[order[i]] >= conf[order[i + 1]] for i in range(6)):  # every order most-confident-first
            w = wrong[list(order)]
            values.append(np.mean(np.cumsum(w) / np.arange(1, 8)))
    assert len(values) == 2 * 6 * 2
    assert selective.aurc(conf, wrong) == pytest.approx(np.mean(values), abs=1e-12)
    shuffled = np.random.default_rng(1).permutation(7)  # the input order does not matter
    assert selective.aurc(conf[shuffled], wrong[shuffled]) == pytest.approx(np.mean(values), abs=1e-12)


def test_excess_aurc_is_zero_for_a_perfect_ranking_and_positive_otherwise() -> None:
    rng = np.random.default_rng(2)
    wrong = (rng.random(200) < 0.2).astype(float)
    perfect = np.where(wrong == 1, rng.random(200) * 0.5, 0.5 + rng.random(200) * 0.5)  # every error less confident
    assert selective.excess_aurc(perfect, wrong) == pytest.approx(0.0, abs=1e-12)
    assert selective.aurc(perfect, wrong) == pytest.approx(selective.optimal_aurc(200, wrong.sum()), abs=1e-12)
    assert selective.excess_aurc(1 - perfect, wrong) > 0.3  # the worst ranking
    assert selective.aurc(np.ones(200), wrong) == pytest.approx(wrong.mean(), abs=1e-12)  # all tied: the error rate


def test_aurc_intervals_resample_the_test_examples_as_documented() -> None:
    rng = np.random.default_rng(4)
    conf = np.round(rng.random(300), 2)  # ties, and bootstrap duplicates are ties too
    wrong = (rng.random(300) < 0.3).astype(float)
    for seed in (0, 5):
        index = np.random.default_rng(seed).integers(0, 300, 300)
        got = selective.aurc_intervals(conf, wrong, resamples=1, seed=seed)
        assert got["aurc"].low == pytest.approx(selective.aurc(conf[index], wrong[index]), abs=1e-12)
        assert got["eaurc"].low == pytest.approx(selective.excess_aurc(conf[index], wrong[index]), abs=1e-12)
    full = selective.aurc_intervals(conf, wrong)
    assert full["aurc"].low <= selective.aurc(conf, wrong) == full["aurc"].value <= full["aurc"].high


# ---------------------------------------------------------------- the OOD sets
@pytest.fixture(scope="module")
def published() -> object:
    config = load_config(None, SETTINGS)
    return load_data(dataset_spec(config.data), "cpu")


def test_built_in_ood_sets_are_seeded_and_differ_from_the_test_set(published) -> None:  # noqa: ANN001
    data = published
    assert ood_names(["auto"], data) == ["mnist1d-noise", "shuffled"]
    assert ood_names(["none"], data) == []
    shuffled = ood_inputs("shuffled", data, seed=0)
    assert torch.equal(shuffled, ood_inputs("shuffled", data, seed=0))
    assert not torch.equal(shuffled, ood_inputs("shuffled", data, seed=1))
    assert shuffled.shape == data.x_test.shape and not torch.equal(shuffled, data.x_test)
    # each signal keeps its own values (the same marginal), in another order
    assert torch.equal(shuffled.sort(dim=1).values, data.x_test.sort(dim=1).values)
    noisy = ood_inputs("mnist1d-noise", data, seed=0)
    assert torch.equal(noisy, ood_inputs("mnist1d-noise", data, seed=0))
    assert not torch.equal(noisy, ood_inputs("mnist1d-noise", data, seed=1))
    assert noisy.shape == data.x_test.shape
    # not the test signals: no OOD signal is within float rounding of any test signal
    distances = torch.cdist(noisy.double(), data.x_test.double())
    assert float(distances.min()) > 1.0


def test_an_ood_path_is_read_and_checked(published, tmp_path: Path) -> None:  # noqa: ANN001
    data = published
    x = np.random.default_rng(0).normal(size=(7, *data.input_shape)).astype(np.float32)
    np.savez(tmp_path / "ood.npz", x=x)
    np.save(tmp_path / "ood.npy", x)
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "x.npy", x)
    for path in (tmp_path / "ood.npz", tmp_path / "ood.npy", tmp_path / "folder"):
        assert torch.equal(ood_inputs(str(path), data), torch.from_numpy(x))
    np.save(tmp_path / "wrong.npy", x[:, :5])
    with pytest.raises(DataError, match="wrong.npy: inputs of shape"):
        ood_inputs(str(tmp_path / "wrong.npy"), data)
    with pytest.raises(DataError, match="neither a built-in OOD set nor an existing file"):
        ood_inputs(str(tmp_path / "missing"), data)


# ---------------------------------------------------------------- ensemble-eval
def _cli_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([*argv, "--json"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_ensemble_eval_reports_selective_and_ood_metrics_of_the_saved_probabilities(published, tmp_path: Path) -> None:  # noqa: ANN001
    config = load_config(None, SETTINGS)
    data = published
    spec = {**dataset_spec(config.data), **data.describe()}
    paths = []
    for seed in range(3):  # untrained networks of different initialisations: different predictions
        torch.manual_seed(seed)
        net = build_network(architecture_spec(config.model), data.num_classes)
        paths.append(tmp_path / f"net{seed}.pt")
        save_checkpoint(paths[-1], model_checkpoint(net, architecture_spec(config.model), spec))
    np.savez(tmp_path / "mine.npz", x=np.random.default_rng(0).normal(size=(50, *data.input_shape)).astype(np.float32))
    mine = str(tmp_path / "mine.npz")
    result = _cli_json(["ensemble-eval", *map(str, paths), "--device", "cpu", "--out", str(tmp_path / "out"),
                        "--ood", "auto", "--ood", mine, "--ood-seed", "3"])
    # by hand: each checkpoint's probabilities on the test split and on each OOD set, averaged
    sets = {name: ood_split(data, ood_inputs(name, data, 3)) for name in ("mnist1d-noise", "shuffled", mine)}
    test, ood = [], {name: [] for name in sets}
    for path in paths:
        model, _ = load_network(path, "cpu")
        test.append(predict_probs(model, data, "test").double())
        for name, split in sets.items():
            ood[name].append(predict_probs(model, split, "test").double())
    mean = torch.stack(test).mean(0).numpy()
    labels = data.y_test.numpy()
    conf, wrong = mean.max(1), (mean.argmax(1) != labels).astype(float)
    got = result["selective"]
    assert got["test_size"] == len(labels) == 1000 and got["ood_seed"] == 3
    assert got["aurc"]["value"] == pytest.approx(selective.aurc(conf, wrong), abs=1e-9)
    assert got["eaurc"]["value"] == pytest.approx(selective.excess_aurc(conf, wrong), abs=1e-9)
    assert got["aurc"]["low"] <= got["aurc"]["value"] <= got["aurc"]["high"]
    assert set(got["ood"]) == set(sets)
    for name, members in ood.items():
        out = torch.stack(members).mean(0).numpy()
        cell = got["ood"][name]
        assert cell["size"] == len(out) == (50 if name == mine else 1000)
        for score in selective.SCORES:
            expected = roc_auc_score(np.r_[np.zeros(len(mean)), np.ones(len(out))],
                                     np.r_[selective.ood_score(mean, score), selective.ood_score(out, score)])
            assert cell[f"auroc_{score}"]["value"] == pytest.approx(expected, abs=1e-9)
            assert cell[f"auroc_{score}"]["low"] <= cell[f"auroc_{score}"]["high"]
        first = result["member_metrics"][0][f"auroc_entropy:{name}"]
        assert first == pytest.approx(selective.auroc(selective.entropy(test[0].numpy()),
                                                      selective.entropy(members[0].numpy())), abs=1e-9)
    member = test[1].numpy()
    assert result["member_metrics"][1]["test_aurc"] == pytest.approx(
        selective.aurc(member.max(1), (member.argmax(1) != labels).astype(float)), abs=1e-9)
    with (tmp_path / "out" / "ensemble.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["test_aurc"]) == pytest.approx(got["aurc"]["value"], abs=1e-9)
    assert float(rows[-1]["auroc_max_prob:shuffled"]) == pytest.approx(got["ood"]["shuffled"]["auroc_max_prob"]["value"])
    assert json.loads((tmp_path / "out" / "ensemble.json").read_text())["selective"] == got


def test_ensemble_eval_refuses_a_bad_ood_path(published, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    config = load_config(None, SETTINGS)
    data = published
    net = build_network(architecture_spec(config.model), data.num_classes)
    path = tmp_path / "net.pt"
    save_checkpoint(path, model_checkpoint(net, architecture_spec(config.model),
                                           {**dataset_spec(config.data), **data.describe()}))
    np.save(tmp_path / "bad.npy", np.zeros((4, 3), dtype=np.float32))
    out = tmp_path / "out"
    assert main(["ensemble-eval", str(path), "--device", "cpu", "--ood", str(tmp_path / "bad.npy"), "--out", str(out)]) == 2
    assert "bad.npy: inputs of shape [4, 3]" in capsys.readouterr().err
    assert not (out / "ensemble.json").exists()
