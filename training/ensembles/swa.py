"""`modeconn swa`: Stochastic Weight Averaging (Izmailov et al. 2018) of checkpoints already made.

SWA is the one-network version of FGE: the average of the weights the FGE (or SSE) walk
visited, with ensemble-like accuracy at the cost of one network. Here it averages the
snapshots of a finished run (a run folder stands for its snapshots, else its final.pt) or
any checkpoints of one architecture and one data set, and saves the result as an ordinary
checkpoint (kind "swa", its members listed), which every command that takes a network reads.

The parameters are averaged with `torch.optim.swa_utils.AveragedModel` (arithmetic mean:
each update moves the average by (w − avg) / (n + 1)); its default `use_buffers=False` leaves
the buffers alone, which is right, since BatchNorm statistics are not weights. They are
recomputed afterwards with the project's `recompute_bn` (training/core/bn.py), NOT with
`torch.optim.swa_utils.update_bn`, because torch's (read in its source, torch 2.x):
- sets `momentum=None`, a cumulative average in which every BATCH counts the same
  (`num_batches_tracked` counts batches), so a smaller last batch is over-weighted; ours sets
  momentum b / (seen + b) per batch, an average in which every INPUT counts the same, equal to
  one pass over the whole training set in batches of any size;
- passes whatever the loader yields, augmentation included when the loader augments; ours
  passes the training split without augmentation, deterministically, in a fixed order;
- runs the forward passes on the global RNG (dropout draws change what runs next); ours forks it;
- has no notion of ranks; ours all-reduces the size-weighted sums under torchrun, giving one
  process's result.
Both reset the statistics first and restore the model's mode and momenta afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from modeconn.contract.artifact import file_sha256
from modeconn.contract.errors import ModeconnError
from modeconn.training.core import progress
from modeconn.training.core.bn import has_batchnorm, recompute_bn
from modeconn.training.core.checkpoint import model_checkpoint, save_checkpoint
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import resolve_device
from modeconn.training.core.networks import held_out_metrics, load_data, load_network
from modeconn.training.core.runs import check_replaceable_checkpoint
from modeconn.training.core.sources import check_same_network
from modeconn.training.ensembles.evaluate import expand_members


class SWAError(ModeconnError):
    """Checkpoints that cannot be averaged into one network."""


@torch.no_grad()
def average_parameters(networks: Iterable[nn.Module]) -> nn.Module:
    """The arithmetic mean of the networks' parameters (AveragedModel, one network in memory at a
    time), as a copy of the first network whose BN statistics are still the first one's (eval mode)."""
    averaged: AveragedModel | None = None
    for model in networks:
        if averaged is None:
            averaged = AveragedModel(model)
        averaged.update_parameters(model)
    if averaged is None:
        raise SWAError("no networks to average")
    return averaged.module.eval()  # a deep copy of the first network, its parameters now the average


def with_bn_recomputed(net: nn.Module, data: Dataset) -> tuple[nn.Module, bool]:
    """`net` with its BN statistics recomputed over `data`'s training split (eval mode), and
    whether it had BN to recompute (without BN nothing changes)."""
    recomputed = has_batchnorm(net)
    if recomputed:
        recompute_bn(net, data)
    return net.eval(), recomputed


def swa_average(networks: Iterable[nn.Module], data: Dataset) -> nn.Module:
    """SWA: the parameters averaged, then BN recomputed (the Python API's `swa`; `modeconn swa` runs the
    same two steps over checkpoints)."""
    return with_bn_recomputed(average_parameters(networks), data)[0]


def average_weights(paths: list[Path], device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """`average_parameters` of checkpoints (each checked against the first); and the first's fields."""
    if not paths:
        raise SWAError("no checkpoints to average")
    first: dict[str, Any] = {}

    def networks() -> Iterator[nn.Module]:
        for path in paths:
            model, state = load_network(path, device)
            if first:
                check_same_network([(paths[0], first), (path, state)], SWAError)
            else:
                first.update(state)
            yield model

    net = average_parameters(networks())
    return net, {k: v for k, v in first.items() if k in ("architecture", "dataset")}


def swa_network(paths: list[Path], data: Dataset, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The averaged checkpoints with BN recomputed on `data`'s training split (eval mode)."""
    net, fields = average_weights(paths, device)
    return with_bn_recomputed(net, data)[0], fields


def run_swa(sources: list[Path], out: Path, device: str = "auto") -> dict[str, Any]:
    """Average `sources` (checkpoints, or run folders standing for their snapshots), recompute BN,
    save the network to `out` (kind "swa"); returns its path, members and metrics."""
    started = time.perf_counter()
    check_replaceable_checkpoint(out, "swa")  # never over a run's own files or a user's
    try:
        members = expand_members(sources)
    except ModeconnError as err:
        raise SWAError(str(err)) from err
    dev = resolve_device(device)
    net, fields = average_weights(members, dev)
    data = load_data(fields["dataset"], dev)
    net, recomputed = with_bn_recomputed(net, data)
    metrics = held_out_metrics(net, data)
    # the members' contents: a rerun that reuses this file can tell whether its snapshots changed
    swa = {"members": [str(p) for p in members], "sha256": [file_sha256(Path(p)) for p in members],
           "count": len(members), "bn_recomputed": recomputed,
           "averaging": "torch.optim.swa_utils.AveragedModel (arithmetic mean of the parameters)"}
    save_checkpoint(out, model_checkpoint(net, fields["architecture"], fields["dataset"], kind="swa", swa=swa,
                                          metrics=metrics))
    seconds = time.perf_counter() - started
    val = f"val error {metrics['val_error']:.2f} %, " if "val_error" in metrics else ""
    progress.log(f"swa: average of {len(members)} checkpoint(s): {val}test error {metrics['test_error']:.2f} %, "
                 f"NLL {metrics['test_nll']:.4f} ({seconds:.1f}s) -> {out}")
    return {"checkpoint": str(out), "members": swa["members"], "bn_recomputed": recomputed, "metrics": metrics,
            "seconds": seconds}
