"""How many threads one process should compute with, chosen on purpose (torch-free, so the
training side and the serving side decide the same way).

A process's intra-op threads are its share of the cores it may use: the CPU affinity mask,
capped by a cgroup CPU quota when one is set (a container started with `--cpus`), divided by
the number of processes of the same job that run side by side (`run_jobs` workers, torchrun
ranks on one node, serving workers). More threads than that only fight each other.

Overrides, strongest first: MODECONN_THREADS (threads per process), then OMP_NUM_THREADS
(what torch itself would read).

Waiting: an idle OpenMP thread spins for a while before it sleeps, which on a machine where
other processes need the cores steals their time slices and slows everyone (torch's pool
waits between every small op). `wait_passively()` sets OMP_WAIT_POLICY=PASSIVE unless the
user set it; it must run before torch loads its OpenMP runtime, which reads it once.
onnxruntime's spinning is a session option: `spinning_allowed` says when to keep it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from modeconn.contract.errors import ModeconnError

THREADS_VARIABLE = "MODECONN_THREADS"
CGROUP_ROOT = Path("/sys/fs/cgroup")


class ThreadsError(ModeconnError):
    """A thread-count variable that is not a positive integer."""


def affinity_cores() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_quota_cores(root: Path = CGROUP_ROOT) -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), or None without one.

    cgroup v2 (`cpu.max`: "QUOTA PERIOD" or "max PERIOD", in the process's own cgroup or at the
    root of the mount as seen inside a container), else cgroup v1 (`cpu.cfs_quota_us`, -1: none)."""
    for folder in _cgroup_folders(root):
        quota = _read_v2(folder / "cpu.max")
        if quota is not None:
            return quota
    for name in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota = _read_v1(root / name)
        if quota is not None:
            return quota
    return None


def _cgroup_folders(root: Path) -> list[Path]:
    folders = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                folders.append(root / line[3:].strip().lstrip("/"))
    except OSError:
        pass
    return [*folders, root]


def _read_v2(path: Path) -> int | None:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _read_v1(folder: Path) -> int | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """The cores this process may use: its affinity mask, capped by the cgroup quota."""
    quota = cgroup_quota_cores()
    cores = affinity_cores()
    return min(cores, quota) if quota is not None else cores


def threads_per_process(side_by_side: int = 1, environ: Mapping[str, str] | None = None,
                        cores: int | None = None) -> int:
    """Intra-op threads for one of `side_by_side` processes sharing this machine's usable cores
    (at least 1); MODECONN_THREADS, else OMP_NUM_THREADS, overrides the share."""
    environ = os.environ if environ is None else environ
    for name in (THREADS_VARIABLE, "OMP_NUM_THREADS"):
        if environ.get(name, "").strip():
            return _positive(name, environ[name])
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, side_by_side))


def _positive(name: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ThreadsError(f"{name}={value!r}: not an integer (threads per process)") from None
    if number < 1:
        raise ThreadsError(f"{name}={value!r}: must be at least 1 (threads per process)")
    return number


def load_average() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def machine_shared(side_by_side: int = 1, load: float | None = None, cores: int | None = None) -> bool:
    """Whether other processes compete for the cores: several of ours side by side, or a
    1-minute load average already at the usable cores (others are computing)."""
    if side_by_side > 1:
        return True
    load = load_average() if load is None else load
    cores = usable_cores() if cores is None else cores
    return load is not None and load >= cores


def spinning_allowed(side_by_side: int = 1, load: float | None = None, cores: int | None = None) -> bool:
    """Whether idle intra-op threads may busy-wait (onnxruntime's allow_spinning): only when
    the process has the machine to itself, where spinning answers a little sooner."""
    return not machine_shared(side_by_side, load, cores)


def wait_passively(environ: dict[str, str] | os._Environ[str] | None = None) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless already set: idle OpenMP threads sleep at once instead of
    spinning. Call before torch is imported (its OpenMP runtime reads the variable when it
    loads); child processes inherit it."""
    (os.environ if environ is None else environ).setdefault("OMP_WAIT_POLICY", "PASSIVE")


def describe(threads: int, side_by_side: int = 1) -> dict[str, object]:
    """The thread settings of a process, for logs and benchmark records."""
    return {
        "threads": threads,
        "side_by_side": side_by_side,
        "usable_cores": usable_cores(),
        "affinity_cores": affinity_cores(),
        "cgroup_quota_cores": cgroup_quota_cores(),
        "override": next((f"{n}={os.environ[n]}" for n in (THREADS_VARIABLE, "OMP_NUM_THREADS")
                          if os.environ.get(n, "").strip()), None),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
