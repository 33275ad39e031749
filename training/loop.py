"""The one training loop (train, curve, FGE and SSE all run it), with checkpoint/resume.

A checkpoint is written atomically every `save_every` epochs, at the epochs in
`save_epochs` and at the end. It holds the model, the optimizer, the position
(epoch, iteration), the RNG states and the resolved config, so `resume=True`
continues a killed run and ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import progress
from training.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from training.config import ConfigError
from training.data import Dataset, iterations_per_epoch, train_batches

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


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _append_metrics(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def fit(
    *,
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Dataset,
    epochs: int,
    batch_size: int,
    learning_rate: Callable[[int, int], float],
    seed: int,
    checkpoint_fields: dict[str, Any],
    loss_fn: LossFn = cross_entropy_loss,
    save_every: int = 1,
    save_epochs: Iterable[int] = (),
    evaluate: Callable[[], dict[str, float]] | None = None,
    after_step: Callable[[int, int], None] | None = None,
    resume: bool = False,
    description: str = "train",
    augment: bool = True,
    max_iterations: int | None = None,
) -> list[dict[str, Any]]:
    """Run `epochs` epochs of SGD; returns the per-epoch metric rows.

    `learning_rate(epoch, iteration)` (epoch from 0, iteration from 1) sets the LR of every
    step; `after_step(iteration, epoch)` runs after each step (FGE collects snapshots there).
    `max_iterations` ends the last epoch early, for budgets given in fractional epochs
    (the caller passes `epochs = ceil(max_iterations / iterations per epoch)`).
    """
    generator = torch.Generator().manual_seed(seed)
    metrics_path = run_dir / "metrics.jsonl"
    rows: list[dict[str, Any]] = []
    start_epoch, iteration = 0, 0
    if resume and (last := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(last, map_location=next(model.parameters()).device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _restore_rng(state["rng"], generator)
        start_epoch, iteration = int(state["epoch"]), int(state["iteration"])
        if metrics_path.exists():
            rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            rows = [r for r in rows if r["epoch"] <= start_epoch]
        progress.log(f"[dim]{description}: resumed from {last} (epoch {start_epoch})[/dim]")
    elif resume:
        progress.log(f"[dim]{description}: nothing to resume in {run_dir}, starting fresh[/dim]")
    steps_per_epoch = iterations_per_epoch(data, batch_size)
    save_at = set(save_epochs) | {epochs}

    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=data.x_train.device)
        correct = torch.zeros((), device=data.x_train.device)
        seen = 0
        with progress.task(f"{description} epoch {epoch + 1}/{epochs}", steps_per_epoch) as advance:
            for x, y in train_batches(data, batch_size, generator, augment=augment):
                if max_iterations is not None and iteration >= max_iterations:
                    break  # depends on the iteration count only, so a resume replays it exactly
                iteration += 1
                lr = learning_rate(epoch, iteration)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, logits = loss_fn(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # accumulate on the device: no host sync per step
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if after_step is not None:
                    after_step(iteration, epoch)
                advance()
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "iteration": iteration,
            "lr": lr,
            "train_loss": float(loss_sum) / seen,
            "train_acc": float(correct) / seen * 100.0,
        }
        if evaluate is not None:
            row.update(evaluate())
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        _log_epoch(description, row)
        # metrics first: a kill between the two writes then leaves an extra row (dropped on
        # resume), never a checkpoint whose epoch has no row
        _append_metrics(metrics_path, rows)
        if (epoch + 1) % save_every == 0 or (epoch + 1) in save_at:
            save_checkpoint(
                checkpoint_path(run_dir, epoch + 1),
                {
                    **checkpoint_fields,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "iteration": iteration,
                    "rng": _rng_state(generator),
                    "metrics": row,
                },
            )
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

