"""Real data no one here made, a network that is not in the registry, end to end through the
CLI: scikit-learn's 8x8 handwritten digits written as PNG files into an image folder, two
networks of `tests.own_models:build_digits` (named by import path), a curve, FGE, export into
a BentoML store, a real `bentoml serve`, and PNG uploads answered as offline torch answers."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from digits_folder import write_digits_folder
from PIL import Image
from support import start_server, stop_server, wait_ready

from modeconn.training.core.networks import load_network

REPO = Path(__file__).resolve().parents[1]
MODEL = "modeconn-digits-e2e"


def _config(root: Path) -> dict:
    return {
        "name": "digits",
        "data": {"name": "image_folder", "root": str(root), "val_size": 150, "num_workers": 1},
        "model": {"factory": "tests.own_models:build_digits", "kwargs": {"width": 8}},
        "train": {"epochs": 6, "batch_size": 64, "lr": 0.05, "save_every": 3},
        "curve": {"epochs": 4, "batch_size": 64, "lr": 0.05, "save_every": 4, "eval_points": 5},
        "fge": {"cycle_epochs": 1, "lr1": 0.05, "lr2": 0.005, "epochs": 3, "start_fraction": 0.5,
                "batch_size": 64},
        "export": {"name": MODEL, "bn_grid_points": 5, "max_bn_interpolation_pp": 100.0},
    }


def _cli(*args: str, env: dict[str, str]) -> None:
    device = [] if args[0] == "export" else ["--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "modeconn", *args, *device], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"modeconn {' '.join(args)}:\n{done.stderr[-3000:]}"


@pytest.mark.slow
def test_digits_image_folder_own_network_cli_serve_and_png_uploads(tmp_path: Path) -> None:
    folder = write_digits_folder(tmp_path / "digits")
    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump(_config(folder.root)))
    home, runs = tmp_path / "bentoml", tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    for seed, name in ((0, "a"), (1, "b")):
        _cli("train", "--config", str(config), "--seed", str(seed), "--out", str(runs / name), env=env)
    _cli("curve", "--config", str(config), "--start", str(runs / "a" / "final.pt"), "--end", str(runs / "b" / "final.pt"),
         "--out", str(runs / "curve"), env=env)
    _cli("fge", "--config", str(config), "--from", str(runs / "a" / "checkpoints" / "epoch-0003.pt"),
         "--out", str(runs / "fge"), env=env)
    _cli("export", str(runs / "fge"), str(runs / "curve"), "--name", MODEL, env=env)

    # offline torch: the FGE snapshots (the exported members) on the decoded test PNGs
    files = sorted((folder.root / "test").glob("*/*.png"))[::45][:8]
    pixels = np.stack([np.asarray(Image.open(f), dtype=np.float32) / 255.0 for f in files])[:, None]
    members = sorted((runs / "fge" / "snapshots").glob("snapshot-*.pt"))
    assert len(members) >= 2  # cycles of 1 epoch in the 3 FGE epochs
    expected = []
    for path in members:
        net, state = load_network(path)
        assert state["architecture"]["factory"] == "tests.own_models:build_digits"
        mean, std = state["dataset"]["mean"], state["dataset"]["std"]
        with torch.no_grad():
            x = (torch.from_numpy(pixels) - mean[0]) / std[0]
            expected.append(torch.softmax(net(x).double(), dim=1).numpy())
    expected_mean = np.mean(expected, axis=0)

    server = start_server(home, MODEL, tmp_path / "serve.log")
    try:
        wait_ready(server)
        for i, path in enumerate(files):
            buf = io.BytesIO(path.read_bytes())
            r = requests.post(server.url + "/predict?calibrated=false", data=buf.getvalue(),
                              headers={"content-type": "image/png"}, timeout=30)
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["probabilities"][0])
            assert np.abs(got - expected_mean[i]).max() <= 1e-5, (path, np.abs(got - expected_mean[i]).max())
            assert r.json()["labels"][0] == str(int(np.argmax(expected_mean[i])))
        info = requests.get(server.url + "/info", timeout=30).json()
        assert info["architecture"]["factory"] == "tests.own_models:build_digits"
    finally:
        stop_server(server)


@pytest.mark.slow
def test_compare_runs_the_digits_folder_by_config(tmp_path: Path) -> None:
    """`modeconn compare --config` on an image folder with a network named by import path, two
    sub-runs side by side (spawned workers import the factory too): the same table as the demo's,
    on the 449 test digits, the equal-budget rows and FGE's differences against them included."""
    folder = write_digits_folder(tmp_path / "digits")
    tree = _config(folder.root)
    tree["train"].update(epochs=2, save_every=1)
    tree["fge"].update(epochs=1, cycle_epochs=0.9, start_fraction=0.5)  # an even cycle inside 1 epoch
    tree["sse"] = {"cycle_epochs": 1, "epochs": 2, "lr": 0.05, "batch_size": 64}
    tree["compare"] = {"budgets": [1, 2], "seeds": 2, "equal_budget_members": [2], "swag_samples": 2}
    config = tmp_path / "digits.yaml"
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "compare"
    _cli("compare", "--config", str(config), "--out", str(out), "--jobs", "2",
         env={**os.environ, "OMP_NUM_THREADS": "1"})
    table = (out / "compare.md").read_text()
    assert "**Budget comparison: tests.own_models:build_digits on image_folder** (config `digits`)" in table
    assert "Test set: 449 examples" in table and "from `" + str(config) + "`" in table
    for row in ("| Ind m=2 | calibrated NLL |", "| FGE − Ind m=2 | calibrated NLL |", "| FGE − SSE | error (pp) |"):
        assert row in table, row
    for k in (1, 2):  # the equal-budget pair shares kB = 2k epochs
        epochs = [load_network(out / "seed-1" / f"eq-{k}B-m2-{j}" / "final.pt")[1]["metrics"]["epoch"] for j in (0, 1)]
        assert sum(epochs) == 2 * k
