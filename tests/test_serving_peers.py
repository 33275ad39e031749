"""benchmarks/serving_peers.py without servers: the synthetic CIFAR-10 folder of its CIFAR-shaped
artifact (tests/support.py) loads as the real loader reads it, and its tables are the medians and
ratios of what was measured."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import serving_peers as sp  # noqa: E402

from modeconn.training.core.data import build_dataset  # noqa: E402
from tests.support import write_cifar10  # noqa: E402


def test_synthetic_cifar10_loads_with_the_real_loader(tmp_path: Path) -> None:
    write_cifar10(tmp_path, train=10, test=7)
    data = build_dataset("cifar10", root=tmp_path, val_size=0)
    assert data.input_shape == (3, 32, 32)
    assert (len(data.y_train), len(data.y_test), data.num_classes) == (10, 7, 10)
    assert 0.0 <= float(data.x_test.min()) and float(data.x_test.max()) <= 1.0


def _start(p50_s: float, rows_per_s: float, cpu_ms: float) -> dict:
    lat = [p50_s * f for f in (0.9, 1.0, 1.1)]
    load = {"rows_per_s": rows_per_s, "latencies_s": lat, "statuses": {200: 3}, "client_cpu_s": 0.1,
            "others_cores": 0.0, "server_cpu_ms": cpu_ms, "server_cpu_ms_1_client": cpu_ms}
    return {"ready_s": 1.0, "idle_cores": 0.0, "json": {"latency_s": lat, "load": load},
            "binary": {"unsupported": "HTTP 400"}}


def test_tables_are_medians_over_starts_and_ratios_within_rounds() -> None:
    results = {"modeconn": [_start(0.002, 900, 1.0), _start(0.004, 500, 1.2), _start(0.003, 700, 1.1)],
               "floor": [_start(0.001, 1000, 0.8), _start(0.002, 400, 0.9), _start(0.001, 800, 0.7)]}
    agg = sp.aggregate(results["modeconn"], "json")
    assert agg["p50_ms"] == pytest.approx(3.0) and agg["rows_per_s"] == 700
    assert agg["server_cpu_ms"] == pytest.approx(1.1)
    assert sp.aggregate(results["modeconn"], "binary") is None  # unsupported everywhere
    run: dict = {"sections": []}
    sp.paired_section(run, results, types.SimpleNamespace(encodings="json,binary", interleave=False))
    (row,) = run["sections"][0]["rows"]
    assert row[:3] == ["floor", "json", 3]
    assert row[3] == pytest.approx(np.median([900 / 1000, 500 / 400, 700 / 800]))
    assert row[5] == pytest.approx(np.median([1.0, 2.0, 2.0]))  # p50 gaps in ms, round by round
