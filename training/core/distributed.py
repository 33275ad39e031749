"""Several processes, one optimisation: `torchrun` process groups, sharding, reductions.

Under `torchrun` (WORLD_SIZE > 1) every rank holds the whole data set and the same seeded
data generator, takes its part of each global batch (`shard_bounds`), and DDP averages the
gradients; `loss_weight` makes that average the global batch mean also when the last batch
of an epoch splits unevenly. Outside torchrun every helper is the one-process identity, so
the stages call them without branches.

gloo on CPUs, NCCL on CUDA (one GPU per rank, chosen by LOCAL_RANK). Rank 0 alone writes
files (training/core/checkpoint.py refuses a write from any other rank).

`run_jobs` is the other way past one process: independent runs (compare's sub-runs, the
pipeline's two networks) side by side in worker processes.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from modeconn.contract import threads as thread_choice
from modeconn.training.core import progress, step
from modeconn.training.core.config import ConfigError

# the rank queries live in ranks.py (progress needs them without the rest); re-exported here
from modeconn.training.core.ranks import (  # noqa: F401
    active,
    is_main,
    launched,
    layout,
    layout_line,
    rank,
    rank_from_env,
    ranks_on_node,
    world_size,
)


def use_threads(side_by_side: int = 1) -> int:
    """Set this process's torch intra-op (and inter-op) threads to its share of the usable
    cores among `side_by_side` processes (modeconn/contract/threads.py); returns the count."""
    return set_threads(thread_choice.threads_per_process(side_by_side))


def set_threads(count: int) -> int:
    """torch's intra-op and inter-op threads of this process: `count` (returned)."""
    torch.set_num_threads(count)
    if torch.get_num_interop_threads() != count:
        with contextlib.suppress(RuntimeError):  # fixed once the inter-op pool has started
            torch.set_num_interop_threads(count)
    return count


def setup(device: torch.device, backend: str = "auto") -> torch.device:
    """Join torchrun's process group (once) and return this rank's device.

    `device` is the resolved `device` setting; `backend` the `distributed.backend` setting
    (auto: NCCL on CUDA, gloo on CPUs). Outside torchrun it returns `device` unchanged.
    """
    if not launched():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            "distributed.backend: nccl needs one CUDA GPU per rank, but this run is on the CPU "
            f"(device {device}; no CUDA GPU is visible or device: cpu was set); use distributed.backend=gloo"
        )
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ConfigError(
                f"device: cuda with LOCAL_RANK {local_rank}, but this node has {visible} visible CUDA GPU(s); "
                f"start at most {visible} processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not active():
        _init_process_group(backend)
        # the run's first line says it is one of several processes (and how many, where)
        progress.log(f"distributed: {layout_line(layout())}, {torch.get_num_threads()} thread(s) per rank")
    return device


def _init_process_group(backend: str) -> None:
    """init_process_group on torchrun's store, under a key prefix of this restart: after torchrun
    restarts the job (--max-restarts, a rank was lost), the store still holds the previous
    attempt's gloo addresses under the same keys, and a restarted rank would connect to the dead
    process's port (seen with torch 2.13: 'Gloo connectFullMesh failed ... Connection refused')."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0":  # a first attempt: torch's own path (with the store taken here, a rank
        # aborted at exit in one full test run of 2026-12-02: "terminate called without an active exception")
        dist.init_process_group(backend=backend)
        return
    store, rank_, world = next(dist.rendezvous("env://"))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"modeconn/attempt-{attempt}", store),
                            rank=rank_, world_size=world)


def shutdown(finished: bool = False) -> None:
    """Leave the process group. `finished` (the command succeeded here): first wait for the other
    ranks, so that none tears its connections down while another still runs (rank 0 evaluates
    alone at the end; twice in full suite runs a rank that left early aborted at exit). After an
    error nobody waits: the others may be gone, and torchrun ends the rest."""
    if active():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (it may write a cache), then the others."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


# ---------------------------------------------------------------- sharding
def shard_bounds(rows: int, part: int, parts: int) -> tuple[int, int]:
    """Rows [start, stop) of part `part` when `rows` are split into `parts` contiguous parts
    as evenly as possible (sizes differ by at most one, the larger ones first)."""
    base, extra = divmod(rows, parts)
    start = part * base + min(part, extra)
    return start, start + base + (part < extra)


def check_batch_size(batch_size: int, rows: int, setting: str, world: int | None = None) -> None:
    """The global batch must split into `world` equal parts, and the last partial batch of an
    epoch must give every rank at least one example."""
    world = world_size() if world is None else world
    if world == 1:
        return
    if batch_size % world:
        raise ConfigError(
            f"{setting} ({batch_size}) is the global batch and must be divisible by the world size ({world} "
            f"processes): choose a multiple of {world}, or start {world} processes that divide it"
        )
    last = rows % batch_size
    if 0 < last < world:
        raise ConfigError(
            f"{setting} ({batch_size}): the last batch of each epoch has {last} of the {rows} training examples, "
            f"fewer than the world size ({world}), so some rank would get no data; choose a {setting} "
            f"that leaves no remainder or at least {world}"
        )


def loss_weight(local_rows: int, global_rows: int, world: int | None = None) -> float:
    """The factor on a rank's mean loss that turns DDP's average over ranks into the mean over
    the global batch (1 when the batch splits evenly)."""
    return local_rows * (world_size() if world is None else world) / global_rows


# ---------------------------------------------------------------- reductions
def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (the identity in one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- models
def unwrap(model: nn.Module) -> nn.Module:
    """The module that the step's wrappers (compile, autocast: training/core/step.py) and DDP
    wrap, or the module itself."""
    model = step.unwrap(model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_for_training(model: nn.Module, sync_batchnorm: bool = False) -> nn.Module:
    """The module the training step runs: `model` itself in one process, else DDP around it.

    No buffer sync in the forward: DDP would otherwise copy rank 0's buffers into every rank before
    each forward (for a curve that includes its fixed control points, every step); each rank
    keeps its own BN running averages instead, rank 0's are the ones saved, and every place
    that needs exact statistics recomputes them (`training.core.bn.recompute_bn`).

    `sync_batchnorm`: the step runs a twin of `model` whose BatchNorm layers normalise with
    the statistics of the whole global batch; the twin shares every parameter and buffer
    with `model`, so `model` (saved, evaluated, copied for snapshots) keeps plain BatchNorm.
    """
    if world_size() == 1:
        return model
    if sync_batchnorm and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = _sync_batchnorm_twin(model)
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **_NO_BUFFER_SYNC
    )


# torch >= 2.13 names it forward_sync_buffers (it still syncs once at construction: harmless,
# every rank starts from the same state); older versions only know broadcast_buffers
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def _sync_batchnorm_twin(model: nn.Module) -> nn.Module:
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo=shared)  # new modules, the same tensors
    cuda = next(model.parameters()).device.type == "cuda"
    # torch's SyncBatchNorm (fused kernels) runs on GPUs only; CPUSyncBatchNorm is the same
    # computation with two all-reduces, for gloo on CPUs
    return _convert_batchnorm(twin, nn.SyncBatchNorm if cuda else CPUSyncBatchNorm)


def _convert_batchnorm(module: nn.Module, kind: type[nn.modules.batchnorm._BatchNorm]) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, kind):
        layer = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            layer.weight, layer.bias = module.weight, module.bias
        layer.running_mean, layer.running_var = module.running_mean, module.running_var
        layer.num_batches_tracked = module.num_batches_tracked
        layer.train(module.training)
        return layer
    for name, child in module.named_children():
        module.add_module(name, _convert_batchnorm(child, kind))
    return module


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of all ranks (any input with channels on axis 1).

    Mean and biased variance in two passes, each an all-reduce of per-channel sums that
    autograd differentiates (torch.distributed.nn), so the gradient is that of one process
    normalising the whole batch. Running averages as nn.BatchNorm: unbiased variance.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input with a channel axis (2D or more), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        rows = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), rows]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


# ---------------------------------------------------------------- independent runs side by side
@dataclass(frozen=True)
class Job:
    """One independent run: `fn(*args)`, after the jobs whose indices are in `after`.

    `fn` must be a module-level function (a worker process imports it by name)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    after: tuple[int, ...] = ()


def run_jobs(jobs: list[Job], parallel: int, device: torch.device, ray: str | None = None) -> list[Any]:
    """Every job's result, in order. `ray`: each job a task on the Ray cluster at that address
    (training/core/cluster.py; `parallel` is then Ray's to choose). `parallel` 1: one after the
    other, in this process (list the jobs in an order that respects `after`). Otherwise up to `parallel` worker processes,
    each job on the next GPU in turn when `device` is CUDA; on CPUs each worker computes with
    its share of the usable cores (MODECONN_THREADS or OMP_NUM_THREADS override it) and its
    idle threads sleep instead of spinning. Every run seeds itself, so the results do not
    depend on which process runs it (to float rounding, exactly when the thread count per
    run is the same)."""
    if ray is not None:
        from modeconn.training.core.cluster import run_on_ray

        return run_on_ray(jobs, ray, device)
    if parallel == 1:
        return [job.fn(*job.args) for job in jobs]
    gpus = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    # spawned workers inherit the environment: set before they load torch's OpenMP runtime
    thread_choice.wait_passively()
    side_by_side = 1 if gpus else parallel
    results: dict[int, Any] = {}
    waiting = list(range(len(jobs)))
    started = 0
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                             initargs=(os.getpid(), multiprocessing.get_start_method())) as pool:
        running: dict[Future, int] = {}
        while waiting or running:
            for i in [i for i in waiting if all(a in results for a in jobs[i].after)]:
                if len(running) >= parallel:
                    break
                waiting.remove(i)
                gpu = gpus[started % len(gpus)] if gpus else None
                running[pool.submit(_job_entry, jobs[i].fn, jobs[i].args, gpu, side_by_side)] = i
                started += 1
            if not running:
                raise ValueError(f"jobs {waiting} wait for jobs that never run")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()  # a job's error ends the whole set
    return [results[i] for i in range(len(jobs))]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _start_worker(parent: int, start_method: str) -> None:
    """A pool worker ends with its parent, and starts its own processes (DataLoader workers of
    streamed data) the way the command would: a spawned process's default is spawn, which made
    every loader worker a fresh interpreter importing torch, seconds for each pass of a split."""
    multiprocessing.set_start_method(start_method, force=True)
    _end_with_parent(parent)


def _end_with_parent(parent: int) -> None:
    """A worker ends when the command that started it does: killed without a word (SIGKILL, an
    OOM kill), it cannot tell its pool to stop, and the workers would go on training jobs
    nobody collects. Linux only (prctl's parent-death signal); elsewhere nothing changes."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)


def _job_entry(fn: Callable[..., Any], args: tuple[Any, ...], gpu: int | None, side_by_side: int) -> Any:
    if gpu is not None:
        torch.cuda.set_device(gpu)
    use_threads(side_by_side)
    return fn(*args)
