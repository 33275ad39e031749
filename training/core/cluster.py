"""Independent runs as Ray tasks: `run_jobs` on a Ray cluster instead of local worker processes.

Each job (compare's method, seed and budget runs) is one Ray task declaring what it needs
(`threads` CPUs; one GPU when the device is CUDA); a job that waits for others gets their
results as arguments, so Ray starts it after them. A task whose worker process or node is lost
is retried (RETRIES times); an exception in the job itself ends the whole set, as locally.
Every run seeds itself, so the results and files are those of the local run (bit for bit with
the same threads per run). The runs write their folders themselves: on several machines the
output folder must be a filesystem every node mounts at the same path.

Ray is an optional extra (`pip install 'modeconn[cluster]'`); nothing here imports it until a
command is given `--ray`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from modeconn.contract import threads as thread_choice
from modeconn.contract.errors import ModeconnError
from modeconn.training.core import progress

if TYPE_CHECKING:
    from modeconn.training.core.distributed import Job

RETRIES = 3  # re-runs of a task whose worker process or node died (not of a job's own error)


class ClusterError(ModeconnError):
    """--ray without Ray installed, or a cluster that cannot be reached."""


def _ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'modeconn[cluster]'") from None


def connect(address: str) -> Any:
    """The ray module, connected to `address` ('auto': the cluster this machine belongs to;
    HOST:PORT or ray://HOST:PORT); a Ray session this process already started is used as it is."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise ClusterError(f"--ray {address}: cannot connect to a Ray cluster ({err})".splitlines()[0]) from None
    return ray


def task_threads() -> int:
    """CPUs each task declares and computes with: MODECONN_THREADS or OMP_NUM_THREADS when
    set, else 1 (many small runs use a cluster's cores better side by side than threaded)."""
    return thread_choice.threads_per_process(cores=1)


def run_on_ray(jobs: list[Job], address: str, device: torch.device) -> list[Any]:
    """Every job's result, in order, each job a Ray task (after the jobs it waits for)."""
    ray = connect(address)
    threads = task_threads()
    options = {
        "num_cpus": threads,
        "num_gpus": 1 if device.type == "cuda" else 0,
        "max_retries": RETRIES,
        "retry_exceptions": False,
        # before the worker imports torch: idle OpenMP threads sleep (the user's value is kept)
        "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}},
    }
    task = ray.remote(**options)(_task_entry)
    refs: list[Any] = []
    for job in jobs:
        if any(a >= len(refs) for a in job.after):
            raise ValueError(f"job {len(refs)} waits for a later job {job.after}: list the jobs in order")
        refs.append(task.remote(job.fn, job.args, threads, *(refs[a] for a in job.after)))
    progress.log(f"ray: {len(jobs)} task(s) of {threads} CPU(s){' and 1 GPU' if options['num_gpus'] else ''} each "
                 f"on {int(ray.cluster_resources().get('CPU', 0))} CPU(s)")
    pending, index = list(refs), {ref: i for i, ref in enumerate(refs)}
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)  # a job's error ends the whole set
        progress.log(f"ray: job {index[done[0]] + 1} finished ({len(refs) - len(pending)}/{len(refs)})")
    return ray.get(refs)


def _task_entry(fn: Callable[..., Any], args: tuple[Any, ...], threads: int, *_after: Any) -> Any:
    """One job in a Ray worker: its threads, then the run (`_after`: the results it waited for)."""
    from modeconn.training.core.distributed import set_threads

    if torch.cuda.is_available() and torch.cuda.device_count():
        torch.cuda.set_device(0)  # Ray makes the task's GPU the only one visible
    set_threads(threads)
    return fn(*args)
