"""The graphs the exporter writes: input normalisation inside every graph, a member, all
members fused in one graph, the curve with t as an input (BN statistics interpolated on a grid),
and writing them as ONNX files that carry the class names."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from modeconn.contract.onnx_refs import CLASS_NAMES_KEY
from modeconn.training.core import progress
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.data import Dataset, normalization_tensors
from modeconn.training.core.networks import predict_probs
from modeconn.training.curves.model import COEFFICIENTS, CurveModel, even_ts, network_at

OPSET = 18


# ---------------------------------------------------------------- graph modules
class Normalize(nn.Module):
    """The data set's normalisation, inside the graph, so clients send raw inputs."""

    def __init__(self, mean: list[float], std: list[float], ndim: int) -> None:
        super().__init__()
        m, s = normalization_tensors(mean, std, ndim)
        self.register_buffer("mean", m)
        self.register_buffer("std", s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MemberGraph(nn.Module):
    """One network: softmax of its logits on normalised inputs, 1D convolutions run as 2D
    (conv1d_as_2d: 1.6-2.4x faster on the demo at batch 64 and 1024 on 2 CPU cores)."""

    def __init__(self, net: nn.Module, normalize: Normalize) -> None:
        super().__init__()
        self.net, self.normalize = conv1d_as_2d(net), normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(self.normalize(x)), dim=1)


class EnsembleGraph(nn.Module):
    """All members in one graph: the mean of their softmax outputs, and each member's.

    The members run one after another inside the graph, each with its 1D convolutions run
    as 2D ones of height 1 (onnxruntime's fast blocked-layout (NCHWc) CPU convolutions are
    2D only). The design shipped before it, the members stacked into one K-times-wide
    network of grouped convolutions (benchmarks/ensemble_designs.py), is as fast on 2 CPU
    cores at batch 64 and 1024 and faster at batch 1, but ran at 0.17x the member loop on
    an H100 at batch 1024 (cuDNN's grouped convolutions) and was bimodal at batch 1 on
    CIFAR shapes; members in turn run the same kernels as the member graphs on any
    provider. Measured fairly (every session's thread spinning off, or each way in its own
    process) it is about as fast as the loop over K member sessions at batch 64 and 1024
    (benchmarks/results/curve_inference-*); the 2x once reported came from the member
    sessions' spinning thread pools slowing each other. What it gives is one call, one
    thread pool and every member's probabilities from one graph.
    """

    def __init__(self, nets: list[nn.Module], normalize: Normalize) -> None:
        super().__init__()
        self.nets, self.normalize = nn.ModuleList(conv1d_as_2d(net) for net in nets), normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.normalize(x)
        member_probs = torch.stack([torch.softmax(net(z), dim=1) for net in self.nets])
        return member_probs.mean(dim=0), member_probs


class Conv2dOfHeight1(nn.Module):
    """A Conv1d computed as a Conv2d over [N, C, 1, L]: the same numbers, the 2D kernels."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        # the Conv1d's own parameters, same names and shapes: the state dict stays the network's
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.out_channels = conv.out_channels
        self.stride, self.dilation, self.groups = (1, *conv.stride), (1, *conv.dilation), conv.groups
        self.padding = conv.padding if isinstance(conv.padding, str) else (0, *conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.conv2d(x.unsqueeze(2), self.weight.unsqueeze(2), self.bias, self.stride, self.padding,
                         self.dilation, self.groups)
        return y.squeeze(2)


def conv1d_as_2d(net: nn.Module) -> nn.Module:
    """`net` itself when it has no Conv1d, else an eval-mode copy whose Conv1d layers run as 2D ones."""
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv1d) and m.padding_mode == "zeros"]
    if not convs:
        return net
    if "" in convs:
        return Conv2dOfHeight1(net)
    net = copy.deepcopy(net).eval()
    for name in convs:
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent), attr, Conv2dOfHeight1(net.get_submodule(name)))
    return net


class CurveGraph(nn.Module):
    """φ(t) for any t: weights = coefficients(t) @ control points; BN statistics
    interpolated linearly between the two nearest of `grid` precomputed points."""

    def __init__(self, curve: CurveModel, bn_grid: dict[str, torch.Tensor], grid_points: int, normalize: Normalize) -> None:
        super().__init__()
        self.base = network_at(curve, 0.0).eval()
        self.curve_type, self.num_bends = curve.curve, curve.num_bends
        self.names, self.shapes, self.sizes = curve.names, curve.shapes, curve.sizes
        self.register_buffer("points", curve.control_points())
        # exact integers 0..n-1: a float32 linspace scaled by n-1 is off by an ulp, and the hat
        # weights at a grid t then sum to 1 - 1e-6 (1e-5 in the probabilities)
        self.register_buffer("grid", torch.arange(grid_points, dtype=torch.float32))
        self.bn_names = list(bn_grid)
        for i, name in enumerate(self.bn_names):
            self.register_buffer(f"bn_{i}", bn_grid[name])  # [grid_points, C]
        self.normalize = normalize

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(())
        flat = COEFFICIENTS[self.curve_type](t, self.num_bends) @ self.points
        weights = {n: w.view(s) for n, w, s in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}
        hat = torch.relu(1 - (t * (self.grid.shape[0] - 1) - self.grid).abs())  # [grid_points]
        stats = {name: hat @ getattr(self, f"bn_{i}") for i, name in enumerate(self.bn_names)}
        return torch.softmax(functional_call(self.base, {**weights, **stats}, (self.normalize(x),)), dim=1)


@dataclass
class BnGrid:
    """What the exporter computes at each grid t of the curve, with BN recomputed exactly there."""

    statistics: dict[str, torch.Tensor]  # per BN buffer, [grid_points, C]
    exact: torch.Tensor  # probabilities on the parity inputs, [grid_points, N, C]: the gate's reference
    val_probs: list[torch.Tensor]  # validation probabilities at each t (empty without a validation split)


@torch.no_grad()
def bn_statistics_grid(
    curve: CurveModel, data: Dataset, grid_points: int, x_check: torch.Tensor, normalize: Normalize
) -> BnGrid:
    """BN running mean/var recomputed at `grid_points` evenly spaced t, stacked per buffer; the
    exactly recomputed network's probabilities on `x_check` (what the parity gate holds the
    curve graph to) and on the validation split (what T(t) is fitted on) at each t."""
    rows: dict[str, list[torch.Tensor]] = {}
    exact, val = [], []
    with progress.task("BN statistics along the curve", grid_points) as advance:
        for t in even_ts(grid_points):
            net = recompute_bn(network_at(curve, t), data).eval()
            for name, buf in net.named_buffers():
                if name.endswith(("running_mean", "running_var")):
                    rows.setdefault(name, []).append(buf.clone())
            exact.append(torch.softmax(net(normalize(x_check)), dim=1))
            if len(data.y_val):
                val.append(predict_probs(net, data, "val"))
            advance()
    return BnGrid({name: torch.stack(values) for name, values in rows.items()}, torch.stack(exact), val)


# ---------------------------------------------------------------- ONNX and parity
def export_onnx(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str]) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic = {"x": {0: batch}, **({"t": None} if "t" in inputs else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    # the exporter warns about every torchvision op it cannot find; none is used here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), args, str(path), input_names=inputs, output_names=outputs, opset_version=OPSET,
            dynamic_shapes=dynamic, dynamo=True, external_data=False, verbose=False,
        )


def with_class_names(path: Path, class_names: list[str]) -> Path:
    """The graph at `path` with the class names in its metadata, for the service's start-up check."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {CLASS_NAMES_KEY: json.dumps(list(class_names))})
    onnx.save(model, str(path))
    return path
