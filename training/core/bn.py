"""BatchNorm re-estimation: statistics are not a function of the weights, so recompute them."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from modeconn.training.core import distributed
from modeconn.training.core.data import Dataset, eval_batches


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def update_bn(batches: Iterable[torch.Tensor], model: nn.Module) -> None:
    """Reset every BN layer's running statistics and recompute them in one pass over
    `batches` as an exact cumulative average, each batch weighted by its size: the running
    mean becomes the mean over all inputs, even when the last batch is smaller.

    Under torchrun every rank passes its own batches (any split, none is fine) and the
    weighted sums and row counts are all-reduced: the result is that of one process over
    all the ranks' batches.

    The model's mode, momenta and the global RNG (dropout draws) are left as they were.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    seen = _local_update_bn(batches, model, layers)
    if distributed.world_size() > 1:
        _combine_ranks(layers, seen)


def _local_update_bn(batches: Iterable[torch.Tensor], model: nn.Module, layers: list[nn.Module]) -> int:
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
    return seen


def _combine_ranks(layers: list[nn.Module], seen: int) -> None:
    """Each rank's statistics are its size-weighted averages over its `seen` rows: all-reduce
    the weighted sums and the counts, then divide (a rank without rows adds zeros)."""
    first = layers[0].running_mean
    parts = [t for layer in layers for t in (layer.running_mean, layer.running_var)]
    flat = torch.cat([t.double().reshape(-1) * seen for t in parts] + [first.new_tensor([seen], dtype=torch.float64)])
    flat = distributed.all_reduce_sum(flat)
    total = flat[-1]
    offset = 0
    for t in parts:
        t.copy_((flat[offset : offset + t.numel()] / total).view_as(t))
        offset += t.numel()
    counts = torch.stack([layer.num_batches_tracked for layer in layers])
    counts = distributed.all_reduce_sum(counts)
    for layer, count in zip(layers, counts, strict=True):
        layer.num_batches_tracked.copy_(count)


def recompute_bn(model: nn.Module, data: Dataset, batch_size: int = 512) -> nn.Module:
    """`update_bn` over the training split, without augmentation (deterministic).

    Under torchrun rank r takes the batches r, r + W, r + 2W, ... of the same batch list.
    """
    part, parts = distributed.rank(), distributed.world_size()
    update_bn((x for x, _ in eval_batches(data, "train", batch_size, shard=(part, parts))), model)
    return model
