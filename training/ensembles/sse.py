"""`modeconn sse`: Snapshot Ensembles (Huang et al. 2017), the baseline FGE is compared with.

From a freshly initialised network (seeded like `train`), SGD with the cosine LR restarted
every `sse.cycle_epochs` epochs; a snapshot (BN recomputed) at the end of every cycle, where
the LR is smallest. Snapshots only from cycles that end inside the `sse.epochs` budget.
Shares the driver, snapshot format and report with FGE (training/ensembles/snapshots.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from modeconn.training.core.config import Config, ConfigError, SSESettings
from modeconn.training.core.data import Dataset, iterations_per_epoch
from modeconn.training.core.loop import StageRun
from modeconn.training.core.networks import (
    dataset_spec,
    fresh_network,
    load_data,
    sgd_optimizer,
    stage_device,
    stage_run,
)
from modeconn.training.core.runs import prepare_run_dir
from modeconn.training.core.schedules import cosine_restart_learning_rate
from modeconn.training.ensembles.snapshots import SnapshotPlan, run_snapshots, snapshot_networks


def sse_budget(settings: SSESettings, steps_per_epoch: int) -> tuple[int, int]:
    """(cycle, budget) in iterations; an error when not even one cycle fits."""
    cycle = max(1, round(settings.cycle_epochs * steps_per_epoch))
    budget = settings.epochs * steps_per_epoch
    if budget < cycle:
        raise ConfigError(
            f"sse.epochs ({settings.epochs}) is shorter than one cycle (sse.cycle_epochs {settings.cycle_epochs}): "
            "no snapshot would be collected"
        )
    return cycle, budget


def sse_plan(settings: SSESettings, steps_per_epoch: int) -> SnapshotPlan:
    """SSE's walk: the cosine LR restarted every cycle, a snapshot at the end of each."""
    cycle, budget = sse_budget(settings, steps_per_epoch)
    return SnapshotPlan(
        method="sse",
        budget=budget,
        batch_size=settings.batch_size,
        learning_rate=lambda i: cosine_restart_learning_rate(i, cycle, settings.lr),
        collect_index=lambda i: i // cycle if i % cycle == 0 else None,
        cycle_end=lambda i: i,
        seed_offset=1,  # the data order of a train run with the same seed
        settings={**settings.model_dump(), "cycle_iterations": cycle},
    )


def sse_networks(model: nn.Module, data: Dataset, settings: SSESettings, run: StageRun) -> list[nn.Module]:
    """Snapshot Ensembles from `model` (its initialisation; trained in place): the snapshots in memory."""
    plan = sse_plan(settings, iterations_per_epoch(data, settings.batch_size))
    return snapshot_networks(plan, run, model=model, optimizer=sgd_optimizer(model, settings), data=data)


def run_sse(config: Config, run_dir: Path, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """`modeconn sse`: Snapshot Ensembles from scratch, written to `run_dir`; returns output paths and
    ensemble metrics."""
    settings = config.sse
    device = stage_device(config.device, config.distributed.backend)
    data = load_data(dataset_spec(config.data), device)
    plan = sse_plan(settings, iterations_per_epoch(data, settings.batch_size))
    model, optimizer, fields = fresh_network(config, data, device, settings, "sse")
    # after the network is built: a model that cannot be built leaves no run folder
    prepare_run_dir(run_dir, config, resume=resume, force=force, final=run_dir / "sse.json")
    run = stage_run(config, run_dir, resume=resume, save_every=config.train.save_every)
    return run_snapshots(plan, run, model=model, optimizer=optimizer, data=data, fields=fields)
