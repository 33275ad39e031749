"""`modeconn layer-barrier`: one layer (or block) interpolated at a time, against independent
computations on the small runs (two 3-epoch MNIST-1D networks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modeconn import models
from modeconn.training import cli
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import load_data, load_network, predict_probs
from modeconn.training.curves.layerwise import ALL, barrier, parameter_groups
from tests.own_models import build_digits

SMALL_KWARGS: dict[str, dict[str, int]] = {"preresnet": {"depth": 20}, "wideresnet": {"depth": 10, "widen_factor": 2}}


@pytest.mark.parametrize("by", ["layer", "block"])
@pytest.mark.parametrize("name", [*models.list_models(), "own"])
def test_groups_hold_every_parameter_once(name: str, by: str) -> None:
    net = build_digits(num_classes=10) if name == "own" else models.build_model(
        name, num_classes=10, **SMALL_KWARGS.get(name, {}))
    groups = parameter_groups(net, by)
    names = [p for params in groups.values() for p in params]
    assert sorted(names) == sorted(n for n, _ in net.named_parameters()) and len(names) == len(set(names))
    if by == "layer":  # a layer is one module: its parameters share its prefix
        assert all(all(p.rsplit(".", 1)[0] == g or g == "(root)" for p in params) for g, params in groups.items())


def test_barrier_is_the_rise_above_the_line_between_the_ends() -> None:
    alphas = np.linspace(0, 1, 5)
    assert barrier([1.0, 3.0, 2.0, 2.0, 1.0], alphas) == (2.0, 0.25)
    assert barrier([1.0, 1.25, 1.5, 1.75, 2.0], alphas) == (0.0, 0.0)  # on the line: no barrier
    rise, at = barrier([0.0, -1.0, -1.0, -1.0, 1.0], alphas)  # below the line everywhere but the ends
    assert (rise, at) == (0.0, 0.0)


def _metrics(net: torch.nn.Module, data: Any) -> dict[str, float]:
    recompute_bn(net, data).eval()
    test = classification_metrics(predict_probs(net, data, "test"), data.y_test)
    return {"train_nll": classification_metrics(predict_probs(net, data, "train"), data.y_train)["nll"],
            "test_error": test["error"], "test_nll": test["nll"]}


def _run(small_runs: dict[str, Path], out: Path, *extra: str) -> dict[str, Any]:
    args = ["layer-barrier", "--start", str(small_runs["net0"]), "--end", str(small_runs["net1"]), "--out", str(out),
            "--points", "3", "--device", "cpu", *extra]
    assert cli.main(args) == 0
    return json.loads((out / "layer_barrier.json").read_text())


def test_layer_barrier_against_independent_computations(small_runs: dict[str, Path], tmp_path: Path) -> None:
    report = _run(small_runs, tmp_path / "lb")
    a, a_state = load_network(small_runs["net0"])
    b, _ = load_network(small_runs["net1"])
    data = load_data(a_state["dataset"], "cpu")
    rows = {r["group"]: r for r in report["groups"]}
    assert list(rows) == [*parameter_groups(a, "layer"), ALL]
    assert report["alphas"] == [0.0, 0.5, 1.0] and report["held_out_size"] == len(data.y_test)
    a_metrics, b_metrics = _metrics(a, data), _metrics(b, data)
    for name, curve in report["curves"].items():  # every path starts at A (BN recomputed)
        assert curve["test_error"][0] == pytest.approx(a_metrics["test_error"], abs=1e-9), name
    # the whole line ends at B; a mixed point built by hand equals the report's
    assert report["curves"][ALL]["test_error"][-1] == pytest.approx(b_metrics["test_error"], abs=1e-9)
    group = "features.1.0"
    keys = parameter_groups(a, "layer")[group]
    state = {k: v.clone() for k, v in a.state_dict().items()}
    for k in keys:
        state[k] = 0.5 * a.state_dict()[k] + 0.5 * b.state_dict()[k]
    a.load_state_dict(state)
    mixed = _metrics(a, data)
    assert report["curves"][group]["test_error"][1] == pytest.approx(mixed["test_error"], abs=1e-9)
    assert report["curves"][group]["train_nll"][1] == pytest.approx(mixed["train_nll"], rel=1e-6)
    for name, row in rows.items():  # the barrier columns are the rise above each path's own line
        for metric, column in (("train_nll", "train_nll_barrier"), ("test_error", "test_error_barrier")):
            values = report["curves"][name][metric]
            assert row[column] == pytest.approx(max(v - (values[0] + i / 2 * (values[-1] - values[0]))
                                                    for i, v in enumerate(values)), abs=1e-9)
    for row in rows.values():  # the interval holds its estimate
        assert row["test_error_barrier_low"] <= row["test_error_barrier"] <= row["test_error_barrier_high"]
    assert rows[ALL]["test_error_barrier"] > 5  # two independent networks: the straight line has a barrier
    assert rows[ALL]["test_error_barrier_low"] > 0  # ... that test sampling alone does not explain
    assert {p.name for p in (tmp_path / "lb").iterdir()} >= {"layer_barrier.json", "layer_barrier.csv",
                                                              "layer_barrier.png"}


def test_aligned_blocks_and_the_json_line(small_runs: dict[str, Path], tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "modeconn", "layer-barrier", "--start", str(small_runs["net0"]),
                          "--end", str(small_runs["net1"]), "--out", str(tmp_path / "lb"), "--points", "3",
                          "--by", "block", "--align", "--device", "cpu", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    report = json.loads(Path(result["json"]).read_text())
    assert report["aligned"] and report["by"] == "block"
    assert [r["group"] for r in result["groups"]] == ["features", "classifier", ALL]
    b, b_state = load_network(small_runs["net1"])
    b_error = _metrics(b, load_data(b_state["dataset"], "cpu"))["test_error"]
    # B permuted computes B's function: the whole aligned line ends at B's error
    assert report["curves"][ALL]["test_error"][-1] == pytest.approx(b_error, abs=0.02)


def test_a_curve_or_another_architecture_is_one_line(small_runs: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    curve = small_runs["bezier"] / "final.pt"
    assert cli.main(["layer-barrier", "--start", str(curve), "--end", str(small_runs["net1"]),
                     "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modeconn layer-barrier: error:") and "is a curve" in err and "\n" not in err
    assert not (tmp_path / "x").exists()  # refused before any folder is made
    assert cli.main(["layer-barrier", "--start", str(small_runs["net0"]), "--end", str(small_runs["net1"]),
                     "--out", str(tmp_path / "y"), "--points", "1", "--device", "cpu"]) == 2
    assert "--points must be at least 2" in capsys.readouterr().err and not (tmp_path / "y").exists()
