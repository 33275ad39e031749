"""The simplex's evaluation: error and NLL at its vertices, at the centre of each of its simplexes and at
sampled points (BN statistics recomputed at each point), and the ensemble of sampled points.

Points are drawn as training draws them (a simplex of the complex uniformly, then uniform on it),
from a generator of their own (seed + 7): the first `eval_points` are the table's sampled rows and
the first `ensemble_size` the ensemble's members (mean of softmax outputs), which `modeconn simplex`
saves as ordinary checkpoints in RUN/snapshots/ (so `ensemble-eval RUN` and `export RUN` take them
as they take FGE's snapshots) and evaluates as `ensemble-eval` does (ensemble.json/.csv).

Statistics: the paired bootstrap interval (training/core/statistics.py) over the test examples of
the mean test error of the sampled points minus the mean of the vertices': how much worse a random
point of the simplex is than a vertex.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modeconn.training.core import progress, statistics
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    model_checkpoint,
    save_checkpoint,
)
from modeconn.training.core.config import SimplexSettings
from modeconn.training.core.data import Dataset
from modeconn.training.core.reports import csv_text
from modeconn.training.curves.evaluate import network_row
from modeconn.training.simplex.model import SimplexModel, centre, network_at, sample_weights

KINDS = ("vertex", "centre", "sample")
SUMMARY_METRICS = ("train_loss", "train_error", "val_error", "val_nll", "test_error", "test_nll")


def point_network(simplex: SimplexModel, w: torch.Tensor, data: Dataset) -> nn.Module:
    """θ(w) as a plain network, BN statistics recomputed over `data`'s training split (eval mode)."""
    return recompute_bn(network_at(simplex, w), data).eval()


def evaluation_points(simplex: SimplexModel, samples: int, seed: int) -> list[tuple[str, str, torch.Tensor]]:
    """(kind, label, weights) of every vertex, every simplex's centre and `samples` drawn points."""
    k = simplex.num_vertices
    points = [("vertex", f"vertex {i + 1}", torch.eye(k, dtype=torch.float64)[i]) for i in range(k)]
    many = len(simplex.simplexes) > 1
    points += [("centre", f"centre of simplex {j + 1}" if many else "centre", centre(k, s))
               for j, s in enumerate(simplex.simplexes)]
    generator = torch.Generator().manual_seed(seed + 7)
    points += [("sample", f"sample {i + 1}", sample_weights(k, simplex.simplexes, generator)) for i in range(samples)]
    return points


def ensemble_points(simplex: SimplexModel, settings: SimplexSettings, seed: int = 0) -> list[torch.Tensor]:
    """The weights of the sampled ensemble's members: the first `ensemble_size` points drawn, as
    `simplex_evaluation` draws them."""
    points = evaluation_points(simplex, settings.ensemble_size, seed)
    return [w for kind, _, w in points if kind == "sample"]


def simplex_evaluation(simplex: SimplexModel, data: Dataset, settings: SimplexSettings, seed: int = 0,
                       keep: Any = None) -> dict[str, Any]:
    """The rows (one per point), their summary per kind, the sampled-minus-vertex interval and the
    test probabilities of the sampled points ([S, N, C], for the ensemble); `keep(index, network)` is
    called with each of the first `ensemble_size` sampled networks (BN recomputed)."""
    samples = max(settings.eval_points, settings.ensemble_size)
    points = evaluation_points(simplex, samples, seed)
    rows, errors, sample_probs = [], {kind: [] for kind in KINDS}, []
    with progress.task("simplex points", len(points)) as advance:
        for kind, label, w in points:
            net = point_network(simplex, w, data)
            row, test_probs = network_row(net, data, settings.weight_decay)
            if kind == "sample" and len(sample_probs) < settings.ensemble_size:
                if keep is not None:
                    keep(len(sample_probs), net, w)
                sample_probs.append(test_probs.cpu())
            if kind != "sample" or int(label.split()[-1]) <= settings.eval_points:
                rows.append({"point": label, "kind": kind, **row, "weights": [round(float(v), 6) for v in w]})
                errors[kind].append(statistics.per_example_losses(test_probs, data.y_test)["error"])
            advance(status=f"{label} test err {row['test_error']:.2f}")
    summary = {kind: _summary([r for r in rows if r["kind"] == kind]) for kind in KINDS}
    difference = statistics.paired_bootstrap(np.mean(errors["sample"], axis=0), np.mean(errors["vertex"], axis=0))
    return {"rows": rows, "summary": summary, "test_size": len(data.y_test),
            "differences": {"samples - vertices (mean test error, pp)": difference.as_dict()},
            "sample_probs": torch.stack(sample_probs)}


def _summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    return {key: {"mean": sum(r[key] for r in rows) / len(rows), "min": min(r[key] for r in rows),
                  "max": max(r[key] for r in rows)} for key in SUMMARY_METRICS if key in rows[0]}


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a small fixed-width table (point, val / test error and NLL, train loss)."""
    val = "val_error" in rows[0]
    head = f"{'point':<22}{'val err %':>10}{'val NLL':>9}" if val else f"{'point':<22}"
    lines = [head + f"{'test err %':>11}{'test NLL':>10}{'train loss':>12}"]
    for r in rows:
        cells = f"{r['point']:<22}" + (f"{r['val_error']:>10.2f}{r['val_nll']:>9.4f}" if val else "")
        lines.append(cells + f"{r['test_error']:>11.2f}{r['test_nll']:>10.4f}{r['train_loss']:>12.4f}")
    return "\n".join(lines)


def write_evaluation(simplex: SimplexModel, data: Dataset, settings: SimplexSettings, run_dir: Path, source: Path,
                     fields: dict[str, Any], seed: int, device: str) -> dict[str, Any]:
    """`simplex_evaluation` written as RUN/simplex.json/.csv, its first `ensemble_size` sampled
    networks as RUN/snapshots/snapshot-NNN.pt (kind simplex-point, with `fields`' architecture and
    dataset), evaluated as `ensemble-eval` does."""
    from modeconn.training.ensembles.evaluate import evaluate_checkpoints

    started = time.perf_counter()
    paths: list[Path] = []

    def keep(index: int, net: nn.Module, w: torch.Tensor) -> None:
        path = run_dir / "snapshots" / f"snapshot-{index + 1:03d}.pt"
        save_checkpoint(path, model_checkpoint(net, fields["architecture"], fields["dataset"], kind="simplex-point",
                                               simplex={"run": str(source), "index": index + 1,
                                                        "weights": [float(v) for v in w]}))
        paths.append(path)

    found = simplex_evaluation(simplex, data, settings, seed, keep)
    found.pop("sample_probs")
    ensemble = evaluate_checkpoints(paths, device=device, out_dir=run_dir)
    rows = found["rows"]
    report = {"checkpoint": str(source), "settings": fields["simplex"], "vertices": simplex.num_vertices,
              "simplexes": simplex.simplexes, **found, "ensemble": ensemble["ensemble"],
              "ensemble_members": len(paths), "ensemble_differences": ensemble["differences"]}
    keys = [k for k in rows[0] if k not in ("point", "kind", "weights")]
    atomic_write_text(run_dir / "simplex.csv", csv_text(["point", "kind", *keys, "weights"],
                                                        ([r["point"], r["kind"], *[r[k] for k in keys],
                                                          " ".join(f"{v:g}" for v in r["weights"])] for r in rows)))
    atomic_write_json(run_dir / "simplex.json", report)  # last: its presence marks a finished evaluation
    cell = statistics.Interval(**found["differences"]["samples - vertices (mean test error, pp)"])
    progress.log(f"simplex: {len(rows)} points, {found['test_size']} test examples (BN recomputed at each)\n"
                 + table(rows)
                 + f"\n  sampled points - vertices, mean test error: {cell.text()} pp (95 % interval)"
                 + f"\n  ensemble of {len(paths)} sampled points: test error {ensemble['ensemble']['test_error']:.2f} %, "
                   f"NLL {ensemble['ensemble']['test_nll']:.4f} ({time.perf_counter() - started:.1f}s)")
    summary = found["summary"]
    return {"json": str(run_dir / "simplex.json"), "csv": str(run_dir / "simplex.csv"),
            "snapshots": [str(p) for p in paths], "summary": summary, "differences": found["differences"],
            "ensemble": ensemble["ensemble"], "test_size": found["test_size"]}
