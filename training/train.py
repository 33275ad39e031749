"""`modeconn train`: one independently trained network (the paper's "Ind")."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from modeconn.training.core import distributed, progress
from modeconn.training.core.checkpoint import model_checkpoint, read_finished, save_checkpoint
from modeconn.training.core.config import Config
from modeconn.training.core.loop import FitPlan, fit
from modeconn.training.core.networks import (
    dataset_spec,
    epoch_metrics,
    fresh_network,
    held_out_metrics,
    load_data,
    stage_device,
)
from modeconn.training.core.runs import prepare_run_dir
from modeconn.training.core.schedules import paper_learning_rate


def fge_start_epoch(config: Config) -> int:
    """The epoch whose checkpoint FGE starts from (the paper: 160 of 200)."""
    return max(1, round(config.fge.start_fraction * config.train.epochs))


def train_network(config: Config, run_dir: Path, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Train one network; returns output paths and final test metrics."""
    final_path = run_dir / "final.pt"
    device = stage_device(config)
    started = time.perf_counter()
    data = load_data(dataset_spec(config), device)
    settings = config.train
    model, optimizer, fields = fresh_network(config, data, device, settings, "train")
    # after the network is built: a model that cannot be built leaves no run folder
    prepare_run_dir(run_dir, config, resume=resume, force=force, final=final_path)
    plan = FitPlan(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=lambda epoch, _: paper_learning_rate(settings.lr, epoch, settings.epochs),
        seed=config.seed + 1,
        description=f"train {config.name}",
        save_every=settings.save_every,
        save_epochs=[fge_start_epoch(config)],
        sync_batchnorm=config.distributed.sync_batchnorm,
        step=config.step,
        tensorboard=config.tensorboard,
        evaluate=lambda: epoch_metrics(model, data),
    )
    rows = fit(plan, run_dir=run_dir, model=model, optimizer=optimizer, data=data, checkpoint_fields=fields,
               resume=resume)
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
