"""A small but honest artifact per docs/manifest.md, for the serving tests.

`build_test_artifact(out_dir)` is the one entry point; it is meant to be swapped for the real
exporter (training/export.py) later, so it keeps the graph input/output names exactly as the
contract says. Members are small MLPs trained for a few steps on a synthetic 10-class
problem (inputs [40]); the curve is a quadratic Bezier between member 0 and member K-1
through a trained-free middle point: W(t) = (1-t)^2 W0 + 2t(1-t) Wtheta + t^2 W1.
"""

from __future__ import annotations

import datetime as dt
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from serving.artifact import file_record, load_artifact

INPUT_SHAPE = (40,)
NUM_CLASSES = 10
NUM_MEMBERS = 3
HIDDEN = 32
INPUT_RANGE = (-4.1, 4.3)
OPSET = 18
_MEAN, _STD = 0.1, 1.3  # input normalisation baked into every graph


def _synthetic_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centers = torch.randn(NUM_CLASSES, *INPUT_SHAPE, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    x = centers[y] + 1.5 * torch.randn(n, *INPUT_SHAPE, generator=generator)
    return x.clamp(*INPUT_RANGE), y


def _mlp_forward(x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    w1, b1, w2, b2 = params
    h = (x - _MEAN) / _STD
    return F.linear(torch.relu(F.linear(h, w1, b1)), w2, b2)


class _Member(nn.Module):
    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(p.detach().clone()) for p in params])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(_mlp_forward(x, list(self.params)), dim=-1)


class _Ensemble(nn.Module):
    def __init__(self, members: list[_Member]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = torch.stack([m(x) for m in self.members])  # [K, N, C]
        return stacked.mean(dim=0), stacked


class _BezierCurve(nn.Module):
    def __init__(self, controls: list[list[torch.Tensor]]) -> None:
        super().__init__()
        # one stacked tensor [3, *shape] per parameter: (w0, theta, w1)
        self.controls = nn.ParameterList(
            [nn.Parameter(torch.stack([c[i] for c in controls])) for i in range(len(controls[0]))]
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        coeffs = torch.cat([(1 - t) ** 2, 2 * t * (1 - t), t**2])  # [3]
        params = [torch.tensordot(coeffs, c, dims=1) for c in self.controls]
        return torch.softmax(_mlp_forward(x, params), dim=-1)


def _train_member(seed: int, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = [
        torch.randn(HIDDEN, INPUT_SHAPE[0], generator=g) / INPUT_SHAPE[0] ** 0.5,
        torch.zeros(HIDDEN),
        torch.randn(NUM_CLASSES, HIDDEN, generator=g) / HIDDEN**0.5,
        torch.zeros(NUM_CLASSES),
    ]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(_mlp_forward(x, params), y).backward()
        opt.step()
    return [p.detach() for p in params]


def _metrics(probs: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    conf, pred = probs.max(dim=1)
    correct = (pred == y).float()
    nll = -torch.log(probs[torch.arange(len(y)), y].clamp_min(1e-12)).mean()
    bins = torch.linspace(0, 1, 16)
    ece = torch.zeros(())
    for lo, hi in zip(bins[:-1], bins[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.float().mean() * (conf[mask].mean() - correct[mask].mean()).abs()
    return {
        "error": round(100.0 * (1 - correct.mean().item()), 4),
        "nll": round(nll.item(), 6),
        "ece": round(ece.item(), 6),
    }


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    # The TorchScript exporter (dynamo=False) is deprecated but exports these tiny graphs in
    # milliseconds instead of seconds; the real exporter makes its own choice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        _torch_export(module, args, path, inputs, outputs)
    onnx.checker.check_model(str(path))


def _torch_export(
    module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]
) -> None:
    torch.onnx.export(
        module,
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        opset_version=OPSET,
        dynamo=False,
        dynamic_axes={
            "x": {0: "N"},
            **{o: ({1: "N"} if o == "member_probabilities" else {0: "N"}) for o in outputs},
        },
    )


def build_test_artifact(out_dir: Path) -> Path:
    """Write a complete artifact (members, ensemble, curve, manifest) into `out_dir`."""
    # These tensors are tiny: one thread is several times faster than two fighting over
    # a busy 2-core CI box. Restored afterwards, other tests share this process.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(Path(out_dir))
    finally:
        torch.set_num_threads(threads)


def _build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    x_train, y_train = _synthetic_data(1024, g)
    x_test, y_test = _synthetic_data(1024, g)

    member_params = [_train_member(seed, x_train, y_train) for seed in range(NUM_MEMBERS)]
    members = [_Member(p) for p in member_params]
    ensemble = _Ensemble(members)
    theta = [
        0.5 * (a + b) + 0.05 * torch.randn(a.shape, generator=g)
        for a, b in zip(member_params[0], member_params[-1], strict=True)
    ]
    curve = _BezierCurve([member_params[0], theta, member_params[-1]])

    example = torch.zeros(2, *INPUT_SHAPE)
    files: list[str] = []
    for k, member in enumerate(members):
        rel = f"members/member-{k:03d}.onnx"
        _export(member, (example,), out_dir / rel, ["x"], ["probabilities"])
        files.append(rel)
    _export(
        ensemble,
        (example,),
        out_dir / "ensemble.onnx",
        ["x"],
        ["probabilities", "member_probabilities"],
    )
    _export(
        curve, (example, torch.tensor([0.5])), out_dir / "curve.onnx", ["x", "t"], ["probabilities"]
    )
    files += ["ensemble.onnx", "curve.onnx"]

    with torch.no_grad():
        member_metrics = [_metrics(m(x_test), y_test) for m in members]
        ensemble_metrics = _metrics(ensemble(x_test)[0], y_test)
        grid = torch.linspace(0, 1, 11)
        curve_errors = [_metrics(curve(x_test, t.reshape(1)), y_test)["error"] for t in grid]
        line = _BezierCurve(
            [
                member_params[0],
                [0.5 * (a + b) for a, b in zip(member_params[0], member_params[-1], strict=True)],
                member_params[-1],
            ]
        )
        line_errors = [_metrics(line(x_test, t.reshape(1)), y_test)["error"] for t in grid]

    manifest = {
        "format_version": 1,
        "name": "modeconn-test",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {"modeconn": "0.1.0", "torch": torch.__version__, "onnx": onnx.__version__},
        "architecture": {"name": "mlp", "kwargs": {"hidden": HIDDEN}},
        "dataset": {
            "name": "synthetic-gaussians",
            "num_classes": NUM_CLASSES,
            "class_names": [f"class-{i}" for i in range(NUM_CLASSES)],
        },
        "input": {"shape": list(INPUT_SHAPE), "dtype": "float32", "range": list(INPUT_RANGE)},
        "files": {rel: file_record(out_dir / rel) for rel in files},
        "members": [
            {"file": files[k], "source": f"synthetic/member-{k}", "metrics": member_metrics[k]}
            for k in range(NUM_MEMBERS)
        ],
        "ensemble": {
            "file": "ensemble.onnx",
            "num_members": NUM_MEMBERS,
            "kind": "independent",
            "settings": {"train_steps": 60},
            "metrics": ensemble_metrics,
        },
        "curve": {
            "file": "curve.onnx",
            "type": "bezier",
            "num_bends": 3,
            "bn_grid_points": 0,
            "settings": {"endpoints": [files[0], files[NUM_MEMBERS - 1]]},
            "metrics": {
                "max_test_error": float(np.max(curve_errors)),
                "line_max_test_error": float(np.max(line_errors)),
            },
        },
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    load_artifact(out_dir)  # the builder checks what it wrote, like the real exporter
    return out_dir
