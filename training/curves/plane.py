"""`modeconn plane`: train loss and test error over the plane through three networks.

The plane through w0, θ and w1 (a 3-bend curve's bends, or any three networks with
`--points A B C`) has the orthonormal basis of the official dnn-mode-connectivity plane.py:
u = (w1 − w0) / |w1 − w0| and v = the component of θ − w0 orthogonal to u, normalised. A
point (x, y) of the plane is the network w0 + x u + y v (parameters only; its BatchNorm
statistics are recomputed on the training split at every point with training/core/bn.py, so
they are those of that network, exactly). x and y are distances in weight space, so the
plot's geometry is the true one; w0 is at (0, 0), w1 at (|w1 − w0|, 0), θ at ((θ − w0)·u, dy).

The grid. The official code spans [−m, 1 + m] in units of |w1 − w0| (and of dy) with G evenly
spaced values, so the three networks generally fall between grid points (at the defaults
G = 21, m = 0.2, w0 sits 2.86 steps from the edge), and the values printed "at" them are
interpolated. Here each axis is G evenly spaced values over the points' extent plus the margin
m on each side (as a fraction of that extent), and the values nearest to the points'
coordinates (x: 0, x_θ, |w1 − w0|; y: 0, dy) are moved onto them exactly: the grid stays
rectangular, the moved lines are at most half a step off the even spacing, and the values
at w0, θ and w1 are those of the networks themselves (their weights rebuilt to float rounding).

At every point: the train loss (NLL + ½·wd·‖w‖²), train NLL and error, and the NLL and error on
the test split (or, with split="val", on the validation split: the official script's default,
and on the demo 1,000 signals instead of 12,000). Arrays are indexed [i, j] = (xs[i], ys[j]), as
the official plane.npz.
"""

from __future__ import annotations

import copy
import io
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import vector_to_parameters

from modeconn.contract.errors import ModeconnError
from modeconn.training.core import progress
from modeconn.training.core.bn import has_batchnorm, recompute_bn
from modeconn.training.core.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import resolve_device
from modeconn.training.core.metrics import error_percent, nll
from modeconn.training.core.networks import load_data, load_network, predict_probs
from modeconn.training.core.parallel import map_side_by_side, workers_for
from modeconn.training.core.reports import csv_text, png_bytes, pyplot
from modeconn.training.core.runs import check_report_folder
from modeconn.training.core.sources import check_same_network
from modeconn.training.curves.fit import curve_file, load_curve
from modeconn.training.curves.model import CurveModel, flatten_parameters, network_at

OUTPUTS = ("plane.json", "plane.csv", "plane.npz", "plane.png")
METRICS = ("train_loss", "train_nll", "train_error", "test_nll", "test_error")
SPLITS = ("test", "val")  # where the error is measured; val: the official plane.py's default, fewer examples


def metric_names(split: str = "test") -> tuple[str, ...]:
    return (*METRICS[:3], f"{split}_nll", f"{split}_error")
CURVE_POINTS = 61


class PlaneError(ModeconnError):
    """A plane that cannot be made as asked (grid, margin, or the three networks)."""


@dataclass(frozen=True)
class PlaneBasis:
    """The plane's origin w0 and orthonormal directions u, v (float64 vectors of all parameters)."""

    origin: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    dx: float  # |w1 − w0|
    dy: float  # θ's distance from the line
    x_theta: float  # (θ − w0)·u

    def bends(self) -> np.ndarray:
        """[3, 2] coordinates of w0, θ, w1, exact by construction (a projection would put w1 at a
        y of order 1e-17 instead of 0)."""
        return np.array([[0.0, 0.0], [self.x_theta, self.dy], [self.dx, 0.0]])

    def coordinates(self, w: torch.Tensor) -> tuple[float, float]:
        d = w.double() - self.origin
        return float(d @ self.u), float(d @ self.v)

    def point(self, x: float, y: float) -> torch.Tensor:
        return self.origin + x * self.u + y * self.v


def plane_basis(w0: torch.Tensor, theta: torch.Tensor, w1: torch.Tensor) -> PlaneBasis:
    """u = (w1 − w0)/|w1 − w0|, v = the normalised part of θ − w0 orthogonal to u (float64)."""
    w0, theta, w1 = (w.detach().double() for w in (w0, theta, w1))
    u = w1 - w0
    dx = float(u.norm())
    if dx == 0.0:
        raise PlaneError("w0 and w1 are the same network: the plane needs two different ends")
    u = u / dx
    v = theta - w0
    x_theta = float(v @ u)
    v = v - x_theta * u
    dy = float(v.norm())
    # float32 weights round at ~6e-8 of their norm: a θ closer to the line than that spans no plane
    if dy <= 1e-6 * max(float(w.norm()) for w in (w0, theta, w1)):
        raise PlaneError("θ lies on the straight line through w0 and w1: the three networks span no plane")
    return PlaneBasis(w0, u, v / dy, dx, dy, x_theta)


def grid_axis(specials: list[float], margin: float, points: int) -> np.ndarray:
    """`points` evenly spaced values over [min − m·span, max + m·span] (span = max − min of
    `specials`), with the values nearest to each special coordinate moved onto it exactly
    (in order, each to its own value)."""
    wanted = sorted(set(specials))
    if points < len(wanted):
        raise PlaneError(f"--grid {points} is too small: {len(wanted)} networks need their own grid lines")
    low, high = wanted[0], wanted[-1]
    span = high - low
    values = np.linspace(low - margin * span, high + margin * span, points)
    step = values[1] - values[0]
    previous = -1
    for n, s in enumerate(wanted):
        nearest = round((s - values[0]) / step)
        index = min(max(nearest, previous + 1), points - (len(wanted) - n))  # room for the ones after
        values[index] = s
        previous = index
    if not np.all(np.diff(values) > 0):  # only for coordinates closer than float rounding
        raise PlaneError("two of the three networks are too close together to get grid lines of their own")
    return values


@dataclass
class PlaneSource:
    """The three networks of a plane and what to draw on it."""

    template: nn.Module  # a network of the architecture; its parameters are overwritten per point
    points: list[torch.Tensor]  # w0, θ, w1 (flat parameters)
    labels: list[str]
    dataset: dict[str, Any]
    weight_decay: float
    curve: CurveModel | None  # drawn when the plane is a curve's
    description: str


def curve_source(path: Path, device: torch.device) -> PlaneSource:
    """The bends of a 3-bend curve run."""
    curve, state = load_curve(Path(path), device)
    if curve.num_bends != 3:
        raise PlaneError(f"{curve_file(Path(path))} is a curve with {curve.num_bends} bends; the plane through "
                         "w0, θ and w1 needs a curve with 3 bends (or pass --points A B C)")
    bends = curve.control_points()
    return PlaneSource(network_at(curve, 0.0), [bends[0], bends[1], bends[2]], ["w0", "θ", "w1"], state["dataset"],
                       float(state["curve"].get("weight_decay", 0.0)), curve,
                       f"{state['curve']['curve']} curve {curve_file(Path(path))}")


def points_source(paths: list[Path], device: torch.device) -> PlaneSource:
    """Three network checkpoints of one architecture and data set (independent runs, FGE snapshots)."""
    if len(paths) != 3:
        raise PlaneError(f"--points takes three checkpoints, got {len(paths)}")
    nets, states = zip(*(load_network(p, device) for p in paths), strict=True)
    check_same_network(list(zip(paths, states, strict=True)), PlaneError)
    names = [n for n, _ in nets[0].named_parameters()]
    flats = [flatten_parameters(dict(net.named_parameters()), names) for net in nets]
    # the train loss adds the L2 term of the first network's training run, when it is known
    weight_decay = float(((states[0].get("config") or {}).get("train") or {}).get("weight_decay", 0.0))
    return PlaneSource(nets[0], flats, [str(p) for p in paths], states[0]["dataset"], weight_decay, None,
                       "networks " + ", ".join(map(str, paths)))


@torch.no_grad()
def evaluate_network(net: nn.Module, data: Dataset, weight_decay: float, split: str = "test") -> dict[str, float]:
    """Train loss (NLL + ½·wd·‖w‖², as the official plane.py), train NLL and error, and NLL and
    error on `split` (test or val) of `net` with its BN statistics recomputed on the training split."""
    if has_batchnorm(net):
        recompute_bn(net, data)
    net.eval()
    train = predict_probs(net, data, "train").double()
    held_out = predict_probs(net, data, split).double()
    labels = data.labels(split)
    l2 = float(sum((p.double() ** 2).sum() for p in net.parameters()))
    train_nll = nll(train, data.y_train)
    return {"train_loss": train_nll + 0.5 * weight_decay * l2, "train_nll": train_nll,
            "train_error": error_percent(train, data.y_train),
            f"{split}_nll": nll(held_out, labels), f"{split}_error": error_percent(held_out, labels)}


def evaluate_plane(source: PlaneSource, basis: PlaneBasis, xs: np.ndarray, ys: np.ndarray,
                   data: Dataset, workers: int | None = None, split: str = "test") -> dict[str, np.ndarray]:
    """Every metric at every grid point, [len(xs), len(ys)] arrays, with a progress bar; `workers`
    points side by side (default: core/parallel.workers_for), each thread on its own copy of the network."""
    workers = workers or workers_for(source.template, data.device, data.streamed)
    cells = [(i, j) for i in range(len(xs)) for j in range(len(ys))]
    local = threading.local()

    with progress.task("plane", len(cells)) as advance:
        def work(cell: tuple[int, int]) -> dict[str, float]:
            if not hasattr(local, "net"):
                local.net = copy.deepcopy(source.template)
            i, j = cell
            vector_to_parameters(basis.point(float(xs[i]), float(ys[j])).to(torch.float32), local.net.parameters())
            row = evaluate_network(local.net, data, source.weight_decay, split)
            advance(status=f"({i}, {j}) train loss {row['train_loss']:.3f} {split} err {row[f'{split}_error']:.2f}")
            return row

        rows = map_side_by_side(work, cells, workers)
    return {m: np.array([row[m] for row in rows]).reshape(len(xs), len(ys)) for m in metric_names(split)}


def _check_settings(grid: int, margin: float, split: str) -> None:
    if split not in SPLITS:
        raise PlaneError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if grid < 3:
        raise PlaneError(f"--grid must be at least 3 (w0, θ and w1 need grid lines of their own), got {grid}")
    if not math.isfinite(margin) or margin < 0:
        raise PlaneError(f"--margin must be a finite number >= 0, got {margin}")


def make_plane(run: Path | None = None, points: list[Path] | None = None, grid: int = 21, margin: float = 0.2,
               out_dir: Path | None = None, device: str = "auto", split: str = "test") -> dict[str, Any]:
    """Evaluate the plane of a 3-bend curve run (`run`) or of three networks (`points`) on a
    `grid` × `grid` grid, the error on `split` (test, or val: 12× fewer signals on the demo);
    write plane.json/.csv/.npz/.png into `out_dir` (default: the curve's run)."""
    started = time.perf_counter()
    _check_settings(grid, margin, split)
    if (run is None) == (points is None):
        raise PlaneError("give either a curve run or --points A B C (not both)")
    if out_dir is None:
        if run is None:
            raise PlaneError("--points needs --out, the folder the plane's files go into")
        out_dir = curve_file(Path(run)).parent
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    source = curve_source(Path(run), dev) if run is not None else points_source(list(points or []), dev)
    check_report_folder(out_dir, OUTPUTS)  # never over a user's files
    w0, theta, w1 = source.points
    basis = plane_basis(w0, theta, w1)
    coords = basis.bends()
    xs = grid_axis(list(coords[:, 0]), margin, grid)
    ys = grid_axis(list(coords[:, 1]), margin, grid)
    index = np.array([[int(np.flatnonzero(xs == x)[0]), int(np.flatnonzero(ys == y)[0])] for x, y in coords])
    data = load_data(source.dataset, dev)
    if not data.size(split):
        raise PlaneError(f"--split {split}: the data set {source.dataset.get('name')!r} has no {split} split")
    grids = evaluate_plane(source, basis, xs, ys, data, split=split)
    ts = np.linspace(0.0, 1.0, CURVE_POINTS)
    curve_xy = (np.array([basis.coordinates(source.curve.flat_weights(float(t)).detach()) for t in ts])
                if source.curve is not None else None)
    report = _report(source, basis, coords, index, xs, ys, grids, margin, split, data.size(split),
                     len(data.y_train))
    paths = {name.split(".")[1]: out_dir / name for name in OUTPUTS}
    atomic_write_bytes(paths["npz"], _npz(xs, ys, coords, index, grids, ts if curve_xy is not None else None, curve_xy))
    atomic_write_text(paths["csv"], _csv(xs, ys, grids))
    atomic_write_bytes(paths["png"], _plot(xs, ys, grids, coords, source, curve_xy))
    report["seconds"] = time.perf_counter() - started
    atomic_write_json(paths["json"], report)
    at = report["points"]
    progress.log(f"plane: {grid}×{grid} grid in {report['seconds']:.1f}s; {split} error at "
                 + ", ".join(f"{p['label']} {p[f'{split}_error']:.2f} %" for p in at)
                 + f"; max along the straight line {report[f'line_max_{split}_error']:.2f} % -> {paths['png']}")
    return {**{k: str(p) for k, p in paths.items()}, **report}


def _report(source: PlaneSource, basis: PlaneBasis, coords: np.ndarray, index: np.ndarray, xs: np.ndarray,
            ys: np.ndarray, grids: dict[str, np.ndarray], margin: float, split: str, split_size: int,
            train_size: int) -> dict[str, Any]:
    (i0, j0), (i1, _) = index[0], index[2]
    line = grids[f"{split}_error"][min(i0, i1):max(i0, i1) + 1, j0]  # the grid row through w0 and w1
    points = [{"label": label, "x": float(x), "y": float(y), "i": int(i), "j": int(j),
               **{m: float(grids[m][i, j]) for m in grids}}
              for label, (x, y), (i, j) in zip(source.labels, coords, index, strict=True)]
    return {
        "source": source.description,
        "grid": len(xs),
        "margin": margin,
        "weight_decay": source.weight_decay,
        "dimensions": int(basis.origin.numel()),
        "dx": float(coords[2, 0]),
        "dy": float(coords[1, 1]),
        "points": points,
        "split": split,
        f"line_max_{split}_error": float(line.max()),
        f"plane_min_{split}_error": float(grids[f"{split}_error"].min()),
        "plane_min_train_loss": float(grids["train_loss"].min()),
        f"{split}_size": split_size,
        "train_size": train_size,
    }


def _npz(xs: np.ndarray, ys: np.ndarray, coords: np.ndarray, index: np.ndarray, grids: dict[str, np.ndarray],
         ts: np.ndarray | None, curve_xy: np.ndarray | None) -> bytes:
    extra = {"ts": ts, "curve_coordinates": curve_xy} if curve_xy is not None else {}
    buf = io.BytesIO()
    np.savez(buf, xs=xs, ys=ys, grid=np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1),
             bend_coordinates=coords, bend_index=index, **grids, **extra)
    return buf.getvalue()


def _csv(xs: np.ndarray, ys: np.ndarray, grids: dict[str, np.ndarray]) -> str:
    return csv_text(["i", "j", "x", "y", *grids], (
        [i, j, repr(float(x)), repr(float(y)), *(repr(float(grid[i, j])) for grid in grids.values())]
        for i, x in enumerate(xs) for j, y in enumerate(ys)))


def _plot(xs: np.ndarray, ys: np.ndarray, grids: dict[str, np.ndarray], coords: np.ndarray, source: PlaneSource,
          curve_xy: np.ndarray | None) -> bytes:
    from matplotlib.colors import BoundaryNorm

    plt = pyplot()

    X, Y = np.meshgrid(xs, ys, indexing="ij")
    # true geometry (equal axes), the panels stacked: the plane is usually much wider than high
    height = float(ys[-1] - ys[0]) / float(xs[-1] - xs[0])
    fig, axes = plt.subplots(2, 1, figsize=(9, 2 * (2.2 + 7 * min(max(height, 0.2), 1.2))))
    error = next(k for k in grids if k.endswith("_error") and not k.startswith("train"))
    panels = (("train_loss", "train loss (log-spaced levels)", True),
              (error, f"{'validation' if error.startswith('val') else 'test'} error (%)", False))
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        z = grids[key]
        low, high = float(z.min()), float(z.max())
        # levels that resolve the low region (where the networks are) rather than the far corners
        levels = np.geomspace(max(low, 1e-6), max(high, low * 1.01, 1e-5), 24) if log else np.linspace(low, high, 24)
        filled = ax.contourf(X, Y, z, levels=levels, cmap="viridis", norm=BoundaryNorm(levels, 256), extend="neither")
        ax.contour(X, Y, z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
        fig.colorbar(filled, ax=ax, format="%.3g" if log else "%.1f", shrink=0.9)
        ax.plot([coords[0, 0], coords[2, 0]], [coords[0, 1], coords[2, 1]], "--", color="w", lw=2,
                label="straight line")
        if curve_xy is not None:
            ax.plot(curve_xy[:, 0], curve_xy[:, 1], "-", color="tab:red", lw=2, label=f"{source.curve.curve} curve")
        ax.plot(coords[:, 0], coords[:, 1], "o", color="k", ms=7, mfc="w")
        for (x, y), label in zip(coords, source.labels, strict=True):
            ax.annotate(label if len(label) < 8 else Path(label).stem, (x, y), textcoords="offset points",
                        xytext=(6, 6), color="w", fontsize=10, weight="bold")
        ax.set(title=title, xlabel="u (distance in weight space)", ylabel="v (distance in weight space)")
        ax.set_aspect("equal")
        ax.legend(loc="upper left", bbox_to_anchor=(1.18, 1.0), fontsize=8, facecolor="0.55", framealpha=1)
    # names, not machine paths: the figure goes into reports and READMEs
    through = (f"the {source.curve.curve} curve's w0, θ and w1" if source.curve is not None
               else ", ".join(f"{Path(p).parent.name}/{Path(p).name}" for p in source.labels))
    fig.suptitle(f"plane through {through}", fontsize=9)
    fig.tight_layout()
    return png_bytes(fig)
