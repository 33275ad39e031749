"""`modeconn train`: one independently trained network (the paper's "Ind")."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeconn.training.core import distributed, progress
from modeconn.training.core.checkpoint import model_checkpoint, read_finished, save_checkpoint
from modeconn.training.core.config import Config, FGESettings, TrainSettings
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import FitPlan, StageRun, fit
from modeconn.training.core.networks import (
    dataset_spec,
    epoch_metrics,
    fresh_network,
    held_out_metrics,
    load_data,
    stage_device,
    stage_run,
)
from modeconn.training.core.runs import prepare_run_dir
from modeconn.training.core.schedules import paper_learning_rate


def fge_start_epoch(train: TrainSettings, fge: FGESettings) -> int:
    """The epoch whose checkpoint FGE starts from (the paper: 160 of 200)."""
    return max(1, round(fge.start_fraction * train.epochs))


def train_model(model: nn.Module, optimizer: torch.optim.Optimizer, data: Dataset, settings: TrainSettings,
                run: StageRun, *, save_epochs: list[int], description: str = "train",
                checkpoint_fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train `model` on `data`'s training split with the paper's schedule (the one loop,
    training/core/loop.py), checkpointing also at `save_epochs`; returns the per-epoch rows."""
    plan = FitPlan(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=lambda epoch, _: paper_learning_rate(settings.lr, epoch, settings.epochs),
        seed=run.seed + 1,
        description=description,
        save_epochs=save_epochs,
        evaluate=lambda: epoch_metrics(model, data),
        **run.loop_options(),
    )
    return fit(plan, run_dir=run.run_dir, model=model, optimizer=optimizer, data=data,
               checkpoint_fields=checkpoint_fields or {}, resume=run.resume)


def train_network(config: Config, run_dir: Path, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Train one network; returns output paths and final test metrics."""
    final_path = run_dir / "final.pt"
    device = stage_device(config.device, config.distributed.backend)
    started = time.perf_counter()
    data = load_data(dataset_spec(config.data), device)  # a data set that cannot be read: nothing written
    settings = config.train
    model, optimizer, fields = fresh_network(config, data, device, settings, "train")
    # after the network is built: a model that cannot be built leaves no run folder
    prepare_run_dir(run_dir, config, resume=resume, force=force, final=final_path)
    run = stage_run(config, run_dir, resume=resume, save_every=settings.save_every)
    rows = train_model(model, optimizer, data, settings, run, save_epochs=[fge_start_epoch(settings, config.fge)],
                       description=f"train {config.name}", checkpoint_fields=fields)
    if not distributed.is_main():
        return {"run_dir": str(run_dir), "rank": distributed.rank()}
    metrics = {**rows[-1], **held_out_metrics(model, data)}
    save_checkpoint(final_path, model_checkpoint(model, **fields, metrics=metrics))
    seconds = time.perf_counter() - started
    progress.log(f"train {config.name}: test error {metrics['test_error']:.2f} %  ({seconds:.1f}s)")
    return {"run_dir": str(run_dir), "checkpoint": str(final_path), "metrics": metrics, "seconds": seconds}


def train_or_reuse(config: Config, run_dir: Path) -> dict[str, Any]:
    """The result of the finished run in `run_dir`, or train (continuing what is there)."""
    return finished_result(run_dir) or train_network(config, run_dir, resume=True)


def finished_result(run_dir: Path) -> dict[str, Any] | None:
    """The result of a run that already finished, when its final checkpoint is valid."""
    path = run_dir / "final.pt"
    if (state := read_finished(path)) is None:
        return None
    return {"run_dir": str(run_dir), "checkpoint": str(path), "metrics": state.get("metrics", {}), "skipped": True}
