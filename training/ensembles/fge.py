"""`modeconn fge`: Fast Geometric Ensembling (Garipov et al. 2018) from a trained network.

FGE continues SGD from an epoch checkpoint (weights and optimizer state, momentum buffers
included: the paper's setting), or from any network checkpoint or bare state_dict with
fresh momentum (see fge_start), with the triangular cyclical LR of docs/design.md, and collects the weights in the
middle of every cycle (where lr = lr2) as an ordinary network checkpoint
`run_dir/snapshots/snapshot-NNN.pt`, BN statistics recomputed on a copy. The weights it
starts from are kept as `run_dir/start.pt` (for the report's distances in weight space).

Budget: round(fge.epochs x iterations per epoch) iterations; a snapshot is collected only in a
cycle that ends inside the budget, so the number of snapshots = budget // cycle.

The driver, snapshot format and report are shared with SSE (training/ensembles/snapshots.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeconn.training.core import distributed, progress
from modeconn.training.core.checkpoint import CheckpointError
from modeconn.training.core.config import (
    Config,
    ConfigError,
    DataSettings,
    FGESettings,
    ModelSettings,
)
from modeconn.training.core.data import Dataset, iterations_per_epoch
from modeconn.training.core.loop import StageRun
from modeconn.training.core.networks import (
    held_out_metrics,
    load_data,
    network_from_state,
    network_state,
    sgd_optimizer,
    stage_device,
    stage_run,
)
from modeconn.training.core.runs import prepare_run_dir
from modeconn.training.core.schedules import even_cycle_iterations, fge_collects, fge_learning_rate
from modeconn.training.ensembles.snapshots import SnapshotPlan, run_snapshots, snapshot_networks

MOMENTUM_KEPT, MOMENTUM_FRESH = "from checkpoint", "fresh"


@dataclass
class FGEStart:
    model: nn.Module
    optimizer: torch.optim.SGD
    state: dict[str, Any]  # the start's fields (architecture, dataset, epoch, ...), weights included
    source: str  # "epoch checkpoint", "checkpoint without optimizer state" or "weights file"
    momentum: str  # MOMENTUM_KEPT or MOMENTUM_FRESH


def fge_start(path: Path, settings: FGESettings, device: torch.device, *, model: ModelSettings,
              data: DataSettings) -> FGEStart:
    """The network and SGD optimizer FGE (of `settings`) starts from.

    An epoch checkpoint brings its momentum buffers (the paper's setting). A checkpoint
    without optimizer state (final.pt, a snapshot, a curve point) or weights trained elsewhere
    (a state_dict file or .safetensors of the `model` section on the `data` section's data:
    network_state) starts with fresh momentum (zero buffers, as at any SGD start).
    """
    path = Path(path)
    state, is_checkpoint = network_state(path, model, data, device, "FGE start")
    if is_checkpoint:
        source = "epoch checkpoint" if "optimizer" in state else "checkpoint without optimizer state"
    else:
        source = "weights file"
    network = network_from_state(state, path, device)
    optimizer = torch.optim.SGD(network.parameters(), lr=settings.lr1, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    if "optimizer" not in state:
        return FGEStart(network, optimizer, state, source, MOMENTUM_FRESH)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: its optimizer state does not fit an SGD over the network ({err})") from err
    # load_state_dict also brings back the train run's hyperparameters; FGE's settings apply
    for group in optimizer.param_groups:
        group.update(momentum=settings.momentum, weight_decay=settings.weight_decay)
    return FGEStart(network, optimizer, state, source, MOMENTUM_KEPT)


def fge_budget(settings: FGESettings, steps_per_epoch: int) -> tuple[int, int]:
    """(cycle, budget) in iterations; an error when not even one cycle fits."""
    cycle = even_cycle_iterations(settings.cycle_epochs, steps_per_epoch)
    budget = round(settings.epochs * steps_per_epoch)
    if budget < cycle:
        raise ConfigError(
            f"fge.epochs ({settings.epochs}) is shorter than one cycle (fge.cycle_epochs {settings.cycle_epochs} "
            f"= {cycle} iterations): no snapshot would be collected"
        )
    return cycle, budget


def fge_plan(settings: FGESettings, steps_per_epoch: int, *, record: dict[str, Any] | None = None,
             start: dict[str, Any] | None = None) -> SnapshotPlan:
    """FGE's walk: the triangular cycle between lr1 and lr2, a snapshot at each cycle's middle (lr2)
    in every cycle that ends inside the budget. `record` adds to the settings the report shows."""
    cycle, budget = fge_budget(settings, steps_per_epoch)
    if budget % cycle:
        progress.log(f"[yellow]fge: the budget ({budget} iterations) is not a whole number of cycles ({cycle}); "
                     f"the last {budget % cycle} iterations add no snapshot[/yellow]")
    return SnapshotPlan(
        method="fge",
        budget=budget,
        batch_size=settings.batch_size,
        learning_rate=lambda i: fge_learning_rate(i, cycle, settings.lr1, settings.lr2),
        # whole cycles only: the cycle of the collection at i ends at i + c/2
        collect_index=lambda i: i // cycle + 1 if fge_collects(i, cycle) and i + cycle // 2 <= budget else None,
        cycle_end=lambda i: i + cycle // 2,
        seed_offset=2,  # a data order of its own (train uses seed + 1)
        settings={**settings.model_dump(), "cycle_iterations": cycle, **(record or {})},
        bn_update=settings.bn_update,
        start=start,
    )


def fge_networks(model: nn.Module, data: Dataset, settings: FGESettings, run: StageRun,
                 optimizer: torch.optim.Optimizer | None = None) -> list[nn.Module]:
    """FGE from `model` (trained in place) over `data`: the snapshots in memory, BN recomputed
    as the CLI's are. Without `optimizer`, fresh momentum."""
    plan = fge_plan(settings, iterations_per_epoch(data, settings.batch_size))
    return snapshot_networks(plan, run, model=model, optimizer=optimizer or sgd_optimizer(model, settings, settings.lr1), data=data)


def run_fge(config: Config, start: Path, run_dir: Path, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """`modeconn fge` from `start` (see fge_start): the snapshots and report written to `run_dir`;
    returns output paths and start/ensemble metrics."""
    settings = config.fge
    device = stage_device(config.device, config.distributed.backend)
    torch.manual_seed(config.seed)  # dropout draws do not depend on what ran before in this process
    begin = fge_start(start, settings, device, model=config.model, data=config.data)
    model, optimizer, state = begin.model, begin.optimizer, begin.state
    data = load_data(state["dataset"], device)
    steps_per_epoch = iterations_per_epoch(data, settings.batch_size)
    fge_budget(settings, steps_per_epoch)  # before the run folder is claimed
    prepare_run_dir(run_dir, config, resume=resume, force=force, final=run_dir / "fge.json")
    note = "momentum buffers kept" if begin.momentum == MOMENTUM_KEPT else "no optimizer state: fresh momentum"
    progress.log(f"fge: starting from {start} ({begin.source}; {note})")
    start_info = {"checkpoint": str(start), "epoch": state.get("epoch"), "source": begin.source,
                  "momentum": begin.momentum, **(held_out_metrics(model, data) if distributed.is_main() else {})}
    fields = {
        "kind": "fge",
        "architecture": state["architecture"],
        "dataset": state["dataset"],
        "config": config.model_dump(),
        "source": str(start),
    }
    plan = fge_plan(settings, steps_per_epoch, start=start_info,
                    record={"start_source": begin.source, "momentum_start": begin.momentum})
    run = stage_run(config, run_dir, resume=resume, save_every=config.train.save_every)
    result = run_snapshots(plan, run, model=model, optimizer=optimizer, data=data, fields=fields)
    return {**result, "start_source": begin.source, "momentum": begin.momentum}
