"""`modeconn layer-barrier`: where along the network a barrier between two networks lives.

For each group of parameters (a layer: every module that owns parameters; or a block: every
top-level child of the network), only that group is interpolated between A and B while every
other parameter stays A's: θ_g(α) = A with group g at (1 − α)·A_g + α·B_g. At each α the BN
statistics are recomputed on the training split, then train loss and held-out error are
measured. A group's barrier is the largest rise above the straight line between its own ends,
max_α [m(θ_g(α)) − ((1 − α)·m(θ_g(0)) + α·m(θ_g(1)))] (the layer-wise barrier of Adilova et
al., ICLR 2024), in train NLL and in held-out error; θ_g(1) is A with B's group g, which may
itself be a poor network, and is reported beside it. The row `(all)` interpolates every
parameter at once: the ordinary straight line between A and B. With `--align`, B's hidden
units are first permuted to match A's (weight matching, training/curves/align.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modeconn.training.core import progress
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from modeconn.training.core.config import ConfigError
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import resolve_device
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import (
    build_network,
    load_data,
    predict_probs,
    weights_mismatch,
)
from modeconn.training.core.reports import csv_text, png_bytes, pyplot
from modeconn.training.core.runs import check_report_folder
from modeconn.training.core.sources import check_same_network
from modeconn.training.core.statistics import Interval, bootstrap_max_of_means, per_example_losses
from modeconn.training.curves.align import align_states, network_checkpoint

ALL = "(all)"
OUTPUTS = ("layer_barrier.json", "layer_barrier.csv", "layer_barrier.png")


def parameter_groups(model: nn.Module, by: str = "layer") -> dict[str, list[str]]:
    """Parameter names by group, in the network's order: every module that owns parameters
    ("layer"), or every top-level child ("block"); together they hold every parameter once."""
    if by not in ("layer", "block"):
        raise ConfigError(f"--by must be layer or block, not {by!r}")
    groups: dict[str, list[str]] = {}
    if by == "layer":
        for name, module in model.named_modules():
            own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
            if own:
                groups[name or "(root)"] = own
    else:
        for name, child in model.named_children():
            if params := [f"{name}.{p}" for p, _ in child.named_parameters()]:
                groups[name] = params
        if own := [p for p, _ in model.named_parameters(recurse=False)]:
            groups["(root)"] = own
    return groups


def mixed_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str], alpha: float) -> dict[str, torch.Tensor]:
    """A's state with the parameters `keys` at (1 − α)·A + α·B (buffers: A's, recomputed later)."""
    state = dict(a)
    for key in keys:
        state[key] = torch.lerp(a[key].float(), b[key].float(), alpha).to(a[key].dtype)
    return state


@torch.no_grad()
def point_metrics(model: nn.Module, state: dict[str, torch.Tensor], data: Dataset,
                  split: str) -> tuple[dict[str, float], np.ndarray]:
    """Train NLL and `split` NLL / error of `model` holding `state`, BN recomputed on the train
    split; and the per-example `split` errors (0 or 100) the barrier's interval is drawn from."""
    model.load_state_dict(state)
    recompute_bn(model, data).eval()
    train = classification_metrics(predict_probs(model, data, "train"), data.y_train)
    probs, labels = predict_probs(model, data, split), data.labels(split)
    held = classification_metrics(probs, labels)
    errors = per_example_losses(probs, labels)["error"]
    return {"train_nll": train["nll"], f"{split}_nll": held["nll"], f"{split}_error": held["error"]}, errors


def barrier(values: list[float], alphas: np.ndarray) -> tuple[float, float]:
    """(largest rise of `values` above the line between its ends, the α where it is)."""
    v = np.asarray(values, dtype=np.float64)
    rise = v - ((1 - alphas) * v[0] + alphas * v[-1])
    i = int(np.argmax(rise))
    return float(rise[i]), float(alphas[i])


def barrier_interval(errors: np.ndarray, alphas: np.ndarray) -> Interval:
    """The error barrier with its paired bootstrap interval over the held-out examples: per
    example, the rise of its error (0 or 100) above the line between the path's ends, at each α
    [points, n]; the barrier is the largest mean rise, resampled with the same examples at every α."""
    rise = errors - ((1 - alphas)[:, None] * errors[0] + alphas[:, None] * errors[-1])
    return bootstrap_max_of_means(rise)


def check_settings(points: int, split: str, data: Dataset) -> None:
    if points < 2:
        raise ConfigError(f"--points must be at least 2, got {points}")
    if split == "val" and not len(data.y_val):
        raise ConfigError("--split val: the networks' data has no validation split")


def layer_barriers(model: nn.Module, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], data: Dataset,
                   points: int = 11, by: str = "layer", split: str = "test") -> dict[str, Any]:
    """The barrier of every parameter group of `model` (and of all at once) between the
    states `a` and `b`, with the metrics at each α."""
    check_settings(points, split, data)
    groups = {**parameter_groups(model, by), ALL: [name for name, _ in model.named_parameters()]}
    alphas = np.linspace(0.0, 1.0, points)
    rows, curves = [], {}
    a_point = point_metrics(model, a, data, split)  # α = 0 is A for every group
    with progress.task("layer-barrier", len(groups) * (points - 1)) as advance:
        for name, keys in groups.items():
            seen = [a_point]
            for alpha in alphas[1:]:
                seen.append(point_metrics(model, mixed_state(a, b, keys, float(alpha)), data, split))
                advance(status=name)
            curves[name] = {metric: [m[metric] for m, _ in seen] for metric in seen[0][0]}
            loss_barrier, loss_at = barrier(curves[name]["train_nll"], alphas)
            error_barrier, error_at = barrier(curves[name][f"{split}_error"], alphas)
            interval = barrier_interval(np.stack([e for _, e in seen]), alphas)
            rows.append({
                "group": name, "parameters": sum(a[k].numel() for k in keys),
                "train_nll_barrier": loss_barrier, "train_nll_barrier_alpha": loss_at,
                f"{split}_error_barrier": error_barrier, f"{split}_error_barrier_alpha": error_at,
                f"{split}_error_barrier_low": interval.low, f"{split}_error_barrier_high": interval.high,
                f"{split}_error_max": max(curves[name][f"{split}_error"]),
                f"{split}_error_at_1": curves[name][f"{split}_error"][-1],
            })
    return {"by": by, "split": split, "alphas": alphas.tolist(), "groups": rows, "curves": curves,
            "start": a_point[0], "interval": "95 % paired bootstrap over the held-out examples (1000 resamples, "
            "seed 0), the same resampled examples at every α: test sampling only, not training randomness"}


def evaluate_layer_barriers(start: Path, end: Path, out_dir: Path, points: int = 11, by: str = "layer",
                            split: str = "test", align: bool = False, device: str = "auto") -> dict[str, Any]:
    """`modeconn layer-barrier`: `layer_barriers` of two network checkpoints, written as
    layer_barrier.json/.csv/.png in `out_dir`."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    a_state, b_state = network_checkpoint(Path(start)), network_checkpoint(Path(end))
    check_same_network([(Path(start), a_state), (Path(end), b_state)], CheckpointError)
    b_weights = align_states(a_state, b_state, start, end)[0] if align else b_state["model"]
    dev = resolve_device(device)
    model = build_network(a_state["architecture"], a_state["dataset"]["num_classes"], dev)
    for path, weights in ((start, a_state["model"]), (end, b_weights)):
        if (problem := weights_mismatch(model, weights)) is not None:
            raise CheckpointError(f"{path}: weights do not fit architecture {a_state['architecture']}: {problem}")
    data = load_data(a_state["dataset"], dev)
    check_settings(points, split, data)
    parameter_groups(model, by)  # a bad --by fails here, before the report folder is made
    check_report_folder(out_dir, OUTPUTS)  # never over a user's files
    a = {k: v.to(dev) for k, v in a_state["model"].items()}
    b = {k: v.to(dev) for k, v in b_weights.items()}
    report = layer_barriers(model, a, b, data, points=points, by=by, split=split)
    report.update(start_checkpoint=str(start), end_checkpoint=str(end), aligned=align,
                  held_out_size=len(getattr(data, f"y_{split}")))
    json_path, csv_path, png_path = (out_dir / name for name in OUTPUTS)
    atomic_write_json(json_path, report)
    atomic_write_text(csv_path, csv_text(list(report["groups"][0]), report["groups"]))
    atomic_write_bytes(png_path, _plot(report))
    seconds = time.perf_counter() - started
    _log(report, seconds)
    return {"json": str(json_path), "csv": str(csv_path), "png": str(png_path), "seconds": seconds,
            "groups": report["groups"]}


def _log(report: dict[str, Any], seconds: float) -> None:
    split = report["split"]
    progress.log(f"layer-barrier by {report['by']}, {len(report['alphas'])} points, BN recomputed at each "
                 f"({report['held_out_size']} {split} examples; {seconds:.1f}s):")
    progress.log(f"  {'group':<28} {'params':>9} {'train NLL barrier':>18} {split + ' error barrier, pp [95 %]':>30} "
                 f"{'A with B' + chr(39) + 's group, %':>20}")
    for r in report["groups"]:
        shown = f"{r[f'{split}_error_barrier']:.2f} [{r[f'{split}_error_barrier_low']:.2f}, " \
                f"{r[f'{split}_error_barrier_high']:.2f}]"
        progress.log(f"  {r['group']:<28} {r['parameters']:>9} {r['train_nll_barrier']:>18.4f} {shown:>30} "
                     f"{r[f'{split}_error_at_1']:>20.2f}")


def _plot(report: dict[str, Any]) -> bytes:
    plt = pyplot()
    split, rows = report["split"], report["groups"]
    names = [r["group"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(rows) + 4), 4.2), sharey=False)
    for ax, key, label in ((axes[0], "train_nll_barrier", "train NLL barrier"),
                           (axes[1], f"{split}_error_barrier", f"{split} error barrier (pp)")):
        values = [r[key] for r in rows]
        ax.bar(range(len(rows)), values, color=["tab:gray" if n == ALL else "tab:blue" for n in names])
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(label, fontsize=10)
    fig.suptitle(f"one {report['by']} interpolated at a time" + (" (B aligned to A)" if report.get("aligned") else ""),
                 fontsize=10)
    fig.tight_layout()
    return png_bytes(fig)
