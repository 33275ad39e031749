"""A real artifact for the serving tests, made by the real exporter from short MNIST-1D runs.

Members are points of the exported curve at t = 0, 0.5 and 1 (BN recomputed, as the curve
graph does), so the served curve at t = 0 and t = 1 must equal members 0 and 2.
"""

from __future__ import annotations

from pathlib import Path

from training.core.config import load_config
from training.curves.evaluate import save_curve_point
from training.curves.fit import fit_curve
from training.export import export_artifact
from training.train import train_network

ROOT = Path(__file__).resolve().parents[1]
ENDPOINT_MEMBERS = {0.0: "members/member-000.onnx", 1.0: "members/member-002.onnx"}


def build_test_artifact(out_dir: Path) -> Path:
    work = out_dir.parent / f"{out_dir.name}-runs"
    overrides = {"device": "cpu", "train.epochs": 3, "curve.epochs": 2}
    nets = []
    for seed in (0, 1):
        config = load_config(ROOT / "configs/mnist1d.yaml", {**overrides, "seed": seed})
        nets.append(Path(train_network(config, work / f"net{seed}")["checkpoint"]))
    config = load_config(ROOT / "configs/mnist1d.yaml", overrides)
    curve = Path(fit_curve(config, nets[0], nets[1], work / "curve")["run_dir"])
    points = [save_curve_point(curve, t, work / f"point-{t}.pt", device="cpu")["checkpoint"] for t in (0.0, 0.5, 1.0)]
    # a 2-epoch curve on an 11-point grid: BN interpolation is bounded in tests/test_export.py on the demo curve
    export_artifact([*map(Path, points), curve], "modeconn-test", out=out_dir, grid_points=11, max_interpolation_pp=100)
    return out_dir
