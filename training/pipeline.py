"""`modeconn pipeline`: the whole demo in one run.

Two independent networks -> a Bezier curve between them, evaluated at 61 points -> FGE from
the first run's 80 % checkpoint -> SWA of the FGE snapshots (one network, `swa/swa.pt`) ->
export of all of them to the BentoML store -> a summary table, written as summary.json and
summary.md (machine, date, test-set size, and the paired bootstrap intervals of FGE − single
network, SWA − single network and curve/line max − worse endpoint; the line is evaluated both
to the second network and to it permuted to match the first, training/curves/align.py). Every stage resumes
what it finds: a finished stage is skipped, an interrupted one continues from its last
checkpoint; `--force` starts over.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from modeconn.contract.artifact import file_sha256
from modeconn.training.batched import batching_blocker, train_seeds, wants_batching
from modeconn.training.core import progress, provenance, statistics
from modeconn.training.core.checkpoint import atomic_write_json, atomic_write_text, read_finished
from modeconn.training.core.config import Config, ModelSettings, describe_origin
from modeconn.training.core.distributed import Job, run_jobs
from modeconn.training.core.loop import checkpoint_path, resolve_device
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.runs import claim_folder
from modeconn.training.curves.evaluate import evaluate_curve
from modeconn.training.curves.fit import fit_curve
from modeconn.training.ensembles.evaluate import ensemble_probs, expand_members, predict_members
from modeconn.training.ensembles.fge import run_fge
from modeconn.training.ensembles.snapshots import finished_snapshot_run
from modeconn.training.ensembles.swa import run_swa
from modeconn.training.export import export_runs
from modeconn.training.train import fge_start_epoch, finished_result, train_network, train_or_reuse


def _stage(name: str, skip: dict[str, Any] | None, run: Any, skipped: list[str],
           times: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run a stage, or take its earlier result; `times` gets its seconds either way (an earlier
    run's as that run recorded them, when it did)."""
    if skip is not None:
        progress.log(f"[dim]pipeline: {name} already done, skipped[/dim]")
        skipped.append(name)
        times[name] = {"seconds": skip.get("seconds"), "earlier_run": True}
        return skip
    progress.log(f"[bold]pipeline: {name}[/bold]")
    started = time.perf_counter()
    result = run()
    times[name] = {"seconds": time.perf_counter() - started, "earlier_run": False}
    return result


def _finished_curve(run_dir: Path) -> dict[str, Any] | None:
    result = finished_result(run_dir)
    return result if result and result["metrics"] else None


def _finished_eval(run_dir: Path) -> dict[str, Any] | None:
    report = read_finished(run_dir / "curve.json")
    if report is None or "differences" not in report or "aligned_line_max_test_error" not in report.get("headline", {}):
        return None  # written before eval-curve had intervals or the aligned line: evaluate again
    paths = {k: str(run_dir / f"curve.{k}") for k in ("json", "csv", "png")}
    return {**paths, **report["headline"], "summary": report["summary"], "differences": report["differences"],
            "test_size": report["test_size"], "skipped": True}


def _finished_swa(path: Path, snapshots: list[Path]) -> dict[str, Any] | None:
    """swa.pt when it is finished and averages exactly the FGE run's current snapshots: the same
    files with the same contents (an FGE rerun, `modeconn fge --force`, rewrites them in place)."""
    record = ((read_finished(path) or {}).get("swa") or {})
    averaged = record.get("members")
    if averaged is None or [Path(p).resolve() for p in averaged] != [p.resolve() for p in snapshots]:
        return None
    if record.get("sha256") != [file_sha256(p) for p in snapshots]:
        return None
    return {"checkpoint": str(path), "members": averaged, "skipped": True}


def _fingerprint(paths: list[Path]) -> str:
    """What the export was made from: the member, curve and SWA files' contents."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(file_sha256(path)))  # read in chunks
    return digest.hexdigest()


def _finished_export(record: Path, fingerprint: str, out: Path | None) -> dict[str, Any] | None:
    done = read_finished(record)
    if done is None or done.get("fingerprint") != fingerprint:
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
    config: Config, root: Path, force: bool = False, out: Path | None = None, jobs: int = 1,
    origin: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or continue) every stage under `root`; the artifact goes to the BentoML store
    under `config.export.name`, or to the folder `out`. The two networks train in one batched
    pass when `train.batched` asks for it (training/batched.py); otherwise `jobs` 2 trains them
    side by side (training/core/distributed.py `run_jobs`). `origin` (config.config_origin):
    the config file and overrides the settings came from, recorded in the summary."""
    started = time.perf_counter()
    claim_folder(root, "pipeline", force=force, container=True)  # --force deletes only the pipeline's own files
    seeds = (config.seed, config.seed + 1)
    runs = [root / f"train-seed{s}" for s in seeds]
    seeded = [config.model_copy(update={"seed": s}) for s in seeds]
    # both networks in one batched pass (training/batched.py) when they can be; else --jobs 2 side by side
    batched = wants_batching(config.train, config.device) and batching_blocker(seeded) is None
    if jobs > 1 and not batched:  # the train stages below then find both networks finished
        run_jobs([Job(train_or_reuse, (c, d)) for c, d in zip(seeded, runs, strict=True)],
                 min(jobs, 2), resolve_device(config.device))
    skipped: list[str] = []
    times: dict[str, dict[str, Any]] = {}
    with progress.display(), progress.task("pipeline", 7, transient=False) as advance:
        trained: list[dict[str, Any]] = []
        together: list[dict[str, Any]] = []  # the batched pass's results, made by the first train stage

        def train(i: int) -> dict[str, Any]:
            if not batched:
                return train_network(seeded[i], runs[i], resume=True)
            together[:] = together or train_seeds(seeded, runs)
            return together[i]

        for i, (seed, run_dir) in enumerate(zip(seeds, runs, strict=True)):
            trained.append(_stage(f"train seed {seed}", finished_result(run_dir) if not together else None,
                                  lambda i=i: train(i), skipped, times))
            advance()
        curve_dir = root / "curve"
        _stage("curve", _finished_curve(curve_dir),
               lambda: fit_curve(config, Path(trained[0]["checkpoint"]), Path(trained[1]["checkpoint"]), curve_dir,
                                 resume=True), skipped, times)
        advance()
        curve_eval = _stage("eval-curve", _finished_eval(curve_dir),
                            lambda: evaluate_curve(curve_dir, points=config.curve.eval_points, device=config.device),
                            skipped, times)
        advance()
        fge_dir = root / "fge"
        fge_from = checkpoint_path(runs[0], fge_start_epoch(config.train, config.fge))
        fge = _stage("fge", finished_snapshot_run(fge_dir, "fge"),
                     lambda: run_fge(config, fge_from, fge_dir, resume=True), skipped, times)
        advance()
        snapshots = sorted((fge_dir / "snapshots").glob("snapshot-*.pt"))
        swa_path = root / "swa" / "swa.pt"  # a folder of its own: export --out may sit beside it in root
        _stage("swa", _finished_swa(swa_path, snapshots),
               lambda: run_swa([fge_dir], swa_path, device=config.device), skipped, times)
        advance()
        sources = [*snapshots, curve_dir / "final.pt", swa_path]
        record = root / "export.json"
        fingerprint = _fingerprint(sources)

        def export() -> dict[str, Any]:
            result = export_runs([fge_dir, curve_dir], config.export, out=out, swa=swa_path)
            done = {k: v for k, v in result.items() if k != "manifest"}
            done["fingerprint"] = fingerprint
            done["bn_interpolation"] = result["manifest"]["curve"]["bn_interpolation"]
            atomic_write_json(record, done)
            return done

        exported = _stage("export", _finished_export(record, fingerprint, out), export, skipped, times)
        advance()
    fge_vs_single = _fge_vs_single(Path(trained[0]["checkpoint"]), fge_dir, config.device)
    swa, swa_vs_single = _swa_vs_single(Path(trained[0]["checkpoint"]), swa_path, config.device)
    summary = _summary(trained, curve_eval, fge, exported, curve_dir, fge_dir, time.perf_counter() - started)
    summary["swa"] = swa
    summary.update(differences={"fge - single network": fge_vs_single, "swa - single network": swa_vs_single,
                                **curve_eval["differences"]},
                   test_size=curve_eval["test_size"], skipped_stages=skipped, stage_times=times,
                   # the full effective config, --set overrides included: what reproduces this run;
                   # and where it came from (the file, or the built-in defaults, and the overrides)
                   config=config.model_dump(mode="json"), config_origin=origin,
                   provenance=provenance.provenance(curve_eval["test_size"]),
                   markdown=str(root / "summary.md"))
    atomic_write_json(root / "summary.json", summary)
    atomic_write_text(root / "summary.md", summary_markdown(summary))
    _print_table(summary)
    return summary


def _fge_vs_single(single: Path, fge_dir: Path, device: str) -> dict[str, Any]:
    """Paired bootstrap intervals of the FGE ensemble minus the network FGE started from (its run's final.pt)."""
    network = predict_members([single], resolve_device(device))
    snapshots = predict_members(expand_members([fge_dir]), resolve_device(device), network.data)
    labels = network.data.y_test
    return statistics.intervals_json(statistics.compare_probs(ensemble_probs(snapshots.probs), network.probs[0], labels))


def _swa_vs_single(single: Path, swa_path: Path, device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """SWA of the FGE snapshots (swa.pt: one network, BN recomputed): its test metrics, and the
    paired bootstrap intervals of SWA minus the network FGE started from."""
    network = predict_members([single], resolve_device(device))
    swa = predict_members([swa_path], resolve_device(device), network.data)
    probs, labels = swa.probs[0].double(), network.data.y_test
    row = {**{k: float(v) for k, v in classification_metrics(probs, labels).items()},
           "members": swa.states[0]["swa"]["count"]}
    return row, statistics.intervals_json(statistics.compare_probs(probs, network.probs[0], labels))


def _row(metrics: dict[str, Any], prefix: str = "test_") -> dict[str, float | None]:
    """The test metrics; None for one a run finished before it was recorded (Brier in older runs)."""
    return {k: None if metrics.get(f"{prefix}{k}") is None else float(metrics[f"{prefix}{k}"]) for k in _METRICS}


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


_METRICS = ("error", "nll", "ece", "brier")


def _summary(trained, curve_eval, fge, exported, curve_dir, fge_dir, seconds) -> dict[str, Any]:  # noqa: ANN001
    ends = curve_eval["summary"]["endpoint_ensemble"]
    return {
        "single_network": _row(trained[0]["metrics"]),
        "second_network": _row(trained[1]["metrics"]),
        "fge_ensemble": {**_row(fge["ensemble"]), "members": fge["snapshots"]},
        "endpoint_ensemble": _row(ends, prefix=""),
        "curve": {"max_test_error": curve_eval["curve_max_test_error"],
                  "line_max_test_error": curve_eval["line_max_test_error"],
                  "aligned_line_max_test_error": curve_eval["aligned_line_max_test_error"]},
        "plots": {"curve": str(curve_dir / "curve.png"), "fge": str(fge_dir / "fge.png")},
        "artifact": {k: v for k, v in exported.items() if k in ("tag", "folder")},
        "seconds": seconds,
    }


def _model_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, float | None] | None, float | None]]:
    """(label, metrics, or None with only an error %) for the summary tables."""
    curve = summary["curve"]
    return [
        ("single network (seed 0)", summary["single_network"], None),
        ("second network (seed 1)", summary["second_network"], None),
        (f"FGE ensemble ({summary['fge_ensemble']['members']} snapshots)", summary["fge_ensemble"], None),
        *([(f"SWA: one network, the average of the {summary['swa']['members']} FGE snapshots", summary["swa"], None)]
          if "swa" in summary else []),
        ("ensemble of the two endpoints", summary["endpoint_ensemble"], None),
        ("max error along the Bezier curve", None, curve["max_test_error"]),
        ("max error along the straight line", None, curve["line_max_test_error"]),
        ("max error along the line after alignment", None, curve["aligned_line_max_test_error"]),
    ]


def _difference_rows(summary: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, [error, NLL, Brier] cells as `diff [low, high]`) for the summary tables."""
    d = summary["differences"]
    fge = d["fge - single network"]
    rows = [("FGE ensemble − single network",
             [statistics.Interval(**fge[k]).text(statistics.DIGITS[k]) for k in statistics.LOSSES])]
    if "swa - single network" in d:
        rows.append(("SWA − single network", [statistics.Interval(**d["swa - single network"][k]).text(statistics.DIGITS[k])
                                             for k in statistics.LOSSES]))
    for name, label in (("curve max - worse endpoint", "curve max − worse endpoint"),
                        ("line max - worse endpoint", "line max − worse endpoint"),
                        ("aligned line max - worse endpoint", "line after alignment max − worse endpoint")):
        cell = d[name]
        rows.append((f"{label} (t = {cell['t']:.3f} vs t = {cell['worse_endpoint_t']:g})",
                     [statistics.Interval(**cell["error"]).text(), "", ""]))
    return rows


def _stage_time(name: str, timing: dict[str, Any]) -> str:
    seconds = "?" if timing["seconds"] is None else f"{timing['seconds']:.0f}"
    return f"{name} {seconds} s" + (" (earlier run)" if timing["earlier_run"] else "")


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: the demo's table with machine, date, test size and intervals (the README copies it);
    the settings from the summary's `config` and `config_origin`."""
    info, config = summary["provenance"], summary["config"]
    origin = summary.get("config_origin")
    network = ModelSettings.model_validate(config["model"]).label
    skipped = summary.get("skipped_stages") or []
    timing = f"{summary['seconds']:.0f} s" + (f" (skipped as already done: {', '.join(skipped)})" if skipped else "")
    stages = ", ".join(_stage_time(name, t) for name, t in (summary.get("stage_times") or {}).items())
    lines = [
        f"**modeconn pipeline: {network} on {config['data']['name']}** (config `{config['name']}`)",
        "",
        *provenance.markdown_lines(info),
        f"- Pipeline time: {timing}." + (f" Stages: {stages}." if stages else ""),
        "- Settings: " + (f"from {describe_origin(origin)}; " if origin else "")
        + "the effective config, overrides included, is `config` in summary.json.",
        "",
        "| model | test error % | NLL | ECE | Brier |",
        "|---|---|---|---|---|",
    ]
    for label, metrics, error in _model_rows(summary):
        if metrics is None:
            lines.append(f"| {label} | {error:.2f} | | | |")
        else:
            lines.append(f"| {label} | {_fmt(metrics['error'], 2)} | {_fmt(metrics['nll'], 4)} | "
                         f"{_fmt(metrics['ece'], 4)} | {_fmt(metrics['brier'], 4)} |")
    lines += [
        "",
        f"Differences on the {info['test_size']:,} test examples, `diff [low, high]` with the 95 % paired "
        "bootstrap interval (error in percentage points; negative: the first is lower):",
        "",
        "| difference | error (pp) | NLL | Brier |",
        "|---|---|---|---|",
        *(f"| {label} | {' | '.join(cells)} |" for label, cells in _difference_rows(summary)),
    ]
    return "\n".join(lines) + "\n"


def _print_table(summary: dict[str, Any]) -> None:
    table = Table(title=f"modeconn demo ({summary['test_size']:,} test examples)")
    for column in ("model", "error %", "NLL", "ECE", "Brier"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for label, metrics, error in _model_rows(summary):
        if metrics is None:
            table.add_row(label, f"{error:.2f}", "", "", "")
        else:
            table.add_row(label, _fmt(metrics["error"], 2), _fmt(metrics["nll"], 4), _fmt(metrics["ece"], 4),
                          _fmt(metrics["brier"], 4))
    progress.console.print(table)
    differences = Table(title="differences, 95 % paired bootstrap intervals")
    for column in ("difference", "error (pp)", "NLL", "Brier"):
        differences.add_column(column, justify="left" if column == "difference" else "right")
    for label, cells in _difference_rows(summary):
        differences.add_row(label, *cells)
    progress.console.print(differences)
    progress.log(f"plots: {summary['plots']['curve']}, {summary['plots']['fge']}")
    progress.log(f"artifact: {summary['artifact']}  ({summary['seconds']:.0f}s) -> {summary['markdown']}")
