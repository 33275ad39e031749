"""The training step's options: mixed precision, channels_last,
the GradScaler for fp16, TensorBoard events, and their flags and errors.

Small runs: `fit` on 256 MNIST-1D signals of the demo data (cnn1d of width 8) or on 64
synthetic CIFAR-shaped images (PreResNet-8), and one comparison of bf16 with fp32 on the
demo's own cnn1d and data (training/core/step.py says what runs in which precision).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modeconn.models import build_model
from modeconn.training.cli import build_parser, config_from_args
from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.config import ConfigError, StepSettings, load_config
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import FitPlan, checkpoint_path, fit
from modeconn.training.core.step import AutocastStep, autocast_dtype, step_model

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "mnist1d.yaml"


def _small(data: Dataset, rows: int = 256) -> Dataset:
    return dataclasses.replace(data, x_train=data.x_train[:rows], y_train=data.y_train[:rows],
                               x_val=data.x_val[:0], y_val=data.y_val[:0], x_test=data.x_test[:0], y_test=data.y_test[:0])


def _fit(run_dir: Path, data: Dataset, step: StepSettings, *, epochs: int = 2, resume: bool = False,
         arch: str = "cnn1d", kwargs: dict[str, Any] | None = None, tensorboard: bool = False) -> tuple[torch.nn.Module, list]:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **(kwargs if kwargs is not None else {"width": 8}))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    plan = FitPlan(epochs=epochs, batch_size=64, learning_rate=lambda e, i: 0.05, seed=1, save_every=1, step=step,
                   tensorboard=tensorboard)
    fields = {"architecture": {"name": arch}, "dataset": {"name": data.name}}
    rows = fit(plan, run_dir=run_dir, model=model, optimizer=optimizer, data=data, checkpoint_fields=fields, resume=resume)
    return model, rows


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].is_floating_point())


# ---------------------------------------------------------------- the step
def test_autocast_step_runs_the_forward_in_bf16_and_returns_fp32(demo_data: Dataset) -> None:
    torch.manual_seed(0)
    model = build_model("cnn1d", num_classes=10).train()
    x, y = demo_data.x_train[:128], demo_data.y_train[:128]
    ref = F.cross_entropy(model(x), y)
    logits = AutocastStep(model, torch.bfloat16, channels_last=False)(x)
    low = F.cross_entropy(logits, y)
    # the loss is computed from fp32 logits; the forward really ran in bf16 (8 mantissa bits:
    # a relative difference of order 1e-3 to 1e-2, never exactly 0)
    assert logits.dtype == torch.float32
    assert 0 < abs(float(low.detach() - ref.detach())) / float(ref.detach()) < 2e-2
    # the parameters stay fp32 and receive fp32 gradients
    low.backward()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())


def test_a_curve_under_bf16_keeps_its_weights_and_l2_term_in_fp32() -> None:
    from modeconn.training.curves.model import CurveModel

    torch.manual_seed(0)
    ends = [build_model("cnn1d", num_classes=10, width=8).state_dict() for _ in range(2)]
    curve = CurveModel(build_model("cnn1d", num_classes=10, width=8), ends[0], ends[1], "bezier", 3).train()
    x, t = torch.randn(16, 40), torch.tensor(0.3)
    logits = AutocastStep(curve, torch.bfloat16, channels_last=False)(x, t)
    low_l2 = curve.last_l2
    reference = curve(x, t)
    assert low_l2.dtype == torch.float32 and torch.equal(low_l2, curve.last_l2)  # w(t) computed in fp32
    assert logits.dtype == torch.float32 and 0 < float((logits - reference).detach().abs().max()) < 0.05


def test_defaults_leave_the_step_model_untouched() -> None:
    model = torch.nn.Linear(3, 2)
    assert step_model(model, StepSettings(), torch.device("cpu"), "t") is model
    assert autocast_dtype("fp32", torch.device("cpu")) is None


# ---------------------------------------------------------------- bf16 against fp32 on the demo
@pytest.mark.slow
def test_bf16_training_of_the_demo_network_stays_near_fp32(tmp_path: Path) -> None:
    """The demo's cnn1d, config and data, 4 epochs (64 steps), seed 0, fp32 and bf16 on the CPU,
    at train.lr 0.1 (the numbers below were measured at it; the config's 0.4 is chosen for 30
    epochs; after 4 epochs at it bf16 - fp32 was 3.5 pp on the CI machine, 2026-12-07).

    Tolerance: bf16 must end within 3 pp test error and 0.1 test NLL of fp32 (12,000 test signals),
    and its last-epoch train loss within 5 %. Measured here (2026-12-02, paired bootstrap 95 %):
    after 4 epochs bf16 - fp32 = +1.27 pp [+0.60, +2.01], after 8 epochs +1.97 pp [+1.43, +2.56]
    (two fp32 seeds: -0.53 pp [-1.13, +0.06]): early in training bf16 lags; after the demo's
    full 30 epochs -0.03 pp [-0.45, +0.41], NLL +0.001 [-0.015, +0.015]: within noise. The full
    run is too long for a test; this bound catches a broken bf16 path (an fp16 loss, no fp32
    master weights, a diverging run), not a fraction of a percent."""
    from modeconn.training.train import train_network

    results = {}
    for precision in ("fp32", "bf16"):
        config = load_config(DEMO, {"device": "cpu", "train.epochs": 4, "train.save_every": 4,
                                    "train.lr": 0.1, "step.precision": precision})
        results[precision] = train_network(config, tmp_path / precision)
    fp32, bf16 = (results[p]["metrics"] for p in ("fp32", "bf16"))
    assert abs(bf16["test_error"] - fp32["test_error"]) < 3.0
    assert abs(bf16["test_nll"] - fp32["test_nll"]) < 0.1
    assert abs(bf16["train_loss"] / fp32["train_loss"] - 1) < 0.05
    weights = [load_checkpoint(Path(results[p]["checkpoint"]))["model"] for p in ("fp32", "bf16")]
    assert load_checkpoint(Path(results["bf16"]["checkpoint"]))["config"]["step"]["precision"] == "bf16"
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # bf16 really ran


# ---------------------------------------------------------------- fp16 and its GradScaler
def test_fp16_trains_with_a_grad_scaler_and_resumes_exactly(demo_data: Dataset, tmp_path: Path) -> None:
    """fp16 autocast on the CPU (torch 2.13 supports it) with dynamic loss scaling: the scaler's
    state goes into every checkpoint, and a run resumed after epoch 1 ends with the same weights
    as the uninterrupted run (the scale is restored, not restarted at 65536)."""
    data, fp16 = _small(demo_data, 128), StepSettings(precision="fp16")  # CPU fp16 convolutions are slow
    whole, rows = _fit(tmp_path / "whole", data, fp16)
    state = load_checkpoint(checkpoint_path(tmp_path / "whole", 2))
    assert state["step"] == fp16.model_dump()
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] == 4  # 2 epochs × 2 steps, none skipped
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    fp32, _ = _fit(tmp_path / "fp32", data, StepSettings())
    assert 0 < _max_diff(whole, fp32) < 0.05  # fp16 rounding moved the weights a little, no more

    resumed_dir = tmp_path / "resumed"  # the whole run as a kill after epoch 1 would have left it
    shutil.copytree(tmp_path / "whole", resumed_dir)
    checkpoint_path(resumed_dir, 2).unlink()
    resumed, _ = _fit(resumed_dir, data, fp16, resume=True)
    assert _max_diff(resumed, whole) == 0.0


# ---------------------------------------------------------------- channels_last
def test_channels_last_image_model_matches_the_default_layout(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    data = Dataset("synthetic", x, y, x[:0], y[:0], x[:0], y[:0], [0.5] * 3, [0.25] * 3,
                   [str(i) for i in range(10)], augment="crop_flip")
    arch = {"arch": "preresnet", "kwargs": {"depth": 8}}
    nhwc, _ = _fit(tmp_path / "nhwc", data, StepSettings(channels_last=True), epochs=1, **arch)
    nchw, _ = _fit(tmp_path / "nchw", data, StepSettings(), epochs=1, **arch)
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # the same arithmetic in another order: float rounding only (one step at lr 0.05)
    assert _max_diff(nhwc, nchw) < 1e-4


def test_channels_last_refuses_non_image_data(demo_data: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"step\.channels_last.*2-D"):
        _fit(tmp_path / "run", _small(demo_data, 64), StepSettings(channels_last=True), epochs=1)


# ---------------------------------------------------------------- TensorBoard
def test_tensorboard_events_hold_the_metric_rows(demo_data: Dataset, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    _fit(run_dir, _small(demo_data), StepSettings(), tensorboard=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {k for k in rows[0] if k != "epoch"}
    for tag in tags:
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        # TensorBoard stores float32: the row's value rounded to float32, exactly
        assert logged == [(r["epoch"], float(np.float32(r[tag]))) for r in rows]


def test_tensorboard_missing_package_is_a_clear_error(demo_data: Dataset, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match=r"tensorboard: true needs the tensorboard package"):
        _fit(tmp_path / "run", _small(demo_data, 64), StepSettings(), epochs=1, tensorboard=True)


# ---------------------------------------------------------------- flags and settings
@pytest.mark.parametrize("command", ["train", "fge", "sse", "compare"])
def test_flags_set_the_step_settings(command: str) -> None:
    extra = ["--from", "x.pt"] if command == "fge" else []
    args = build_parser().parse_args([command, *extra, "--precision", "bf16", "--channels-last", "--compile",
                                      "--tensorboard"])
    config = config_from_args(args)
    assert config.step == StepSettings(precision="bf16", channels_last=True, compile=True)
    assert config.tensorboard is True
    plain = config_from_args(build_parser().parse_args([command, *extra]))
    assert plain.step == StepSettings() and plain.tensorboard is False


def test_unknown_precision_names_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"step\.precision"):
        load_config(DEMO, {"step.precision": "fp8"})
