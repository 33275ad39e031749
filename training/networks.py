"""Networks and data from configs and checkpoints, and their evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import ModelSpecError, build_model
from training import distributed
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import Config, ConfigError
from training.data import Dataset, build_dataset, eval_batches
from training.loop import resolve_device
from training.metrics import classification_metrics

Forward = Callable[[torch.Tensor], torch.Tensor]


def architecture_spec(config: Config) -> dict[str, Any]:
    return {"name": config.model.name, "kwargs": dict(config.model.kwargs)}


def dataset_spec(config: Config) -> dict[str, Any]:
    return {"name": config.data.name, "root": config.data.root}


def build_network(architecture: dict[str, Any], num_classes: int, device: torch.device | str = "cpu") -> nn.Module:
    try:
        model = build_model(architecture["name"], num_classes=num_classes, **architecture.get("kwargs", {}))
    except ModelSpecError as err:
        raise ConfigError(f"model: {err}") from err
    return model.to(device)


def fresh_network(
    config: Config, data: Dataset, device: torch.device | str, sgd: Any, kind: str
) -> tuple[nn.Module, torch.optim.SGD, dict[str, Any]]:
    """A network seeded with config.seed, its SGD optimizer from `sgd` (lr, momentum,
    weight_decay), and the checkpoint fields naming where it came from."""
    torch.manual_seed(config.seed)
    model = build_network(architecture_spec(config), data.num_classes, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=sgd.lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay)
    fields = {
        "kind": kind,
        "architecture": architecture_spec(config),
        "dataset": {**dataset_spec(config), **data.describe()},
        "config": config.model_dump(),
    }
    return model, optimizer, fields


def load_data(spec: dict[str, Any], device: torch.device | str) -> Dataset:
    with distributed.main_first():  # under torchrun rank 0 fills the data cache, the others read it
        return build_dataset(spec["name"], root=spec.get("root"), device=device)


def stage_device(config: Config) -> torch.device:
    """The device of this process: the `device` setting, and under torchrun this rank's GPU
    (the process group is joined here, with the `distributed.backend` setting)."""
    return distributed.setup(resolve_device(config.device), config.distributed.backend)


def load_network(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Any modeconn checkpoint as a plain network of its base architecture (eval mode)."""
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") == "curve":
        raise CheckpointError(f"{path} is a curve; pick a point with `modeconn curve-point` first")
    return network_from_state(state, path, device).eval(), state


def network_from_state(state: dict[str, Any], path: str | Path, device: torch.device | str) -> nn.Module:
    """The checkpoint's architecture with its weights; a mismatch names the file."""
    model = build_network(state["architecture"], state["dataset"]["num_classes"], device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit architecture {state['architecture']}: {err}") from err
    return model


@torch.no_grad()
def predict_probs(forward: Forward, data: Dataset, split: str = "test", batch_size: int = 1024) -> torch.Tensor:
    """Softmax outputs over a whole split, in order (the caller sets eval mode)."""
    return torch.cat([torch.softmax(forward(x), dim=1) for x, _ in eval_batches(data, split, batch_size)])


def labels(data: Dataset, split: str = "test") -> torch.Tensor:
    return data.y_test if split == "test" else data.y_train


def test_metrics(model: nn.Module, data: Dataset) -> dict[str, float]:
    """Test error, NLL and ECE of a network in eval mode, keyed test_*."""
    was_training = model.training
    model.eval()
    metrics = classification_metrics(predict_probs(model, data, "test"), data.y_test)
    model.train(was_training)
    return {f"test_{k}": v for k, v in metrics.items()}
