"""What every benchmark shares: the machine description, interleaved timing, the fp32 matmul
peak, FLOP counting, tables, and writing `benchmarks/results/<name>-<YYYY-MM-DD>.{md,json}`.

Timing on a shared machine: competitors are timed round-robin (one sample of each per round),
so load that comes and goes hits all of them alike; tables report the median sample. The load
average is recorded at the start and the end of every run, next to the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------- machine
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no __version__
        return "n/a"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict[str, Any]:
    """CPU model, cores, SIMD flags, nominal fp32 peak and library versions."""
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    simd = [f for f in ("avx512f", "avx2", "fma", "avx") if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mhz = float(cpu.get("cpu MHz", "0") or 0)
    # fp32 FLOP per cycle per core: 2 FMA units x (16 lanes AVX-512 | 8 AVX2) x 2; a nominal
    # figure at the reported clock (turbo and AVX-512 down-clocking make it approximate).
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    return {
        "cpu": cpu.get("model name", platform.processor() or "unknown"),
        "cores": cores,
        "cpu_mhz": mhz,
        "simd": simd,
        "nominal_fp32_peak_gflops": round(cores * mhz / 1000 * per_cycle, 1) if mhz else None,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"),
        "bentoml": _version("bentoml"),
        "platform": platform.platform(),
    }


def start_run(name: str) -> dict[str, Any]:
    """The run's record: machine, date, load at start. Pass it to `write_results`."""
    return {"benchmark": name, "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(), "load_average_start": load_average(), "sections": []}


# ---------------------------------------------------------------- timing
class CpuMonitor:
    """CPU time used by *other* processes (and the hypervisor: steal), in cores, from
    /proc/stat minus this process (all its threads) and the processes in `pids`. The
    benchmarks wait for a quiet machine before each block and keep, per timing sample,
    how busy the rest of the machine was; a table's numbers come from the quiet samples."""

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.tick = os.sysconf("SC_CLK_TCK")

    def _ours(self) -> int:
        total = 0
        for pid in ["self", *self.pids]:
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
        return total

    def snapshot(self) -> tuple[float, int, int]:
        try:
            cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return time.perf_counter(), 0, 0
        busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + (cpu[7] if len(cpu) > 7 else 0)
        return time.perf_counter(), busy, self._ours()

    def others(self, before: tuple[float, int, int], after: tuple[float, int, int]) -> float:
        """Cores busy with other work between two snapshots."""
        seconds = max(after[0] - before[0], 1e-9)
        return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / self.tick / seconds)


QUIET_CORES = 0.25  # a sample counts as quiet when other work used less than this many cores


def wait_for_quiet(monitor: CpuMonitor | None = None, max_wait_s: float = 120.0, window_s: float = 1.0) -> float:
    """Wait (at most `max_wait_s`) for a `window_s` window in which other work used less than
    QUIET_CORES; returns the cores other work used in the last window."""
    monitor = monitor or CpuMonitor()
    deadline = time.monotonic() + max_wait_s
    while True:
        before = monitor.snapshot()
        time.sleep(window_s)
        busy = monitor.others(before, monitor.snapshot())
        if busy < QUIET_CORES or time.monotonic() > deadline:
            return busy


@dataclass
class Samples:
    """Seconds per call of each timing sample, and the cores other work used meanwhile."""

    seconds: list[float] = field(default_factory=list)
    background: list[float] = field(default_factory=list)

    def quiet(self) -> list[float]:
        """The samples taken while the machine was quiet; all of them if fewer than two were."""
        kept = [s for s, b in zip(self.seconds, self.background, strict=True) if b < QUIET_CORES]
        return kept if len(kept) >= 2 else list(self.seconds)

    @property
    def value(self) -> float:
        """Median seconds per call over the quiet samples."""
        return statistics.median(self.quiet())

    @property
    def quiet_count(self) -> str:
        return f"{sum(b < QUIET_CORES for b in self.background)}/{len(self.seconds)}"

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "background_cores": [round(b, 3) for b in self.background],
                "value_s": self.value}


def interleaved(cases: dict[str, Callable[[], Any]], rounds: int, min_sample_s: float = 0.2,
                max_calls: int = 1000, warmup: int = 1, monitor: CpuMonitor | None = None,
                quiet_wait_s: float = 60.0, settle_s: float = 0.05) -> dict[str, Samples]:
    """Seconds per call of each case: `rounds` samples each, taken round-robin, after waiting
    for a quiet machine; one sample is as many back-to-back calls as fill `min_sample_s`
    (at least one). Between samples the process sleeps `settle_s`, so thread pools that spin
    after a call (onnxruntime's, OpenMP's) are asleep before the next case starts."""
    monitor = monitor or CpuMonitor()
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    wait_for_quiet(monitor, quiet_wait_s)
    samples = {name: Samples() for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            time.sleep(settle_s)
            calls, before = 0, monitor.snapshot()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - before[0]
                if elapsed >= min_sample_s or calls >= max_calls:
                    break
            after = monitor.snapshot()
            samples[name].seconds.append((after[0] - before[0]) / calls)
            samples[name].background.append(monitor.others(before, after))
    return samples


def latencies(fn: Callable[[], Any], calls: int, warmup: int = 5) -> list[float]:
    """Seconds of each of `calls` back-to-back calls (for percentiles)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def spread(samples: Samples) -> str:
    """Fastest and slowest quiet sample against their median, e.g. '-3%/+12%'."""
    values = samples.quiet()
    m = median(values)
    return f"-{(1 - min(values) / m) * 100:.0f}%/+{(max(values) / m - 1) * 100:.0f}%"


def matmul_peak(threads: int, quick: bool = False) -> dict[str, Any]:
    """Best fp32 GFLOP/s of square matmuls (torch, and numpy's BLAS) on `threads` threads."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    with threadpool_limits(limits=threads):  # numpy's BLAS keeps its own threads: held to the same count
        return _matmul_peak(threads, quick)


def _matmul_peak(threads: int, quick: bool) -> dict[str, Any]:
    import torch

    best: dict[str, float] = {}
    sizes = (1024, 2048) if not quick else (1024,)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        flop = 2 * n**3
        for name, fn in (("torch.mm", lambda a=a, b=b: torch.mm(a, b)), ("numpy.matmul", lambda an=an, bn=bn: an @ bn)):
            times = interleaved({name: fn}, rounds=3 if quick else 7, min_sample_s=0.05)[name]
            best[f"{name} n={n}"] = flop / min(times.quiet()) / 1e9
    key = max(best, key=best.get)
    return {"gflops": round(best[key], 1), "by": key, "all": {k: round(v, 1) for k, v in best.items()},
            "threads": threads}


def flops_per_sample(net: Any, example: Any) -> int:
    """FLOPs (2 x multiply-adds of conv/linear/matmul ops) of one forward per sample of `example`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(example)
    return counter.get_total_flops() // len(example)


# ---------------------------------------------------------------- tables and results
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (also readable as plain text)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *map(line, cells[1:])])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def add_section(run: dict[str, Any], title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]],
                notes: str = "", data: Any = None) -> None:
    """Record a table (and the raw data behind it) and print it."""
    run["sections"].append({"title": title, "headers": list(headers), "rows": [list(r) for r in rows],
                            "notes": notes, "data": data})
    print(f"\n## {title}\n\n{table(headers, rows)}\n{notes}\n", flush=True)


RAW = Path(__file__).resolve().parent / "raw"
RAW_LIST = 100  # a list of more numbers than this is a raw sample dump


def summarize_samples(obj: Any) -> Any:
    """`obj` with every long list of numbers replaced by its size and percentiles."""
    if isinstance(obj, dict):
        return {k: summarize_samples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        if len(obj) > RAW_LIST and all(isinstance(v, int | float) for v in obj):
            values = sorted(float(v) for v in obj)
            return {"samples": len(values), "min": values[0], "p50": percentile(values, 50),
                    "p90": percentile(values, 90), "p99": percentile(values, 99), "max": values[-1],
                    "mean": sum(values) / len(values)}
        return [summarize_samples(v) for v in obj]
    return obj


def write_results(run: dict[str, Any], summary: str = "", out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write `<name>-<YYYY-MM-DD>.md` and `.json` (same day: overwritten) and return their paths."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    run["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    run["load_average_end"] = load_average()
    day = run["started_at"][:10]
    stem = out_dir / f"{run['benchmark']}{'-quick' if run.get('quick') else ''}-{day}"
    m = run["machine"]
    lines = [
        f"# {run['benchmark']} ({day})",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['simd'])}), {m['cpu_mhz']:.0f} MHz, "
        f"nominal fp32 peak {m['nominal_fp32_peak_gflops']} GFLOP/s",
        f"- software: python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"numpy {m['numpy']}, bentoml {m['bentoml']}",
        f"- run: {run['started_at']} .. {run['finished_at']} UTC; load average (1/5/15 min) "
        f"{run['load_average_start']} at start, {run['load_average_end']} at end"
        + (" (--quick)" if run.get("quick") else ""),
        f"- command: `{run.get('command', '')}`",
        "",
    ]
    if summary:
        lines += [summary.strip(), ""]
    for section in run["sections"]:
        lines += [f"## {section['title']}", "", table(section["headers"], section["rows"]), ""]
        if section["notes"]:
            lines += [section["notes"].strip(), ""]
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    md.write_text("\n".join(lines))
    # the repository keeps the tables and sample summaries; raw samples go to benchmarks/raw/ (ignored)
    js.write_text(json.dumps(summarize_samples(run), indent=1, default=str))
    RAW.mkdir(exist_ok=True)
    (RAW / js.name).write_text(json.dumps(run, default=str))
    print(f"results: {md.relative_to(ROOT) if md.is_relative_to(ROOT) else md}, {js.name}", flush=True)
    return md, js


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sizes and repeats (minutes -> seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    return parser


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
