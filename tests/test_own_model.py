"""Any network: a model that is not in the registry, named by import path
(`model.factory: tests.own_models:build`), through the real `modeconn` command in
subprocesses run from the repository root (the current directory is importable, as with
uvicorn). Its checkpoints record the factory, so every later command (curve, fge, eval-curve,
curve-point, align, plane, ensemble-eval, swa, export) rebuilds it without a config; weights
trained elsewhere (a torch.save state_dict, a .safetensors file) serve as curve ends and FGE
starts; and each bad input is one line, exit status 2, nothing written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

from modeconn.training.cli import main
from modeconn.training.core.checkpoint import load_checkpoint, model_checkpoint, save_checkpoint
from modeconn.training.core.config import load_config
from modeconn.training.core.data import normalize
from modeconn.training.core.model_source import ModelSourceError, build_from_record
from modeconn.training.core.networks import build_network, load_data
from modeconn.training.curves.fit import load_curve
from tests.own_models import SignalNet

REPO = Path(__file__).resolve().parents[1]
MODECONN = Path(sys.executable).parent / "modeconn"
FACTORY = "tests.own_models:build"
RECORD = {"factory": FACTORY, "kwargs": {"width": 4}}
# tiny runs: three epochs on the demo's 2000 training signals (16 iterations of 128 each)
TINY = ["--device", "cpu", "--set", "train.epochs=3", "--set", "train.save_every=1", "--set", "curve.epochs=1"]
FGE_TINY = ["--device", "cpu", "--cycle", "1", "--epochs", "2"]  # 2 snapshots (at iterations 8 and 24)


def modeconn(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(MODECONN), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})


def modeconn_json(*args: str | Path) -> dict[str, Any]:
    proc = modeconn(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The one-line error of a refused command (exit status 2) that contains every word."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def write_config(path: Path, model: dict[str, Any]) -> Path:
    """The demo config (its data) with another model section."""
    tree = yaml.safe_load((REPO / "configs" / "mnist1d.yaml").read_text())
    tree["model"] = model
    path.write_text(yaml.safe_dump(tree))
    return path


def own_net(state: dict[str, Any]) -> SignalNet:
    """The network of a checkpoint, built here without modeconn: SignalNet with its weights."""
    net = SignalNet(10, width=4)
    net.load_state_dict(state["model"])
    return net.eval()


@torch.no_grad()
def softmax_on(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(net(x), dim=1).double()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("own-model")


@pytest.fixture(scope="module")
def config(work: Path) -> Path:
    return write_config(work / "own.yaml", {"factory": FACTORY, "kwargs": {"width": 4}})


@pytest.fixture(scope="module")
def nets(work: Path, config: Path) -> list[Path]:
    """Two networks of the factory's model (seeds 0 and 1), trained by `modeconn train`."""
    finals = []
    for seed in (0, 1):
        result = modeconn_json("train", "--config", config, "--seed", seed, "--out", work / f"net{seed}", *TINY)
        finals.append(Path(result["checkpoint"]))
    return finals


@pytest.fixture(scope="module")
def test_x(nets: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as the networks see it (normalised with the training split's statistics)."""
    data = load_data(load_checkpoint(nets[0])["dataset"], "cpu")
    return normalize(data.x_test, data.mean, data.std), data.y_test


# ---------------------------------------------------------------- the factory's model end to end
@pytest.mark.slow
def test_every_command_rebuilds_the_factory_model_from_its_checkpoints(
    nets: list[Path], work: Path, test_x: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    artifact_dir = tmp_path  # outside the runs: export refuses an --out inside a run being exported
    states = [load_checkpoint(p) for p in nets]
    assert [s["architecture"] for s in states] == [RECORD, RECORD]
    assert states[0]["config"]["model"] == RECORD
    x, y = test_x
    # the recorded test error is that of SignalNet with the saved weights, computed here
    errors = [100.0 * (own_net(s).forward(x).argmax(1) != y).double().mean().item() for s in states]
    assert [s["metrics"]["test_error"] for s in states] == pytest.approx(errors, abs=1e-4)  # float32, in %

    # curve: the demo config names the registry's cnn1d; the ends' records decide the network
    demo = REPO / "configs" / "mnist1d.yaml"
    curve = modeconn_json("curve", "--config", demo, "--start", nets[0], "--end", nets[1], "--out", work / "curve", *TINY)
    assert load_checkpoint(curve["checkpoint"])["architecture"] == RECORD
    evaluated = modeconn_json("eval-curve", work / "curve", "--points", "3", "--device", "cpu")
    assert evaluated["test_size"] == len(y)
    # the fixed start: φ(0) has w0's parameters exactly (BN statistics recomputed)
    point = modeconn_json("curve-point", work / "curve", "--t", "0", "--out", work / "point-0.pt", "--device", "cpu")
    saved = load_checkpoint(point["checkpoint"])
    assert saved["architecture"] == RECORD
    for name, _ in SignalNet(10, width=4).named_parameters():
        assert torch.equal(saved["model"][name], states[0]["model"][name]), name

    plane = modeconn_json("plane", work / "curve", "--grid", "3", "--split", "val", "--device", "cpu")
    assert plane["grid"] == 3 and len(plane["points"]) == 3
    # the plane lives in SignalNet's parameter space (counted here)
    assert plane["dimensions"] == sum(p.numel() for p in SignalNet(10, width=4).parameters())

    # align: B permuted to match A computes B's function (checked on SignalNet built here)
    modeconn_json("align", "--start", nets[0], "--end", nets[1], "--out", work / "aligned.pt")
    aligned = load_checkpoint(work / "aligned.pt")
    assert aligned["architecture"] == RECORD
    assert not torch.equal(aligned["model"]["head.weight"], states[1]["model"]["head.weight"])
    torch.testing.assert_close(own_net(aligned)(x[:512]), own_net(states[1])(x[:512]), atol=1e-5, rtol=0)

    # FGE from a final.pt with the default config (registry cnn1d): the start's record decides
    fge = modeconn_json("fge", "--from", nets[0], "--out", work / "fge", *FGE_TINY)
    snapshots = sorted((work / "fge" / "snapshots").glob("snapshot-*.pt"))
    assert fge["snapshots"] == len(snapshots) == 2
    snap_states = [load_checkpoint(p) for p in snapshots]
    assert all(s["architecture"] == RECORD for s in snap_states)

    # ensemble-eval: the mean of the snapshots' softmax outputs, computed here
    ensemble = modeconn_json("ensemble-eval", work / "fge", "--device", "cpu")
    mean = sum(softmax_on(own_net(s), x) for s in snap_states) / len(snap_states)
    assert ensemble["architecture"] == RECORD
    assert ensemble["ensemble"]["test_error"] == pytest.approx(100.0 * (mean.argmax(1) != y).double().mean().item(),
                                                               abs=1e-4)

    swa = modeconn_json("swa", work / "fge", "--out", work / "swa" / "swa.pt", "--device", "cpu")
    assert load_checkpoint(swa["checkpoint"])["architecture"] == RECORD

    artifact = artifact_dir / "artifact"
    export = modeconn_json("export", work / "fge", work / "curve", "--out", artifact, "--swa", swa["checkpoint"],
                           "--bn-grid-points", "3", "--set", "export.max_bn_interpolation_pp=100")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["architecture"] == RECORD == export["manifest"]["architecture"]
    assert len(manifest["members"]) == 2 and manifest["curve"] is not None and manifest["swa"] is not None


# ---------------------------------------------------------------- weights trained elsewhere
@pytest.mark.slow
def test_state_dict_and_safetensors_files_are_curve_ends_and_fge_starts(
    nets: list[Path], work: Path, config: Path
) -> None:
    states = [load_checkpoint(p) for p in nets]
    plain = work / "elsewhere" / "w0.pt"
    plain.parent.mkdir()
    torch.save(own_net(states[0]).state_dict(), plain)  # a bare state_dict, as any training script saves it
    safe = work / "elsewhere" / "w1.safetensors"
    save_file({k: v.contiguous() for k, v in own_net(states[1]).state_dict().items()}, safe)

    curve = modeconn_json("curve", "--config", config, "--start", plain, "--end", safe, "--out", work / "foreign-curve",
                          *TINY)
    fitted = load_checkpoint(curve["checkpoint"])
    assert fitted["architecture"] == RECORD
    assert fitted["dataset"] == states[0]["dataset"]  # the config's data, described as train described it
    # the curve's fixed ends are the two files' parameters, exactly
    curve_model, _ = load_curve(work / "foreign-curve")
    bends = curve_model.control_points()
    for bend, state in ((bends[0], states[0]), (bends[-1], states[1])):
        for name, value in curve_model.unflatten(bend).items():
            assert torch.equal(value, state["model"][name]), name

    fge = modeconn_json("fge", "--config", config, "--from", safe, "--out", work / "foreign-fge", *FGE_TINY)
    assert (fge["start_source"], fge["momentum"], fge["snapshots"]) == ("weights file", "fresh", 2)
    start = load_checkpoint(work / "foreign-fge" / "start.pt")
    assert start["architecture"] == RECORD
    for name, value in states[1]["model"].items():
        assert torch.equal(start["model"][name], value), name


# ---------------------------------------------------------------- one code path: the API computes what the command does
@pytest.mark.slow
def test_the_python_api_fits_the_curve_and_fge_the_commands_fit(
    nets: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`modeconn curve` / `modeconn fge` and `modeconn.fit_curve` / `modeconn.fge` on the same networks,
    data (a TensorDataset of the inputs the networks take) and settings give the same weights."""
    import modeconn as api  # the name `modeconn` is the command's runner in this module

    states = [load_checkpoint(p) for p in nets]
    data = load_data(states[0]["dataset"], "cpu")
    train = TensorDataset(normalize(data.x_train, data.mean, data.std), data.y_train)
    overrides = {"curve.epochs": 1, "fge.cycle_epochs": 1.0, "fge.epochs": 2.0}
    config = load_config(None, overrides)
    argv = ["--device", "cpu", *(arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}"))]
    assert main(["curve", "--start", str(nets[0]), "--end", str(nets[1]), "--out", str(tmp_path / "curve"), *argv]) == 0
    assert main(["fge", "--from", str(nets[0]), "--out", str(tmp_path / "fge"), *argv]) == 0
    capsys.readouterr()

    curve = api.fit_curve(own_net(states[0]), own_net(states[1]), train, settings=config.curve, seed=config.seed)
    command_curve, _ = load_curve(tmp_path / "curve")
    assert torch.equal(curve.model.free_points.detach(), command_curve.free_points.detach())
    snapshots = api.fge(own_net(states[0]), train, settings=config.fge, seed=config.seed)
    files = sorted((tmp_path / "fge" / "snapshots").glob("snapshot-*.pt"))
    assert len(snapshots) == len(files) == 2
    for net, path in zip(snapshots, files, strict=True):
        saved = load_checkpoint(path)["model"]
        assert all(torch.equal(value, saved[name]) for name, value in net.state_dict().items()), path


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
# In-process through the CLI's main() (what `modeconn` runs), except the first: a subprocess
# from the repository root, where the import path is resolved as a user's would be.
def cli_refuses(capsys: pytest.CaptureFixture, argv: list[str | Path], *words: str) -> str:
    """main(argv) exits 2 with one line on stderr that contains every word."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_factory_whose_module_does_not_exist_is_refused_by_the_command(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yaml", {"factory": "tests.no_such_module:build"})
    refused(modeconn("train", "--config", config, "--out", tmp_path / "run", *TINY),
            "model factory 'tests.no_such_module:build'", "no module named 'tests.no_such_module'", str(REPO))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("factory", "words"), [
    ("own_models_nowhere.nets:build", ["model factory 'own_models_nowhere.nets:build'",
                                       "no module named 'own_models_nowhere'"]),
    ("tests.own_models:nope", ["model factory 'tests.own_models:nope'", "has no attribute 'nope'"]),
    ("tests.own_models:build_raises", ["model factory 'tests.own_models:build_raises' raised RuntimeError",
                                       "no GPU kernel for 10 classes"]),
    ("tests.own_models:build_not_a_module", ["'tests.own_models:build_not_a_module' returned a dict",
                                             "not a torch.nn.Module"]),
    ("tests.own_models:NOT_CALLABLE", ["'tests.own_models:NOT_CALLABLE' is not callable"]),
    ("tests.own_models", ["model.factory", "'tests.own_models' is not an import path"]),
    ("tests.own_models:", ["model.factory", "is not an import path"]),
])
def test_a_model_that_cannot_be_built_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, factory: str, words: list[str]
) -> None:
    config = write_config(tmp_path / "bad.yaml", {"factory": factory})
    for command in ("train", "sse"):
        cli_refuses(capsys, [command, "--config", config, "--out", tmp_path / "run", *TINY], *words)
    assert not (tmp_path / "run").exists()


def test_name_and_factory_together_and_unknown_prefixes_are_config_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    both = write_config(tmp_path / "both.yaml", {"name": "cnn1d", "factory": FACTORY})
    cli_refuses(capsys, ["train", "--config", both, "--out", tmp_path / "run"], "model", "not both")
    prefix = write_config(tmp_path / "prefix.yaml", {"name": "keras:resnet"})
    cli_refuses(capsys, ["train", "--config", prefix, "--out", tmp_path / "run"], "model.name", "torchvision:NAME")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_torchvision_and_timm_names_say_the_package_is_not_installed(
    package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules is how Python itself marks a package as not importable; it makes the
    # test hold whether or not the package happens to be installed
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ModelSourceError, match=rf"model '{package}:resnet18': {package} is not installed"):
        build_from_record({"name": f"{package}:resnet18"}, 10)


def test_factories_get_num_classes_when_they_take_it() -> None:
    cases = {"tests.own_models:build": 7, "tests.own_models:build_from_kwargs": 7, "tests.own_models:build_ten": 10}
    for factory, classes in cases.items():
        net = build_network({"factory": factory, "kwargs": {}}, 7)
        assert isinstance(net, SignalNet) and net.head.out_features == classes, factory
    wide = build_network({"factory": FACTORY, "kwargs": {"width": 6}}, 3)
    assert (wide.head.in_features, wide.head.out_features) == (60, 3)
    with pytest.raises(ModelSourceError, match="model.kwargs sets num_classes"):
        build_network({"factory": FACTORY, "kwargs": {"num_classes": 3}}, 10)


def _weights_file(tmp_path: Path, name: str, weights: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, path)
    else:
        torch.save(weights, path)
    return path


@pytest.mark.slow
def test_weights_that_do_not_fit_the_model_name_the_first_key(
    nets: list[Path], tmp_path: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    weights = own_net(load_checkpoint(nets[0])).state_dict()
    missing = {k: v for k, v in weights.items() if k != "head.bias"}
    unexpected = {**weights, "extra.weight": torch.zeros(2)}
    wide = SignalNet(10, width=6).state_dict()
    cases = [
        (_weights_file(tmp_path, "missing.pt", missing), ["1 missing key(s) (first 'head.bias')"]),
        (_weights_file(tmp_path, "unexpected.safetensors", unexpected), ["1 unexpected key(s) (first 'extra.weight')"]),
        (_weights_file(tmp_path, "wide.safetensors", wide),
         ["shape mismatch(es) (first 'body.1.weight': [6, 1, 3] in the file, [4, 1, 3] in the model)"]),
    ]
    for path, words in cases:
        cli_refuses(capsys, ["curve", "--config", config, "--start", nets[0], "--end", path, "--out", tmp_path / "c",
                             *TINY], str(path), "do not fit", *words)
        cli_refuses(capsys, ["fge", "--config", config, "--from", path, "--out", tmp_path / "f", *FGE_TINY],
                    str(path), *words)
    assert not (tmp_path / "c").exists() and not (tmp_path / "f").exists()


@pytest.mark.slow
def test_curve_ends_of_different_architectures_are_refused(
    nets: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    state = load_checkpoint(nets[0])
    other = build_network({"name": "cnn1d", "kwargs": {"width": 4}}, 10)
    save_checkpoint(tmp_path / "cnn.pt", model_checkpoint(other, {"name": "cnn1d", "kwargs": {"width": 4}},
                                                          state["dataset"], kind="train"))
    cli_refuses(capsys, ["curve", "--start", nets[0], "--end", tmp_path / "cnn.pt", "--out", tmp_path / "c", *TINY],
                "mixed architectures", str(tmp_path / "cnn.pt"), FACTORY)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_corrupt_safetensors_file_is_named(
    nets: list[Path], tmp_path: Path, config: Path, capsys: pytest.CaptureFixture
) -> None:
    good = _weights_file(tmp_path, "good.safetensors", own_net(load_checkpoint(nets[0])).state_dict())
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:-64])  # truncated: the header promises more bytes
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    for path in (corrupt, garbage):
        cli_refuses(capsys, ["curve", "--config", config, "--start", nets[0], "--end", path, "--out", tmp_path / "c",
                             *TINY], str(path), "is not a readable safetensors file")
        cli_refuses(capsys, ["fge", "--config", config, "--from", path, "--out", tmp_path / "f", *FGE_TINY],
                    str(path), "is not a readable safetensors file")
    assert not (tmp_path / "c").exists() and not (tmp_path / "f").exists()
