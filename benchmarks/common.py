"""What every benchmark shares: the machine description, interleaved timing, the fp32 matmul
peak, FLOP counting, tables, and writing `benchmarks/results/<name>-<YYYY-MM-DD>.{md,json}`.

Timing on a shared machine: competitors are timed round-robin (one sample of each per round),
so load that comes and goes hits all of them alike; tables report the median sample. The load
average is recorded at the start and the end of every run, next to the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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
def interleaved(cases: dict[str, Callable[[], Any]], rounds: int, min_sample_s: float = 0.2,
                max_calls: int = 1000, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each case: `rounds` samples each, taken round-robin; one sample is
    as many back-to-back calls as fill `min_sample_s` (at least one)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            calls, started = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - started
                if elapsed >= min_sample_s or calls >= max_calls:
                    break
            samples[name].append(elapsed / calls)
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


def spread(values: Sequence[float]) -> str:
    """min..max of the samples relative to their median, e.g. '-3%/+12%'."""
    m = median(values)
    return f"-{(1 - min(values) / m) * 100:.0f}%/+{(max(values) / m - 1) * 100:.0f}%"


def matmul_peak(threads: int, quick: bool = False) -> dict[str, Any]:
    """Best fp32 GFLOP/s of square matmuls (torch, and numpy's BLAS) on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    best: dict[str, float] = {}
    sizes = (1024, 2048) if not quick else (1024,)
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        flop = 2 * n**3
        for name, fn in (("torch.mm", lambda a=a, b=b: torch.mm(a, b)), ("numpy.matmul", lambda an=an, bn=bn: an @ bn)):
            times = interleaved({name: fn}, rounds=3 if quick else 7, min_sample_s=0.05)[name]
            best[f"{name} n={n}"] = flop / min(times) / 1e9
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
    js.write_text(json.dumps(run, indent=1, default=str))
    print(f"results: {md.relative_to(ROOT) if md.is_relative_to(ROOT) else md}, {js.name}", flush=True)
    return md, js


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke run: fewer sizes and repeats (minutes -> seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    return parser


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
