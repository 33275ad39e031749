"""The snapshot driver FGE and SSE share: the one loop `fit` with the method's LR, the
snapshot writer (BN recomputed on a copy), the per-iteration LR log `lr.csv` (iteration, lr,
epoch counted from 1) and the report METHOD.json/.csv/.png (training/ensembles/evaluate.py).
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeconn.training.core import distributed, progress
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import (
    atomic_write_text,
    model_checkpoint,
    read_finished,
    save_checkpoint,
)
from modeconn.training.core.data import Dataset, iterations_per_epoch
from modeconn.training.core.loop import FitPlan, StageRun, fit
from modeconn.training.core.networks import epoch_metrics, held_out_metrics
from modeconn.training.core.reports import csv_text
from modeconn.training.ensembles.evaluate import snapshot_report

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


@dataclass
class Snapshot:
    """One collected network: a copy of the live weights, BN recomputed unless the plan says not."""

    index: int
    network: nn.Module
    info: dict[str, Any]  # method, index, iteration, cycle_end, epoch, lr
    running: dict[str, torch.Tensor]  # the training model's BN running averages at collection
    bn_recomputed: bool


def snapshot_network(model: nn.Module, data: Dataset, bn_update: bool) -> tuple[nn.Module, dict[str, torch.Tensor], bool]:
    """A deep copy of the live model with BN recomputed over `data`'s training split (so the training
    model and its running averages, which the next steps keep updating, are untouched); the running
    averages it replaced; whether it recomputed. Under torchrun every rank calls this (shared work)."""
    net = copy.deepcopy(model)
    running = bn_running_averages(net)
    recomputed = bn_update and bool(running)
    if recomputed:
        recompute_bn(net, data)
    return net.eval(), running, recomputed


def save_snapshot(path: Path, snapshot: Snapshot, data: Dataset, fields: dict[str, Any]) -> dict[str, float]:
    """Save a snapshot as an ordinary checkpoint; returns its held-out metrics.

    The running averages are kept beside the recomputed ones (`bn_running_averages`, a few KB)
    so the report can measure what the recomputation changes from the files alone, also after a
    resume. Rank 0 evaluates and writes; the others return {}.
    """
    if not distributed.is_main():
        return {}
    net = snapshot.network
    metrics = held_out_metrics(net, data)
    extra = {k: v for k, v in fields.items() if k not in ("architecture", "dataset")}
    extra.update(kind=f"{fields['kind']}-snapshot", metrics=metrics, snapshot=snapshot.info,
                 bn_recomputed=snapshot.bn_recomputed)
    if snapshot.bn_recomputed:
        extra["bn_running_averages"] = snapshot.running
    save_checkpoint(path, model_checkpoint(net, fields["architecture"], fields["dataset"], **extra))
    return metrics


def read_lr_log(path: Path) -> dict[int, tuple[float, int]]:
    if not path.is_file():
        return {}
    with path.open() as f:
        return {int(r["iteration"]): (float(r["lr"]), int(r["epoch"])) for r in csv.DictReader(f)}


def write_lr_log(path: Path, rows: dict[int, tuple[float, int]]) -> None:
    atomic_write_text(path, csv_text(["iteration", "lr", "epoch"],
                                     ([i, repr(lr), epoch] for i, (lr, epoch) in sorted(rows.items()))))


def collection_points(budget: int, collect_index: CollectIndex) -> list[tuple[int, int]]:
    """(iteration, snapshot number) of every collection inside the budget."""
    return [(i, k) for i in range(1, budget + 1) if (k := collect_index(i)) is not None]


@dataclass
class SnapshotPlan:
    """What an FGE or SSE walk does: `budget` iterations with `learning_rate(i)` (i = this run's
    iteration from 1), a snapshot wherever `collect_index(i)` names one, the data order drawn from
    the run's seed + `seed_offset`; `settings` and `start` go into the report."""

    method: str
    budget: int
    batch_size: int
    learning_rate: Callable[[int], float]
    collect_index: CollectIndex
    cycle_end: Callable[[int], int]
    seed_offset: int
    settings: dict[str, Any]
    bn_update: bool = True
    start: dict[str, Any] | None = None


def collect_snapshots(
    plan: SnapshotPlan,
    run: StageRun,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    on_snapshot: Callable[[Snapshot], None],
    checkpoint_fields: dict[str, Any] | None = None,
    learning_rate: Callable[[int, int], float] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Train the plan's budget with the one loop, handing every collected snapshot to `on_snapshot`;
    returns the per-epoch rows. The CLI (files, resume) and the Python API (a list) both walk here.
    `learning_rate(epoch, iteration)` replaces the plan's schedule lookup (the CLI logs it there)."""
    steps_per_epoch = iterations_per_epoch(data, plan.batch_size)

    def after_step(iteration: int, epoch: int) -> None:
        index = plan.collect_index(iteration)
        if index is None:
            return
        info = {"method": plan.method, "index": index, "iteration": iteration, "cycle_end": plan.cycle_end(iteration),
                "epoch": iteration / steps_per_epoch, "lr": plan.learning_rate(iteration)}
        net, running, recomputed = snapshot_network(model, data, plan.bn_update)
        on_snapshot(Snapshot(index, net, info, running, recomputed))

    fit_plan = FitPlan(
        epochs=math.ceil(plan.budget / steps_per_epoch),
        max_iterations=plan.budget,
        batch_size=plan.batch_size,
        learning_rate=learning_rate or (lambda _epoch, iteration: plan.learning_rate(iteration)),
        seed=run.seed + plan.seed_offset,
        description=plan.method,
        batch_setting=f"{plan.method}.batch_size",
        evaluate=evaluate,
        after_step=after_step,
        **run.loop_options(),
    )
    return fit(fit_plan, run_dir=run.run_dir, model=model, optimizer=optimizer, data=data,
               checkpoint_fields=checkpoint_fields or {}, resume=run.resume)


def snapshot_networks(plan: SnapshotPlan, run: StageRun, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                      data: Dataset) -> list[nn.Module]:
    """The walk's snapshots in memory, in order (nothing written): the Python API's FGE and SSE."""
    networks: list[nn.Module] = []
    collect_snapshots(plan, run, model=model, optimizer=optimizer, data=data,
                      on_snapshot=lambda snapshot: networks.append(snapshot.network))
    return networks


def run_snapshots(
    plan: SnapshotPlan,
    run: StageRun,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """`modeconn fge` / `sse`: the walk with its snapshots, start weights and LR log written to the
    run folder, then the report."""
    method, budget, collect_index = plan.method, plan.budget, plan.collect_index
    assert run.run_dir is not None
    run_dir, resume = run.run_dir, run.resume
    started = time.perf_counter()
    steps_per_epoch = iterations_per_epoch(data, plan.batch_size)
    lr_path = run_dir / "lr.csv"
    # Buffered in memory (no file I/O in the hot loop) and written at each epoch end, before
    # fit's checkpoint; a resume drops the rows after the point it restarts from.
    lr_rows = read_lr_log(lr_path) if resume else {}
    first_call = True
    # the weights the run starts from, for the report's distances (the model is still at its
    # start here: fit loads a resumed run's state later, so a resume writes the same file)
    start_weights = run_dir / "start.pt"
    if distributed.is_main() and not start_weights.is_file():
        save_checkpoint(start_weights, model_checkpoint(model, fields["architecture"], fields["dataset"],
                                                        kind=f"{method}-start", source=fields.get("source")))

    def lr_at(epoch: int, iteration: int) -> float:
        nonlocal first_call
        if first_call:
            for stale in [i for i in lr_rows if i >= iteration]:
                del lr_rows[stale]
            first_call = False
        lr = plan.learning_rate(iteration)
        lr_rows[iteration] = (lr, epoch + 1)
        return lr

    def save(snapshot: Snapshot) -> None:
        metrics = save_snapshot(snapshot_path(run_dir, snapshot.index), snapshot, data, fields)
        if metrics:
            progress.log(f"{method} snapshot {snapshot.index} at iteration {snapshot.info['iteration']}: "
                         f"test error {metrics['test_error']:.2f} %")

    def end_of_epoch() -> dict[str, float]:
        write_lr_log(lr_path, lr_rows)
        return epoch_metrics(model, data)

    collect_snapshots(plan, run, model=model, optimizer=optimizer, data=data, on_snapshot=save,
                      checkpoint_fields=fields, learning_rate=lr_at, evaluate=end_of_epoch)
    if not distributed.is_main():
        return {"run_dir": str(run_dir), "rank": distributed.rank()}
    write_lr_log(lr_path, lr_rows)
    points = collection_points(budget, collect_index)
    result = snapshot_report(
        method,
        run_dir,
        [snapshot_path(run_dir, k) for _, k in points],
        data,
        lr_rows={i: lr for i, (lr, _) in lr_rows.items()},
        start=plan.start,
        settings={**plan.settings, "budget_iterations": budget, "iterations_per_epoch": steps_per_epoch},
        start_weights=start_weights,
    )
    result["seconds"] = time.perf_counter() - started
    return result


def finished_snapshot_run(run_dir: Path, method: str) -> dict[str, Any] | None:
    """The report of an FGE/SSE run that already finished (its METHOD.json is written last and
    every snapshot it lists is in the folder). The snapshots are looked up in `run_dir` by name:
    the paths the report records are as the run was started (relative to its working directory),
    so a run continued from elsewhere, or a moved folder, is still found finished."""
    report = read_finished(run_dir / f"{method}.json")
    members = [] if report is None else report.get("members", [])
    if report is None or not all((run_dir / "snapshots" / Path(m["checkpoint"]).name).is_file() for m in members):
        return None
    return {**report["summary"], "skipped": True}
