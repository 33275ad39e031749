"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU).

One launch runs several real stages in the same process group (a torchrun start costs
seconds on a busy 2-core machine): train without BN, with BN, with SyncBatchNorm, a curve,
then BN re-estimation over the two ranks' shards and the bad-input checks. Each rank writes
what it observed to OUT/rank-R.json (the test harness's own file, not the tool's).

Usage: python tests/ddp_worker.py OUT START.pt END.pt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from modeconn.training.core import distributed
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import atomic_write_bytes
from modeconn.training.core.config import ConfigError, load_config
from modeconn.training.core.networks import load_data, load_network, stage_device
from modeconn.training.curves.fit import fit_curve
from modeconn.training.curves.model import CurveModel
from modeconn.training.ensembles.fge import run_fge
from modeconn.training.ensembles.sse import run_sse
from modeconn.training.train import train_network

REPO = Path(__file__).resolve().parents[1]
# train.lr 0.02: at the config's 0.1 the start of training is chaotic enough that the float32
# rounding of a 64-row half batch (per rank) against a 128-row batch grows to 6e-3 in 64 steps
# on some CPUs (AMD EPYC, 2026-12-02; 1e-8 on the Intel CI machine); at 0.02 it stays at 3e-8
NO_BN = {"model.kwargs": {"width": 8, "batchnorm": False}, "train.lr": 0.02}
BN = {"model.kwargs": {"width": 8}}
# the published MNIST-1D, all 4000 training signals (32 steps of 128 per epoch)
TINY = {"device": "cpu", "data.val_size": 0, "train.epochs": 2, "train.save_every": 1, "curve.epochs": 1, "curve.save_every": 1,
        "fge.epochs": 1, "fge.cycle_epochs": 1, "sse.epochs": 1, "sse.cycle_epochs": 1,
        "fge.bn_update": True}  # the standard config keeps training's averages; this test checks the recompute


def config(**overrides: object):  # noqa: ANN201
    return load_config(REPO / "configs" / "mnist1d_standard.yaml", {**TINY, **overrides})


def main(out: Path, start: Path, end: Path) -> None:
    settings = config()
    stage_device(settings.device, settings.distributed.backend)  # joins the process group
    me = distributed.rank()
    seen: dict[str, object] = {"rank": me, "world": distributed.world_size()}

    train_network(config(**NO_BN), out / "train-nobn")
    train_network(config(**BN), out / "train-bn")
    train_network(config(**BN, **{"distributed.sync_batchnorm": True}), out / "train-syncbn")

    ts: list[float] = []
    forward = CurveModel.forward

    def recording_forward(self: CurveModel, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        if self.training:
            ts.append(float(t))
        return forward(self, x, t)

    CurveModel.forward = recording_forward  # observe the t every step really uses
    fit_curve(config(**NO_BN), start, end, out / "curve-nobn")
    CurveModel.forward = forward
    seen["curve_t"] = ts

    for name in ("nobn", "bn"):  # FGE from epoch 1 of the train runs: one snapshot, BN recomputed
        run_fge(config(), out / f"train-{name}" / "checkpoints" / "epoch-0001.pt", out / f"fge-{name}")
    run_sse(config(**NO_BN), out / "sse-nobn")

    distributed.barrier()  # rank 0 has written train-bn/final.pt
    model, state = load_network(out / "train-bn" / "final.pt")
    data = load_data(state["dataset"], "cpu")
    recompute_bn(model, data)
    if me == 0:
        bn = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
        torch.save(bn, out / "recomputed-bn-2ranks.pt")

    try:
        atomic_write_bytes(out / f"written-by-rank-{me}", b"x")
        seen["write"] = "written"
    except RuntimeError as err:
        seen["write"] = str(err)
    try:
        train_network(config(**NO_BN, **{"train.batch_size": 127}), out / "odd-batch")
    except ConfigError as err:
        seen["odd_batch_error"] = str(err)
    try:
        distributed.setup(torch.device("cpu"), "nccl")
    except ConfigError as err:
        seen["nccl_error"] = str(err)
    (out / f"rank-{me}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    finally:
        distributed.shutdown()
