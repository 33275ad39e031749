"""`modeconn export`: member graphs, one fused ensemble graph, one curve graph with t as
an input, optionally the SWA network's graph (`--swa`), and `manifest.json`
(docs/manifest.md), into the BentoML model store or a folder.

Every graph is checked against PyTorch on real test inputs (onnxruntime, CPU provider)
before anything is stored; an artifact that fails the parity gate is never stored.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modeconn.contract.artifact import MANIFEST_NAME, file_record, load_artifact
from modeconn.contract.manifest import (
    FORMAT_VERSION,
    Architecture,
    BnInterpolation,
    Calibration,
    Curve,
    CurveCalibration,
    CurvePredictionSets,
    DatasetInfo,
    Ensemble,
    FileRecord,
    ImageInput,
    InputSpec,
    Manifest,
    Member,
    Normalization,
    Parity,
    PredictionSets,
    Swa,
)
from modeconn.training.core import progress
from modeconn.training.core.checkpoint import atomic_write_json, load_checkpoint
from modeconn.training.core.config import ExportSettings
from modeconn.training.core.data import Dataset
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.model_source import architecture_label
from modeconn.training.core.networks import load_data, load_network, predict_probs
from modeconn.training.core.runs import artifact_target_problem, write_marker
from modeconn.training.core.sources import check_same_network, run_members
from modeconn.training.curves.fit import load_curve
from modeconn.training.curves.model import CurveModel, even_ts
from modeconn.training.ensembles.calibration import calibration_report, grid_temperatures
from modeconn.training.ensembles.conformal import (
    curve_prediction_sets,
    prediction_sets,
    split_uniforms,
)
from modeconn.training.export.graphs import (
    CurveGraph,
    EnsembleGraph,
    MemberGraph,
    Normalize,
    bn_statistics_grid,
    export_onnx,
    with_class_names,
)
from modeconn.training.export.parity import (
    ExportError,
    check_parity,
    interpolation_check,
    ort_session,
)

DATA_PROVENANCE = ("train_size", "val_size", "test_size", "split_seed", "generation")


# what a files-based data set records about its files and how they were read
SOURCE_FIELDS = ("root", "train", "test", "resize", "channels")


def data_source(described: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's dataset.source: where files-based data came from, None for built-in sets."""
    fields = {k: described[k] for k in SOURCE_FIELDS if described.get(k) is not None}
    return fields or None


def image_input(described: dict[str, Any]) -> ImageInput | None:
    """How image-folder data was read from files (the service reads uploads the same way)."""
    if described.get("channels") is None:
        return None
    resize = described.get("resize")
    return ImageInput(channels=int(described["channels"]), resize=None if resize is None else [int(v) for v in resize])


# ---------------------------------------------------------------- sources
@dataclass
class Sources:
    members: list[Path] = field(default_factory=list)
    curve: Path | None = None
    curve_report: Path | None = None
    swa: Path | None = None


def swa_source(path: Path | None) -> Path | None:
    """`--swa`: one network checkpoint file (made by `modeconn swa`), not a run folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"--swa {path} is a folder; give the SWA checkpoint file (`modeconn swa ... --out swa.pt`)")
    if not path.is_file():
        raise ExportError(f"--swa {path} does not exist")
    return path


def collect_sources(paths: list[Path]) -> Sources:
    """Run directories or checkpoint files -> member checkpoints and at most one curve."""
    found = Sources()
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise ExportError(f"{path} does not exist")
        files = run_members(path, ExportError)
        if files[0].name.startswith("snapshot-"):
            found.members.extend(files)
            continue
        path = files[0]
        kind = load_checkpoint(path).get("kind")
        if kind == "curve":
            if found.curve is not None:
                raise ExportError(f"more than one curve given ({found.curve} and {path}); export takes one")
            found.curve = path
            report = path.parent / "curve.json"
            found.curve_report = report if report.is_file() else None
        else:
            found.members.append(path)
    if not found.members:
        raise ExportError("no member networks given: pass FGE/SSE run directories, train runs or checkpoints")
    return found


@dataclass
class ExportJob:
    """What one export works from: the loaded members and curve, the data, the gate's settings."""

    name: str
    sources: Sources
    nets: list[nn.Module]
    states: list[dict[str, Any]]
    curve: CurveModel | None
    curve_state: dict[str, Any] | None
    data: Dataset
    normalize: Normalize
    x_check: torch.Tensor  # raw test inputs every graph is checked on
    grid_points: int
    atol: float
    max_interpolation_pp: float
    swa_net: nn.Module | None = None
    swa_state: dict[str, Any] | None = None
    uniforms: dict[str, np.ndarray] = field(default_factory=dict)  # each split's conformal u, made once

    def split_uniforms(self, split: str) -> np.ndarray:
        if split not in self.uniforms:
            self.uniforms[split] = split_uniforms(self.data, split)
        return self.uniforms[split]


# ---------------------------------------------------------------- export
def export_artifact(
    paths: list[Path], name: str, out: Path | None = None, grid_points: int = 61, atol: float = 1e-5,
    parity_samples: int = 256, max_interpolation_pp: float = 0.2, swa: Path | None = None,
) -> dict[str, Any]:
    """Build, check and store the artifact; returns the tag or folder and the manifest.
    `swa`: a network checkpoint (of the members' architecture and data set) exported as `swa.onnx`."""
    started = time.perf_counter()
    swa = swa_source(swa)
    paths = list(paths)
    if out is not None:  # before minutes of work: the same check runs again just before the replace
        _check_target(Path(out), [*paths, *([swa] if swa else [])])
    sources = collect_sources(paths)
    sources.swa = swa
    device = torch.device("cpu")  # export traces on the CPU; parity is checked against CPU onnxruntime
    nets, states = zip(*(load_network(p, device) for p in sources.members), strict=True)
    first = states[0]
    named = list(zip(sources.members, states, strict=True))
    curve = curve_state = None
    if sources.curve is not None:
        curve, curve_state = load_curve(sources.curve, device)
        named.append((sources.curve, curve_state))
    swa_net = swa_state = None
    if swa is not None:
        swa_net, swa_state = load_network(swa, device)
        named.append((swa, swa_state))
    check_same_network(named, ExportError)
    data = load_data(first["dataset"], device)
    info = first["dataset"]
    normalize = Normalize(info["mean"], info["std"], 1 + len(data.input_shape))
    x_check = data.first_inputs("test", parity_samples).contiguous()

    job = ExportJob(name, sources, list(nets), list(states), curve, curve_state, data, normalize, x_check,
                    grid_points, atol, max_interpolation_pp, swa_net, swa_state)
    where, manifest = write_artifact(job, None if out is None else Path(out), [*paths, *([swa] if swa else [])])
    seconds = time.perf_counter() - started
    extras = (" + curve" if curve is not None else "") + (" + swa" if swa is not None else "")
    progress.log(f"export: {len(nets)} members{extras} -> {where} ({seconds:.1f}s)")
    return {**where, "seconds": seconds, "manifest": manifest}


def export_runs(paths: list[Path], settings: ExportSettings, out: Path | None = None, name: str | None = None,
                swa: Path | None = None) -> dict[str, Any]:
    """`export_artifact` with the config's export section (the CLI's and the pipeline's one call)."""
    return export_artifact(paths, name or settings.name, out=out, grid_points=settings.bn_grid_points,
                           atol=settings.parity_atol, max_interpolation_pp=settings.max_bn_interpolation_pp, swa=swa)


def write_artifact(job: ExportJob, out: Path | None, sources: list[Path]) -> tuple[dict[str, str], dict[str, Any]]:
    """Build the graphs and manifest of `job` in a scratch folder, check them (parity, the serving
    loader), then move them to `out` (never over any of `sources`) or, without `out`, into the
    BentoML store. Returns where it went and the manifest. The CLI and the Python API export here."""
    work = Path(tempfile.mkdtemp(prefix="modeconn-export-"))
    try:
        manifest = _build(work, job).model_dump(mode="json")
        # absent means none: loaders that predate these fields read the manifest
        optional = [(manifest, "swa"), (manifest["input"], "image"), (manifest["dataset"], "source"),
                    *((manifest[name], "prediction_sets") for name in ("ensemble", "swa", "curve") if manifest.get(name))]
        for section, key in optional:
            if section[key] is None:
                del section[key]
        atomic_write_json(work / MANIFEST_NAME, manifest)
        load_artifact(work)  # the serving loader must accept exactly what we wrote
        if out is not None:
            _replace_folder(work, out, sources)
            return {"folder": str(out)}, manifest
        from modeconn.contract.store import save_to_bentoml_store

        labels = {"architecture": architecture_label(job.states[0]["architecture"]), "dataset": job.states[0]["dataset"]["name"],
                  "members": str(len(job.nets)), "curve": job.curve.curve if job.curve is not None else "none",
                  "swa": "yes" if job.swa_net is not None else "no"}
        tag = save_to_bentoml_store(work, job.name, labels=labels, metadata=_store_metadata(manifest))
        return {"tag": tag}, manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _source(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _calibration(val_probs: torch.Tensor | None, test_probs: torch.Tensor, data: Dataset) -> Calibration | None:
    """T fitted on the validation split (None without one: such an artifact serves raw probabilities)."""
    if val_probs is None:
        return None
    return Calibration(**calibration_report(val_probs, data.y_val, test_probs, data.y_test))


def _prediction_sets(val_probs: torch.Tensor | None, test_probs: torch.Tensor, calibration: Calibration | None,
                     job: ExportJob) -> PredictionSets | None:
    """Split-conformal thresholds at the calibrated probabilities (None without a validation split)."""
    if val_probs is None or calibration is None:
        return None
    data = job.data
    fields = prediction_sets(val_probs, data.y_val, job.split_uniforms("val"), calibration.temperature,
                             test_probs, data.y_test, job.split_uniforms("test"))
    return None if fields is None else PredictionSets(**fields)


def _export_network(work: Path, rel: str, net: nn.Module, job: ExportJob,
                    parity: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One network as a MemberGraph at `rel`, held to the network by the parity gate; its
    test and validation probabilities (None without a validation split)."""
    data, normalize, x_check = job.data, job.normalize, job.x_check
    export_onnx(MemberGraph(net, normalize).eval(), (x_check[:2],), work / rel, ["x"], ["probabilities"])
    with torch.no_grad():  # the original network, not the rewritten export module
        expected = torch.softmax(net(normalize(x_check)), dim=1)
        probs = predict_probs(net, data, "test")
        val_probs = predict_probs(net, data, "val") if len(data.y_val) else None
    parity[rel] = check_parity(rel, ort_session(work / rel).run(None, {"x": x_check.numpy()})[0], expected, job.atol)
    return probs, val_probs


def _export_swa(work: Path, job: ExportJob, parity: dict[str, float]) -> Swa:
    """swa.onnx: the averaged network, exported and checked as a member is, with its own T."""
    assert job.swa_net is not None and job.swa_state is not None
    probs, val_probs = _export_network(work, "swa.onnx", job.swa_net, job, parity)
    record = job.swa_state.get("swa") or {}
    calibration = _calibration(val_probs, probs, job.data)
    return Swa(file="swa.onnx", source=_source(job.sources.swa), kind=job.swa_state.get("kind"),
               averaged=[str(p) for p in record.get("members", [])], bn_recomputed=record.get("bn_recomputed"),
               metrics=classification_metrics(probs, job.data.y_test), calibration=calibration,
               prediction_sets=_prediction_sets(val_probs, probs, calibration, job))


def _build(work: Path, job: ExportJob) -> Manifest:
    nets, states, data, normalize, x_check, atol = job.nets, job.states, job.data, job.normalize, job.x_check, job.atol
    has_val = len(data.y_val) > 0
    parity: dict[str, float] = {}
    files: list[str] = []
    members: list[Member] = []
    member_probs, member_val_probs = [], []
    with progress.task("export members", len(nets)) as advance:
        paths = job.sources.members or [None] * len(nets)  # the Python API's members have no files
        for i, (net, state, path) in enumerate(zip(nets, states, paths, strict=True)):
            rel = f"members/member-{i:03d}.onnx"
            probs, val_probs = _export_network(work, rel, net, job, parity)
            member_probs.append(probs)
            member_val_probs.append(val_probs)
            members.append(Member(file=rel, source=_source(path), kind=state.get("kind"),
                                  metrics=classification_metrics(probs, data.y_test),
                                  calibration=_calibration(val_probs, probs, data)))
            files.append(rel)
            advance()

    ensemble_graph = EnsembleGraph(list(nets), normalize).eval()
    export_onnx(ensemble_graph, (x_check[:2],), work / "ensemble.onnx", ["x"], ["probabilities", "member_probabilities"])
    with torch.no_grad():  # the mean of the original networks' softmax outputs
        members_expected = torch.stack([torch.softmax(net(normalize(x_check)), dim=1) for net in nets])
        mean_expected = members_expected.mean(dim=0)
    got_mean, got_members = ort_session(work / "ensemble.onnx").run(None, {"x": x_check.numpy()})
    parity["ensemble.onnx"] = max(check_parity("ensemble.onnx", got_mean, mean_expected, atol),
                                  check_parity("ensemble.onnx (members)", got_members, members_expected, atol))
    files.append("ensemble.onnx")
    ensemble_probs = torch.stack(member_probs).mean(dim=0)
    ensemble_val = torch.stack(member_val_probs).mean(dim=0) if has_val else None
    first = states[0]
    kinds = sorted({str(s.get("kind")) for s in states})
    ensemble_calibration = _calibration(ensemble_val, ensemble_probs, data)
    ensemble = Ensemble(file="ensemble.onnx", num_members=len(nets), kind="+".join(kinds),
                        settings=first.get("fge") or first.get("config", {}).get("fge", {}),
                        metrics=classification_metrics(ensemble_probs, data.y_test), calibration=ensemble_calibration,
                        prediction_sets=_prediction_sets(ensemble_val, ensemble_probs, ensemble_calibration, job))

    curve = None
    if job.curve is not None:
        curve = _export_curve(work, job, parity)
        files.append("curve.onnx")
    swa = None
    if job.swa_net is not None:
        swa = _export_swa(work, job, parity)
        files.append("swa.onnx")

    info = first["dataset"]
    described = data.describe()
    return Manifest(
        format_version=FORMAT_VERSION,
        name=job.name,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        versions=_versions(),
        architecture=Architecture(**first["architecture"]),
        # sizes, split seed and (MNIST-1D) generation parameters: enough to make the same data again
        dataset=DatasetInfo(name=info["name"], num_classes=data.num_classes, class_names=list(data.class_names),
                            source=data_source(described),
                            **{k: v for k, v in described.items() if k in DATA_PROVENANCE}),
        input=InputSpec(shape=list(data.input_shape), dtype="float32", range=[float(v) for v in data.value_range],
                        normalization=Normalization(mean=list(info["mean"]), std=list(info["std"])),
                        image=image_input(described)),
        files={rel: FileRecord(**file_record(with_class_names(work / rel, data.class_names))) for rel in files},
        members=members,
        ensemble=ensemble,
        curve=curve,
        swa=swa,
        parity=Parity(atol=atol, samples=len(x_check), max_abs_diff=parity),
    )


def _export_curve(work: Path, job: ExportJob, parity: dict[str, float]) -> Curve:
    curve, data, normalize, x_check, grid_points = job.curve, job.data, job.normalize, job.x_check, job.grid_points
    assert curve is not None and job.curve_state is not None
    bn_grid = bn_statistics_grid(curve, data, grid_points, x_check, normalize)
    exact = bn_grid.exact
    graph = CurveGraph(curve, bn_grid.statistics, grid_points, normalize).eval()
    t0 = torch.tensor([0.5])
    export_onnx(graph, (x_check[:2], t0), work / "curve.onnx", ["x", "t"], ["probabilities"])
    session = ort_session(work / "curve.onnx")
    worst = 0.0
    for t, expected in zip(even_ts(grid_points), exact, strict=True):  # every grid t: the exact network there
        got = session.run(None, {"x": x_check.numpy(), "t": np.array([t], dtype=np.float32)})[0]
        worst = max(worst, check_parity(f"curve.onnx at t={t:g}", got, expected, job.atol))
    parity["curve.onnx"] = worst
    interpolation = interpolation_check(graph, curve, data, grid_points)
    if not interpolation["max_abs_error_difference_pp"] <= job.max_interpolation_pp:
        raise ExportError(
            f"curve.onnx: between the {grid_points} grid points, interpolated BN statistics change the test error "
            f"by {interpolation['max_abs_error_difference_pp']:.3g} pp from exactly recomputed ones "
            f"(export.max_bn_interpolation_pp {job.max_interpolation_pp:g}); use more grid points (--bn-grid-points)")
    metrics = {}
    if job.sources.curve_report is not None:
        metrics = json.loads(job.sources.curve_report.read_text()).get("headline", {})
    calibration = CurveCalibration(**grid_temperatures(bn_grid.val_probs, data.y_val)) if bn_grid.val_probs else None
    sets = None
    if calibration is not None:
        fields = curve_prediction_sets(bn_grid.val_probs, data.y_val, job.split_uniforms("val"),
                                       calibration.temperatures)
        sets = None if fields is None else CurvePredictionSets(**fields)
    return Curve(file="curve.onnx", source=_source(job.sources.curve), type=curve.curve, num_bends=curve.num_bends,
                 bn_grid_points=grid_points, settings=job.curve_state["curve"], metrics=metrics,
                 bn_interpolation=BnInterpolation(**interpolation), calibration=calibration, prediction_sets=sets)


def _versions() -> dict[str, str]:
    import onnx

    try:
        own = importlib_metadata.version("modeconn")
    except importlib_metadata.PackageNotFoundError:
        own = "unknown"
    return {"modeconn": own, "torch": torch.__version__, "onnx": onnx.__version__}


def _store_metadata(manifest: dict[str, Any]) -> dict[str, Any]:
    meta = {"format_version": manifest["format_version"], "architecture": architecture_label(manifest["architecture"]),
            "dataset": manifest["dataset"]["name"], "members": len(manifest["members"]),
            "ensemble_test_error": manifest["ensemble"]["metrics"]["error"],
            "curve": manifest["curve"]["type"] if manifest["curve"] else None,
            "swa_test_error": manifest["swa"]["metrics"]["error"] if manifest.get("swa") else None}
    return {k: v for k, v in meta.items() if v is not None}  # BentoML's metadata refuses None


def _check_target(dst: Path, sources: list[Path]) -> None:
    if (problem := artifact_target_problem(dst, sources)) is not None:
        raise ExportError(problem)


def _replace_folder(src: Path, dst: Path, sources: list[Path]) -> None:
    """Move the finished artifact into place; an existing folder is replaced only when it is
    empty or an earlier artifact holding nothing else (training/core/runs.py), and only after the
    new one is complete, so a crash leaves either the old or the new artifact."""
    _check_target(dst, sources)
    dst.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))  # ours alone: nothing else is touched
    try:
        staged, old = scratch / "new", scratch / "old"
        shutil.copytree(src, staged)
        write_marker(staged, "artifact")
        if dst.exists():
            dst.rename(old)
            try:
                staged.rename(dst)
            except BaseException:
                old.rename(dst)  # the earlier artifact back in place before the scratch folder goes
                raise
        else:
            staged.rename(dst)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
