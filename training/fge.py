"""`modeconn fge`: Fast Geometric Ensembling (Garipov et al. 2018) from a trained network.

FGE continues SGD from an epoch checkpoint (weights and optimizer state, momentum buffers
included: the paper's setting), or from any network checkpoint or bare state_dict with
fresh momentum (see fge_start), with the triangular cyclical LR of docs/design.md, and collects the weights in the
middle of every cycle (where lr = lr2) as an ordinary network checkpoint
`run_dir/snapshots/snapshot-NNN.pt`, BN statistics recomputed on a copy. The weights it
starts from are kept as `run_dir/start.pt` (for the report's distances in weight space).

Budget: round(fge.epochs x iterations per epoch) iterations; a snapshot is collected only in a
cycle that ends inside the budget, so the number of snapshots = budget // cycle.

`run_snapshots` is the driver FGE and SSE (training/sse.py) share: the one loop `fit`, the
snapshot writer, the per-iteration LR log `lr.csv` (iteration, lr, epoch counted from 1) and
the report METHOD.json/.csv/.png (training/ensemble.py).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training import progress
from training.bn import recompute_bn
from training.checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint_or_weights,
    model_checkpoint,
    save_checkpoint,
)
from training.config import Config, ConfigError, FGESettings
from training.data import Dataset, iterations_per_epoch
from training.ensemble import snapshot_report
from training.loop import fit, resolve_device
from training.networks import (
    config_specs,
    dataset_spec,
    epoch_metrics,
    held_out_metrics,
    load_data,
    network_from_state,
)
from training.runs import prepare_run_dir
from training.schedules import even_cycle_iterations, fge_collects, fge_learning_rate

# iteration (from 1) -> the snapshot number collected there, or None
CollectIndex = Callable[[int], int | None]


def snapshot_path(run_dir: Path, index: int) -> Path:
    return run_dir / "snapshots" / f"snapshot-{index:03d}.pt"


def bn_running_averages(model: nn.Module) -> dict[str, torch.Tensor]:
    """The BN buffers (running mean/var, batch count) by state_dict key: what recompute_bn replaces."""
    return {
        f"{name}.{buffer_name}" if name else buffer_name: buffer.detach().cpu().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buffer_name, buffer in module.named_buffers(recurse=False)
    }


def save_snapshot(
    path: Path, model: nn.Module, data: Dataset, fields: dict[str, Any], info: dict[str, Any], bn_update: bool
) -> dict[str, float]:
    """Save the live weights as an ordinary checkpoint; returns its test metrics.

    BN statistics are recomputed on a deep copy so the training model (and its running
    averages, which the next steps keep updating) is untouched. The running averages are
    kept beside the recomputed ones (`bn_running_averages`, a few KB) so the report can
    measure what the recomputation changes from the files alone, also after a resume.
    """
    net = copy.deepcopy(model)
    running = bn_running_averages(net)
    recomputed = bn_update and bool(running)
    if recomputed:
        recompute_bn(net, data)
    net.eval()
    metrics = held_out_metrics(net, data)
    extra = {k: v for k, v in fields.items() if k not in ("architecture", "dataset")}
    extra.update(kind=f"{fields['kind']}-snapshot", metrics=metrics, snapshot=info, bn_recomputed=recomputed)
    if recomputed:
        extra["bn_running_averages"] = running
    save_checkpoint(path, model_checkpoint(net, fields["architecture"], fields["dataset"], **extra))
    return metrics


def read_lr_log(path: Path) -> dict[int, tuple[float, int]]:
    if not path.is_file():
        return {}
    with path.open() as f:
        return {int(r["iteration"]): (float(r["lr"]), int(r["epoch"])) for r in csv.DictReader(f)}


def write_lr_log(path: Path, rows: dict[int, tuple[float, int]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["iteration", "lr", "epoch"])
    writer.writerows([i, repr(lr), epoch] for i, (lr, epoch) in sorted(rows.items()))
    atomic_write_text(path, buf.getvalue())


def collection_points(budget: int, collect_index: CollectIndex) -> list[tuple[int, int]]:
    """(iteration, snapshot number) of every collection inside the budget."""
    return [(i, k) for i in range(1, budget + 1) if (k := collect_index(i)) is not None]


def run_snapshots(
    method: str,
    run_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    batch_size: int,
    budget: int,
    learning_rate: Callable[[int], float],
    collect_index: CollectIndex,
    cycle_end: Callable[[int], int],
    fields: dict[str, Any],
    seed: int,
    save_every: int,
    bn_update: bool,
    resume: bool,
    settings: dict[str, Any],
    start: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train `budget` iterations with `learning_rate(i)` (i = this run's iteration from 1),
    save a snapshot wherever `collect_index(i)` names one, then write the report."""
    started = time.perf_counter()
    steps_per_epoch = iterations_per_epoch(data, batch_size)
    lr_path = run_dir / "lr.csv"
    # Buffered in memory (no file I/O in the hot loop) and written at each epoch end, before
    # fit's checkpoint; a resume drops the rows after the point it restarts from.
    lr_rows = read_lr_log(lr_path) if resume else {}
    first_call = True
    # the weights the run starts from, for the report's distances (the model is still at its
    # start here: fit loads a resumed run's state later, so a resume writes the same file)
    start_weights = run_dir / "start.pt"
    if not start_weights.is_file():
        save_checkpoint(start_weights, model_checkpoint(model, fields["architecture"], fields["dataset"],
                                                        kind=f"{method}-start", source=fields.get("source")))

    def lr_at(epoch: int, iteration: int) -> float:
        nonlocal first_call
        if first_call:
            for stale in [i for i in lr_rows if i >= iteration]:
                del lr_rows[stale]
            first_call = False
        lr = learning_rate(iteration)
        lr_rows[iteration] = (lr, epoch + 1)
        return lr

    def after_step(iteration: int, epoch: int) -> None:
        index = collect_index(iteration)
        if index is None:
            return
        info = {"method": method, "index": index, "iteration": iteration, "cycle_end": cycle_end(iteration),
                "epoch": iteration / steps_per_epoch, "lr": learning_rate(iteration)}
        metrics = save_snapshot(snapshot_path(run_dir, index), model, data, fields, info, bn_update)
        progress.log(f"{method} snapshot {index} at iteration {iteration}: test error {metrics['test_error']:.2f} %")

    def end_of_epoch() -> dict[str, float]:
        write_lr_log(lr_path, lr_rows)
        return epoch_metrics(model, data)

    fit(
        run_dir=run_dir,
        model=model,
        optimizer=optimizer,
        data=data,
        epochs=math.ceil(budget / steps_per_epoch),
        max_iterations=budget,
        batch_size=batch_size,
        learning_rate=lr_at,
        seed=seed,
        checkpoint_fields=fields,
        save_every=save_every,
        evaluate=end_of_epoch,
        after_step=after_step,
        resume=resume,
        description=method,
    )
    write_lr_log(lr_path, lr_rows)
    points = collection_points(budget, collect_index)
    result = snapshot_report(
        method,
        run_dir,
        [snapshot_path(run_dir, k) for _, k in points],
        data,
        lr_rows={i: lr for i, (lr, _) in lr_rows.items()},
        start=start,
        settings={**settings, "budget_iterations": budget, "iterations_per_epoch": steps_per_epoch},
        start_weights=start_weights,
    )
    result["seconds"] = time.perf_counter() - started
    return result


def finished_snapshot_run(run_dir: Path, method: str) -> dict[str, Any] | None:
    """The report of an FGE/SSE run that already finished (its METHOD.json is written last)."""
    try:
        report = json.loads((run_dir / f"{method}.json").read_text())
    except (OSError, ValueError):
        return None
    if not all(Path(m["checkpoint"]).is_file() for m in report.get("members", [])):
        return None
    return {**report["summary"], "skipped": True}


# ---------------------------------------------------------------- FGE
MOMENTUM_KEPT, MOMENTUM_FRESH = "from checkpoint", "fresh"


@dataclass
class FGEStart:
    model: nn.Module
    optimizer: torch.optim.SGD
    state: dict[str, Any]  # the start's fields (architecture, dataset, epoch, ...), weights included
    source: str  # "epoch checkpoint", "checkpoint without optimizer state" or "weights file"
    momentum: str  # MOMENTUM_KEPT or MOMENTUM_FRESH


def fge_start(path: Path, config: Config, device: torch.device) -> FGEStart:
    """The network and SGD optimizer FGE starts from.

    An epoch checkpoint brings its momentum buffers (the paper's setting). A checkpoint
    without optimizer state (final.pt, a snapshot, a curve point) or a bare state_dict of the
    config's model (architecture and data from the config's model/data sections) starts
    with fresh momentum (zero buffers, as at any SGD start).
    """
    path, settings = Path(path), config.fge
    contents, is_checkpoint = load_checkpoint_or_weights(path, map_location=device)
    if is_checkpoint:
        state = contents
        if state.get("kind") == "curve":
            raise CheckpointError(f"{path} is a curve run; FGE starts from a network (pick a point with curve-point)")
        source = "epoch checkpoint" if "optimizer" in state else "checkpoint without optimizer state"
    else:
        architecture, dataset = config_specs(config, load_data(dataset_spec(config), device))
        state = {"architecture": architecture, "dataset": dataset, "model": contents}
        source = "weights file"
    model = network_from_state(state, path, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr1, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    if "optimizer" not in state:
        return FGEStart(model, optimizer, state, source, MOMENTUM_FRESH)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: its optimizer state does not fit an SGD over the network ({err})") from err
    # load_state_dict also brings back the train run's hyperparameters; FGE's settings apply
    for group in optimizer.param_groups:
        group.update(momentum=settings.momentum, weight_decay=settings.weight_decay)
    return FGEStart(model, optimizer, state, source, MOMENTUM_KEPT)


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


def run_fge(config: Config, start: Path, run_dir: Path, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """FGE from `start` (see fge_start); returns output paths and start/ensemble metrics."""
    settings = config.fge
    device = resolve_device(config.device)
    begin = fge_start(start, config, device)
    model, optimizer, state = begin.model, begin.optimizer, begin.state
    data = load_data(state["dataset"], device)
    steps_per_epoch = iterations_per_epoch(data, settings.batch_size)
    cycle, budget = fge_budget(settings, steps_per_epoch)
    if budget % cycle:
        progress.log(f"[yellow]fge: the budget ({budget} iterations) is not a whole number of cycles ({cycle}); "
                     f"the last {budget % cycle} iterations add no snapshot[/yellow]")
    prepare_run_dir(run_dir, config, resume=resume, force=force, final=run_dir / "fge.json")
    note = "momentum buffers kept" if begin.momentum == MOMENTUM_KEPT else "no optimizer state: fresh momentum"
    progress.log(f"fge: starting from {start} ({begin.source}; {note})")
    start_info = {"checkpoint": str(start), "epoch": state.get("epoch"), "source": begin.source,
                  "momentum": begin.momentum, **held_out_metrics(model, data)}
    fields = {
        "kind": "fge",
        "architecture": state["architecture"],
        "dataset": state["dataset"],
        "config": config.model_dump(),
        "source": str(start),
    }
    result = run_snapshots(
        "fge",
        run_dir,
        model=model,
        optimizer=optimizer,
        data=data,
        batch_size=settings.batch_size,
        budget=budget,
        learning_rate=lambda i: fge_learning_rate(i, cycle, settings.lr1, settings.lr2),
        # whole cycles only: the cycle of the collection at i ends at i + c/2
        collect_index=lambda i: i // cycle + 1 if fge_collects(i, cycle) and i + cycle // 2 <= budget else None,
        cycle_end=lambda i: i + cycle // 2,
        fields=fields,
        seed=config.seed + 2,  # a data order of its own (train uses seed + 1)
        save_every=config.train.save_every,
        bn_update=settings.bn_update,
        resume=resume,
        settings={**settings.model_dump(), "cycle_iterations": cycle, "start_source": begin.source,
                  "momentum_start": begin.momentum},
        start=start_info,
    )
    return {**result, "start_source": begin.source, "momentum": begin.momentum}
