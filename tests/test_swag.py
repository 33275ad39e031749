"""SWAG: its moments and draws against direct computations of the paper's formulas, and
`modeconn swag` on the small runs' two networks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from modeconn.training import cli
from modeconn.training.core.networks import load_network
from modeconn.training.ensembles.swag import swag_moments, swag_sample


def _snapshots(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g) * 0.1 + i} for i in range(n)]


def test_moments_are_the_mean_the_diagonal_and_the_running_deviations() -> None:
    snaps = _snapshots(5)
    m = swag_moments(snaps, rank=3)
    for name in ("w", "b"):
        stack = np.stack([s[name].double().numpy() for s in snaps])
        np.testing.assert_allclose(m["mean"][name].numpy(), stack.mean(0), atol=1e-12)
        np.testing.assert_allclose(m["variance"][name].numpy(), stack.var(0), atol=1e-12)
        running = [stack[: i + 1].mean(0) for i in range(5)]  # the mean after snapshot i
        for column, i in zip(m["deviations"], (2, 3, 4), strict=True):  # the last 3 of 5
            np.testing.assert_allclose(column[name].numpy(), stack[i] - running[i], atol=1e-12)
    assert m["count"] == 5 and len(m["deviations"]) == 3


def test_draws_have_the_swag_mean_and_covariance() -> None:
    """θ_SWA + (Σ_diag^½ z₁ + D̂ z₂ / √(K − 1)) / √2: mean θ_SWA, covariance ½ Σ_diag + D̂D̂ᵀ / (2(K − 1))."""
    snaps = [{"v": torch.tensor([0.0, 1.0, 2.0]) * i + torch.tensor([1.0, -1.0, 0.5]) * (i % 2)} for i in range(4)]
    m = swag_moments(snaps, rank=4)
    g = torch.Generator().manual_seed(0)
    draws = np.stack([swag_sample(m, g)["v"].numpy() for _ in range(40000)])
    d = np.stack([c["v"].numpy() for c in m["deviations"]], axis=1)  # [3, K]
    expected = 0.5 * np.diag(m["variance"]["v"].numpy()) + d @ d.T / (2 * (d.shape[1] - 1))
    np.testing.assert_allclose(draws.mean(0), m["mean"]["v"].numpy(), atol=0.03)
    np.testing.assert_allclose(np.cov(draws.T), expected, atol=0.05 * np.abs(expected).max())
    # scale multiplies the covariance: the same z's at scale 1/4 land half as far from the mean
    full, quarter = (swag_sample(m, torch.Generator().manual_seed(1), scale=s)["v"] for s in (1.0, 0.25))
    torch.testing.assert_close(quarter - m["mean"]["v"], 0.5 * (full - m["mean"]["v"]))


def test_identical_snapshots_draw_their_mean() -> None:
    snaps = [{"v": torch.tensor([1.0, 2.0])}] * 3
    m = swag_moments(snaps, rank=3)
    assert torch.equal(swag_sample(m, torch.Generator().manual_seed(0))["v"], m["mean"]["v"])


def test_swag_command_draws_checkpoints_and_evaluates_them(small_runs: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "swag"
    args = ["swag", str(small_runs["net0"]), str(small_runs["net1"]), "--out", str(out), "--samples", "3",
            "--device", "cpu", "--json"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [Path(p).name for p in result["samples"]] == ["sample-001.pt", "sample-002.pt", "sample-003.pt"]
    report = json.loads((out / "ensemble.json").read_text())
    assert report["ensemble"] == result["ensemble"] and len(report["member_metrics"]) == 3
    a, _ = load_network(small_runs["net0"])
    b, _ = load_network(small_runs["net1"])
    s, state = load_network(result["samples"][0])
    assert state["kind"] == "swag" and state["swag"]["rank"] == 2 and state["swag"]["index"] == 1
    # a draw differs from both ends and from their mean; its BN statistics were recomputed for it
    mean = {k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k, _ in a.named_parameters()}
    assert all(not torch.equal(s.state_dict()[k], mean[k]) for k in mean)
    bn = next(k for k in s.state_dict() if k.endswith("running_mean"))
    assert not torch.equal(s.state_dict()[bn], a.state_dict()[bn])
    # the same --out again: its samples are not overwritten
    assert cli.main(args) == 2
    assert "already holds samples" in capsys.readouterr().err


def test_one_snapshot_is_one_line(small_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["swag", str(small_runs["net0"]), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("modeconn swag: error:") and "at least 2 snapshots" in err and "\n" not in err
    assert not (tmp_path / "s").exists()  # refused before any folder is made
