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
waits between every small op). On a quiet machine spinning is faster
(benchmarks/results/busy_machine-*). So `wait_passively()`
sets OMP_WAIT_POLICY=PASSIVE, unless the user set it, for processes that run side by side,
and the CLI asks for it only when the machine is shared as it starts (`machine_shared`:
other processes kept cores busy over a 0.1 s sample, or the load average is at the cores).
It must run before torch loads its OpenMP runtime, which reads it once. onnxruntime's
spinning is a session option: `spinning_allowed` says when to keep it.
"""

from __future__ import annotations

import math
import os
import time
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


BUSY_CORES = 0.5  # cores other processes keep busy from which the machine counts as shared
_STAT = Path("/proc/stat")


def busy_cores(seconds: float = 0.1) -> float | None:
    """Cores kept busy over the next `seconds` (from /proc/stat), by every process but this
    one, which sleeps meanwhile; None where there is no /proc/stat."""
    def sample() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in _STAT.read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]) - idle, sum(fields[:8])
    first = sample()
    if first is None:
        return None
    time.sleep(seconds)
    second = sample()
    if second is None or second[1] == first[1]:
        return None
    return (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or 1)


def machine_shared(side_by_side: int = 1, load: float | None = None, cores: int | None = None,
                   busy: float | None = None) -> bool:
    """Whether other processes compete for the cores: several of ours side by side, other
    processes keeping BUSY_CORES or more busy now, or a 1-minute load average already at the
    usable cores. Measured now unless `load` or `busy` is given."""
    if side_by_side > 1:
        return True
    if load is None and busy is None:
        load, busy = load_average(), busy_cores()
    cores = usable_cores() if cores is None else cores
    return (load is not None and load >= cores) or (busy is not None and busy >= BUSY_CORES)


def spinning_allowed(side_by_side: int = 1, load: float | None = None, cores: int | None = None) -> bool:
    """Whether idle intra-op threads may busy-wait (onnxruntime's allow_spinning): only when
    the process has the machine to itself, where spinning answers a little sooner."""
    return not machine_shared(side_by_side, load, cores)


def wait_passively(environ: dict[str, str] | os._Environ[str] | None = None, when_shared: bool = False) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless already set: idle OpenMP threads sleep at once instead of
    spinning. With `when_shared`, only if the machine is shared now (`machine_shared`). Call
    before torch is imported (its OpenMP runtime reads the variable when it loads); child
    processes inherit it."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in environ and (not when_shared or machine_shared()):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


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
