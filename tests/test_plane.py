"""`modeconn plane`: the basis, the grid through the three networks, a tiny grid end to end, errors.

The networks are small untrained CNNs (width 4) on the demo's data, and the curve is built
here (3 bends, a random middle bend) and saved as a curve checkpoint, so nothing trains.
Expected values come from the networks themselves: each loaded from its own checkpoint, BN
recomputed, evaluated with the metrics' formulas written out here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modeconn.training.cli import main
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import model_checkpoint, save_checkpoint
from modeconn.training.core.networks import build_network, config_specs, load_network, predict_probs
from modeconn.training.curves.model import CurveModel
from modeconn.training.curves.plane import (
    PlaneError,
    evaluate_plane,
    grid_axis,
    plane_basis,
    points_source,
)

ARCH = {"name": "cnn1d", "kwargs": {"width": 4}}


@pytest.fixture(scope="module")
def dataset(demo_config, demo_data) -> dict:  # noqa: ANN001
    return config_specs(demo_config.model, demo_config.data, demo_data)[1]


def _network(path: Path, seed: int, dataset: dict, architecture: dict = ARCH) -> Path:
    torch.manual_seed(seed)
    net = build_network(architecture, dataset["num_classes"])
    save_checkpoint(path, model_checkpoint(net, architecture, dataset, kind="train",
                                           config={"train": {"weight_decay": 5e-4}}))
    return path


def _curve(path: Path, dataset: dict, bends: int = 3) -> Path:
    torch.manual_seed(10)
    start, end = (build_network(ARCH, 10).state_dict() for _ in range(2))
    curve = CurveModel(build_network(ARCH, 10), start, end, num_bends=bends, init="random")
    settings = {**curve.settings(), "fix_start": True, "fix_end": True, "weight_decay": 5e-4}
    save_checkpoint(path, {"kind": "curve", "architecture": ARCH, "dataset": dataset, "curve": settings,
                           "model": curve.state_dict()})
    return path


def test_basis_is_orthonormal_and_rebuilds_the_three_networks() -> None:
    g = torch.Generator().manual_seed(0)
    w0, theta, w1 = (torch.randn(5000, generator=g) for _ in range(3))
    basis = plane_basis(w0, theta, w1)
    gram = torch.stack([basis.u, basis.v]) @ torch.stack([basis.u, basis.v]).T
    assert torch.allclose(gram, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(basis.u, (w1 - w0).double() / (w1 - w0).double().norm())
    for w, (x, y) in zip((w0, theta, w1), basis.bends(), strict=True):
        assert torch.allclose(basis.point(x, y).float(), w, atol=1e-6, rtol=0)
        assert basis.coordinates(w) == pytest.approx((x, y), abs=1e-9)
    # the grid's lines pass exactly through the three coordinates, in order, G values each
    xs = grid_axis(list(basis.bends()[:, 0]), 0.2, 21)
    ys = grid_axis(list(basis.bends()[:, 1]), 0.2, 21)
    assert len(xs) == len(ys) == 21 and np.all(np.diff(xs) > 0) and np.all(np.diff(ys) > 0)
    for x, y in basis.bends():
        assert x in xs and y in ys
    step = (xs[-1] - xs[0]) / 20
    assert xs[0] == pytest.approx(-0.2 * (xs[-1] - xs[0]) / 1.4) and np.abs(np.diff(xs) - step).max() <= step / 2 + 1e-9
    # degenerate planes are refused
    with pytest.raises(PlaneError, match="same network"):
        plane_basis(w0, theta, w0)
    with pytest.raises(PlaneError, match="on the straight line"):
        plane_basis(w0, 0.3 * w0 + 0.7 * w1, w1)
    with pytest.raises(PlaneError, match="too small"):
        grid_axis([0.0, 0.5, 1.0], 0.2, 2)


def _expected(path: Path, data, weight_decay: float) -> dict[str, float]:  # noqa: ANN001
    """Train loss and test error of a network loaded from its file, BN recomputed."""
    net, _ = load_network(path)
    recompute_bn(net, data).eval()
    train, test = predict_probs(net, data, "train").double(), predict_probs(net, data, "test").double()
    l2 = sum(float((p.detach().double() ** 2).sum()) for p in net.parameters())
    train_nll = float(-torch.log(train[torch.arange(len(train)), data.y_train]).mean())
    return {"train_loss": train_nll + 0.5 * weight_decay * l2,
            "test_error": float((test.argmax(1) != data.y_test).double().mean() * 100)}


def test_plane_of_three_networks_and_of_a_curve(dataset: dict, demo_data, tmp_path: Path,  # noqa: ANN001
                                                capsys: pytest.CaptureFixture) -> None:
    files = [_network(tmp_path / f"n{k}.pt", k, dataset) for k in range(3)]
    out = tmp_path / "plane"
    assert main(["plane", "--points", *map(str, files), "--grid", "3", "--margin", "0.1", "--out", str(out),
                 "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = np.load(out / "plane.npz")
    assert saved["train_loss"].shape == saved["test_error"].shape == (3, 3)
    # G = 3 with three distinct x coordinates: every x line is a network's; y: 0 (w0, w1) and dy (θ)
    columns, rows = saved["bend_index"][:, 0], saved["bend_index"][:, 1]
    assert len(set(columns)) == 3 and rows[0] == rows[2] != rows[1]  # w0 and w1 on y = 0, θ above
    for point, path in zip(result["points"], files, strict=True):
        i, j = point["i"], point["j"]
        assert (saved["xs"][i], saved["ys"][j]) == (point["x"], point["y"])
        expected = _expected(path, demo_data, 5e-4)
        assert saved["train_loss"][i, j] == pytest.approx(expected["train_loss"], rel=1e-5)
        assert saved["test_error"][i, j] == pytest.approx(expected["test_error"], abs=1e-4)  # a float32 mean
    # two points at a time (threads, on copies of the network) give the same grid
    source = points_source(files, torch.device("cpu"))
    basis = plane_basis(*source.points)
    both = evaluate_plane(source, basis, saved["xs"], saved["ys"], demo_data, workers=2)
    for metric, grid in both.items():
        assert np.allclose(grid, saved[metric], rtol=1e-5, atol=0.01 if "error" in metric else 1e-6), metric
    assert (out / "plane.png").stat().st_size > 10_000
    assert (out / "plane.csv").read_text().count("\n") == 1 + 9
    assert json.loads((out / "plane.json").read_text())["grid"] == 3

    # a curve run: w0, θ, w1 are its bends; the Bezier curve lies in the plane
    run = tmp_path / "curve"
    run.mkdir()
    _curve(run / "final.pt", dataset)
    result = main(["plane", str(run), "--grid", "3", "--margin", "0", "--device", "cpu", "--split", "val"])
    assert result == 0
    saved = np.load(run / "plane.npz")
    assert "val_error" in saved and "test_error" not in saved  # the error on the validation split
    assert saved["curve_coordinates"].shape == (61, 2)
    assert np.allclose(saved["curve_coordinates"][[0, -1]], saved["bend_coordinates"][[0, 2]], atol=1e-6)
    # a quadratic Bezier's middle is (w0 + 2θ + w1) / 4
    assert np.allclose(saved["curve_coordinates"][30], saved["bend_coordinates"].T @ [0.25, 0.5, 0.25], atol=1e-5)


def test_plane_errors(dataset: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = [str(_network(tmp_path / f"n{k}.pt", k, dataset)) for k in range(3)]
    two = _curve(tmp_path / "two.pt", dataset, bends=2)
    wide = _network(tmp_path / "wide.pt", 5, dataset, {"name": "cnn1d", "kwargs": {"width": 8}})
    cases = [
        (["--points", *files, "--grid", "0"], "--grid must be at least 3"),
        (["--points", *files, "--grid", "2"], "--grid must be at least 3"),
        (["--points", *files, "--margin", "-1"], "--margin must be"),
        ([str(two)], "2 bends"),
        (["--points", *files[:2], str(wide)], "mixed architectures"),
        (["--points", *files], "--points needs --out"),
        ([str(two), "--points", *files], "not both"),
        ([], "either a curve run or --points"),
        (["--points", files[0], files[1], files[0]], "same network"),
    ]
    for args, message in cases:
        assert main(["plane", *args, "--device", "cpu", *(["--out", str(tmp_path / "o")] if "needs" not in message
                                                          else [])]) == 2, args
        assert message in capsys.readouterr().err, args
