"""Many independent networks in one pass: K `modeconn train` runs that differ only by seed,
trained as one batched computation on one device (torch.func: `stack_module_state` + `vmap` +
`functional_call`).

Member k is what `train_network` makes of its own config, to float rounding: its own init
(`fresh_network`: torch.manual_seed(seed), then build), its own data order (its own generator
seeded seed + 1, drawn exactly as `train_batches` draws it), its own SGD momentum (one
torch.optim.SGD over the stacked parameters: SGD is elementwise, so each member's slice gets
its own run's update), the same LR schedule. The loss is the sum of the members' batch means,
so each member's gradient is its own run's. BatchNorm: the running statistics are stacked
buffers, each member's slice updated in place by its own batches (vmap batches BN over the
member axis), as in its separate run. Each member's folder gets what a separate run writes:
config.yaml, metrics.jsonl, epoch checkpoints (model, optimizer, RNG states, position) and
final.pt, so every later command (and `--resume` of a separate run) treats them as usual.

`train.batched` chooses (`wants_batching`: auto is on for GPUs only). Batched runs need one process, the default step settings and no dropout (vmap draws its
randomness differently); `batching_blocker` says why not, and `train_seeds` then trains
the members one after another.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from modeconn.training.core import distributed, monitor, progress
from modeconn.training.core.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    model_checkpoint,
    save_checkpoint,
)
from modeconn.training.core.config import Config, ModelSettings, StepSettings, TrainSettings
from modeconn.training.core.data import Dataset, eval_batches, iterations_per_epoch, train_batches
from modeconn.training.core.loop import checkpoint_path, latest_checkpoint
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import (
    EVAL_BATCH_ROWS,
    architecture_spec,
    build_network,
    dataset_spec,
    fresh_network,
    held_out_splits,
    load_data,
    stage_device,
)
from modeconn.training.core.runs import prepare_run_dir
from modeconn.training.core.schedules import paper_learning_rate
from modeconn.training.train import fge_start_epoch, finished_result, train_or_reuse


@dataclass
class _Member:
    """One network of the batch: its folder, its own module (for saving), optimizer and RNG states."""

    config: Config
    run_dir: Path
    model: nn.Module
    optimizer: torch.optim.SGD
    fields: dict[str, Any]
    generator: torch.Generator
    torch_rng: torch.Tensor  # the global RNG state its separate run would have (training draws none)
    rows: list[dict[str, Any]] = field(default_factory=list)
    momentum: list[torch.Tensor] | None = None  # from a checkpoint, until stacked


# ---------------------------------------------------------------- when
def batching_blocker(configs: list[Config]) -> str | None:
    """Why these runs cannot be trained in one pass, or None when they can."""
    if len(configs) < 2:
        return "one network"
    first = configs[0].model_dump(exclude={"seed"})
    if any(c.model_dump(exclude={"seed"}) != first for c in configs[1:]):
        return "the runs differ in more than their seed"
    if len({c.seed for c in configs}) < len(configs):
        return "two runs share a seed"
    if distributed.world_size() > 1:
        return "several processes (torchrun)"
    if configs[0].step != StepSettings():
        return "non-default step settings (precision, channels_last, compile)"
    if _has_dropout(configs[0].model):
        return "the network has dropout"
    return None


def wants_batching(train: TrainSettings, device: str) -> bool:
    """`train.batched`: true or false as set; auto: on a GPU (the `device` setting), not on the CPU."""
    if train.batched != "auto":
        return bool(train.batched)
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _has_dropout(settings: ModelSettings) -> bool:
    """Whether the architecture has active dropout (built without weights, the RNG untouched)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_network(architecture_spec(settings), num_classes=2, device="meta")
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())


def _resume_epoch(run_dir: Path) -> int:
    last = latest_checkpoint(run_dir)
    return int(last.stem.removeprefix("epoch-")) if last is not None else 0


def train_seeds(configs: list[Config], run_dirs: list[Path]) -> list[dict[str, Any]]:
    """`train_or_reuse` of every (config, folder): finished runs are reused; the others are
    trained in one batched pass when `train.batched` asks for it and they can be (they continue from
    their checkpoints when all stopped at the same epoch), else one after another."""
    results: list[dict[str, Any] | None] = [finished_result(d) for d in run_dirs]
    todo = [i for i, r in enumerate(results) if r is None]
    pending = [configs[i] for i in todo]
    blocker = ("train.batched" if pending and not wants_batching(pending[0].train, pending[0].device)
               else batching_blocker(pending))
    if blocker is None and len({_resume_epoch(run_dirs[i]) for i in todo}) > 1:
        blocker = "the runs stopped at different epochs"
    if blocker is None:
        for i, result in zip(todo, train_members(pending, [run_dirs[i] for i in todo], resume=True), strict=True):
            results[i] = result
    else:
        if len(todo) > 1:
            progress.log(f"[dim]{len(todo)} networks one after another ({blocker})[/dim]")
        for i in todo:
            results[i] = train_or_reuse(configs[i], run_dirs[i])
    return [r for r in results if r is not None]


# ---------------------------------------------------------------- the pass
def train_members(configs: list[Config], run_dirs: list[Path], resume: bool = False, force: bool = False,
                  data: Dataset | None = None) -> list[dict[str, Any]]:
    """Train K networks that differ only by seed in one batched pass (or continue them from
    their last checkpoints, which must be of one epoch); returns what `train_network` returns
    for each. `data`: the data set when already loaded (default: the config's, loaded here).
    Runs that `batching_blocker` objects to are a ValueError (`train_seeds` checks)."""
    if (blocker := batching_blocker(configs)) is not None:
        raise ValueError(f"these runs cannot be trained in one pass: {blocker}")
    config, settings = configs[0], configs[0].train
    started = time.perf_counter()
    device = stage_device(config.device, config.distributed.backend)
    for c, d in zip(configs, run_dirs, strict=True):
        prepare_run_dir(d, c, resume=resume, force=force, final=d / "final.pt")
    data = data if data is not None else load_data(dataset_spec(config.data), device)
    members = [_member(c, d, data, device) for c, d in zip(configs, run_dirs, strict=True)]
    start_epoch, iteration = _resume(members, device) if resume else (0, 0)
    distributed.check_batch_size(settings.batch_size, len(data.y_train), "train.batch_size")
    stack = _Stack(members, settings)
    save_at = {fge_start_epoch(settings, config.fge), settings.epochs}
    name = f"train {config.name} x{len(members)}"
    with contextlib.ExitStack() as loggers:
        log_rows = [loggers.enter_context(monitor.epoch_logger(m.run_dir, config.tensorboard, start_epoch))
                    for m in members]
        for epoch in range(start_epoch, settings.epochs):
            epoch_started = time.perf_counter()
            lr = paper_learning_rate(settings.lr, epoch, settings.epochs)
            with progress.task(f"{name} epoch {epoch + 1}/{settings.epochs}",
                               iterations_per_epoch(data, settings.batch_size)) as advance:
                totals, iteration = stack.epoch(data, lr, iteration, advance)
            evaluated = stack.metrics(data, held_out_splits(data)[:1])
            for k, m in enumerate(members):
                row = {"epoch": epoch + 1, "iteration": iteration, "lr": lr, **totals[k], **evaluated[k],
                       "seconds": time.perf_counter() - epoch_started}
                m.rows.append(row)
                atomic_write_text(m.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in m.rows))
                log_rows[k](row)
            _log_epoch(name, [m.rows[-1] for m in members])
            if (epoch + 1) % settings.save_every == 0 or epoch + 1 in save_at:
                stack.save(epoch + 1, iteration)
    return stack.finish(data, time.perf_counter() - started)


def _member(config: Config, run_dir: Path, data: Dataset, device: torch.device) -> _Member:
    model, optimizer, fields = fresh_network(config, data, device, config.train, "train")
    return _Member(config, run_dir, model, optimizer, fields, torch.Generator().manual_seed(config.seed + 1),
                   torch.get_rng_state())


def _resume(members: list[_Member], device: torch.device) -> tuple[int, int]:
    """Load every member's last checkpoint (all of one epoch); (epoch, iteration) to go on from."""
    positions = set()
    for m in members:
        if (last := latest_checkpoint(m.run_dir)) is None:
            positions.add((0, 0))
            continue
        state = load_checkpoint(last, map_location=device)
        m.model.load_state_dict(state["model"])
        saved = state["optimizer"]["state"]
        m.momentum = [saved[i]["momentum_buffer"] for i in range(len(saved))] if saved else None
        m.generator.set_state(state["rng"]["data"].cpu())  # RNG states are CPU byte tensors
        m.torch_rng = state["rng"]["torch"].cpu()
        epoch = int(state["epoch"])
        positions.add((epoch, int(state["iteration"])))
        path = m.run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        m.rows = [r for r in rows if r["epoch"] <= epoch]
        progress.log(f"[dim]train {m.config.name} seed {m.config.seed}: resumed from {last} (epoch {epoch})[/dim]")
    if len(positions) > 1:
        raise ValueError(f"the runs stopped at different positions {sorted(positions)}: resume them one by one")
    return positions.pop()


class BatchedNetworks:
    """K networks of one architecture as one: their parameters and buffers stacked on a new
    leading axis (`stack_module_state`), one SGD over the stack (elementwise: member k's slice
    gets exactly its own optimizer's update), and a weightless copy of the architecture that
    vmap calls with each member's slice (`functional_call`). BatchNorm's running statistics
    are stacked buffers that each member's forward updates in place with its own batch."""

    def __init__(self, models: list[nn.Module], lr: float, momentum: float, weight_decay: float,
                 momentum_buffers: list[list[torch.Tensor]] | None = None) -> None:
        self.size = len(models)
        self.params, self.buffers = stack_module_state(models)
        self.optimizer = torch.optim.SGD(list(self.params.values()), lr=lr, momentum=momentum,
                                         weight_decay=weight_decay)
        if momentum_buffers is not None:  # each member's, in its parameters' order
            for i, p in enumerate(self.params.values()):
                self.optimizer.state[p]["momentum_buffer"] = torch.stack([m[i] for m in momentum_buffers])
        self.base = copy.deepcopy(models[0]).to("meta")  # the architecture; vmap supplies the tensors
        self._forward = vmap(self._call, in_dims=(0, 0, 0))
        self._forward_shared = vmap(self._call, in_dims=(0, 0, None))  # every member on the same inputs

    def _call(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step of member k on (x[k], y[k]) for every k; (losses [K], logits [K, B, classes])."""
        self.base.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        logits = self._forward(self.params, self.buffers, x)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(self.size, -1).mean(1)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # member k's parameters get exactly d(loss_k)
        self.optimizer.step()
        return losses.detach(), logits.detach()

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's softmax outputs on the same inputs, eval mode: [K, N, classes]."""
        self.base.eval()
        return torch.softmax(self._forward_shared(self.params, self.buffers, x), dim=2)

    @torch.no_grad()
    def copy_into(self, k: int, model: nn.Module, optimizer: torch.optim.SGD) -> None:
        """Member k's weights, buffers, momentum and LR into its own module and optimizer."""
        named = dict(model.named_parameters())
        for name, stacked in self.params.items():
            named[name].copy_(stacked[k])
            if "momentum_buffer" in self.optimizer.state[stacked]:
                optimizer.state[named[name]] = {"momentum_buffer": self.optimizer.state[stacked]["momentum_buffer"][k].clone()}
        for name, buffer in model.named_buffers():
            buffer.copy_(self.buffers[name][k])
        optimizer.param_groups[0]["lr"] = self.optimizer.param_groups[0]["lr"]


class _Stack:
    """The members of one pass around their BatchedNetworks: epochs, metrics and their files."""

    def __init__(self, members: list[_Member], settings: Any) -> None:
        self.members = members
        momentum = [m.momentum for m in members] if members[0].momentum is not None else None
        self.networks = BatchedNetworks([m.model for m in members], settings.lr, settings.momentum,
                                        settings.weight_decay, momentum)
        self.batch_size = settings.batch_size

    def epoch(self, data: Dataset, lr: float, iteration: int, advance: Any) -> tuple[list[dict[str, float]], int]:
        """One epoch of every member on its own batches (its own generator); their train loss and accuracy."""
        k = len(self.members)
        loss_sum = torch.zeros(k, dtype=torch.float64, device=data.device)
        correct = torch.zeros(k, dtype=torch.float64, device=data.device)
        seen = 0
        streams = [train_batches(data, self.batch_size, m.generator) for m in self.members]
        for batches in zip(*streams, strict=True):
            iteration += 1
            y = torch.stack([b[1] for b in batches])
            losses, logits = self.networks.step(torch.stack([b[0] for b in batches]), y, lr)
            loss_sum += losses.double() * y.shape[1]  # accumulated on the device: no host sync per step
            correct += (logits.argmax(2) == y).sum(1).double()
            seen += y.shape[1]
            advance()
        return [{"train_loss": float(loss_sum[i] / seen), "train_acc": float(correct[i] / seen) * 100.0}
                for i in range(k)], iteration

    def metrics(self, data: Dataset, splits: tuple[str, ...]) -> list[dict[str, float]]:
        """As `held_out_metrics` of each member: {split}_{metric} per split."""
        out: list[dict[str, float]] = [{} for _ in self.members]
        rows = EVAL_BATCH_ROWS.get(data.device.type, 1024)
        for split in splits:
            probs = torch.cat([self.networks.probs(x) for x, _ in eval_batches(data, split, rows)], dim=1)
            labels = data.labels(split)
            for k, member_probs in enumerate(probs):
                out[k].update({f"{split}_{m}": v for m, v in classification_metrics(member_probs, labels).items()})
        return out

    def unstack(self) -> None:
        for k, m in enumerate(self.members):
            self.networks.copy_into(k, m.model, m.optimizer)

    def save(self, epoch: int, iteration: int) -> None:
        """Each member's epoch checkpoint, as `fit` writes it."""
        self.unstack()
        for m in self.members:
            rng = {"torch": m.torch_rng, "data": m.generator.get_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_checkpoint(checkpoint_path(m.run_dir, epoch), {
                **m.fields, "model": m.model.state_dict(), "optimizer": m.optimizer.state_dict(),
                "epoch": epoch, "iteration": iteration, "rng": rng, "metrics": m.rows[-1],
                "step": m.config.step.model_dump(),
            })

    def finish(self, data: Dataset, seconds: float) -> list[dict[str, Any]]:
        """Each member's final.pt (the last row plus validation and test metrics) and result."""
        self.unstack()
        evaluated = self.metrics(data, held_out_splits(data))
        results = []
        for m, held_out in zip(self.members, evaluated, strict=True):
            metrics = {**m.rows[-1], **held_out}
            final = m.run_dir / "final.pt"
            save_checkpoint(final, model_checkpoint(m.model, **m.fields, metrics=metrics))
            results.append({"run_dir": str(m.run_dir), "checkpoint": str(final), "metrics": metrics,
                            "seconds": seconds, "batched": len(self.members)})
        errors = ", ".join(f"{m.config.seed}: {r['metrics']['test_error']:.2f} %" for m, r in
                           zip(self.members, results, strict=True))
        progress.log(f"train {self.members[0].config.name} x{len(self.members)} (one pass): test error by seed "
                     f"{errors}  ({seconds:.1f}s)")
        return results


def _log_epoch(name: str, rows: list[dict[str, Any]]) -> None:
    row = rows[0]
    losses = " ".join(f"{r['train_loss']:.4f}" for r in rows)
    held = next((s for s in ("val", "test") if f"{s}_error" in row), None)
    errors = "" if held is None else f"  {held} error " + " ".join(f"{r[f'{held}_error']:.2f}" for r in rows)
    progress.log(f"{name} epoch {row['epoch']:4d}  lr {row['lr']:.5f}  train loss {losses}{errors}  "
                 f"{row['seconds']:.1f}s")
