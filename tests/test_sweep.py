"""benchmarks/sweep_ensembles.py on a tiny grid (a width-8 CNN on the published MNIST-1D, 2
epochs, CPU): its choices follow the validation scores it reports, its "BN running averages"
evaluation is what a real `fge.bn_update: false` run saves, and it never computes a test
prediction."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.config import load_config
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import dataset_spec, load_data, load_network, predict_probs
from modeconn.training.ensembles.evaluate import expand_members
from modeconn.training.ensembles.fge import run_fge

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import sweep_ensembles  # noqa: E402

SETTINGS = {"device": "cpu", "model.kwargs.width": 8, "data.generation": {}, "data.val_size": 400,
            "train.epochs": 2, "train.save_every": 1, "fge.start_fraction": 0.5, "fge.epochs": 2,
            "sse.epochs": 2, "simplex.ensemble_size": 3}
GRID = {"train": [{"lr": 0.02}, {"lr": 0.1}], "fge": [{"cycle_epochs": 1.0, "lr1": 0.05}, {"cycle_epochs": 1.0, "lr1": 0.1}],
        "sse": [{"snapshots": 1, "lr": 0.05}, {"snapshots": 2, "lr": 0.1}],
        "simplex": [{"lr": 0.01, "volume_weight": 1e-3}, {"lr": 0.01, "volume_weight": 1.0}], "equal_check": True}


@pytest.mark.slow
def test_the_sweep_chooses_on_validation_and_evaluates_bn_off_as_a_real_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(None, SETTINGS)
    calls = []
    real_predict = sweep_ensembles.predict_probs
    monkeypatch.setattr(sweep_ensembles, "predict_probs",
                        lambda model, data, split="test": calls.append(split) or real_predict(model, data, split))
    found = sweep_ensembles.sweep(config, 2, GRID, tmp_path / "work", jobs=1)
    assert set(calls) == {"val"}  # the test split is never predicted
    # same effort: every configuration of a method scored on both seeds; FGE with BN on and off
    assert [len(found[m]) for m in ("ind", "equal", "sse", "fge", "simplex")] == [2, 2, 2, 4, 2]
    assert all(len(scores) == 2 for m in ("ind", "equal", "sse", "fge", "simplex") for scores in found[m].values())
    # the choices are the lowest mean calibrated validation NLL of each table
    for method, section in (("ind", "train"), ("sse", "sse"), ("simplex", "simplex")):
        best = min(found[method], key=lambda n: sum(s["cal_nll"] for s in found[method][n]))
        assert sweep_ensembles._name(found["chosen"][section]) == best
    best_fge = min(found["fge"], key=lambda n: sum(s["cal_nll"] for s in found["fge"][n]))
    assert found["chosen"]["fge"]["bn_update"] == best_fge.endswith("BN recomputed")
    assert best_fge.startswith(f"cycle_epochs 1, lr1 {found['chosen']['fge']['lr1']:g}")
    # the equal-budget pairs: 2 networks of 1 epoch each, no network shared between seeds
    pairs = sorted((tmp_path / "work").glob("seed-*/equal-lr0.1-seed*/final.pt"))
    states = [load_checkpoint(path) for path in pairs]
    assert len({state["config"]["seed"] for state in states}) == 4
    assert {state["metrics"]["epoch"] for state in states} == {1}
    # the SSE cycle is sse.epochs / snapshots
    assert (tmp_path / "work" / "seed-1000" / "sse-cycle_epochs1-lr0.1").is_dir()
    _check_simplex(found, config, tmp_path / "work" / "seed-1001")

    # an independent check of one score: the seed-1000 network at lr 0.1, by hand
    data = load_data(dataset_spec(config.data), "cpu")
    model, _ = load_network(tmp_path / "work" / "seed-1000" / "train-lr0.1" / "final.pt")
    probs = predict_probs(model, data, "val").double()
    assert found["ind"]["lr 0.1"][0]["nll"] == pytest.approx(classification_metrics(probs, data.y_val)["nll"], abs=1e-9)
    assert found["ind"]["lr 0.1"][0]["cal_nll"] <= found["ind"]["lr 0.1"][0]["nll"] + 1e-12

    # BN off, evaluated from the kept running averages, equals a run with fge.bn_update false
    chosen_lr = found["chosen"]["train"]["lr"]
    fge_dir = tmp_path / "work" / "seed-1000" / f"fge-from-train-lr{chosen_lr:g}-cycle_epochs1-lr10.05-lr20.005"
    fields = {**sweep_ensembles.fge_fields(config, GRID["fge"][0]), "bn_update": False}
    off = sweep_ensembles._variant(config, 1000, "fge", fields)
    start = tmp_path / "work" / "seed-1000" / f"train-lr{chosen_lr:g}" / "checkpoints" / "epoch-0001.pt"
    run_fge(off, start, tmp_path / "off", resume=False)
    kept = sweep_ensembles.val_probs(expand_members([fge_dir]), data, torch.device("cpu"), running_bn=True)
    real = sweep_ensembles.val_probs(expand_members([tmp_path / "off"]), data, torch.device("cpu"))
    recomputed = sweep_ensembles.val_probs(expand_members([fge_dir]), data, torch.device("cpu"))
    assert torch.allclose(kept, real, atol=1e-6)
    assert not torch.allclose(recomputed, real, atol=1e-4)  # recomputing BN changed something
    name = "cycle_epochs 1, lr1 0.05, lr2 0.005, BN running averages"
    assert found["fge"][name][0]["nll"] == pytest.approx(sweep_ensembles.val_scores(real, data.y_val)["nll"], abs=1e-6)


def _check_simplex(found: dict, config, seed_dir: Path) -> None:
    """The seed-1001 simplex at λ 1: grown from that seed's network at the chosen train.lr, its two
    vertices sharing B = 2 epochs (compare's 2B), at its λ; its score is the validation NLL of the
    ensemble of its first 3 sampled points rebuilt by hand (θ(w) = Σ w_i θ_i, BN recomputed)."""
    from modeconn.training.core.bn import recompute_bn
    from modeconn.training.simplex.model import sample_weights

    train = seed_dir / f"train-lr{found['chosen']['train']['lr']:g}"
    run = seed_dir / f"simplex-from-{train.name}-lr0.01-volume_weight1"
    vertices = [load_checkpoint(path) for path in sorted(run.glob("vertex-*/vertex.pt"))]
    assert [max(r["epoch"] for r in v["history"]) for v in vertices] == [1, 1]
    assert {(v["config"]["simplex"]["lr"], v["config"]["simplex"]["volume_weight"]) for v in vertices} == {(0.01, 1.0)}
    simplex = load_checkpoint(run / "final.pt")
    net, state = load_network(train / "final.pt")
    names = [n for n, _ in net.named_parameters()]
    shapes = {n: p.shape for n, p in net.named_parameters()}
    assert torch.equal(simplex["model"]["vertices"][0], torch.cat([p.detach().flatten() for p in net.parameters()]))
    data = load_data(state["dataset"], "cpu")
    generator = torch.Generator().manual_seed(1001 + 7)
    members = []
    for _ in range(3):
        w = sample_weights(3, [[0, 1, 2]], generator)
        flat = (w[:, None] * simplex["model"]["vertices"].double()).sum(0).float()
        chunks = flat.split([shapes[n].numel() for n in names])
        net.load_state_dict({**simplex["base"], **{n: c.view(shapes[n]) for n, c in zip(names, chunks, strict=True)}})
        members.append(predict_probs(recompute_bn(net, data).eval(), data, "val").double())
    expected = classification_metrics(torch.stack(members).mean(0), data.y_val)
    assert found["simplex"]["lr 0.01, volume_weight 1"][1]["nll"] == pytest.approx(expected["nll"], abs=1e-4)
    assert found["simplex"]["lr 0.01, volume_weight 1"][1]["error"] == pytest.approx(expected["error"], abs=0.11)  # 1 of 400


def test_a_diverged_setting_ranks_last_and_the_rest_as_before() -> None:
    scores = {"lr 0.4": [{"cal_nll": float("nan"), "nll": float("nan"), "error": 90.0}, {"cal_nll": 0.2, "nll": 0.3, "error": 6.0}],
              "lr 0.1": [{"cal_nll": 0.3, "nll": 0.4, "error": 8.0}, {"cal_nll": 0.5, "nll": 0.6, "error": 9.0}],
              "lr 0.2": [{"cal_nll": 0.25, "nll": 0.3, "error": 7.0}]}
    rows = sweep_ensembles.rank(scores)
    assert [r[0] for r in rows] == ["lr 0.2", "lr 0.1", "lr 0.4"]
    assert rows[1][1:3] == pytest.approx([0.4, 0.1414213562])  # mean and sample std of 0.3, 0.5
    assert rows[0][2] == 0.0 and rows[2][1] == math.inf and math.isnan(rows[2][2])
