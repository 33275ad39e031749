"""Nothing the tool did not write is ever deleted.

A foreign file (`thesis.tex`) is put in every place a command replaces or deletes: the run
folder of train/curve/fge/sse --force, the compare and pipeline roots, export --out onto a
run folder, onto a foreign folder, onto an earlier artifact with a foreign file inside, and
--out naming a file. Each test checks that the file survives byte for byte and, where the
command refuses, that the real CLI exits 2 with one line naming the folder and no traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modeconn.contract.artifact import load_artifact
from modeconn.contract.errors import ModeconnError
from modeconn.training.core.checkpoint import load_checkpoint
from modeconn.training.core.config import load_config
from modeconn.training.core.runs import (
    MARKER,
    RunDirError,
    artifact_target_problem,
    claim_folder,
    folder_kind,
    write_marker,
)
from modeconn.training.export import ExportError, export_artifact
from modeconn.training.train import train_network

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mnist1d.yaml"
_SCRIPT = Path(sys.executable).with_name("modeconn")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "modeconn"]
TINY = {"model.kwargs.width": 8, "train.epochs": 2, "train.save_every": 1, "fge.start_fraction": 0.5,
        "curve.epochs": 1, "curve.save_every": 1, "fge.cycle_epochs": 1, "fge.epochs": 1,
        "sse.cycle_epochs": 1, "sse.epochs": 1}
TINY_ARGS = ["--config", str(CONFIG), "--device", "cpu", *(a for k, v in TINY.items() for a in ("--set", f"{k}={v}"))]
THESIS = b"\\documentclass{article} % the user's own work\n"


def modeconn(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def assert_refused(proc: subprocess.CompletedProcess[str], folder: Path, *needles: str) -> None:
    """Exit 2, one line on stderr naming the folder (and each needle), no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in (str(folder), *needles):
        assert needle in lines[0], (needle, lines[0])


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (hidden ones too) with its bytes; None for a folder."""
    return {p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 2-epoch train run (width 8), made by this version: marked."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    train_network(load_config(CONFIG, {**TINY, "device": "cpu"}), run_dir)
    return run_dir


def copy_run(tiny_run: Path, dst: Path, marked: bool = True) -> Path:
    shutil.copytree(tiny_run, dst)
    if not marked:  # a run folder as an earlier version made it
        (dst / MARKER).unlink()
    return dst


def foreign_folder(path: Path) -> Path:
    """A user's folder: a thesis, a notes folder and a config.yaml of their own."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_bytes(THESIS)
    (path / "notes" / "todo.txt").write_text("read Garipov et al.\n")
    (path / "config.yaml").write_text("my: own settings\n")
    return path


# ---------------------------------------------------------------- the marker
def test_run_folders_are_marked_and_the_marker_names_their_kind(tiny_run: Path) -> None:
    marker = json.loads((tiny_run / MARKER).read_text())
    assert marker["format"] == "modeconn-folder" and marker["kind"] == "run"
    assert folder_kind(tiny_run) == "run"
    assert issubclass(RunDirError, ModeconnError) and issubclass(ExportError, ModeconnError)


# ---------------------------------------------------------------- --force on a folder the tool made
@pytest.mark.slow
def test_train_force_deletes_its_own_files_and_keeps_a_foreign_one(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path / "run")
    (run_dir / "thesis.tex").write_bytes(THESIS)
    (run_dir / "checkpoints" / "draft.txt").write_text("mine\n")  # a foreign file inside a tool folder
    stale = run_dir / "checkpoints" / "epoch-0009.pt"  # a tool file the new run does not write again
    shutil.copy(run_dir / "checkpoints" / "epoch-0001.pt", stale)
    proc = modeconn("train", *TINY_ARGS, "--out", run_dir, "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "thesis.tex").read_bytes() == THESIS
    assert (run_dir / "checkpoints" / "draft.txt").read_text() == "mine\n"
    assert not stale.exists()  # really deleted, not merely overwritten
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["draft.txt", "epoch-0001.pt", "epoch-0002.pt"]
    assert "kept" in proc.stderr and "thesis.tex" in proc.stderr and "checkpoints/draft.txt" in proc.stderr
    assert load_checkpoint(run_dir / "final.pt")["metrics"] == json.loads(proc.stdout.splitlines()[-1])["metrics"]
    assert folder_kind(run_dir) == "run"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["curve", "fge", "sse"])
def test_curve_fge_sse_force_keep_a_foreign_file(command: str, tiny_run: Path, tmp_path: Path) -> None:
    """--force over a marked run folder (here: a train run) clears the tool's files, keeps thesis.tex."""
    from modeconn.training.curves.fit import fit_curve
    from modeconn.training.ensembles.fge import run_fge
    from modeconn.training.ensembles.sse import run_sse

    run_dir = copy_run(tiny_run, tmp_path / command)
    (run_dir / "thesis.tex").write_bytes(THESIS)
    config = load_config(CONFIG, {**TINY, "device": "cpu"})
    if command == "curve":
        fit_curve(config, tiny_run / "final.pt", tiny_run / "checkpoints" / "epoch-0001.pt", run_dir, force=True)
        assert load_checkpoint(run_dir / "final.pt")["kind"] == "curve"
    elif command == "fge":
        run_fge(config, tiny_run / "checkpoints" / "epoch-0001.pt", run_dir, force=True)
        assert (run_dir / "fge.json").is_file() and not (run_dir / "final.pt").exists()
    else:
        run_sse(config, run_dir, force=True)
        assert (run_dir / "sse.json").is_file() and not (run_dir / "final.pt").exists()
    assert (run_dir / "thesis.tex").read_bytes() == THESIS
    # every file the command wrote is one runs.py knows as the tool's: --force leaves only the foreign one
    claim_folder(run_dir, "run", force=True)
    assert sorted(p.name for p in run_dir.iterdir()) == [MARKER, "thesis.tex"]


# ---------------------------------------------------------------- folders the tool did not make
def _refusing_command(command: str, tiny_run: Path, out: Path) -> list[str | Path]:
    start = tiny_run / "checkpoints" / "epoch-0001.pt"
    extra: dict[str, list[str | Path]] = {
        "train": ["--out", out], "curve": ["--start", tiny_run / "final.pt", "--end", start, "--out", out],
        "fge": ["--from", start, "--out", out], "sse": ["--out", out],
        "compare": ["--out", out, "--budgets", "1", "--seeds", "1"], "pipeline": ["--runs", out],
    }
    return [command, *TINY_ARGS, *extra[command], "--force"]


@pytest.mark.parametrize("command", ["train", "curve", "fge", "sse", "compare", "pipeline"])
def test_force_refuses_a_foreign_folder_and_changes_nothing(command: str, tiny_run: Path, tmp_path: Path) -> None:
    out = foreign_folder(tmp_path / "mine")
    before = snapshot(out)
    proc = modeconn(*_refusing_command(command, tiny_run, out))
    assert_refused(proc, out, "thesis.tex", "not made by modeconn")
    assert snapshot(out) == before


def test_a_fresh_run_never_starts_in_a_foreign_folder(tmp_path: Path) -> None:
    """Without --force the run would overwrite the user's config.yaml: refused too."""
    out = foreign_folder(tmp_path / "mine")
    before = snapshot(out)
    for flag in ([], ["--resume"]):
        assert_refused(modeconn("train", *TINY_ARGS, "--out", out, *flag), out, "thesis.tex")
    assert snapshot(out) == before


def test_force_refuses_a_file_and_a_folder_of_another_kind(tiny_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "thesis.tex"
    path.write_bytes(THESIS)
    assert_refused(modeconn("train", *TINY_ARGS, "--out", path, "--force"), path, "not a folder")
    assert path.read_bytes() == THESIS
    root = tmp_path / "pipeline"
    root.mkdir()
    write_marker(root, "pipeline")
    copy_run(tiny_run, root / "train-seed0")
    before = snapshot(root)
    assert_refused(modeconn("train", *TINY_ARGS, "--out", root, "--force"), root, "pipeline folder")
    assert snapshot(root) == before


# ---------------------------------------------------------------- folders of earlier versions (no marker)
@pytest.mark.slow
def test_an_earlier_versions_run_resumes_and_is_marked(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path / "old", marked=False)
    (run_dir / "thesis.tex").write_bytes(THESIS)
    config = load_config(CONFIG, {**TINY, "device": "cpu", "train.epochs": 3})
    result = train_network(config, run_dir, resume=True)  # one more epoch from epoch-0002.pt
    assert load_checkpoint(run_dir / "checkpoints" / "epoch-0003.pt")["epoch"] == 3
    assert result["metrics"]["epoch"] == 3
    assert folder_kind(run_dir) == "run" and (run_dir / "thesis.tex").read_bytes() == THESIS


def test_force_on_an_earlier_versions_run(tiny_run: Path, tmp_path: Path) -> None:
    """Cleared when it holds only tool outputs around a real checkpoint; refused otherwise."""
    clean = copy_run(tiny_run, tmp_path / "clean", marked=False)
    claim_folder(clean, "run", force=True)
    assert sorted(p.name for p in clean.iterdir()) == [MARKER]

    mixed = copy_run(tiny_run, tmp_path / "mixed", marked=False)
    (mixed / "thesis.tex").write_bytes(THESIS)
    before = snapshot(mixed)
    assert_refused(modeconn("train", *TINY_ARGS, "--out", mixed, "--force"), mixed, "thesis.tex", MARKER)
    assert snapshot(mixed) == before

    # tool-like names only, but no modeconn checkpoint: not clearly a run, so not deleted
    fake = tmp_path / "fake"
    (fake / "checkpoints").mkdir(parents=True)
    (fake / "final.pt").write_bytes(b"not a checkpoint")
    (fake / "config.yaml").write_text("my: own settings\n")
    before = snapshot(fake)
    with pytest.raises(RunDirError, match="no modeconn checkpoint"):
        claim_folder(fake, "run", force=True)
    assert snapshot(fake) == before


# ---------------------------------------------------------------- compare and pipeline roots
@pytest.mark.slow
def test_compare_force_keeps_a_foreign_file(tiny_run: Path, tmp_path: Path) -> None:
    """A compare root as an earlier comparison left it (sub-runs, compare.md), plus foreign files."""
    root = tmp_path / "compare"
    root.mkdir()
    write_marker(root, "compare")
    for sub in ("ind-0", "ind-7", "fge"):  # ind-7: a sub-run this comparison does not make again
        copy_run(tiny_run, root / "seed-0" / sub)
    (root / "compare.md").write_text("| method | old table |\n")
    (root / "thesis.tex").write_bytes(THESIS)
    (root / "seed-0" / "fge" / "notes.txt").write_text("mine\n")
    old_final = (root / "seed-0" / "ind-0" / "final.pt").stat().st_mtime_ns  # copytree keeps the fixture's
    proc = modeconn("compare", *TINY_ARGS, "--out", root, "--budgets", "1", "--seeds", "1", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (root / "thesis.tex").read_bytes() == THESIS
    assert (root / "seed-0" / "fge" / "notes.txt").read_text() == "mine\n"
    assert not (root / "seed-0" / "ind-7").exists()
    assert "old table" not in (root / "compare.md").read_text()
    assert (root / "seed-0" / "ind-0" / "final.pt").stat().st_mtime_ns != old_final  # deleted and trained again
    assert (root / "seed-0" / "fge" / "fge.json").is_file() and (root / "seed-0" / "sse" / "sse.json").is_file()
    assert "resumed from" not in proc.stderr and "kept" in proc.stderr
    claim_folder(root, "compare", force=True, container=True)  # all the comparison wrote is known as its own
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        MARKER, "seed-0", "seed-0/fge", f"seed-0/fge/{MARKER}", "seed-0/fge/notes.txt", "thesis.tex"]


def test_pipeline_force_deletes_only_the_pipelines_files(tiny_run: Path, tmp_path: Path) -> None:
    """The pipeline's --force line (claim_folder) on a root as a pipeline leaves it, beside other
    commands' runs (runs/NAME/train is `modeconn train`'s default) and a foreign file."""
    root = tmp_path / "runs"
    root.mkdir()
    write_marker(root, "pipeline")
    for name in ("train-seed0", "train-seed1", "fge", "curve", "train"):
        copy_run(tiny_run, root / name)
    (root / "swa").mkdir()
    (root / "swa" / "swa.pt").write_bytes((tiny_run / "final.pt").read_bytes())
    (root / "export.json").write_text("{}\n")
    (root / "summary.json").write_text("{}\n")
    (root / "thesis.tex").write_bytes(THESIS)
    (root / "curve" / "notes.txt").write_text("mine\n")
    train_before = snapshot(root / "train")
    claim_folder(root, "pipeline", force=True, container=True)
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "curve", "thesis.tex", "train"]
    assert sorted(p.name for p in (root / "curve").iterdir()) == [MARKER, "notes.txt"]  # still the tool's
    assert snapshot(root / "train") == train_before  # `modeconn train`'s run is not the pipeline's
    assert (root / "thesis.tex").read_bytes() == THESIS


def test_a_compare_or_pipeline_root_adds_to_a_folder_but_overwrites_nothing(tiny_run: Path, tmp_path: Path) -> None:
    """Without --force a root may be a folder holding other things (runs/NAME holds every
    command's default run folder), but never one whose files it would overwrite, nor a run."""
    mine = foreign_folder(tmp_path / "mine")
    before = snapshot(mine)
    claim_folder(mine, "pipeline", force=False, container=True)
    assert folder_kind(mine) == "pipeline"
    assert {k: v for k, v in snapshot(mine).items() if k != MARKER} == before
    clash = foreign_folder(tmp_path / "clash")
    (clash / "summary.json").write_text('{"mine": true}\n')
    before = snapshot(clash)
    with pytest.raises(RunDirError, match="summary.json"):
        claim_folder(clash, "pipeline", force=False, container=True)
    old_run = copy_run(tiny_run, tmp_path / "old-run", marked=False)
    with pytest.raises(RunDirError, match="holds a modeconn run"):
        claim_folder(old_run, "compare", force=False, container=True)
    assert snapshot(clash) == before and folder_kind(old_run) is None


# ---------------------------------------------------------------- export --out
def _export(sources: list[Path], out: Path) -> dict[str, Any]:
    return export_artifact(sources, "t", out=out, grid_points=3, parity_samples=32)


def test_export_out_onto_the_run_being_exported_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(tiny_run, tmp_path / "run")
    (run_dir / "thesis.tex").write_bytes(THESIS)
    before = snapshot(run_dir)
    assert_refused(modeconn("export", run_dir, "--out", run_dir), run_dir, "is the run folder")
    with pytest.raises(ExportError, match="is inside the run folder"):
        _export([run_dir], run_dir / "artifact")
    with pytest.raises(ExportError, match="contains the run folder"):
        _export([run_dir / "final.pt"], tmp_path)
    assert snapshot(run_dir) == before


def test_export_out_onto_a_foreign_folder_or_a_file_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    mine = foreign_folder(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(ExportError, match=f"{mine}.*not a modeconn artifact.*thesis.tex"):
        _export([tiny_run], mine)
    assert snapshot(mine) == before
    other_run = copy_run(tiny_run, tmp_path / "other-run")  # a run, but not one being exported
    run_before = snapshot(other_run)
    with pytest.raises(ExportError, match="modeconn run folder"):
        _export([tiny_run / "final.pt"], other_run)
    assert snapshot(other_run) == run_before
    path = tmp_path / "thesis.tex"
    path.write_bytes(THESIS)
    assert_refused(modeconn("export", tiny_run, "--out", path), path, "not a folder")
    assert path.read_bytes() == THESIS


@pytest.mark.slow
def test_export_replaces_only_an_artifact_with_nothing_else_inside(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    decoy = tmp_path / ".artifact.old"  # the old code deleted a folder by this name
    decoy.mkdir()
    (decoy / "thesis.tex").write_bytes(THESIS)
    first = _export([tiny_run], out)
    assert folder_kind(out) == "artifact" and load_artifact(out).num_members == 1
    inode = out.stat().st_ino
    second = _export([tiny_run], out)  # an earlier artifact: replaced by a new folder
    assert out.stat().st_ino != inode
    assert json.loads((out / "manifest.json").read_text())["created_at"] == second["manifest"]["created_at"]
    assert second["manifest"]["created_at"] >= first["manifest"]["created_at"]
    assert folder_kind(out) == "artifact"
    (out / MARKER).unlink()  # an artifact of an earlier version (no marker) may be replaced too
    assert artifact_target_problem(out, [tiny_run]) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".artifact.old", "artifact"]  # no scratch left
    assert (decoy / "thesis.tex").read_bytes() == THESIS

    (out / "members" / "thesis.tex").write_bytes(THESIS)  # a foreign file inside the artifact
    before = snapshot(out)
    with pytest.raises(ExportError, match="members/thesis.tex"):
        _export([tiny_run], out)
    assert snapshot(out) == before


def test_curve_point_out_never_replaces_a_run_file_or_a_users_file(tmp_path: Path, tiny_run: Path) -> None:
    from modeconn.training.curves.evaluate import save_curve_point

    run_dir = copy_run(tiny_run, tmp_path / "run")
    (run_dir / "thesis.tex").write_bytes(THESIS)
    before = snapshot(run_dir)
    for out in (run_dir / "final.pt", run_dir / "thesis.tex"):
        with pytest.raises(RunDirError, match=str(out)):
            save_curve_point(run_dir, 0.5, out, device="cpu")
    assert snapshot(run_dir) == before


def test_reports_never_overwrite_a_users_file(tiny_run: Path, tmp_path: Path) -> None:
    """eval-curve and ensemble-eval --out: a foreign folder holding a file of a report's name is
    refused; a new folder is the tool's and may be written again; a run folder takes reports."""
    mine = foreign_folder(tmp_path / "mine")
    (mine / "curve.png").write_bytes(b"my own plot")
    (mine / "ensemble.json").write_text('{"mine": true}\n')
    before = snapshot(mine)
    assert_refused(modeconn("eval-curve", tiny_run, "--out", mine, "--device", "cpu"), mine, "curve.png")
    assert_refused(modeconn("ensemble-eval", tiny_run, "--out", mine, "--device", "cpu"), mine, "ensemble.json")
    assert snapshot(mine) == before
    from modeconn.training.ensembles.evaluate import evaluate_checkpoints

    fresh = tmp_path / "reports"
    first = evaluate_checkpoints([tiny_run], device="cpu", out_dir=fresh)
    again = evaluate_checkpoints([tiny_run], device="cpu", out_dir=fresh)  # the tool's own folder
    assert folder_kind(fresh) == "reports" and first["ensemble"] == again["ensemble"]
    run_dir = copy_run(tiny_run, tmp_path / "run")
    evaluate_checkpoints([run_dir], device="cpu", out_dir=run_dir)
    assert json.loads((run_dir / "ensemble.json").read_text())["members"] == 1
