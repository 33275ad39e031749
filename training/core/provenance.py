"""Where and when a result was made: machine, date (UTC), versions, test-set size.

Every written table (pipeline's summary.md, compare.md) opens with these lines, so a number
copied into the README (training/readme_results.py) carries its machine and date with it.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from modeconn.training.core import ranks, statistics


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict[str, Any]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "load_average": load,  # 1, 5, 15 min: timings on a busy machine say so
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def provenance(test_size: int) -> dict[str, Any]:
    """Machine, date, the processes that computed it (world size, nodes, backend) and the
    statistics' settings, for a result's JSON."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "processes": ranks.layout(),
        "test_size": test_size,
        "bootstrap": {"resamples": statistics.RESAMPLES, "seed": statistics.SEED, "level": statistics.LEVEL},
    }


def markdown_lines(info: dict[str, Any]) -> list[str]:
    """The provenance as a few markdown bullet lines."""
    m, b = info["machine"], info["bootstrap"]
    load = f", load average {' / '.join(map(str, m['load_average']))}" if m.get("load_average") else ""
    processes = info.get("processes") or {"world_size": 1}
    spread = f"; {ranks.layout_line(processes)}" if processes["world_size"] > 1 else ""
    return [
        f"- Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}{load}; "
        f"torch {m['torch']}, Python {m['python']}{spread}.",
        f"- Date: {info['date']}.",
        f"- Test set: {info['test_size']:,} examples. Intervals: paired bootstrap over the test examples, "
        f"{b['level'] * 100:g} % percentile interval, {b['resamples']} resamples, seed {b['seed']}; "
        "error differences in percentage points.",
    ]
