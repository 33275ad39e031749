"""Curves: the coefficient formulas (docs/design.md), the generic wrapper over any nn.Module, BN
re-estimation, and the MNIST-1D result (a low-loss curve where the straight line is not).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modeconn import models
from modeconn.models import build_model
from modeconn.training import cli
from modeconn.training.core.bn import recompute_bn, update_bn
from modeconn.training.core.networks import load_network
from modeconn.training.curves.model import (
    CurveModel,
    bezier_coefficients,
    network_at,
    polychain_coefficients,
)

REPO = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).with_name("modeconn")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "modeconn"]
TS = torch.linspace(0, 1, 201, dtype=torch.float64)


def modeconn(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=600)


# ------------------------------------------------------------------ coefficients
def test_bezier_coefficients_are_the_bernstein_basis() -> None:
    for n in (2, 3, 4, 5, 7):
        for t in TS:
            c = bezier_coefficients(t, n)
            assert c.shape == (n,)
            assert float(c.sum()) == pytest.approx(1.0, abs=1e-12)
            assert bool((c >= 0).all())
            tv = float(t)
            expected = [math.comb(n - 1, k) * tv**k * (1 - tv) ** (n - 1 - k) for k in range(n)]
            assert c.tolist() == pytest.approx(expected, abs=1e-12)
        one_hot_0 = torch.zeros(n, dtype=torch.float64)
        one_hot_0[0] = 1
        assert torch.equal(bezier_coefficients(torch.tensor(0.0, dtype=torch.float64), n), one_hot_0)
        assert torch.equal(bezier_coefficients(torch.tensor(1.0, dtype=torch.float64), n), one_hot_0.flip(0))
    assert torch.equal(bezier_coefficients(torch.tensor(0.0), 3), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(bezier_coefficients(torch.tensor(1.0), 3), torch.tensor([0.0, 0.0, 1.0]))
    for t in TS.tolist():  # n = 3 as written in the paper
        c = bezier_coefficients(torch.tensor(t, dtype=torch.float64), 3).tolist()
        assert c == pytest.approx([(1 - t) ** 2, 2 * t * (1 - t), t**2], abs=1e-12)


def _polychain3(t: float) -> list[float]:
    """docs/design.md: 2(tθ + (0.5−t)w0) for t ≤ 0.5; 2((t−0.5)w1 + (1−t)θ) for t > 0.5."""
    return [2 * (0.5 - t), 2 * t, 0.0] if t <= 0.5 else [0.0, 2 * (1 - t), 2 * (t - 0.5)]


def test_polychain_passes_through_its_bends_and_matches_the_formula() -> None:
    for n in (2, 3, 4, 6):
        for k in range(n):
            c = polychain_coefficients(torch.tensor(k / (n - 1), dtype=torch.float64), n)
            expected = torch.zeros(n, dtype=torch.float64)
            expected[k] = 1.0
            assert torch.equal(c, expected), (n, k)
        for t in TS:
            c = polychain_coefficients(t, n)
            assert float(c.sum()) == pytest.approx(1.0, abs=1e-12) and bool((c >= 0).all())
            assert int((c > 0).sum()) <= 2  # piecewise linear: two neighbouring bends at most
    for t in TS.tolist():
        c = polychain_coefficients(torch.tensor(t, dtype=torch.float64), 3).tolist()
        assert c == pytest.approx(_polychain3(t), abs=1e-12), t


# ------------------------------------------------------------------ the wrapper
class TinyNet(nn.Module):
    """A user module outside the registry: LayerNorm, a buffer, a bare nn.Parameter."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(40, 24)
        self.norm = nn.LayerNorm(24)
        self.scale = nn.Parameter(torch.ones(24))
        self.fc2 = nn.Linear(24, classes)
        self.register_buffer("offset", torch.linspace(-0.1, 0.1, 24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x)) * self.scale + self.offset))


class BNNet(nn.Module):
    """Two BatchNorm layers, so the second sees train-mode-normalised inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(40, 16)
        self.bn1 = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 10)
        self.bn2 = nn.BatchNorm1d(10)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.fc2(self.drop(torch.relu(self.bn1(self.fc1(x))))))


SMALL_KWARGS: dict[str, dict[str, int]] = {"preresnet": {"depth": 20}, "wideresnet": {"depth": 10, "widen_factor": 2}}


def _make(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet() if name == "user" else build_model(name, num_classes=10, **SMALL_KWARGS.get(name, {}))


def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(8, 40, generator=g) if name in ("cnn1d", "user") else torch.randn(8, 3, 32, 32, generator=g)


def _curve(name: str = "cnn1d", **kw: Any) -> tuple[CurveModel, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    net0, net1 = _make(name, 0), _make(name, 1)
    start = {k: v.clone() for k, v in net0.named_parameters()}
    end = {k: v.clone() for k, v in net1.named_parameters()}
    return CurveModel(copy.deepcopy(net0), net0.state_dict(), net1.state_dict(), **kw), start, end


def _assert_endpoints(curve: CurveModel, start: dict, end: dict) -> None:
    at0, at1 = curve.weights(0.0), curve.weights(1.0)
    assert at0.keys() == start.keys() == end.keys()
    for name in start:
        assert torch.equal(at0[name], start[name]), name
        assert torch.equal(at1[name], end[name]), name


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("num_bends", [3, 4])
def test_fixed_endpoints_are_reproduced_bit_for_bit(kind: str, num_bends: int) -> None:
    curve, start, end = _curve(curve=kind, num_bends=num_bends, init="random")
    _assert_endpoints(curve, start, end)
    # still after a few SGD steps on the free points
    optimizer = torch.optim.SGD([curve.free_points], lr=0.5)
    curve.train()
    x, y = _input("cnn1d"), torch.arange(8) % 10
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(curve(x), y).backward()
        optimizer.step()
    _assert_endpoints(curve, start, end)


def test_curve_weights_combine_the_bends_by_the_formulas() -> None:
    curve, start, end = _curve(curve="bezier", num_bends=3, init="random")
    w0, w1 = (torch.cat([s[k].reshape(-1) for k in curve.names]).double() for s in (start, end))
    theta = curve.free_points.detach()[0].double()
    assert not torch.allclose(theta, (w0 + w1) / 2)  # a random middle bend, off the line
    for t in (0.1, 0.37, 0.5, 0.9):
        expected = (1 - t) ** 2 * w0 + 2 * t * (1 - t) * theta + t**2 * w1
        assert torch.allclose(curve.flat_weights(t).double(), expected, atol=1e-6)
    chain = CurveModel(curve.base, start, end, curve="polychain", num_bends=3)
    theta = chain.free_points.detach()[0].double()
    assert torch.allclose(theta, (w0 + w1) / 2, atol=1e-6)  # linear init: the midpoint
    with torch.no_grad():
        chain.free_points[0] += 0.01 * torch.randn_like(chain.free_points[0])
    theta = chain.free_points.detach()[0].double()
    for t in (0.0, 0.2, 0.5, 0.51, 0.8, 1.0):
        if t <= 0.5:
            expected = 2 * (t * theta + (0.5 - t) * w0)
        else:
            expected = 2 * ((t - 0.5) * w1 + (1 - t) * theta)
        assert torch.allclose(chain.flat_weights(t).double(), expected, atol=1e-6), t


def test_gradients_reach_only_the_free_points() -> None:
    curve, _, _ = _curve()
    # the base network is a frozen submodule: the only trainable tensor is the free points
    assert [n for n, p in curve.named_parameters() if p.requires_grad] == ["free_points"]
    assert "fixed_points" in dict(curve.named_buffers())
    assert curve.free_index.tolist() == [1] and curve.fixed_index.tolist() == [0, 2]
    curve.train()
    torch.manual_seed(0)
    F.cross_entropy(curve(_input("cnn1d")), torch.arange(8)).backward()
    assert curve.free_points.grad is not None and float(curve.free_points.grad.abs().sum()) > 0
    for name, p in curve.base.named_parameters():
        assert p.grad is None and not p.requires_grad, name
    assert not curve.fixed_points.requires_grad and curve.fixed_points.grad is None

    freed, _, _ = _curve(fix_start=False)
    assert freed.free_index.tolist() == [0, 1] and freed.fixed_index.tolist() == [2]
    freed.train()
    torch.manual_seed(0)
    F.cross_entropy(freed(_input("cnn1d")), torch.arange(8)).backward()
    assert float(freed.free_points.grad[0].abs().sum()) > 0  # the start row trains


def test_free_start_flag_frees_the_start_point(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_fit_curve(config, start, end, run_dir, resume=False, force=False, align=False):  # noqa: ANN001, ANN202
        seen["config"] = config
        return {}

    monkeypatch.setattr("modeconn.training.curves.fit.fit_curve", fake_fit_curve)
    assert cli.main(["curve", "--start", "a.pt", "--end", "b.pt", "--free-start", "--out", str(tmp_path)]) == 0
    settings = seen["config"].curve
    assert settings.fix_start is False and settings.fix_end is True
    net0, net1 = _make("cnn1d", 0), _make("cnn1d", 1)
    curve = CurveModel(net0, net0.state_dict(), net1.state_dict(), fix_start=settings.fix_start,
                       fix_end=settings.fix_end, num_bends=settings.num_bends)
    assert 0 in curve.free_index.tolist() and 0 not in curve.fixed_index.tolist()


@pytest.mark.parametrize("name", [*models.list_models(), "user"])
def test_wrapper_trains_any_architecture(name: str) -> None:
    curve, start, end = _curve(name)
    x = _input(name)
    curve.train()
    torch.manual_seed(1)
    logits = curve(x)  # t drawn from U[0, 1]
    assert logits.shape == (8, 10) and bool(torch.isfinite(logits).all())
    with torch.no_grad():
        assert curve.eval()(x, t=0.3).shape == (8, 10)
    with pytest.raises(ValueError, match="t"):
        curve(x)  # eval mode needs an explicit t
    curve.train()
    free_before, fixed_before = curve.free_points.detach().clone(), curve.fixed_points.clone()
    flat = [torch.cat([s[k].reshape(-1) for k in curve.names]) for s in (start, end)]
    assert torch.equal(fixed_before, torch.stack(flat))  # the rows are exactly w0 and w1
    optimizer = torch.optim.SGD([curve.free_points], lr=0.1)
    torch.manual_seed(2)
    loss = F.cross_entropy(curve(x), torch.arange(8) % 10)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert not torch.equal(curve.free_points.detach(), free_before)
    assert torch.equal(curve.fixed_points, fixed_before)
    if name not in ("vgg16", "vgg16bn"):  # 15 M parameters: the fixed rows above suffice there
        _assert_endpoints(curve, start, end)


def test_l2_term_is_the_squared_norm_of_the_weights_at_t() -> None:
    curve, start, _ = _curve("user", init="random")
    x = _input("user")

    def squared_norm(weights: dict[str, torch.Tensor]) -> float:
        return float(sum((w.detach().double() ** 2).sum() for w in weights.values()))

    curve.train()
    torch.manual_seed(7)
    curve(x)
    torch.manual_seed(7)
    t = torch.rand(())  # the t the forward drew (its first random draw)
    assert float(curve.last_l2.detach()) == pytest.approx(squared_norm(curve.weights(t)), rel=1e-5)
    curve.eval()
    for t in (0.0, 0.25, 1.0):
        curve(x, t=t)
        assert float(curve.last_l2.detach()) == pytest.approx(squared_norm(curve.weights(t)), rel=1e-5)
    curve(x, t=0.0)
    assert float(curve.last_l2.detach()) == pytest.approx(squared_norm(start), rel=1e-5)
    curve.train()
    curve(x, t=0.4)
    curve.last_l2.backward()  # the penalty's gradient flows to the free points
    assert float(curve.free_points.grad.abs().sum()) > 0


# ------------------------------------------------------------------ BatchNorm
@pytest.fixture(scope="module")
def mnist1d(demo_data):  # noqa: ANN001, ANN201
    return demo_data


def test_recompute_bn_is_the_cumulative_average_of_batch_statistics(mnist1d) -> None:
    torch.manual_seed(0)
    net0, net1 = BNNet(), BNNet()
    curve = CurveModel(copy.deepcopy(net0), net0.state_dict(), net1.state_dict(), init="random")
    t = 0.3
    net = network_at(curve, t)
    assert not net.training
    recompute_bn(net, mnist1d)
    assert not net.training

    # independently: per-batch means/variances of each BN input over the training set in
    # order, batches of 512, averaged with each batch weighted by its size
    w = {k: v.double() for k, v in curve.weights(t).items()}
    x_all = ((mnist1d.x_train - mnist1d.mean[0]) / mnist1d.std[0]).double()
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, len(x_all), 512):
        h1 = x_all[start:start + 512] @ w["fc1.weight"].T + w["fc1.bias"]
        stats.append((h1.mean(0), h1.var(0, unbiased=True)))
    assert len(stats) == math.ceil(len(mnist1d.y_train) / 512) == 4  # 2000 demo training signals
    sizes = torch.tensor([min(512, len(x_all) - s) for s in range(0, len(x_all), 512)], dtype=torch.float64)
    weights = (sizes / sizes.sum())[:, None]
    mean1 = (torch.stack([m for m, _ in stats]) * weights).sum(0)
    var1 = (torch.stack([v for _, v in stats]) * weights).sum(0)
    assert torch.allclose(net.bn1.running_mean.double(), mean1, atol=1e-5, rtol=1e-4)
    assert torch.allclose(net.bn1.running_var.double(), var1, atol=1e-5, rtol=1e-4)
    assert int(net.bn1.num_batches_tracked) == len(stats)
    # the running mean is the mean over the whole training set, although the last batch is
    # smaller; an equal weight per batch would differ: the test tells the two apart
    whole = (x_all @ w["fc1.weight"].T + w["fc1.bias"]).mean(0)
    assert torch.allclose(net.bn1.running_mean.double(), whole, atol=1e-5, rtol=1e-4)
    equal_weight = torch.stack([m for m, _ in stats]).mean(0)
    assert not torch.allclose(equal_weight, whole, atol=1e-6)


def test_recompute_bn_second_layer_without_dropout(mnist1d) -> None:
    torch.manual_seed(1)
    net0, net1 = BNNet(), BNNet()
    for n in (net0, net1):
        n.drop.p = 0.0
    curve = CurveModel(copy.deepcopy(net0), net0.state_dict(), net1.state_dict(), init="random")
    net = recompute_bn(network_at(curve, 0.7), mnist1d)
    w = {k: v.double() for k, v in curve.weights(0.7).items()}
    x_all = ((mnist1d.x_train - mnist1d.mean[0]) / mnist1d.std[0]).double()
    outputs = []
    for start in range(0, len(x_all), 512):
        h1 = x_all[start:start + 512] @ w["fc1.weight"].T + w["fc1.bias"]
        a1 = torch.relu((h1 - h1.mean(0)) / torch.sqrt(h1.var(0, unbiased=False) + 1e-5) * w["bn1.weight"] + w["bn1.bias"])
        outputs.append(a1 @ w["fc2.weight"].T + w["fc2.bias"])
    assert torch.allclose(net.bn2.running_mean.double(), torch.cat(outputs).mean(0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("train_mode", [False, True])
def test_update_bn_keeps_rng_mode_and_momenta(train_mode: bool) -> None:
    torch.manual_seed(0)
    model = BNNet()
    model.bn2.momentum = 0.3
    batches = [torch.randn(32, 40) for _ in range(4)]
    model.train()
    before = torch.get_rng_state()
    model(batches[0])
    assert not torch.equal(torch.get_rng_state(), before), "dropout should draw from the RNG"
    model.train(train_mode)
    rng = torch.get_rng_state()
    update_bn(batches, model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training == train_mode for m in model.modules())
    assert (model.bn1.momentum, model.bn2.momentum) == (0.1, 0.3)
    assert int(model.bn1.num_batches_tracked) == len(batches)
    expected = torch.stack([(b @ model.fc1.weight.T + model.fc1.bias).mean(0) for b in batches]).mean(0)
    assert torch.allclose(model.bn1.running_mean, expected.detach(), atol=1e-5)


# ------------------------------------------------------------------ MNIST-1D curve
@pytest.mark.slow
def test_demo_curve_connects_the_endpoints(demo_curve: dict[str, Any], trained_pair: list[dict[str, Any]]) -> None:
    ev = demo_curve["eval"]
    ends = [r["metrics"]["test_error"] for r in trained_pair]
    worse = max(ends)
    print(f"\nendpoints {ends[0]:.2f} % / {ends[1]:.2f} %; along curve: start {ev['start_test_error']:.2f} %, "
          f"end {ev['end_test_error']:.2f} %, max {ev['curve_max_test_error']:.2f} %; "
          f"line max {ev['line_max_test_error']:.2f} %; endpoint ensemble {ev['endpoint_ensemble_test_error']:.2f} %")
    # BN recomputed at t = 0 and 1 nearly reproduces each endpoint: the exact training-set
    # statistics are not the running averages the endpoint was evaluated with, so a few of the
    # 12,000 test signals flip (measured: 13 of them, 0.11 pp); bound: 30 signals, 0.25 pp
    assert abs(ev["start_test_error"] - ends[0]) <= 0.25 + 1e-6
    assert abs(ev["end_test_error"] - ends[1]) <= 0.25 + 1e-6
    assert ev["curve_max_test_error"] <= worse + 2.0
    assert ev["line_max_test_error"] >= worse + 10.0

    report = json.loads(Path(ev["json"]).read_text())
    curve_rows, line_rows = report["curve"], report["line"]
    assert [r["t"] for r in curve_rows] == [i / 30 for i in range(31)]  # the fixture's 31 points
    assert max(r["test_error"] for r in curve_rows) == ev["curve_max_test_error"]
    assert max(r["test_error"] for r in line_rows) == ev["line_max_test_error"]
    assert line_rows[0]["test_error"] == curve_rows[0]["test_error"]  # the same endpoints

    with open(ev["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 31
    assert [float(r["curve_test_error"]) for r in rows] == pytest.approx([r["test_error"] for r in curve_rows])
    png = Path(ev["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    for name, rows_ in (("curve", curve_rows), ("line", line_rows)):
        assert sum(r["segment_length"] for r in rows_) == pytest.approx(ev["summary"][name]["length"], rel=1e-9)
    # geometry: the straight line's length is ‖w1 − w0‖, and the curve is no shorter
    w0, w1 = (load_network(r["checkpoint"])[0] for r in trained_pair)
    flat0, flat1 = (torch.cat([p.detach().reshape(-1) for p in m.parameters()]).double() for m in (w0, w1))
    assert ev["summary"]["line"]["length"] == pytest.approx(float((flat1 - flat0).norm()), rel=1e-4)
    assert ev["summary"]["curve"]["length"] >= ev["summary"]["line"]["length"]


@pytest.mark.slow
def test_curve_point_is_an_ordinary_checkpoint(demo_curve: dict[str, Any], tmp_path: Path, mnist1d) -> None:
    run = demo_curve["fit"]["run_dir"]
    out = tmp_path / "p.pt"
    proc = modeconn("curve-point", run, "--t", "0.5", "--out", out, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    model, state = load_network(out)
    assert state["kind"] == "curve-point" and state["curve_point"]["t"] == 0.5
    with torch.no_grad():  # by hand: one forward over the normalised test set
        logits = model((mnist1d.x_test - mnist1d.mean[0]) / mnist1d.std[0])
    recomputed = float((logits.argmax(1) != mnist1d.y_test).double().mean()) * 100
    rows = json.loads(Path(demo_curve["eval"]["json"]).read_text())["curve"]
    at_half = next(r for r in rows if r["t"] == 0.5)
    print(f"\ncurve-point t=0.5: test error {recomputed:.2f} % (eval-curve: {at_half['test_error']:.2f} %)")
    # one row of 12,000 may flip between batched and whole-set evaluation
    assert recomputed == pytest.approx(at_half["test_error"], abs=1 / len(mnist1d.y_test) * 100 + 1e-9)
    assert printed["metrics"]["test_error"] == at_half["test_error"]

    bad = modeconn("curve-point", run, "--t", "1.5", "--out", tmp_path / "q.pt", "--device", "cpu")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "t must" in bad.stderr and "1.5" in bad.stderr
    assert not (tmp_path / "q.pt").exists()


@pytest.mark.slow
def test_eval_curve_interval_of_max_minus_worse_endpoint(demo_curve: dict[str, Any], tmp_path: Path, mnist1d) -> None:
    """Recomputed from curve-point checkpoints at the worst t and the worse endpoint."""
    import numpy as np

    from modeconn.training.core.networks import predict_probs
    from modeconn.training.curves.evaluate import save_curve_point

    ev = demo_curve["eval"]
    report = json.loads(Path(ev["json"]).read_text())
    rows = report["curve"]
    cell = ev["differences"]["curve max - worse endpoint"]
    errors = [r["test_error"] for r in rows]
    assert cell["t"] == rows[errors.index(max(errors))]["t"]
    assert cell["worse_endpoint_t"] == (0.0 if errors[0] >= errors[-1] else 1.0)
    labels = mnist1d.y_test
    per_example = {}
    for t in (cell["t"], cell["worse_endpoint_t"]):
        save_curve_point(Path(demo_curve["fit"]["run_dir"]), t, tmp_path / f"{t}.pt", device="cpu")
        model, _ = load_network(tmp_path / f"{t}.pt")
        per_example[t] = (predict_probs(model, mnist1d, "test").argmax(1) != labels).double().numpy() * 100
    d = per_example[cell["t"]] - per_example[cell["worse_endpoint_t"]]
    index = np.random.default_rng(0).integers(0, len(d), size=(1000, len(d)))
    low, high = np.percentile(d[index].mean(axis=1), [2.5, 97.5])
    got = cell["error"]
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((d.mean(), low, high), abs=1e-9)
    assert got["mean"] == pytest.approx(max(errors) - max(errors[0], errors[-1]), abs=1e-4)
    line = ev["differences"]["line max - worse endpoint"]
    line_errors = [r["test_error"] for r in report["line"]]
    assert line["error"]["mean"] == pytest.approx(max(line_errors) - max(line_errors[0], line_errors[-1]), abs=1e-4)
    assert line["error"]["low"] > 0  # the straight line's barrier is far outside the noise
    assert report["differences"] == ev["differences"] and report["test_size"] == len(labels)
