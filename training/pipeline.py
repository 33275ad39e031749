"""`modeconn pipeline`: the whole demo in one run.

Two independent networks -> a Bezier curve between them, evaluated at 61 points -> FGE from
the first run's 80 % checkpoint -> export to the BentoML store -> a summary table. Every
stage resumes what it finds: a finished stage is skipped, an interrupted one continues
from its last checkpoint; `--force` starts over.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from training import progress
from training.checkpoint import atomic_write_json
from training.config import Config
from training.curve_train import fit_curve
from training.distributed import Job, run_jobs
from training.eval_curve import evaluate_curve
from training.export import export_artifact
from training.fge import finished_snapshot_run, run_fge
from training.loop import checkpoint_path, resolve_device
from training.train import fge_start_epoch, finished_result, train_network, train_or_reuse


def _stage(name: str, skip: dict[str, Any] | None, run: Any) -> dict[str, Any]:
    if skip is not None:
        progress.log(f"[dim]pipeline: {name} already done, skipped[/dim]")
        return skip
    progress.log(f"[bold]pipeline: {name}[/bold]")
    return run()


def _finished_curve(run_dir: Path) -> dict[str, Any] | None:
    result = finished_result(run_dir)
    return result if result and result["metrics"] else None


def _finished_eval(run_dir: Path) -> dict[str, Any] | None:
    try:
        report = json.loads((run_dir / "curve.json").read_text())
    except (OSError, ValueError):
        return None
    paths = {k: str(run_dir / f"curve.{k}") for k in ("json", "csv", "png")}
    return {**paths, **report["headline"], "summary": report["summary"], "skipped": True}


def _fingerprint(paths: list[Path]) -> str:
    """What the export was made from: the member and curve files' contents."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _finished_export(record: Path, fingerprint: str, out: Path | None) -> dict[str, Any] | None:
    try:
        done = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    if done.get("fingerprint") != fingerprint:
        return None
    if out is not None:
        return done if (out / "manifest.json").is_file() else None
    try:
        import bentoml

        bentoml.models.get(done["tag"])
    except Exception:  # noqa: BLE001 (deleted from the store, or another store): export again
        return None
    return done


def run_pipeline(
    config: Config, root: Path, force: bool = False, out: Path | None = None, jobs: int = 1
) -> dict[str, Any]:
    """Run (or continue) every stage under `root`; the artifact goes to the BentoML store
    under `config.export.name`, or to the folder `out`. `jobs` 2 trains the two networks
    side by side (training/distributed.py `run_jobs`)."""
    started = time.perf_counter()
    if force and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    seeds = (config.seed, config.seed + 1)
    runs = [root / f"train-seed{s}" for s in seeds]
    if jobs > 1:  # the train stages below then find both networks finished
        run_jobs([Job(train_or_reuse, (config.model_copy(update={"seed": s}), d)) for s, d in zip(seeds, runs, strict=True)],
                 min(jobs, 2), resolve_device(config.device))
    with progress.display(), progress.task("pipeline", 6, transient=False) as advance:
        trained = []
        for seed, run_dir in zip(seeds, runs, strict=True):
            seeded = config.model_copy(update={"seed": seed})
            trained.append(_stage(f"train seed {seed}", finished_result(run_dir),
                                  lambda c=seeded, d=run_dir: train_network(c, d, resume=True)))
            advance()
        curve_dir = root / "curve"
        _stage("curve", _finished_curve(curve_dir),
               lambda: fit_curve(config, Path(trained[0]["checkpoint"]), Path(trained[1]["checkpoint"]), curve_dir, resume=True))
        advance()
        curve_eval = _stage("eval-curve", _finished_eval(curve_dir),
                            lambda: evaluate_curve(curve_dir, points=config.curve.eval_points, device=config.device))
        advance()
        fge_dir = root / "fge"
        fge_from = checkpoint_path(runs[0], fge_start_epoch(config))
        fge = _stage("fge", finished_snapshot_run(fge_dir, "fge"),
                     lambda: run_fge(config, fge_from, fge_dir, resume=True))
        advance()
        sources = [*sorted((fge_dir / "snapshots").glob("snapshot-*.pt")), curve_dir / "final.pt"]
        record = root / "export.json"
        fingerprint = _fingerprint(sources)

        def export() -> dict[str, Any]:
            result = export_artifact([fge_dir, curve_dir], config.export.name, out=out,
                                     grid_points=config.export.bn_grid_points, atol=config.export.parity_atol,
                                     max_interpolation_pp=config.export.max_bn_interpolation_pp)
            done = {k: v for k, v in result.items() if k != "manifest"}
            done["fingerprint"] = fingerprint
            done["bn_interpolation"] = result["manifest"]["curve"]["bn_interpolation"]
            atomic_write_json(record, done)
            return done

        exported = _stage("export", _finished_export(record, fingerprint, out), export)
        advance()
    summary = _summary(trained, curve_eval, fge, exported, curve_dir, fge_dir, time.perf_counter() - started)
    atomic_write_json(root / "summary.json", summary)
    _print_table(summary)
    return summary


def _row(metrics: dict[str, Any], prefix: str = "test_") -> dict[str, float]:
    return {k: float(metrics[f"{prefix}{k}"]) for k in ("error", "nll", "ece")}


def _summary(trained, curve_eval, fge, exported, curve_dir, fge_dir, seconds) -> dict[str, Any]:  # noqa: ANN001
    ends = curve_eval["summary"]["endpoint_ensemble"]
    return {
        "single_network": _row(trained[0]["metrics"]),
        "second_network": _row(trained[1]["metrics"]),
        "fge_ensemble": {**_row(fge["ensemble"]), "members": fge["snapshots"]},
        "endpoint_ensemble": {k: float(ends[k]) for k in ("error", "nll", "ece")},
        "curve": {"max_test_error": curve_eval["curve_max_test_error"],
                  "line_max_test_error": curve_eval["line_max_test_error"]},
        "plots": {"curve": str(curve_dir / "curve.png"), "fge": str(fge_dir / "fge.png")},
        "artifact": {k: v for k, v in exported.items() if k in ("tag", "folder")},
        "seconds": seconds,
    }


def _print_table(summary: dict[str, Any]) -> None:
    table = Table(title="modeconn demo (MNIST-1D test set)")
    for column in ("model", "error %", "NLL", "ECE"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, key in (("single network (seed 0)", "single_network"),
                       (f"FGE ensemble ({summary['fge_ensemble']['members']} snapshots)", "fge_ensemble"),
                       ("ensemble of the two endpoints", "endpoint_ensemble")):
        m = summary[key]
        table.add_row(label, f"{m['error']:.2f}", f"{m['nll']:.4f}", f"{m['ece']:.4f}")
    curve = summary["curve"]
    table.add_row("max error along the Bezier curve", f"{curve['max_test_error']:.2f}", "", "")
    table.add_row("max error along the straight line", f"{curve['line_max_test_error']:.2f}", "", "")
    progress.console.print(table)
    progress.log(f"plots: {summary['plots']['curve']}, {summary['plots']['fge']}")
    progress.log(f"artifact: {summary['artifact']}  ({summary['seconds']:.0f}s)")
