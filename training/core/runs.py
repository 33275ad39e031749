"""Folders the tool writes: which it may create, continue, clear or replace (one place for the rules).

Every folder the tool makes gets a marker file, MARKER, naming its kind: a "run" (train,
curve, fge, sse), a "compare" or "pipeline" root, an exported "artifact", a folder of "reports". Deleting acts
only on a folder that is empty, marked, or made by an earlier version (no marker) and
holding nothing but known tool outputs around a real modeconn checkpoint or manifest;
and even there only on the files the tool writes (LAYOUTS): anything else in a marked
folder is kept and named in the log, anything else in an unmarked one refuses the delete.
A fresh run never starts in a non-empty folder the tool did not make (it would overwrite
files such as config.yaml).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.markup import escape

from modeconn.contract.errors import ModeconnError
from modeconn.training.core import distributed, progress
from modeconn.training.core.checkpoint import (
    CheckpointError,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
)
from modeconn.training.core.config import Config

MARKER = ".modeconn.json"
_MARKER_FORMAT = "modeconn-folder"
_SHOWN = 5  # foreign entries named in an error


class RunDirError(ModeconnError):
    """A run directory that is in the way (already holds a run, or holds what the tool did not write)."""


# What each kind of folder holds that the tool wrote: a name pattern (a full-match regex) maps
# to None for a file or to the layout of a folder. A new output file must be added here, or
# --force keeps it (in a marked folder) or refuses (in an unmarked one).
Layout = dict[str, Any]
RUN_LAYOUT: Layout = {
    r"config\.yaml": None, r"metrics\.jsonl": None, r"(final|start|aligned-end)\.pt": None, r"lr\.csv": None,
    r"(fge|sse|curve)\.(json|csv|png)": None, r"plane\.(json|csv|npz|png)": None, r"ensemble\.(json|csv)": None,
    r"checkpoints": {r"epoch-\d+\.pt": None},
    r"snapshots": {r"snapshot-\d+\.pt": None},
    r"tensorboard": {r"events\.out\.tfevents\..+": None},  # tensorboard: true (training/core/monitor.py)
    r"simplex\.(json|csv)": None,
    # `modeconn simplex`: each trained vertex's run of the loop (training/simplex/fit.py)
    r"vertex-\d+": {r"metrics\.jsonl": None, r"vertex\.pt": None, r"checkpoints": {r"epoch-\d+\.pt": None},
                    r"tensorboard": {r"events\.out\.tfevents\..+": None}},
}
LAYOUTS: dict[str, Layout] = {
    "run": RUN_LAYOUT,
    "compare": {r"compare(_differences)?\.(md|csv|json)": None, r"seed-\d+": {r"ind-\d+": RUN_LAYOUT, r"eq-\d+B-m\d+-\d+": RUN_LAYOUT, r"fge": RUN_LAYOUT, r"sse": RUN_LAYOUT,
                                                                  r"simplex-\d+B": RUN_LAYOUT}},
    "pipeline": {r"export\.json": None, r"summary\.(json|md)": None, r"train-seed-?\d+": RUN_LAYOUT,
                 r"curve": RUN_LAYOUT, r"fge": RUN_LAYOUT, r"swa": {r"swa\.pt": None}},
}
# atomic_write_bytes' temporary file beside NAME (tempfile.mkstemp: 8 random characters)
_TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


# ---------------------------------------------------------------- the marker
def folder_kind(folder: Path) -> str | None:
    """The kind the marker in `folder` names, or None (no marker, or not one of ours)."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        return None
    kind = marker.get("kind")
    return kind if isinstance(kind, str) else None


def write_marker(folder: Path, kind: str) -> None:
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    atomic_write_json(folder / MARKER, {"format": _MARKER_FORMAT, "kind": kind, "created": created})


# ---------------------------------------------------------------- what a folder holds
@dataclass
class _Plan:
    """A folder's entries sorted into the tool's (files, and folders removed when empty) and the rest."""

    files: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)  # deepest first
    foreign: list[Path] = field(default_factory=list)


def _match(name: str, layout: Layout) -> tuple[bool, Layout | None]:
    if name == MARKER:
        return True, None
    temp = _TEMP.fullmatch(name)
    for pattern, sub in layout.items():
        if re.fullmatch(pattern, name):
            return True, sub
        if temp and sub is None and re.fullmatch(pattern, temp.group(1)):
            return True, None
    return False, None


def _plan(folder: Path, layout: Layout, plan: _Plan | None = None) -> _Plan:
    plan = plan if plan is not None else _Plan()
    for entry in sorted(folder.iterdir()):
        known, sub = _match(entry.name, layout)
        if not known or entry.is_symlink():  # the tool never makes links
            plan.foreign.append(entry)
        elif sub is None:
            (plan.files if entry.is_file() else plan.foreign).append(entry)
        elif entry.is_dir():
            _plan(entry, sub, plan)
            plan.dirs.append(entry)
        else:
            plan.foreign.append(entry)
    return plan


def _names(paths: list[Path], root: Path) -> str:
    shown = ", ".join(p.relative_to(root).as_posix() + ("/" if p.is_dir() and not p.is_symlink() else "") for p in paths[:_SHOWN])
    return shown + (f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else "")


def _holds_checkpoint(run_dir: Path) -> bool:
    """A real modeconn checkpoint in the places a run keeps them (one is enough)."""
    candidates = [run_dir / "final.pt", *sorted((run_dir / "checkpoints").glob("epoch-*.pt"))[-1:],
                  *sorted((run_dir / "snapshots").glob("snapshot-*.pt"))[:1]]
    for path in candidates:
        try:
            load_checkpoint(path)
            return True
        except CheckpointError:
            continue
    return False


def _is_earlier_run(folder: Path, kind: str) -> bool:
    """An unmarked folder that clearly holds a modeconn run (or root) of `kind`, made by an earlier version."""
    if kind == "run":
        return _holds_checkpoint(folder)
    layout = LAYOUTS[kind]
    for entry in folder.iterdir():
        known, sub = _match(entry.name, layout)
        if known and sub is not None and entry.is_dir() and not entry.is_symlink():
            if sub is RUN_LAYOUT and (folder_kind(entry) == "run" or _holds_checkpoint(entry)):
                return True
            if sub is not RUN_LAYOUT and any(child.is_dir() and (folder_kind(child) == "run" or _holds_checkpoint(child))
                                             for child in entry.iterdir()):
                return True
    return False


# ---------------------------------------------------------------- claiming and clearing
def _clear(folder: Path, plan: _Plan) -> None:
    # markers go last, and only with their folder: a folder that keeps a foreign file (and the
    # top one, reused now) stays marked, so a crash or the next run still finds it the tool's
    for path in plan.files:
        if path.name != MARKER:
            path.unlink(missing_ok=True)
    for path in plan.dirs:
        if {p.name for p in path.iterdir()} <= {MARKER}:
            (path / MARKER).unlink(missing_ok=True)
            path.rmdir()
    if plan.foreign:
        progress.log(f"[yellow]{escape(str(folder))}: --force kept what modeconn did not write there: "
                     f"{escape(_names(plan.foreign, folder))}[/yellow]")


def claim_folder(folder: Path, kind: str, *, force: bool, container: bool = False) -> None:
    """Make `folder` ready for a run of `kind`: create and mark it, clearing the tool's files first
    when `force`. Refuses (RunDirError naming the folder and what is in the way) a file, a folder
    of another kind, a fresh start in a non-empty folder the tool did not make (unless `container`:
    a compare/pipeline root only adds its own named entries), and a --force that would delete
    anything the tool did not write in an unmarked folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"{folder} is not a folder; --out must name a folder (new, empty or made by modeconn)")
    entries = sorted(folder.iterdir()) if folder.exists() else []
    marked = folder_kind(folder) if entries else None
    if marked is not None and marked != kind:
        raise RunDirError(f"{folder} is a modeconn {marked} folder, not a {kind} folder; choose another --out")
    if entries and marked is None:
        earlier = _is_earlier_run(folder, kind)
        if force:
            plan = _plan(folder, LAYOUTS[kind])
            if plan.foreign:
                raise RunDirError(
                    f"{folder} was not made by modeconn (it has no {MARKER}) and holds what modeconn does not "
                    f"write: {_names(plan.foreign, folder)}; --force deletes nothing it did not write: move those "
                    "away or choose another --out")
            if not earlier:
                raise RunDirError(
                    f"{folder} was not made by modeconn (no {MARKER}, no modeconn checkpoint) and is not empty: "
                    f"{_names(entries, folder)}; --force deletes only what modeconn made: delete it yourself "
                    "or choose another --out")
        elif not earlier and not container:
            raise RunDirError(
                f"{folder} is not empty and was not made by modeconn: {_names(entries, folder)}; "
                "choose a new or empty folder for --out")
        elif not earlier:  # a container adds its entries beside foreign ones, but overwrites none
            if _is_earlier_run(folder, "run"):
                raise RunDirError(f"{folder} holds a modeconn run (made by an earlier version), not a {kind} "
                                  "root; choose another folder")
            clash = [e for e in entries if e.name != MARKER and _match(e.name, LAYOUTS[kind]) == (True, None)]
            if clash:
                raise RunDirError(f"{folder} was not made by modeconn and holds files the {kind} would overwrite: "
                                  f"{_names(clash, folder)}; choose a new or empty folder")
    if force and entries:
        _clear(folder, _plan(folder, LAYOUTS[kind]))
    folder.mkdir(parents=True, exist_ok=True)
    if folder_kind(folder) != kind:
        write_marker(folder, kind)


def prepare_run_dir(run_dir: Path, config: Config, *, resume: bool, force: bool, final: Path) -> None:
    """Under torchrun rank 0 alone claims the folder (clears, marks) and writes; then every rank
    checks, so all fail alike."""
    if distributed.is_main():
        claim_folder(run_dir, "run", force=force)
    distributed.barrier()
    has_run = any((run_dir / "checkpoints").glob("epoch-*.pt")) or final.exists()
    if has_run and not resume and not force:  # after --force only foreign files can be left
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or --force to start over")
    if distributed.is_main():
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(), sort_keys=False))


def check_replaceable_checkpoint(path: Path, kind: str) -> None:
    """A checkpoint file about to be written at `path` may replace only an earlier one of `kind`
    (e.g. curve-point --out given the run's final.pt, or a user's file, is refused)."""
    path = Path(path)
    if path.is_dir():
        raise RunDirError(f"--out {path} is a folder; give the checkpoint file to write")
    if not path.exists() and not path.is_symlink():
        return
    try:
        state = None if path.is_symlink() else load_checkpoint(path)
    except CheckpointError:
        state = None
    if state is None:
        raise RunDirError(f"--out {path} already exists and is not a modeconn checkpoint; choose a new file name")
    if state.get("kind") != kind:
        raise RunDirError(f"--out {path} already exists and is a modeconn {state.get('kind') or 'network'} checkpoint, "
                          f"not an earlier {kind}; choose a new file name")


def check_report_folder(folder: Path, names: tuple[str, ...]) -> None:
    """Reports (eval-curve, ensemble-eval --out) go into a run folder, a folder of reports the
    tool made (marked "reports" when new or empty), or any other folder where none of `names`
    exists yet: a file of the user's is never overwritten."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunDirError(f"--out {folder} is not a folder; give the folder the reports go into")
    if not folder.exists() or not any(folder.iterdir()):
        folder.mkdir(parents=True, exist_ok=True)
        write_marker(folder, "reports")
        return
    if folder_kind(folder) in ("run", "reports") or (folder_kind(folder) is None and _is_earlier_run(folder, "run")):
        return
    clash = [folder / name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if clash:
        raise RunDirError(f"--out {folder} was not made by modeconn and already holds {_names(clash, folder)}, "
                          "which the reports would overwrite; choose another --out")


# ---------------------------------------------------------------- export targets
def _source_folder(path: Path) -> Path:
    """The run folder a source stands for: itself, or the run holding a checkpoint file."""
    path = path.resolve()
    if path.is_dir():
        return path
    parent = path.parent
    return parent.parent if parent.name in ("checkpoints", "snapshots") else parent


def _walk(root: Path) -> list[Path]:
    """Every entry under `root`, links not followed."""
    found = []
    for top, dirs, files in os.walk(root):
        found += [Path(top, name) for name in dirs + files]
    return sorted(found)


def artifact_target_problem(dst: Path, sources: list[Path]) -> str | None:
    """Why `export --out dst` may not replace `dst`, or None. It may when dst is missing, an empty
    folder, or an earlier artifact (its manifest lists every file in it; marked or from an earlier
    version) that is none of, inside none of and holds none of the sources."""
    dst = Path(dst)
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        return f"--out {dst} is not a folder; export writes the artifact as a folder: choose a new folder name"
    where = dst.resolve()
    for source in sources:
        run = _source_folder(Path(source))
        if where == run or run in where.parents or where in run.parents:
            relation = "is" if where == run else "is inside" if run in where.parents else "contains"
            return (f"--out {dst} {relation} the run folder {run} being exported; export replaces the whole "
                    "--out folder: choose a folder outside the runs")
    if not dst.exists() or not any(dst.iterdir()):
        return None
    kind = folder_kind(dst)
    if kind not in (None, "artifact"):
        return f"--out {dst} is a modeconn {kind} folder, not an exported artifact: choose another --out"
    try:
        manifest = json.loads((dst / "manifest.json").read_text())
        listed = set(manifest["files"]) if isinstance(manifest, dict) and isinstance(manifest.get("format_version"), int) else None
    except (OSError, ValueError, KeyError, TypeError):
        listed = None
    if listed is None:
        return (f"--out {dst} is not empty and is not a modeconn artifact (no valid manifest.json): "
                f"{_names(sorted(dst.iterdir()), dst)}; choose a new or empty folder")
    listed |= {"manifest.json", MARKER}
    folders = {parent.as_posix() for rel in listed for parent in Path(rel).parents}
    foreign = [p for p in _walk(dst)
               if p.is_symlink() or p.relative_to(dst).as_posix() not in (folders if p.is_dir() else listed)]
    if foreign:
        return (f"--out {dst} is an artifact but also holds what export did not write: {_names(foreign, dst)}; "
                "export replaces the whole folder: move those away or choose another --out")
    return None


__all__ = ["MARKER", "RunDirError", "artifact_target_problem", "check_replaceable_checkpoint", "check_report_folder", "claim_folder", "folder_kind",
           "prepare_run_dir", "write_marker"]
