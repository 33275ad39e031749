"""Run directories: created once, refused when they already hold a run unless resumed or forced."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from serving.errors import ModeconnError
from training import distributed
from training.checkpoint import atomic_write_text
from training.config import Config


class RunDirError(ModeconnError):
    """A run directory that is in the way (already holds a run)."""


def prepare_run_dir(run_dir: Path, config: Config, *, resume: bool, force: bool, final: Path) -> None:
    """Every rank checks (so all fail alike); rank 0 alone deletes and writes."""
    if force and run_dir.exists() and distributed.is_main():
        shutil.rmtree(run_dir)
    distributed.barrier()
    has_run = (run_dir / "checkpoints").exists() or final.exists()
    if has_run and not resume:
        raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or --force to start over")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.model_dump(), sort_keys=False))
