"""The Python API (`import modeconn`) on networks defined here, over DataLoaders of real data no one
here made: scikit-learn's 1,797 8x8 handwritten digits (no download).

Two networks: one with BatchNorm (its statistics must be recomputed wherever weights change) and
one with LayerNorm only (BN recomputation must change nothing). Every value is checked against an
independent computation: parameters by formula, BN statistics from the layer inputs, metrics in
numpy, ONNX graphs with onnxruntime.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modeconn
from modeconn.training.core.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
BN_ROWS = 512  # recompute_bn's batch: the independent recomputation averages over the same batches


class ConvBN(nn.Module):
    """One BatchNorm, right after the first layer: its input does not depend on any BN statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv(x)))


class MLPLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


MODELS = {"batchnorm": ConvBN, "layernorm": MLPLayerNorm}


def digits() -> dict[str, TensorDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    parts = {"train": order[:1200], "val": order[1200:1400], "test": order[1400:]}
    return {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}


def train_plain(model: nn.Module, data: TensorDataset, seed: int, epochs: int = 4) -> nn.Module:
    """An ordinary training loop, as a user's own code would train a network."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def sets() -> dict[str, TensorDataset]:
    return digits()


@pytest.fixture(scope="module")
def loaders(sets: dict[str, TensorDataset]) -> dict[str, DataLoader]:
    # batches of BN_ROWS in order: the same batches whether the stages batch the data or take the loader's
    return {name: DataLoader(s, batch_size=BN_ROWS, shuffle=False) for name, s in sets.items()}


@pytest.fixture(scope="module", params=sorted(MODELS))
def setup(request: pytest.FixtureRequest, sets, loaders):  # noqa: ANN001, ANN201
    kind = request.param
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        pair.append(train_plain(MODELS[kind](), sets["train"], seed))
    curve = modeconn.fit_curve(pair[0], pair[1], loaders["train"], val=loaders["val"], epochs=2, batch_size=64,
                               lr=0.02, eval_points=3)
    return {"kind": kind, "a": pair[0], "b": pair[1], "curve": curve}


# ---------------------------------------------------------------- independent references
def x_y(data: TensorDataset) -> tuple[torch.Tensor, torch.Tensor]:
    return data.tensors[0], data.tensors[1]


@torch.no_grad()
def expected_bn(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ConvBN's BN statistics over the training inputs from the layer input itself: the mean over all
    inputs, the variance as the size-weighted mean of each batch's unbiased variance."""
    mean = net.conv(x).transpose(0, 1).flatten(1).mean(1)  # over [C, N*H*W]
    parts = x.split(BN_ROWS)
    var = sum(net.conv(p).transpose(0, 1).flatten(1).var(1, unbiased=True) * len(p) for p in parts) / len(x)
    return mean, var


def assert_bn_recomputed(net: nn.Module, x: torch.Tensor) -> None:
    mean, var = expected_bn(net, x)
    torch.testing.assert_close(net.bn.running_mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.bn.running_var, var, atol=1e-5, rtol=1e-5)


def params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


@torch.no_grad()
def probs(nets: list[nn.Module], x: torch.Tensor) -> np.ndarray:
    return np.mean([torch.softmax(net.eval()(x), 1).double().numpy() for net in nets], axis=0)


def numpy_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    confidence, predicted = p.max(1), p.argmax(1)
    correct = (predicted == y).astype(float)
    bins = np.clip(np.ceil(confidence * 15).astype(int), 1, 15) - 1
    ece = sum(abs(correct[bins == b].sum() - confidence[bins == b].sum()) for b in range(15)) / len(y)
    onehot = np.eye(p.shape[1])[y]
    return {"error": 100 * (1 - correct.mean()), "nll": float(-np.log(p[np.arange(len(y)), y]).mean()),
            "ece": float(ece), "brier": float(((p - onehot) ** 2).sum(1).mean())}


# ---------------------------------------------------------------- curves
def test_curve_points(setup, sets) -> None:  # noqa: ANN001
    a, b, curve = setup["a"], setup["b"], setup["curve"]
    x, _ = x_y(sets["train"])
    before = params(a)
    for t, end in ((0.0, a), (1.0, b)):
        net = curve.network(t)
        assert type(net) is type(end)
        for name, value in params(end).items():  # the ends are fixed: exactly the networks given
            assert torch.equal(params(net)[name], value), name
        if setup["kind"] == "batchnorm":
            assert_bn_recomputed(net, x)
        else:  # no BN: nothing to recompute, the network computes exactly what the end does
            torch.testing.assert_close(net(x), end(x), atol=1e-6, rtol=0)
    mid = curve.network(0.5)
    bends = [curve.model.unflatten(p) for p in curve.model.control_points()]
    for name, value in params(mid).items():  # Bezier with 3 bends at t = 1/2: (w0 + 2 θ + w1) / 4
        torch.testing.assert_close(value, 0.25 * bends[0][name] + 0.5 * bends[1][name] + 0.25 * bends[2][name])
    first = next(iter(before))  # the middle bend was trained away from its start on the line
    assert not torch.equal(bends[1][first], 0.5 * (bends[0][first] + bends[2][first]))
    if setup["kind"] == "batchnorm":
        assert_bn_recomputed(mid, x)
    assert all(torch.equal(v, params(a)[k]) for k, v in before.items())  # the given network is untouched
    assert len(curve.history) == 2 and curve.history[-1]["train_loss"] > 0


def test_curve_evaluate(setup, sets, loaders) -> None:  # noqa: ANN001
    a, b, curve = setup["a"], setup["b"], setup["curve"]
    result = curve.evaluate(loaders["test"], points=3)
    x, y = x_y(sets["test"])
    assert [r["t"] for r in result.curve] == [0.0, 0.5, 1.0] and result.test_size == len(y)
    errors = []
    for row in result.curve:
        expected = numpy_metrics(probs([curve.network(row["t"])], x), y.numpy())
        assert row["test_error"] == pytest.approx(expected["error"], abs=1e-5)  # error % in float32
        assert row["test_nll"] == pytest.approx(expected["nll"], rel=1e-5)
        errors.append(expected["error"])
    assert result.headline["curve_max_test_error"] == pytest.approx(max(errors))
    interval = result.differences["curve"]
    assert interval.mean == pytest.approx(max(errors) - max(errors[0], errors[-1]), abs=1e-5)
    assert interval.low <= interval.mean <= interval.high
    assert set(result.differences) == {"curve", "line", "aligned line"}
    # the straight line's midpoint: the ends' mean weights, BN statistics recomputed there
    middle = copy.deepcopy(a)
    with torch.no_grad():
        for name, value in middle.named_parameters():
            value.copy_(0.5 * (params(a)[name] + params(b)[name]))
        if setup["kind"] == "batchnorm":
            mean, var = expected_bn(middle, x_y(sets["train"])[0])
            middle.bn.running_mean.copy_(mean)
            middle.bn.running_var.copy_(var)
    expected = numpy_metrics(probs([middle], x), y.numpy())["error"]
    assert result.line[1]["test_error"] == pytest.approx(expected, abs=1e-5)


def test_bad_settings_and_mismatched_networks(setup, loaders) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="epochs"):
        modeconn.fit_curve(setup["a"], setup["b"], loaders["train"], epochs=0)
    other = MLPLayerNorm() if setup["kind"] == "batchnorm" else ConvBN()
    with pytest.raises(modeconn.NetworkMismatchError, match="missing key"):
        modeconn.fit_curve(setup["a"], other, loaders["train"])


# ---------------------------------------------------------------- FGE, SWA, alignment
@pytest.fixture(scope="module")
def snapshots(setup, loaders):  # noqa: ANN001, ANN201
    return modeconn.fge(setup["a"], loaders["train"], epochs=2, cycle_epochs=1, batch_size=60, lr1=0.05, lr2=0.005)


def test_fge_and_swa(setup, snapshots, sets, loaders) -> None:  # noqa: ANN001
    x, _ = x_y(sets["train"])
    assert len(snapshots) == 2  # budget 2 epochs // cycle 1 epoch (20 steps of 60 rows)
    start = params(setup["a"])
    for net in snapshots:
        assert not net.training
        assert any(not torch.equal(v, start[k]) for k, v in params(net).items())
        if setup["kind"] == "batchnorm":
            assert_bn_recomputed(net, x)
    averaged = modeconn.swa(snapshots, loaders["train"])
    for name, value in params(averaged).items():
        torch.testing.assert_close(value, sum(params(n)[name] for n in snapshots) / len(snapshots))
    if setup["kind"] == "batchnorm":
        assert_bn_recomputed(averaged, x)
    sse = modeconn.sse(copy.deepcopy(setup["a"]), loaders["train"], epochs=2, cycle_epochs=1, batch_size=128)
    assert len(sse) == 2 and all(not n.training for n in sse)


def test_align_keeps_the_function(setup, sets) -> None:  # noqa: ANN001
    a, b = setup["a"], setup["b"]
    x, _ = x_y(sets["test"])
    aligned = modeconn.align(a, b, x[:4])
    with torch.no_grad():
        torch.testing.assert_close(aligned.eval()(x), b(x), atol=1e-5, rtol=0)
    moved = [k for k, v in params(aligned).items() if not torch.equal(v, params(b)[k])]
    assert moved  # two independently trained networks: their units are matched by a real permutation

    def similarity(net: nn.Module) -> float:
        return sum(float((params(a)[k].double() * v.double()).sum()) for k, v in params(net).items())

    assert similarity(aligned) > similarity(b)


# ---------------------------------------------------------------- evaluation and temperature
def test_evaluate_ensemble_and_temperature(setup, sets, loaders) -> None:  # noqa: ANN001
    a, b = setup["a"], setup["b"]
    x, y = x_y(sets["test"])
    both = modeconn.evaluate_ensemble([a, b], loaders["test"], val=loaders["val"])
    expected = numpy_metrics(probs([a, b], x), y.numpy())
    for key in ("error", "nll", "ece", "brier"):
        assert getattr(both, key) == pytest.approx(expected[key], rel=1e-6, abs=1e-5), key
    single = modeconn.evaluate_ensemble(a, loaders["test"])
    assert single.error == pytest.approx(numpy_metrics(probs([a], x), y.numpy())["error"])
    assert single.temperature is None
    interval = both.compare(single)["error"]
    assert interval.mean == pytest.approx(both.error - single.error, abs=1e-5)
    assert interval.low <= interval.mean <= interval.high

    xv, yv = x_y(sets["val"])
    t = modeconn.fit_temperature([a, b], loaders["val"])
    assert t == pytest.approx(both.temperature)
    logp = np.log(probs([a, b], xv))

    def nll(temperature: float) -> float:
        z = logp / temperature
        z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(len(yv)), yv.numpy()] - np.log(np.exp(z).sum(1))).mean())

    assert nll(t) <= min(nll(1.0), nll(t * 1.05), nll(t / 1.05)) + 1e-12


# ---------------------------------------------------------------- streamed loaders
def _weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# a loader worker that dies is reported when its loader is collected: an error here, not a warning
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_every_function_runs_over_a_streamed_loader(sets, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """Loaders of data too large to hold (here: a limit of 0 bytes) are streamed through their worker
    processes; the curve, a point on it (BN recomputed), FGE, SSE, SWA and the evaluation along the
    curve then give exactly what the same data held in memory gives. With two torch threads: the
    evaluation along the curve would run its points side by side in memory, one at a time streamed."""
    import gc

    from modeconn.training.core import data as core_data

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    pair = [train_plain(ConvBN(), sets["train"], seed, epochs=2) for seed in (0, 1)]

    def everything(workers: int) -> dict[str, object]:
        loaders = {name: DataLoader(s, batch_size=BN_ROWS, num_workers=workers) for name, s in sets.items()}
        curve = modeconn.fit_curve(pair[0], pair[1], loaders["train"], val=loaders["val"], epochs=1, batch_size=64,
                                   lr=0.02)
        snapshots = modeconn.fge(pair[0], loaders["train"], epochs=2, cycle_epochs=1, batch_size=60, lr1=0.05, lr2=0.005)
        torch.manual_seed(2)
        sse = modeconn.sse(ConvBN(), loaders["train"], epochs=1, cycle_epochs=1, batch_size=128)
        report = modeconn.evaluate_ensemble(snapshots, loaders["test"], val=loaders["val"])
        along = curve.evaluate(loaders["test"], points=3)
        return {"streamed": curve.data.streamed, "curve": curve.model.free_points.detach().clone(),
                "middle": _weights(curve.network(0.5)), "fge": [_weights(n) for n in snapshots],
                "sse": [_weights(n) for n in sse], "swa": _weights(modeconn.swa(snapshots, loaders["train"])),
                "ensemble": (report.error, report.nll, report.ece, report.brier, report.temperature),
                "along": [r["test_error"] for r in along.curve + along.line]}

    try:
        held = everything(workers=0)
        monkeypatch.setattr(core_data, "IN_MEMORY_MAX_BYTES", 0)
        streamed = everything(workers=1)
        gc.collect()  # the streamed splits' loaders shut their workers down here
    finally:
        torch.set_num_threads(threads)
    assert (held.pop("streamed"), streamed.pop("streamed")) == (False, True)
    assert torch.equal(held.pop("curve"), streamed.pop("curve"))
    for key in ("middle", "swa"):
        assert all(torch.equal(v, streamed[key][k]) for k, v in held.pop(key).items()), key
    for key in ("fge", "sse"):
        pairs = zip(held.pop(key), streamed[key], strict=True)
        assert all(torch.equal(v, b[k]) for a, b in pairs for k, v in a.items()), key
    assert held == {k: streamed[k] for k in held}


# ---------------------------------------------------------------- export
# once, for the network whose curve graph carries BN statistics (ONNX export takes seconds per graph)
@pytest.mark.parametrize("setup", ["batchnorm"], indirect=True)
def test_export_opens_in_onnxruntime(setup, snapshots, sets, loaders, tmp_path) -> None:  # noqa: ANN001
    """Members, ensemble, SWA and the curve (BN statistics on a t grid) as ONNX graphs."""
    import onnxruntime as ort

    from modeconn.contract.artifact import load_artifact

    x, _ = x_y(sets["test"])
    example = x[:32]
    averaged = modeconn.swa(snapshots, loaders["train"])
    out = modeconn.export(tmp_path / "artifact", members=snapshots, curve=setup["curve"], swa=averaged,
                          example_input=example, test=loaders["test"], class_names=[str(i) for i in range(10)],
                          bn_grid_points=5, max_bn_interpolation_pp=100.0)
    artifact = load_artifact(out)  # what the service reads
    assert artifact.input_shape == (1, 8, 8) and len(artifact.spec.members) == 2
    assert artifact.spec.ensemble.calibration is not None  # the curve's validation data: temperatures fitted

    def run(rel: str, **extra: np.ndarray) -> list[np.ndarray]:
        session = ort.InferenceSession(str(out / rel), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x.numpy(), **extra})

    for i, net in enumerate(snapshots):
        np.testing.assert_allclose(run(f"members/member-{i:03d}.onnx")[0], probs([net], x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(run("ensemble.onnx")[0], probs(snapshots, x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(run("swa.onnx")[0], probs([averaged], x), atol=1e-5, rtol=0)
    mid = run("curve.onnx", t=np.array([0.5], dtype=np.float32))[0]  # a grid point: BN exact there
    np.testing.assert_allclose(mid, probs([setup["curve"].network(0.5)], x), atol=1e-5, rtol=0)


def test_example_script_runs(tmp_path: Path) -> None:
    """examples/own_model.py, the README's example, end to end on tiny settings."""
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "own_model.py"), "--tiny", "--out",
                           str(tmp_path / "artifact")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ensemble test error" in proc.stdout
    assert (tmp_path / "artifact" / "manifest.json").is_file()
