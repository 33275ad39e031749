"""`modeconn swa`: the average of checkpoints, BN recomputed, saved as an ordinary checkpoint.

The members are small untrained CNNs (width 4) on the demo's data, with random weights and
random BN running statistics, so no test trains; the expected values are computed here: the
mean of the members' state_dicts in float64, and BN statistics from a fresh network loaded
with that mean and passed over the training split by hand (torch's own BN layers in train
mode, one batch of the whole split).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modeconn.training.cli import main
from modeconn.training.core.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
from modeconn.training.core.networks import build_network, config_specs, load_network
from modeconn.training.ensembles.swa import SWAError, run_swa

ARCH = {"name": "cnn1d", "kwargs": {"width": 4}}


def _member(path: Path, seed: int, dataset: dict, architecture: dict = ARCH) -> Path:
    torch.manual_seed(seed)
    net = build_network(architecture, dataset["num_classes"])
    for module in net.modules():  # running statistics far from the data's, so a recomputation shows
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-3, 3)
            module.running_var.uniform_(0.5, 4)
    save_checkpoint(path, model_checkpoint(net, architecture, dataset, kind="fge-snapshot"))
    return path


@pytest.fixture(scope="module")
def dataset(demo_config, demo_data) -> dict:  # noqa: ANN001
    return config_specs(demo_config.model, demo_config.data, demo_data)[1]


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory: pytest.TempPathFactory, dataset: dict) -> Path:
    """A folder laid out as an FGE run: three snapshots."""
    run = tmp_path_factory.mktemp("fge")
    for k in range(3):
        _member(run / "snapshots" / f"snapshot-{k + 1:03d}.pt", k, dataset)
    return run


def _mean_state(paths: list[Path]) -> dict[str, torch.Tensor]:
    states = [load_checkpoint(p)["model"] for p in paths]
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


@torch.no_grad()
def _bn_by_hand(weights: dict[str, torch.Tensor], data, batch: int = 512) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """BN statistics of the network with `weights` over the normalised training split, in order, in
    batches of `batch`: each layer's input per batch (train mode: batch statistics) gives a mean and
    an unbiased variance per channel; the statistics are their averages weighted by batch size."""
    net = build_network(ARCH, 10).train()
    net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    sums = {n: [0.0, 0.0] for n in layers}

    def hook(name: str):  # noqa: ANN202
        def record(_module, inputs) -> None:  # noqa: ANN001
            x = inputs[0].double()
            dims = [0, *range(2, x.dim())]
            sums[name][0] = sums[name][0] + x.mean(dims) * len(x)
            sums[name][1] = sums[name][1] + x.var(dims, unbiased=True) * len(x)
        return record

    for name, layer in layers.items():
        layer.register_forward_pre_hook(hook(name))
    x = (data.x_train - data.mean[0]) / data.std[0]  # MNIST-1D: one channel, one mean and std
    for start in range(0, len(x), batch):
        net(x[start:start + batch])
    n = len(x)
    return {**{f"{k}.running_mean": v[0] / n for k, v in sums.items()},
            **{f"{k}.running_var": v[1] / n for k, v in sums.items()}}


def test_swa_is_the_mean_of_the_snapshots_with_bn_recomputed(snapshot_run: Path, demo_data, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "swa.pt"
    result = run_swa([snapshot_run], out, device="cpu")
    members = sorted((snapshot_run / "snapshots").glob("snapshot-*.pt"))
    assert result["members"] == [str(p) for p in members]
    state = load_checkpoint(out)
    assert state["kind"] == "swa" and state["swa"]["members"] == [str(p) for p in members]
    assert state["swa"]["count"] == 3 and state["swa"]["bn_recomputed"]
    mean = _mean_state(members)
    net, _ = load_network(out)
    for name, param in net.named_parameters():
        assert torch.allclose(param.double(), mean[name], atol=1e-6, rtol=0), name
    # BN: recomputed for the averaged weights, not the average of the members' running statistics
    expected = _bn_by_hand(mean, demo_data)
    for name, value in expected.items():
        assert torch.allclose(state["model"][name].double(), value, rtol=1e-4, atol=1e-5), name
        assert not torch.allclose(state["model"][name], mean[name].float(), rtol=0.05), name
    # the stored metrics are the saved network's
    probs = torch.softmax(net((demo_data.x_test - demo_data.mean[0]) / demo_data.std[0]), 1)
    error = float((probs.argmax(1) != demo_data.y_test).double().mean() * 100)
    assert result["metrics"]["test_error"] == pytest.approx(error, abs=1e-4)  # float32 mean


def test_swa_cli_checkpoints_and_errors(snapshot_run: Path, dataset: dict, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    first, second = sorted((snapshot_run / "snapshots").glob("snapshot-*.pt"))[:2]
    out = tmp_path / "two.pt"
    assert main(["swa", str(first), str(second), "--out", str(out), "--device", "cpu", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["checkpoint"] == str(out) and len(printed["members"]) == 2
    mean = _mean_state([first, second])
    weights = load_checkpoint(out)["model"]
    assert all(torch.allclose(weights[k].double(), mean[k], atol=1e-6) for k in mean if "running" not in k
               and "num_batches" not in k)
    # mixed architectures: the error names the file that does not match
    wide = _member(tmp_path / "wide.pt", 7, dataset, {"name": "cnn1d", "kwargs": {"width": 8}})
    assert main(["swa", str(first), str(wide), "--out", str(tmp_path / "bad.pt"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "mixed architectures" in err and str(wide) in err
    assert not (tmp_path / "bad.pt").exists()
    other = _member(tmp_path / "other.pt", 8, {**dataset, "name": "cifar10"})
    assert main(["swa", str(first), str(other), "--out", str(tmp_path / "bad.pt"), "--device", "cpu"]) == 2
    assert "mixed data sets" in capsys.readouterr().err
    # never over a file that is not an earlier SWA checkpoint
    assert main(["swa", str(first), "--out", str(second), "--device", "cpu"]) == 2
    assert "not an earlier swa" in capsys.readouterr().err
    assert main(["swa", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SWAError):
        run_swa([], tmp_path / "none.pt", device="cpu")


def test_pipeline_reuses_swa_only_for_the_same_snapshot_contents(dataset: dict, tmp_path: Path) -> None:
    """The pipeline's SWA stage (training/pipeline.py) keeps RUNS/swa/swa.pt on a rerun only while
    the FGE snapshots are the files it averaged, with the same bytes: `modeconn fge --force`
    rewrites them under the same names."""
    from modeconn.contract.artifact import file_sha256
    from modeconn.training.pipeline import _finished_swa

    members = [_member(tmp_path / "fge" / "snapshots" / f"snapshot-{k + 1:03d}.pt", k, dataset) for k in range(2)]
    out = tmp_path / "swa" / "swa.pt"
    run_swa([tmp_path / "fge"], out, device="cpu")
    assert load_checkpoint(out)["swa"]["sha256"] == [file_sha256(p) for p in members]
    assert _finished_swa(out, members) == {"checkpoint": str(out), "members": [str(p) for p in members],
                                           "skipped": True}
    assert _finished_swa(out, members[:1]) is None  # another set of snapshots
    _member(members[1], 7, dataset)  # the same name, other weights
    assert _finished_swa(out, members) is None
