"""BatchNorm re-estimation: statistics are not a function of the weights, so recompute them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from training.data import Dataset, eval_batches


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def update_bn(batches: Iterable[torch.Tensor], model: nn.Module) -> None:
    """Reset every BN layer's running statistics and recompute them in one pass over
    `batches` as an exact cumulative average, each batch weighted by its size: the running
    mean becomes the mean over all inputs, even when the last batch is smaller.

    The model's mode, momenta and the global RNG (dropout draws) are left as they were.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = {layer: layer.momentum for layer in layers}
    was_training = model.training
    for layer in layers:
        layer.reset_running_stats()
    model.train()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    seen = 0
    with torch.random.fork_rng(devices=devices):
        for x in batches:
            # new = (1 - m) old + m batch with m = b / (seen + b): the size-weighted average
            for layer in layers:
                layer.momentum = len(x) / (seen + len(x))
            model(x)
            seen += len(x)
    for layer, momentum in momenta.items():
        layer.momentum = momentum
    model.train(was_training)


def recompute_bn(model: nn.Module, data: Dataset, batch_size: int = 512) -> nn.Module:
    """`update_bn` over the training split, without augmentation (deterministic)."""
    update_bn((x for x, _ in eval_batches(data, "train", batch_size)), model)
    return model
