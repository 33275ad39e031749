"""`modeconn eval-curve`: metrics along the curve and along the straight line between its ends.

For each of `points` evenly spaced t: BN statistics recomputed, then train loss/NLL/error,
test NLL/error/ECE/Brier and the segment length ‖w(t_i) − w(t_{i−1})‖; the same for the line;
the ensemble of the two endpoints, and of w0 with φ(t) for each t. The line is evaluated twice:
to the end as it is, and to the end with its hidden units permuted to match the start (weight
matching, training/curves/align.py; a curve fitted with `--align` already ends there, and its
unaligned line undoes the recorded permutations).

Statistics: for the curve and for the line, the paired bootstrap interval (training/core/statistics.py)
over the test examples of (error at the t of the largest test error) − (error of the worse
endpoint). That t is picked on the same test set, so the difference leans high; it measures
how much worse the path's worst point is than its ends, not a held-out estimate.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modeconn.training.core import progress, statistics
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from modeconn.training.core.config import ConfigError
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import resolve_device
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import load_data, predict_probs
from modeconn.training.core.parallel import map_side_by_side, workers_for
from modeconn.training.core.reports import csv_text, png_bytes, pyplot
from modeconn.training.core.runs import check_report_folder
from modeconn.training.curves.fit import curve_file, load_curve
from modeconn.training.curves.model import CurveModel, even_ts, network_at

PATHS = ("curve", "line", "aligned_line")  # the line to the end permuted to match the start (training/curves/align.py)
METRICS = ("train_loss", "train_nll", "train_error", "test_nll", "test_error")
VAL_METRICS = ("val_nll", "val_error")


def lines(curve: CurveModel, state: dict[str, Any]) -> tuple[CurveModel, CurveModel, dict[str, Any]]:
    """`straight_lines` of a curve checkpoint's fields."""
    return straight_lines(curve, state["curve"].get("alignment"), state["dataset"]["input_shape"])


def straight_lines(curve: CurveModel, alignment: dict[str, Any] | None,
                   input_shape: Sequence[int]) -> tuple[CurveModel, CurveModel, dict[str, Any]]:
    """(the line from the start to the unaligned end, the line to the end aligned to the start,
    the alignment record). A curve fitted with --align ends at the aligned end (`alignment` is its
    record): its unaligned end is that end with the recorded permutations undone; otherwise the
    end is aligned here."""
    from modeconn.training.curves.align import apply_permutation, inverse, weight_matching
    from modeconn.training.curves.permutations import derive_spec, example_input

    points = curve.control_points().cpu()
    start, end = curve.unflatten(points[0]), curve.unflatten(points[-1])
    spec = derive_spec(network_at(curve, 0.0).cpu(), example_input(input_shape))
    record = alignment
    if record is not None:
        undo = inverse({g: torch.tensor(p) for g, p in record["permutations"].items()})
        unaligned, aligned = apply_permutation(spec, end, undo), end
    else:
        matching = weight_matching(spec, start, end, set(start))
        unaligned, aligned = end, apply_permutation(spec, end, matching.perms)
        record = {"method": "weight matching", "seed": 0, **matching.record(spec)}
    device = curve.free_points.device

    def line(to: dict[str, torch.Tensor]) -> CurveModel:
        return CurveModel(network_at(curve, 0.0), start, to, curve="polychain", num_bends=2).to(device).eval()

    return line(unaligned), line(aligned), {k: v for k, v in record.items() if k != "permutations"}


def point_network(curve: CurveModel, t: float, data: Dataset) -> nn.Module:
    """φ(t) as a plain network, BN statistics recomputed over `data`'s training split (eval mode)."""
    return recompute_bn(network_at(curve, t), data).eval()


@torch.no_grad()
def evaluate_point(curve: CurveModel, t: float, data: Dataset, weight_decay: float) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of φ(t) with BN recomputed, and its test probabilities."""
    return network_row(point_network(curve, t, data), data, weight_decay)


@torch.no_grad()
def network_row(net: nn.Module, data: Dataset, weight_decay: float) -> tuple[dict[str, float], torch.Tensor]:
    """A network's train loss (NLL + 0.5·wd·‖θ‖²), train/test (and validation) NLL and error, test
    ECE and Brier, and its test probabilities: a row of eval-curve's and of the simplex report."""
    train = classification_metrics(predict_probs(net, data, "train"), data.y_train)
    test_probs = predict_probs(net, data, "test")
    test = classification_metrics(test_probs, data.y_test)
    l2 = float(sum((p.double() ** 2).sum() for p in net.parameters()))
    row = {
        "train_loss": train["nll"] + 0.5 * weight_decay * l2,
        "train_nll": train["nll"],
        "train_error": train["error"],
        "test_nll": test["nll"],
        "test_error": test["error"],
        "test_ece": test["ece"],
        "test_brier": test["brier"],
    }
    if len(data.y_val):  # what a choice of curve settings reads; test is only reported
        val = classification_metrics(predict_probs(net, data, "val"), data.y_val)
        row.update(val_nll=val["nll"], val_error=val["error"])
    return row, test_probs


def summarize(rows: list[dict[str, float]], lengths: list[float]) -> dict[str, Any]:
    """Start, end, min, max, mean and the length-weighted (trapezoid) average of each metric."""
    total = sum(lengths[1:])
    out: dict[str, Any] = {"length": total}
    for key in (*METRICS, *VAL_METRICS):
        if key not in rows[0]:
            continue
        values = [r[key] for r in rows]
        integral = sum((values[i] + values[i - 1]) / 2 * lengths[i] for i in range(1, len(values)))
        out[key] = {
            "start": values[0],
            "end": values[-1],
            "min": min(values),
            "max": max(values),
            "mean": sum(values) / len(values),
            "integral": integral / total if total > 0 else values[0],
        }
    return out


def max_minus_worse_endpoint(rows: list[dict[str, float]], errors: list[np.ndarray]) -> dict[str, Any]:
    """(error at the first t of the largest test error) − (error of the worse endpoint), with its
    paired bootstrap interval; `errors` holds each t's per-example error indicators (%)."""
    test_errors = [r["test_error"] for r in rows]
    peak = max(range(len(rows)), key=test_errors.__getitem__)
    worse = 0 if test_errors[0] >= test_errors[-1] else len(rows) - 1
    return {"t": rows[peak]["t"], "worse_endpoint_t": rows[worse]["t"],
            "error": statistics.paired_bootstrap(errors[peak], errors[worse]).as_dict()}


def curve_report(curve: CurveModel, data: Dataset, points: int, weight_decay: float,
                 alignment: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every metric along the curve, the line and the aligned line at `points` evenly spaced t (BN
    recomputed on `data`'s training split at each), their summaries, the headline and the paired
    bootstrap intervals of (max along the path) - (worse endpoint). eval-curve and the Python API's
    `Curve.evaluate` both report this."""
    line, aligned_line, alignment_record = straight_lines(curve, alignment, data.input_shape)
    ts = even_ts(points)
    results: dict[str, list] = {name: [] for name in PATHS}
    probs_curve: list[torch.Tensor] = []
    errors: dict[str, list[np.ndarray]] = {name: [] for name in PATHS}
    paths = {"curve": curve, "line": line, "aligned_line": aligned_line}
    jobs = [(name, t) for name in PATHS for t in ts]
    with progress.task("eval-curve", len(jobs)) as advance:
        def work(job: tuple[str, float]) -> tuple[dict[str, float], torch.Tensor]:
            name, t = job
            row, test_probs = evaluate_point(paths[name], t, data, weight_decay)
            advance(status=f"{name} t={t:.3f} test err {row['test_error']:.2f}")
            return row, test_probs

        done = iter(map_side_by_side(work, jobs, workers_for(curve.base, data.device, data.streamed)))
    for name in PATHS:
        previous = None
        for t in ts:
            row, test_probs = next(done)
            flat = paths[name].flat_weights(t).detach()
            row["segment_length"] = 0.0 if previous is None else float((flat - previous).norm())
            previous = flat
            results[name].append({"t": t, **row})
            errors[name].append(statistics.per_example_losses(test_probs, data.y_test)["error"])
            if name == "curve":
                probs_curve.append(test_probs)
    y = data.y_test
    endpoints = classification_metrics((probs_curve[0] + probs_curve[-1]) / 2, y)
    for row, probs in zip(results["curve"], probs_curve, strict=True):
        ens = classification_metrics((probs_curve[0] + probs) / 2, y)
        row["ensemble_test_error"], row["ensemble_test_nll"] = ens["error"], ens["nll"]
    summary = {
        "curve": summarize(results["curve"], [r["segment_length"] for r in results["curve"]]),
        "line": summarize(results["line"], [r["segment_length"] for r in results["line"]]),
        "aligned_line": summarize(results["aligned_line"], [r["segment_length"] for r in results["aligned_line"]]),
        "endpoint_ensemble": endpoints,
    }
    headline = {
        "start_test_error": results["curve"][0]["test_error"],
        "end_test_error": results["curve"][-1]["test_error"],
        "curve_max_test_error": summary["curve"]["test_error"]["max"],
        "line_max_test_error": summary["line"]["test_error"]["max"],
        "aligned_line_max_test_error": summary["aligned_line"]["test_error"]["max"],
        "endpoint_ensemble_test_error": endpoints["error"],
        "best_ensemble_along_curve_test_error": min(r["ensemble_test_error"] for r in results["curve"]),
    }
    differences = {f"{name.replace('_', ' ')} max - worse endpoint": max_minus_worse_endpoint(results[name], errors[name])
                   for name in PATHS}
    return {"points": points, "alignment": alignment_record, "summary": summary, "headline": headline,
            "differences": differences, "test_size": len(y), **{name: results[name] for name in PATHS}}


def evaluate_curve(path: Path, points: int = 61, out_dir: Path | None = None, device: str = "auto") -> dict[str, Any]:
    """`modeconn eval-curve`: `curve_report` of a curve run, written as curve.json/.csv/.png."""
    started = time.perf_counter()
    path = curve_file(Path(path))
    out_dir = Path(out_dir) if out_dir else path.parent
    check_report_folder(out_dir, ("curve.json", "curve.csv", "curve.png"))  # never over a user's files
    dev = resolve_device(device)
    curve, state = load_curve(path, dev)
    data = load_data(state["dataset"], dev)
    wd = float(state["curve"].get("weight_decay", 0.0))
    found = curve_report(curve, data, points, wd, state["curve"].get("alignment"))
    results = {name: found[name] for name in PATHS}
    headline, summary, differences, y = found["headline"], found["summary"], found["differences"], data.y_test
    settings = {**state["curve"], "alignment": found["alignment"]}  # the permutations themselves stay in the checkpoint
    report = {"checkpoint": str(path), "points": points, "settings": settings, "summary": summary,
              "headline": headline, "differences": differences, "test_size": len(y), **results}
    json_path, csv_path, png_path = out_dir / "curve.json", out_dir / "curve.csv", out_dir / "curve.png"
    atomic_write_json(json_path, report)
    atomic_write_text(csv_path, _csv(results))
    atomic_write_bytes(png_path, _plot(results, summary["endpoint_ensemble"]["error"], state["curve"]["curve"]))
    seconds = time.perf_counter() - started
    progress.log(
        f"eval-curve: ends {headline['start_test_error']:.2f} / {headline['end_test_error']:.2f} %, "
        f"max along curve {headline['curve_max_test_error']:.2f} %, along line {headline['line_max_test_error']:.2f} %, "
        f"along the line after alignment {headline['aligned_line_max_test_error']:.2f} % ({seconds:.1f}s)"
    )
    for name, cell in differences.items():
        progress.log(f"  {name} (t = {cell['t']:.3f} vs {cell['worse_endpoint_t']:g}, {len(y)} test examples): "
                     f"error {statistics.Interval(**cell['error']).text()} pp (95 % interval)")
    return {"json": str(json_path), "csv": str(csv_path), "png": str(png_path), "seconds": seconds,
            **headline, "summary": summary, "differences": differences, "test_size": len(y)}


def _csv(results: dict[str, list]) -> str:
    keys = [*METRICS, *(k for k in VAL_METRICS if k in results["curve"][0]), "test_ece", "test_brier", "segment_length"]
    header = ["t", *[f"{name}_{k}" for name in PATHS for k in keys], "ensemble_test_error", "ensemble_test_nll"]
    return csv_text(header, ([c["t"], *[results[name][i][k] for name in PATHS for k in keys], c["ensemble_test_error"],
                              c["ensemble_test_nll"]] for i, c in enumerate(results["curve"])))


def _plot(results: dict[str, list], endpoint_ensemble_error: float, curve_type: str) -> bytes:
    plt = pyplot()
    ts = [r["t"] for r in results["curve"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, key, title in ((axes[0], "test_error", "test error (%)"), (axes[1], "train_loss", "train loss")):
        ax.plot(ts, [r[key] for r in results["curve"]], label=f"{curve_type} curve", lw=2)
        ax.plot(ts, [r[key] for r in results["line"]], label="straight line", lw=2, ls="--")
        ax.plot(ts, [r[key] for r in results["aligned_line"]], label="straight line after alignment", lw=2, ls="-.")
        ax.set(xlabel="t", title=title)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    axes[1].set_yscale("log")
    axes[2].plot(ts, [r["ensemble_test_error"] for r in results["curve"]], label="ensemble of w0 and φ(t)", lw=2)
    axes[2].axhline(endpoint_ensemble_error, color="k", ls=":", label="ensemble of the two endpoints")
    axes[2].set(xlabel="t", title="ensemble test error (%)")
    axes[2].legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    fig.tight_layout()
    return png_bytes(fig)


def save_curve_point(path: Path, t: float, out: Path, device: str = "auto") -> dict[str, Any]:
    """φ(t) with BN recomputed, saved as an ordinary checkpoint of the base architecture."""
    from modeconn.training.core.checkpoint import model_checkpoint, save_checkpoint
    from modeconn.training.core.networks import held_out_metrics
    from modeconn.training.core.runs import check_replaceable_checkpoint

    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"--t must lie in [0, 1], got {t}")
    check_replaceable_checkpoint(out, "curve-point")  # never over the run's own files or a user's
    dev = resolve_device(device)
    curve, state = load_curve(Path(path), dev)
    data = load_data(state["dataset"], dev)
    net = point_network(curve, t, data)
    metrics = held_out_metrics(net, data)
    save_checkpoint(out, model_checkpoint(net, state["architecture"], state["dataset"], kind="curve-point",
                                          curve_point={"t": t, "curve": str(curve_file(Path(path)))}, metrics=metrics))
    return {"checkpoint": str(out), "t": t, "metrics": metrics}
