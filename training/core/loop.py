"""The one training loop (train, curve, FGE and SSE all run it), with checkpoint/resume.

A checkpoint is written atomically every `save_every` epochs, at the epochs in
`save_epochs` and at the end. It holds the model, the optimizer, the position
(epoch, iteration), the RNG states and the resolved config, so `resume=True`
continues a killed run and ends with the same weights as an uninterrupted one.

Under torchrun (training/core/distributed.py) the same loop runs on every rank: `batch_size` is
the global batch, each rank takes its part of it, DDP averages the gradients, iterations
count global steps; rank 0 writes the files, and a checkpoint holds every rank's RNG states.

The step's precision, memory layout and compilation (`plan.step`, the config's `step` section)
are set up in training/core/step.py; a checkpoint records them (and fp16's GradScaler state).
`plan.tensorboard` also logs each epoch's row as TensorBoard scalars (training/core/monitor.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.contract import hooks
from modeconn.training.core import distributed, monitor, progress, step
from modeconn.training.core.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from modeconn.training.core.config import ConfigError, StepSettings
from modeconn.training.core.data import Dataset, iterations_per_epoch, train_batches

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
_EPOCH_FILE = re.compile(r"epoch-(\d+)\.pt$")


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible")
    return torch.device(name)


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(
        (int(m.group(1)), p)
        for p in (run_dir / "checkpoints").glob("epoch-*.pt")
        if (m := _EPOCH_FILE.search(p.name))
    )
    return found[-1][1] if found else None


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(saved: dict[str, Any], generators: dict[str, torch.Generator], description: str) -> None:
    """This rank's states: its own entry of `rng_ranks` when the checkpoint has one."""
    state = saved["rng"]
    ranks = saved.get("rng_ranks") or [state]
    if len(ranks) != distributed.world_size():
        progress.log(f"[yellow]{description}: resuming with {distributed.world_size()} process(es) a run "
                     f"checkpointed with {len(ranks)}; the rest differs slightly from an uninterrupted run[/yellow]")
    state = ranks[distributed.rank()] if distributed.rank() < len(ranks) else state
    torch.set_rng_state(state["torch"])
    for name, generator in generators.items():
        if name in state:
            generator.set_state(state[name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _append_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


@dataclass
class FitPlan:
    """What one `fit` does: its length, schedule, data order, what it saves and its hooks.

    `learning_rate(epoch, iteration)` (epoch from 0, iteration from 1) sets the LR of every
    step; `after_step(iteration, epoch)` runs after each step on every rank (FGE collects
    snapshots there). `max_iterations` ends the last epoch early, for budgets given in
    fractional epochs (then `epochs = ceil(max_iterations / iterations per epoch)`).
    `shared_generators`: generators seeded alike on every rank that the caller draws from
    (the curve's t), saved and restored with the checkpoints. `evaluate` runs on rank 0 only.
    `sync_batchnorm` and `batch_setting` (the setting named in errors): see distributed.py.
    `step`: precision, channels_last, compile (step.py); `tensorboard`: also log rows there.
    """

    epochs: int
    batch_size: int
    learning_rate: Callable[[int, int], float]
    seed: int
    description: str = "train"
    batch_setting: str = "train.batch_size"
    max_iterations: int | None = None
    save_every: int = 1
    save_epochs: Iterable[int] = ()
    augment: bool = True
    sync_batchnorm: bool = False
    loss_fn: LossFn = cross_entropy_loss
    evaluate: Callable[[], dict[str, float]] | None = None
    after_step: Callable[[int, int], None] | None = None
    shared_generators: dict[str, torch.Generator] = field(default_factory=dict)
    step: StepSettings = field(default_factory=StepSettings)
    tensorboard: bool = False


@dataclass
class StageRun:
    """How a stage runs, apart from its own settings section: the seed its draws derive from, the
    run folder it writes (None: nothing is written, as from the Python API), whether it resumes,
    and the options every stage's loop shares (checkpoint interval, step, SyncBN, TensorBoard)."""

    seed: int = 0
    run_dir: Path | None = None
    resume: bool = False
    save_every: int = 1
    step: StepSettings = field(default_factory=StepSettings)
    sync_batchnorm: bool = False
    tensorboard: bool = False

    def loop_options(self) -> dict[str, Any]:
        """The FitPlan fields that come from the run, not from the stage's settings."""
        return {"save_every": self.save_every, "sync_batchnorm": self.sync_batchnorm, "step": self.step,
                "tensorboard": self.tensorboard and self.run_dir is not None}


def fit(
    plan: FitPlan,
    *,
    run_dir: Path | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    checkpoint_fields: dict[str, Any],
    resume: bool = False,
) -> list[dict[str, Any]]:
    """Run `plan.epochs` epochs of SGD (resuming from the run's last checkpoint if asked);
    returns the per-epoch metric rows. `run_dir` None: in memory only (no files, no resume)."""
    epochs, batch_size, learning_rate, description = plan.epochs, plan.batch_size, plan.learning_rate, plan.description
    max_iterations, loss_fn, after_step = plan.max_iterations, plan.loss_fn, plan.after_step
    generator = torch.Generator().manual_seed(plan.seed)
    generators = {"data": generator, **plan.shared_generators}
    distributed.check_batch_size(batch_size, len(data.y_train), plan.batch_setting)
    shard = (distributed.rank(), distributed.world_size())
    metrics_path = run_dir / "metrics.jsonl" if run_dir is not None else None
    rows: list[dict[str, Any]] = []
    start_epoch, iteration = 0, 0
    device = next(model.parameters()).device
    scaler = step.grad_scaler(plan.step, device)
    if resume and run_dir is None:
        raise ValueError("resume needs a run folder")
    if resume and (last := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(last, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        if state.get("step", StepSettings().model_dump()) != plan.step.model_dump():
            progress.log(f"[yellow]{description}: the checkpoint was trained with step settings {state.get('step')}, "
                         f"this run uses {plan.step.model_dump()}[/yellow]")
        _restore_rng(state, generators, description)
        start_epoch, iteration = int(state["epoch"]), int(state["iteration"])
        if metrics_path is not None and metrics_path.exists():
            rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["epoch"] <= start_epoch]
        progress.log(f"[dim]{description}: resumed from {last} (epoch {start_epoch})[/dim]")
    elif resume:
        progress.log(f"[dim]{description}: nothing to resume in {run_dir}, starting fresh[/dim]")
    steps_per_epoch = iterations_per_epoch(data, batch_size)
    save_at = set(plan.save_epochs) | {epochs}
    step.prepare_model(model, plan.step, data.input_dims)
    step_model = step.step_model(distributed.wrap_for_training(model, plan.sync_batchnorm), plan.step, device,
                                 description)
    rows_total = len(data.y_train)
    with monitor.epoch_logger(run_dir, plan.tensorboard and run_dir is not None, start_epoch) as log_row:
        for epoch in range(start_epoch, epochs):
            started = time.perf_counter()
            step_model.train()
            loss_sum = torch.zeros((), device=data.device)
            correct = torch.zeros((), device=data.device)
            seen = 0
            with progress.task(f"{description} epoch {epoch + 1}/{epochs}", steps_per_epoch) as advance:
                batches = train_batches(data, batch_size, generator, augment=plan.augment, shard=shard)
                for batch_index, (x, y) in enumerate(batches):
                    if max_iterations is not None and iteration >= max_iterations:
                        break  # depends on the iteration count only, so a resume replays it exactly
                    iteration += 1
                    lr = learning_rate(epoch, iteration)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss, logits = loss_fn(step_model, x, y)
                    weight = distributed.loss_weight(len(y), min(batch_size, rows_total - batch_index * batch_size))
                    optimizer.zero_grad(set_to_none=True)
                    # the scaler passes everything through unless step.precision is fp16
                    scaler.scale(loss if weight == 1 else loss * weight).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    # accumulate on the device: no host sync per step
                    loss_sum += loss.detach() * len(y)
                    correct += (logits.detach().argmax(1) == y).sum()
                    seen += len(y)
                    if after_step is not None:
                        after_step(iteration, epoch)
                    advance()
            totals = distributed.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(),
                                                             loss_sum.new_tensor(seen, dtype=torch.float64)]))
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "iteration": iteration,
                "lr": lr,
                "train_loss": float(totals[0] / totals[2]),
                "train_acc": float(totals[1] / totals[2]) * 100.0,
            }
            if plan.evaluate is not None and distributed.is_main():
                row.update(plan.evaluate())
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            _log_epoch(description, row)
            saving = run_dir is not None and ((epoch + 1) % plan.save_every == 0 or (epoch + 1) in save_at)
            rng_ranks = distributed.all_gather_objects(_rng_state(generators)) if saving else []
            if not distributed.is_main() or metrics_path is None:
                continue
            # metrics first: a kill between the two writes then leaves an extra row (dropped on
            # resume), never a checkpoint whose epoch has no row
            _append_metrics(metrics_path, rows)
            log_row(row)
            if saving:
                save_checkpoint(
                    checkpoint_path(run_dir, epoch + 1),
                    {
                        **checkpoint_fields,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "epoch": epoch + 1,
                        "iteration": iteration,
                        "rng": rng_ranks[0],
                        **({"rng_ranks": rng_ranks} if len(rng_ranks) > 1 else {}),
                        "metrics": row,
                        "step": plan.step.model_dump(),
                        **({"scaler": scaler.state_dict()} if scaler.is_enabled() else {}),
                    },
                )
                hooks.hold_point(f"{description.split()[0]}:epoch-{epoch + 1}")  # train:epoch-2, fge:epoch-1
    return rows


def _log_epoch(description: str, row: dict[str, Any]) -> None:
    test = ""
    for split in ("val", "test"):
        if f"{split}_nll" in row:
            test += f"  {split} nll {row[f'{split}_nll']:.4f}  {split} acc {100 - row[f'{split}_error']:6.2f}"
    progress.log(
        f"{description} epoch {row['epoch']:4d}  lr {row['lr']:.5f}  train loss {row['train_loss']:.4f}"
        f"  train acc {row['train_acc']:6.2f}{test}  {row['seconds']:.1f}s"
    )

