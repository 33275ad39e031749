"""Export: ONNX graphs against PyTorch, the manifest's hashes, the parity gate, bad runs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modeconn.contract.artifact import ArtifactError, load_artifact
from modeconn.contract.errors import ModeconnError
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.networks import load_data, load_network
from modeconn.training.curves.fit import load_curve
from modeconn.training.curves.model import network_at
from modeconn.training.export import ExportError, export_artifact

ROOT = Path(__file__).resolve().parents[1]


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("curve_type", ["bezier", "polychain"])
def test_graphs_match_pytorch(small_runs: dict[str, Path], tmp_path: Path, curve_type: str) -> None:
    out = tmp_path / "artifact"
    # curves of 2 epochs on a coarse grid: the interpolation bound is tested on the demo curve instead
    result = export_artifact([small_runs["net0"], small_runs["net1"], small_runs[curve_type]], "t", out=out,
                             grid_points=11, max_interpolation_pp=100)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == result["manifest"]
    assert manifest["curve"]["type"] == curve_type and manifest["curve"]["num_bends"] == 3
    nets = [load_network(small_runs[k])[0] for k in ("net0", "net1")]
    data = load_data(load_checkpoint(small_runs["net0"])["dataset"], "cpu")  # the data the runs trained on
    x = data.x_test[:300]  # raw inputs: normalisation is inside the graphs
    mean, std = manifest["input"]["normalization"]["mean"][0], manifest["input"]["normalization"]["std"][0]
    with torch.no_grad():
        expected = [torch.softmax(net((x - mean) / std), dim=1).numpy() for net in nets]

    for i, member in enumerate(manifest["members"]):
        got = _session(out / member["file"]).run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, expected[i], atol=1e-5, rtol=0)
    import onnx

    for graph in (manifest["members"][0]["file"], "ensemble.onnx"):  # 1D convolutions run as 2D ones
        model = onnx.shape_inference.infer_shapes(onnx.load(str(out / graph)))
        ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        ranks.update({v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info})
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        assert len(convs) == 4 * (1 if graph.startswith("members") else 2), graph
        assert [ranks.get(n.input[1]) for n in convs] == [4] * len(convs), graph
    mean_probs, member_probs = _session(out / "ensemble.onnx").run(None, {"x": x.numpy()})
    np.testing.assert_allclose(member_probs, np.stack(expected), atol=1e-5, rtol=0)
    np.testing.assert_allclose(mean_probs, (expected[0] + expected[1]) / 2, atol=1e-5, rtol=0)

    # the curve at t: an independent PyTorch network with the weights at t and BN recomputed
    curve, _ = load_curve(small_runs[curve_type])
    session = _session(out / "curve.onnx")
    for t in (0.0, 0.3, 0.5, 0.9, 1.0):  # 0.3 and 0.9 lie on the 11-point grid
        net = recompute_bn(network_at(curve, t), data).eval()
        with torch.no_grad():
            want = torch.softmax(net((x - mean) / std), dim=1).numpy()
        got = session.run(None, {"x": x.numpy(), "t": np.array([t], dtype=np.float32)})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=f"t={t}")
    # t = 0 and t = 1 are the endpoints' weights exactly
    for t, endpoint in ((0.0, nets[0]), (1.0, nets[1])):
        at_t = network_at(curve, t)
        for name, p in endpoint.named_parameters():
            assert torch.equal(at_t.get_parameter(name), p), name


def test_off_grid_bn_interpolation_close_to_exact(demo_curve: dict, trained_pair: list, tmp_path: Path) -> None:
    """On the demo (full budget), interpolated BN statistics at off-grid t give the same
    test error as exactly recomputed ones, within 0.2 pp."""
    result = export_artifact([Path(trained_pair[0]["checkpoint"]), Path(demo_curve["fit"]["run_dir"])], "t",
                             out=tmp_path / "a", grid_points=61)
    check = result["manifest"]["curve"]["bn_interpolation"]
    print(f"\noff-grid BN interpolation vs exact (demo, 61-point grid): {check}")
    assert len(check["points"]) >= 3
    assert all(0 < p["t"] < 1 for p in check["points"])
    assert check["max_abs_error_difference_pp"] <= 0.2
    assert result["manifest"]["curve"]["metrics"]["curve_max_test_error"] == demo_curve["eval"]["curve_max_test_error"]


def test_manifest_hashes_and_loader_refuses_changed_files(small_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    export_artifact([small_runs["net0"], small_runs["net1"]], "t", out=out)
    artifact = load_artifact(out)
    assert artifact.curve_file is None and artifact.num_members == 2
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib

    for rel, record in manifest["files"].items():
        blob = (out / rel).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == record["sha256"] and len(blob) == record["bytes"]
    # flip one byte of a member graph: same size, other hash
    victim = out / manifest["members"][1]["file"]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    with pytest.raises(ArtifactError, match="member-001.onnx"):
        load_artifact(out)


def test_parity_gate_refuses_and_leaves_the_folder_unchanged(small_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    with pytest.raises(ExportError, match="parity gate failed"):
        export_artifact([small_runs["net0"]], "t", out=out, atol=1e-30)
    assert not out.exists()


def _cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENTOML_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "modeconn", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _store_listing(home: Path) -> list[str]:
    models = home / "models"
    return sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_dir()) if models.exists() else []


def test_store_export_and_bad_runs_leave_store_unchanged(small_runs: dict[str, Path], tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    ok = _cli(["export", str(small_runs["net0"]), str(small_runs["net1"]), str(small_runs["bezier"]),
               "--name", "export-test", "--bn-grid-points", "5", "--set", "export.max_bn_interpolation_pp=100", "--json"], home)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert result["tag"].startswith("export-test:")
    stored = [p for p in (home / "models" / "export-test").iterdir() if p.is_dir()]
    assert len(stored) == 1
    artifact = load_artifact(stored[0])
    assert artifact.num_members == 2 and artifact.has_curve
    before = _store_listing(home)

    incomplete = tmp_path / "incomplete-run"
    (incomplete / "checkpoints").mkdir(parents=True)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(small_runs["net0"].read_bytes()[:1000])
    for bad, message in ((tmp_path / "missing", "does not exist"),
                         (incomplete, "not a finished run"),
                         (truncated, "truncated")):
        res = _cli(["export", str(bad), "--name", "export-test"], home)
        assert res.returncode == 2, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr
        assert _store_listing(home) == before
    res = _cli(["export", str(small_runs["net0"]), "--swa", str(tmp_path / "swa.pt"), "--name", "export-test"], home)
    assert res.returncode == 2 and f"--swa {tmp_path / 'swa.pt'} does not exist" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and _store_listing(home) == before


def test_refuses_members_of_different_architectures(small_runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    other = tmp_path / "in" / "other.pt"
    state = torch.load(small_runs["net0"], weights_only=True)
    net = copy.deepcopy(state)
    net["architecture"] = {"name": "cnn1d", "kwargs": {"width": 8}}
    from modeconn.models import build_model

    net["model"] = build_model("cnn1d", num_classes=10, width=8).state_dict()
    torch.save(net, other)
    with pytest.raises(ExportError, match="differ"):
        export_artifact([small_runs["net0"], other], "t", out=tmp_path / "a")


def test_parity_gate_holds_each_graph_to_the_original_network(
    small_runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong export rewrite (here: 1D kernels mirrored when run as 2D; same shapes, other
    numbers) would pass a gate that compares the graph with its own export module."""
    import modeconn.training.export as export

    original = export.Conv2dOfHeight1.__init__

    def mirrored(self: export.Conv2dOfHeight1, conv: torch.nn.Conv1d) -> None:
        original(self, conv)
        self.weight.data = self.weight.data.flip(-1)

    monkeypatch.setattr(export.Conv2dOfHeight1, "__init__", mirrored)
    with pytest.raises(ExportError, match="parity gate failed for members/member-000.onnx"):
        export_artifact([small_runs["net0"]], "t", out=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_curve_graph_with_too_coarse_a_bn_grid_is_refused(small_runs: dict[str, Path], tmp_path: Path) -> None:
    """Two grid points (the ends only): BN statistics in the middle of the curve are guessed
    by interpolation and the test error moves; a bound of 0 pp refuses the export."""
    with pytest.raises(ExportError, match="max_bn_interpolation_pp 0.*--bn-grid-points"):
        export_artifact([small_runs["net0"], small_runs["bezier"]], "t", out=tmp_path / "a", grid_points=2,
                        max_interpolation_pp=0.0)
    assert not (tmp_path / "a").exists()


def test_swa_graph_matches_its_checkpoint_with_its_own_temperature(built_artifact: Path) -> None:
    """The test artifact's swa.onnx (the average of its three members, `modeconn swa`) against
    the checkpoint's network in PyTorch; its metrics and T computed here from that network."""
    from modeconn.training.core.metrics import classification_metrics
    from modeconn.training.core.networks import predict_probs
    from modeconn.training.ensembles.calibration import fit_temperature

    manifest = json.loads((built_artifact / "manifest.json").read_text())
    swa = manifest["swa"]
    assert swa["kind"] == "swa" and swa["bn_recomputed"] is True
    assert swa["averaged"] == [m["source"] for m in manifest["members"]]
    assert 0 <= manifest["parity"]["max_abs_diff"]["swa.onnx"] <= 1e-5
    net, state = load_network(swa["source"])
    data = load_data(state["dataset"], "cpu")
    mean, std = manifest["input"]["normalization"]["mean"][0], manifest["input"]["normalization"]["std"][0]
    x = data.x_test[:300]
    with torch.no_grad():
        want = torch.softmax(net((x - mean) / std), dim=1).numpy()
        test = predict_probs(net, data, "test")
    session = _session(built_artifact / "swa.onnx")
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], want, atol=1e-5, rtol=0)
    assert swa["metrics"] == pytest.approx(classification_metrics(test, data.y_test), abs=1e-9)
    val = torch.from_numpy(session.run(None, {"x": data.x_val.numpy()})[0])
    temperature = swa["calibration"]["temperature"]
    assert temperature == pytest.approx(fit_temperature(val, data.y_val), rel=1e-3)  # its own, on validation
    assert temperature != pytest.approx(manifest["ensemble"]["calibration"]["temperature"], rel=1e-3)


def test_swa_that_is_not_one_checkpoint_of_the_members_network_is_refused(
    small_runs: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    other = tmp_path / "in" / "other.pt"
    state = torch.load(small_runs["net0"], weights_only=True)
    from modeconn.models import build_model

    state.update(architecture={"name": "cnn1d", "kwargs": {"width": 8}},
                 model=build_model("cnn1d", num_classes=10, width=8).state_dict())
    torch.save(state, other)
    out = tmp_path / "out" / "a"
    for swa, message in ((other, f"{other} is .*differ"), (tmp_path / "in", "is a folder"),
                         (tmp_path / "in" / "missing.pt", "does not exist"),
                         (small_runs["bezier"] / "final.pt", "is a curve")):
        with pytest.raises(ModeconnError, match=message):  # ExportError, or CheckpointError for the curve
            export_artifact([small_runs["net0"]], "t", out=out, swa=swa)
        assert not out.exists()
