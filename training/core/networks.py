"""Networks and data from configs and checkpoints, and their evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeconn.training.core import distributed
from modeconn.training.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_checkpoint_or_weights,
)
from modeconn.training.core.config import Config, DataSettings, ModelSettings
from modeconn.training.core.data import (
    LOADING_OPTIONS,
    SOURCE_OPTIONS,
    Dataset,
    build_dataset,
    eval_batches,
)
from modeconn.training.core.loop import StageRun, resolve_device
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.model_source import build_from_record

Forward = Callable[[torch.Tensor], torch.Tensor]
# the data settings a checkpoint records besides name, root, val_size, split_seed and generation
DATA_OPTIONS = SOURCE_OPTIONS + LOADING_OPTIONS


def architecture_spec(model: ModelSettings) -> dict[str, Any]:
    """The architecture record of a model section: {name, kwargs} or {factory, kwargs}."""
    return model.model_dump()


def dataset_spec(data: DataSettings) -> dict[str, Any]:
    """The data a data section names, as load_data and a checkpoint's `dataset` record take it."""
    return {"name": data.name, "root": data.root, "val_size": data.val_size, "split_seed": data.split_seed,
            "generation": dict(data.generation), **{k: getattr(data, k) for k in DATA_OPTIONS}}


def config_specs(model: ModelSettings, data: DataSettings, dataset: Dataset) -> tuple[dict[str, Any], dict[str, Any]]:
    """The architecture and dataset fields a checkpoint records of a network of the `model` section
    trained on `dataset`, loaded as the `data` section names it."""
    return architecture_spec(model), {**dataset_spec(data), **dataset.describe()}


def build_network(architecture: dict[str, Any], num_classes: int, device: torch.device | str = "cpu") -> nn.Module:
    """The network an architecture record names (registry, torchvision/timm, or a factory by
    import path: training/core/model_source.py); every command builds its networks here."""
    return build_from_record(architecture, num_classes).to(device)


def sgd_optimizer(model: nn.Module, settings: Any, lr: float | None = None) -> torch.optim.SGD:
    """SGD over `model` with a settings section's momentum and weight decay (and its lr unless
    given); fresh momentum buffers."""
    return torch.optim.SGD(model.parameters(), lr=settings.lr if lr is None else lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay)


def fresh_network(
    config: Config, data: Dataset, device: torch.device | str, sgd: Any, kind: str
) -> tuple[nn.Module, torch.optim.SGD, dict[str, Any]]:
    """A network seeded with config.seed, its SGD optimizer from `sgd` (lr, momentum,
    weight_decay), and the checkpoint fields naming where it came from."""
    torch.manual_seed(config.seed)
    model = build_network(architecture_spec(config.model), data.num_classes, device)
    optimizer = sgd_optimizer(model, sgd)
    architecture, dataset = config_specs(config.model, config.data, data)
    fields = {"kind": kind, "architecture": architecture, "dataset": dataset, "config": config.model_dump()}
    return model, optimizer, fields


def load_data(spec: dict[str, Any], device: torch.device | str) -> Dataset:
    """The data a config section or a checkpoint's `dataset` record describes; checkpoints
    from before the validation split (no `val_size`) get none, as they were trained.
    Under torchrun rank 0 builds it first (it may fill the data cache), then the others."""
    with distributed.main_first():
        return build_dataset(spec["name"], root=spec.get("root"), device=device, val_size=spec.get("val_size", 0),
                             split_seed=spec.get("split_seed", 0), generation=spec.get("generation") or None,
                             **{k: spec.get(k) for k in DATA_OPTIONS})


def stage_device(device: str, backend: str) -> torch.device:
    """The device of this process: the `device` setting, and under torchrun this rank's GPU
    (the process group is joined here, with the `distributed.backend` setting)."""
    return distributed.setup(resolve_device(device), backend)


def stage_run(config: Config, run_dir: Path, *, resume: bool, save_every: int) -> StageRun:
    """The one place a stage's run options are read from the whole config."""
    return StageRun(seed=config.seed, run_dir=run_dir, resume=resume, save_every=save_every, step=config.step,
                    sync_batchnorm=config.distributed.sync_batchnorm, tensorboard=config.tensorboard)


def load_network(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Any modeconn checkpoint as a plain network of its base architecture (eval mode)."""
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") == "curve":
        raise CheckpointError(f"{path} is a curve; pick a point with `modeconn curve-point` first")
    if state.get("kind") == "simplex":
        raise CheckpointError(f"{path} is a simplex; its sampled points are networks (the run's snapshots/)")
    return network_from_state(state, path, device).eval(), state


def network_state(path: str | Path, model: ModelSettings, data: DataSettings, device: torch.device | str,
                  role: str) -> tuple[dict[str, Any], bool]:
    """A network to start from (`role`: a curve end, the FGE start) as checkpoint fields, and
    whether it is a modeconn checkpoint: one as saved, or weights trained elsewhere (a
    state_dict file read with weights_only=True, or .safetensors) of the `model` section on the
    `data` section's data, checked to fit that model (else an error naming the file and the first
    mismatch)."""
    contents, is_checkpoint = load_checkpoint_or_weights(path, map_location=device)
    if is_checkpoint:
        if contents.get("kind") == "curve":
            raise CheckpointError(f"{path} is a curve, not a network; the {role} must be a network "
                                  "(pick a point with `modeconn curve-point`)")
        return contents, True
    architecture, dataset = config_specs(model, data, load_data(dataset_spec(data), device))
    state = {"architecture": architecture, "dataset": dataset, "model": contents}
    network_from_state(state, path, device)  # the fit check, before any run folder is made
    return state, False


def weights_mismatch(model: nn.Module, weights: dict[str, torch.Tensor]) -> str | None:
    """One line saying how a state_dict does not fit `model` (keys, shapes), or None when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (first {missing[0]!r})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (first {unexpected[0]!r})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatch(es) (first {k!r}: {list(weights[k].shape)} in the file, "
                        f"{list(expected[k].shape)} in the model)")
    return "; ".join(problems) or None


def network_from_state(state: dict[str, Any], path: str | Path, device: torch.device | str) -> nn.Module:
    """The checkpoint's architecture with its weights; a mismatch names the file."""
    model = build_network(state["architecture"], state["dataset"]["num_classes"], device)
    if (problem := weights_mismatch(model, state["model"])) is not None:
        raise CheckpointError(f"{path}: weights do not fit architecture {state['architecture']}: {problem}")
    model.load_state_dict(state["model"])
    return model


# Rows per evaluation forward. On the CPU 512: a batch's activations stay in the core's cache
# (demo CNN, one thread, Intel Xeon, the 12,000 test signals: 0.24 s at 512, 0.25 s at 1024,
# 0.44 s at 4096); elsewhere 1024.
EVAL_BATCH_ROWS = {"cpu": 512}


@torch.no_grad()
def predict_probs(forward: Forward, data: Dataset, split: str = "test", batch_size: int | None = None) -> torch.Tensor:
    """Softmax outputs over a whole split, in order (the caller sets eval mode)."""
    rows = batch_size or EVAL_BATCH_ROWS.get(data.device.type, 1024)
    return torch.cat([torch.softmax(forward(x), dim=1) for x, _ in eval_batches(data, split, rows)])


def held_out_splits(data: Dataset) -> tuple[str, ...]:
    """The splits a network is evaluated on: validation (when the data set has one) and test."""
    return ("val", "test") if len(data.y_val) else ("test",)


def epoch_metrics(model: nn.Module, data: Dataset) -> dict[str, float]:
    """What a training run logs after each epoch: validation metrics (the test split, often
    much larger, only at the end), or test metrics for a data set without validation."""
    return held_out_metrics(model, data, held_out_splits(data)[:1])


def held_out_metrics(model: nn.Module, data: Dataset, splits: tuple[str, ...] | None = None) -> dict[str, float]:
    """Error, NLL and ECE of a network on the validation and test splits (or `splits`),
    keyed val_* and test_* (settings are chosen on val_*; test_* is only reported)."""
    was_training = model.training
    model.eval()
    out = {}
    for split in splits or held_out_splits(data):
        metrics = classification_metrics(predict_probs(model, data, split), data.labels(split))
        out.update({f"{split}_{k}": v for k, v in metrics.items()})
    model.train(was_training)
    return out
