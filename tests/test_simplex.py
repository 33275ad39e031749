"""`modeconn simplex` and `modeconn.fit_simplex`: the point θ(w), the Cayley–Menger volume, the
uniform draws, a fitted simplex on real data, bad input and resuming, each against a direct computation."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import modeconn
from modeconn.training import cli
from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.networks import load_network
from modeconn.training.simplex.model import (
    SimplexModel,
    network_at,
    sample_weights,
    structure,
    vertex_matrix,
    volume_squared,
)
from tests.holds import start_held
from tests.test_api import digits, train_plain


class TinyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _nets(count: int) -> list[nn.Module]:
    out = []
    for seed in range(count):
        torch.manual_seed(seed)
        out.append(TinyBN())
    return out


# ---------------------------------------------------------------- the point θ(w)
def test_a_point_is_the_barycentric_combination_of_the_vertices() -> None:
    nets = _nets(4)
    base = nets[0]
    simplex = SimplexModel(base, vertex_matrix([n.state_dict() for n in nets[:3]], base), [[0, 1, 2, 3]],
                           free=vertex_matrix([nets[3].state_dict()], base)[0])
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    net = network_at(simplex, w)
    for name, p in net.named_parameters():
        expected = sum(float(w[i]) * nets[i].get_parameter(name).detach() for i in range(4))
        assert torch.allclose(p, expected, atol=1e-6), name
    # a vertex is exactly that network; the forward at w runs the network θ(w)
    vertex = network_at(simplex, torch.eye(4, dtype=torch.float64)[2])
    assert all(torch.equal(p, nets[2].get_parameter(n)) for n, p in vertex.named_parameters())
    x = torch.randn(5, 1, 8, 8)
    assert torch.allclose(simplex.eval()(x, w), net.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="4 entries"):
        simplex.flat_weights(torch.ones(3) / 3)


def test_the_structures_are_one_simplex_or_the_papers_complex() -> None:
    assert structure(1, 2, connecting=False) == [[0, 1, 2]]
    assert structure(3, 2, connecting=False) == [[0, 1, 2, 3, 4]]
    assert structure(3, 2, connecting=True) == [[0, 3, 4], [1, 3, 4], [2, 3, 4]]


# ---------------------------------------------------------------- the volume
def test_the_cayley_menger_volume_matches_known_simplexes() -> None:
    triangle = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # unit right triangle: area 1/2
    assert volume_squared(triangle).item() == pytest.approx(0.25, rel=1e-12)
    s = math.sqrt
    tetrahedron = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]]) / (2 * s(2))
    assert torch.allclose(torch.cdist(tetrahedron, tetrahedron)[0, 1:], torch.ones(3))  # edge 1
    assert s(volume_squared(tetrahedron).item()) == pytest.approx(1 / (6 * s(2)), rel=1e-6)
    assert volume_squared(torch.tensor([[0.0], [3.0]])).item() == pytest.approx(9.0)  # a segment: its length
    # embedded in many dimensions far from the origin: the same area (distances from differences)
    rotation, _ = torch.linalg.qr(torch.randn(1000, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    lifted = torch.nn.functional.pad(triangle.double(), (0, 998)) @ rotation + 1e3
    assert volume_squared(lifted).item() == pytest.approx(0.25, rel=1e-6)
    assert volume_squared(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])).item() == pytest.approx(0.0, abs=1e-9)


def test_the_regulariser_pushes_a_vertex_off_the_others_span() -> None:
    vertices = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.5]], requires_grad=True)
    (-torch.log(volume_squared(vertices) + 1e-4)).backward()
    assert vertices.grad[2, 1] < 0  # descending moves it up, away from the base: a larger triangle


# ---------------------------------------------------------------- the draws
def test_draws_are_uniform_on_a_simplex_of_the_complex() -> None:
    generator = torch.Generator().manual_seed(0)
    complex_ = [[0, 2, 3], [1, 2, 3]]
    draws = torch.stack([sample_weights(4, complex_, generator) for _ in range(20000)])
    assert torch.allclose(draws.sum(1), torch.ones(20000, dtype=torch.float64)) and bool((draws >= 0).all())
    assert bool(((draws[:, 0] == 0) | (draws[:, 1] == 0)).all())  # never both networks: one simplex at a time
    assert (draws[:, 0] > 0).double().mean().item() == pytest.approx(0.5, abs=0.02)  # the simplex drawn uniformly
    # uniform on a triangle: a vertex's weight is Beta(1, 2), P(w > 1/2) = 1/4, mean 1/3
    w2 = draws[:, 2]
    assert (w2 > 0.5).double().mean().item() == pytest.approx(0.25, abs=0.015)
    assert w2.mean().item() == pytest.approx(1 / 3, abs=0.01)


# ---------------------------------------------------------------- a fitted simplex (Python API, digits)
@pytest.fixture(scope="module")
def digits_sets():  # noqa: ANN201
    return digits()


def test_fitted_simplex_points_stay_near_the_vertices_loss(digits_sets) -> None:  # noqa: ANN001
    loaders = {k: DataLoader(v, batch_size=256) for k, v in digits_sets.items()}
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        pair.append(train_plain(TinyBN(), digits_sets["train"], seed, epochs=6))
    before = [{k: v.clone() for k, v in n.state_dict().items()} for n in pair]
    line_middle = modeconn.fit_simplex(pair, loaders["train"], val=loaders["val"], vertices=1, epochs=1, lr=1e-9,
                                       eval_points=4, ensemble_size=3)
    fitted = modeconn.fit_simplex(pair, loaders["train"], val=loaders["val"], vertices=1, epochs=6, lr=0.05,
                                  batch_size=64, eval_points=4, ensemble_size=3)
    assert all(torch.equal(v, n.state_dict()[k]) for n, b in zip(pair, before, strict=True) for k, v in b.items())
    untrained = line_middle.evaluate(loaders["test"])["summary"]
    report = fitted.evaluate(loaders["test"])
    vertex, sample, centre = (report["summary"][k]["train_loss"]["mean"] for k in ("vertex", "sample", "centre"))
    # the trained vertex lowered the loss inside the simplex well below the untrained one's (a vertex left at
    # the middle of the straight line: the barrier there), and the sampled points' stays near the vertices'
    assert sample < untrained["sample"]["train_loss"]["mean"] - 0.03, (sample, untrained["sample"])
    assert centre < untrained["centre"]["train_loss"]["mean"] - 0.08, (centre, untrained["centre"])
    assert sample < vertex + 0.1, report["rows"]
    # the vertices given stay as they were; the point at a vertex is that network (up to BN recomputation)
    assert torch.equal(fitted.model.vertices()[0], vertex_matrix([pair[0].state_dict()], pair[0])[0])
    assert report["test_size"] == len(digits_sets["test"]) and report["ensemble"]["members"] == 3
    with pytest.raises(modeconn.ModeconnError, match="non-negative weights summing to 1"):
        fitted.network([0.5, 0.5, 0.5])
    assert len(fitted.sample(2, seed=1)) == 2


def test_the_connecting_complex_trains_connectors_shared_by_every_network(digits_sets) -> None:  # noqa: ANN001
    loaders = {k: DataLoader(v, batch_size=256) for k, v in digits_sets.items()}
    nets = [train_plain(TinyBN(), digits_sets["train"], seed, epochs=2) for seed in (0, 1)]
    fitted = modeconn.fit_simplex(nets, loaders["train"], connecting=True, vertices=2, epochs=1, eval_points=3,
                                  ensemble_size=2)
    assert fitted.model.simplexes == [[0, 2, 3], [1, 2, 3]] and fitted.model.num_vertices == 4
    assert [r["vertex"] for r in fitted.history] == [1, 2]
    report = fitted.evaluate(loaders["test"])
    assert [r["point"] for r in report["rows"] if r["kind"] == "centre"] == ["centre of simplex 1", "centre of simplex 2"]
    # every sampled point lies on one simplex of the complex: never both networks at once
    assert all(min(r["weights"][0], r["weights"][1]) == 0 for r in report["rows"] if r["kind"] == "sample")


# ---------------------------------------------------------------- the command
FAST = ["--device", "cpu", "--epochs", "2", "--set", "simplex.eval_points=2", "--set", "simplex.ensemble_size=2",
        "--set", "simplex.save_every=1"]


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", ["missing run", "two vertices", "connecting one network", "epochs per vertex"])
def test_bad_input_is_one_line_and_writes_nothing(case: str, small_runs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s"
    runs, extra, expected = {
        "missing run": ([str(small_runs["net0"]), str(tmp_path / "nope.pt")], [], "nope.pt does not exist"),
        "two vertices": ([str(small_runs["net0"])], ["--vertices", "1"], "simplex.vertices: a simplex needs at least 3"),
        "connecting one network": ([str(small_runs["net0"])], ["--connecting"], "simplex.connecting joins two or more"),
        "epochs per vertex": ([str(small_runs["net0"])], ["--set", "simplex.vertex_epochs=[3]"],
                              "vertex_epochs must give 2 whole numbers of epochs"),
    }[case]
    code, _, err = _run(["simplex", "--runs", *runs, "--out", str(out), *extra, *FAST], capsys)
    assert code == 2 and expected in err and err.startswith("modeconn simplex:") and err.count("\n") == 1, err
    assert not out.exists()


def test_command_fits_evaluates_and_resumes_after_a_kill(small_runs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # one thread in this process as in the killed one: 1 and 2 threads round differently (AMD EPYC)
    monkeypatch.setenv("MODECONN_THREADS", "1")
    argv = ["simplex", "--runs", str(small_runs["net0"]), *FAST]
    reference = tmp_path / "reference"
    code, stdout, _ = _run([*argv, "--out", str(reference), "--json"], capsys)
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    final = load_checkpoint(reference / "final.pt")
    assert final["kind"] == "simplex" and final["model"]["vertices"].shape[0] == 3 and final["simplexes"] == [[0, 1, 2]]
    start, _ = load_network(small_runs["net0"])
    assert torch.equal(final["model"]["vertices"][0], vertex_matrix([start.state_dict()], start)[0])
    report = json.loads((reference / "simplex.json").read_text())
    assert [r["point"] for r in report["rows"]] == ["vertex 1", "vertex 2", "vertex 3", "centre", "sample 1", "sample 2"]
    assert report["test_size"] == result["test_size"] == 12000
    # the ensemble's members are ordinary networks at the sampled points: their weights are θ(w)
    member, state = load_network(reference / "snapshots" / "snapshot-001.pt")
    w = torch.tensor(state["simplex"]["weights"], dtype=torch.float64)
    expected = w.float() @ final["model"]["vertices"]
    got = vertex_matrix([member.state_dict()], member)[0]
    assert torch.allclose(got, expected, atol=1e-5)
    ensemble = json.loads((reference / "ensemble.json").read_text())
    assert ensemble["members"] == 2 and ensemble["ensemble"] == result["ensemble"]
    # the exporter takes the run as it takes an FGE run: its sampled points are the served members
    artifact = tmp_path / "artifact"
    assert _run(["export", str(reference), "--out", str(artifact), "--bn-grid-points", "2"], capsys)[0] == 0
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["ensemble"]["num_members"] == 2 and {m["kind"] for m in manifest["members"]} == {"simplex-point"}
    # the run folder again without --resume is refused
    assert _run([*argv, "--out", str(reference)], capsys)[0] == 2
    # killed after the second vertex's first epoch, then resumed: the same vertices as uninterrupted
    killed = tmp_path / "killed"
    proc = start_held([sys.executable, "-m", "modeconn", *argv, "--out", str(killed)], "simplex-vertex-2:epoch-1",
                      {**os.environ, "OMP_NUM_THREADS": "1"})
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "vertex-01" / "vertex.pt").exists() and not (killed / "final.pt").exists()
    assert _run([*argv, "--out", str(killed), "--resume"], capsys)[0] == 0
    assert torch.equal(load_checkpoint(killed / "final.pt")["model"]["vertices"], final["model"]["vertices"])
    assert json.loads((killed / "simplex.json").read_text())["rows"] == report["rows"]
    # --force starts over, removing only what the tool wrote
    (killed / "mine.txt").write_text("kept")
    assert _run([*argv, "--out", str(killed), "--force"], capsys)[0] == 0
    assert (killed / "mine.txt").read_text() == "kept"
