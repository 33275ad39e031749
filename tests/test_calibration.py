"""Temperature scaling (training/ensembles/calibration.py, serving/calibration.py): the fitted T
is the NLL minimum a grid search finds, calibrated validation NLL never exceeds raw, the two
implementations agree, and the exporter fitted its temperatures on the validation split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modeconn.serving.calibration import curve_temperature, scale
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import load_data
from modeconn.training.ensembles.calibration import (
    T_MAX,
    T_MIN,
    calibrate,
    fit_temperature,
    interpolated_temperature,
    log_probs,
    nll_at,
)


def _synthetic(true_temperature: float, n: int = 2000, classes: int = 10, seed: int = 0):  # noqa: ANN202
    """Logits, and labels drawn from softmax(logits / true_temperature): the raw softmax(logits)
    is miscalibrated by that temperature."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits / true_temperature, dim=1), 1, generator=g).squeeze(1)
    return logits, torch.softmax(logits, dim=1).float(), labels


def _grid_nll(logp: torch.Tensor, labels: torch.Tensor, temperatures: torch.Tensor) -> np.ndarray:
    """NLL at every temperature of a grid, all at once (chunks of 50 temperatures)."""
    rows = torch.arange(len(labels))
    out = []
    for chunk in temperatures.split(50):
        scaled = torch.log_softmax(logp[None] / chunk[:, None, None], dim=2)  # [G, N, C]
        out.append(-scaled[:, rows, labels].mean(dim=1))
    return torch.cat(out).numpy()


@pytest.mark.parametrize("true_temperature", [0.6, 1.0, 2.5])
def test_fitted_temperature_is_the_grid_minimum(true_temperature: float) -> None:
    _, probs, labels = _synthetic(true_temperature)
    fitted = fit_temperature(probs, labels)
    grid = np.linspace(math.log(T_MIN), math.log(T_MAX), 2001)
    logp = log_probs(probs)
    losses = _grid_nll(logp, labels, torch.from_numpy(np.exp(grid)))
    best = grid[int(np.argmin(losses))]
    assert abs(math.log(fitted) - best) <= grid[1] - grid[0]  # within the grid's resolution
    assert nll_at(logp, labels, fitted) <= losses.min() + 1e-9
    assert nll_at(logp, labels, fitted) <= nll_at(logp, labels, 1.0)  # calibrated val NLL ≤ raw
    assert fitted == pytest.approx(true_temperature, rel=0.15)  # and near the temperature the labels came from


def test_calibrate_is_softmax_of_scaled_logits_on_both_sides() -> None:
    logits, probs, _ = _synthetic(1.0, n=500)
    for temperature in (0.5, 1.7, 4.0):
        want = torch.softmax(logits / temperature, dim=1)  # from the logits, not the probabilities
        offline = calibrate(probs, temperature)
        torch.testing.assert_close(offline, want, atol=1e-6, rtol=0)  # float32 probabilities in
        served = scale(probs.numpy(), temperature)
        np.testing.assert_allclose(served, offline.numpy(), atol=1e-12, rtol=0)


def test_curve_temperature_interpolates_like_the_bn_grid() -> None:
    temps = [1.0, 2.0, 1.5, 3.0, 0.5]
    for i, value in enumerate(temps):  # exact at the grid t = i / 4
        assert interpolated_temperature(temps, i / 4) == pytest.approx(value, abs=1e-12)
        assert curve_temperature(temps, i / 4) == pytest.approx(value, abs=1e-12)
    for t in (0.1, 0.3, 0.62, 0.99):
        low = int(t * 4)
        want = temps[low] + (t * 4 - low) * (temps[low + 1] - temps[low])
        assert interpolated_temperature(temps, t) == pytest.approx(want, abs=1e-12)
        assert curve_temperature(temps, t) == pytest.approx(want, abs=1e-12)


def test_exported_temperatures_are_fitted_on_validation(built_artifact: Path) -> None:
    manifest = json.loads((built_artifact / "manifest.json").read_text())
    data = load_data(manifest["dataset"], "cpu")  # the data the manifest records
    session = ort.InferenceSession(str(built_artifact / "ensemble.onnx"), providers=["CPUExecutionProvider"])
    val = torch.from_numpy(session.run(None, {"x": data.x_val.numpy()})[0])
    test = torch.from_numpy(session.run(None, {"x": data.x_test.numpy()})[0])
    cal = manifest["ensemble"]["calibration"]
    assert cal["val_examples"] == len(data.y_val) == manifest["dataset"]["val_size"]
    assert cal["temperature"] == pytest.approx(fit_temperature(val, data.y_val), rel=1e-3)
    assert cal["temperature"] != pytest.approx(fit_temperature(test, data.y_test), rel=1e-3)  # not the test split
    assert cal["calibrated_val_nll"] <= cal["val_nll"]
    expected = classification_metrics(calibrate(test, cal["temperature"]), data.y_test)
    for key, value in expected.items():
        assert cal["calibrated_metrics"][key] == pytest.approx(value, abs=1e-4), key
    for member in manifest["members"]:
        assert member["calibration"]["calibrated_val_nll"] <= member["calibration"]["val_nll"]
    curve = manifest["curve"]["calibration"]
    assert all(c <= r for c, r in zip(curve["calibrated_val_nll"], curve["val_nll"], strict=True))


def test_ensemble_eval_reports_the_exporters_temperatures(built_artifact: Path, tmp_path: Path) -> None:
    """`ensemble-eval` of the artifact's member checkpoints fits the same ensemble and member
    temperatures on the same validation split as the exporter, and writes them in its CSV."""
    from modeconn.training.ensembles.evaluate import evaluate_checkpoints

    manifest = json.loads((built_artifact / "manifest.json").read_text())
    sources = [Path(m["source"]) for m in manifest["members"]]
    result = evaluate_checkpoints(sources, device="cpu", out_dir=tmp_path)
    calibration = result["calibration"]
    exported = manifest["ensemble"]["calibration"]
    assert calibration["ensemble"]["temperature"] == pytest.approx(exported["temperature"], rel=1e-4)
    assert calibration["ensemble"]["calibrated_metrics"]["nll"] == pytest.approx(
        exported["calibrated_metrics"]["nll"], rel=1e-4)
    for got, member in zip(calibration["members"], manifest["members"], strict=True):
        assert got["temperature"] == pytest.approx(member["calibration"]["temperature"], rel=1e-4)
        assert got["calibrated_val_nll"] <= got["val_nll"]
    csv_text = (tmp_path / "ensemble.csv").read_text().splitlines()
    assert csv_text[0].endswith("temperature,calibrated_test_nll,calibrated_test_ece,calibrated_test_brier")
    assert csv_text[-1].startswith("ensemble,") and f"{calibration['ensemble']['temperature']}" in csv_text[-1]
