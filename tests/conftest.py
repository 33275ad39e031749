"""Session-wide fixtures: the demo config, two demo networks trained once, and a curve between them.

Training is the expensive part (about 10 s per network and 16 s for the curve on an idle
AMD EPYC; eval-curve evaluates three paths, 110 s at the paper's 61 points, so the fixture
takes 31: every other point of them), so it happens once per session and every test that
needs trained networks shares the results. The MNIST-1D cache stays in its default place
(~/.cache/modeconn or $MODECONN_DATA_DIR): regenerating it costs seconds per process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from filelock import FileLock

if os.environ.get("PYTEST_XDIST_WORKER"):  # test processes side by side: idle OpenMP threads sleep
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from modeconn.training.core.config import Config, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "mnist1d.yaml"
DEMO_CURVE_POINTS = 31


T = TypeVar("T")


def _shared(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """`build(folder)` once per test run, also when pytest-xdist runs the tests in several
    processes: the first to get here builds into a folder all of them share, the others wait
    for it and read its result (JSON; paths come back as Paths)."""
    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, result = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not result.is_file():
            folder.mkdir()
            result.write_text(json.dumps(build(folder), default=_encode))
    return json.loads(result.read_text(), object_hook=_decode)


def _encode(value: Any) -> Any:
    if isinstance(value, Path):
        return {"__path__": str(value)}
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"cannot share a {type(value).__name__} between test processes")


def _decode(value: dict[str, Any]) -> Any:
    return Path(value["__path__"]) if set(value) == {"__path__"} else value


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def demo_config() -> Config:
    return load_config(DEMO_CONFIG)


@pytest.fixture(scope="session")
def demo_data(demo_config: Config):  # noqa: ANN201
    """The demo's data set (the MNIST-1D variant configs/mnist1d.yaml generates), on the CPU."""
    from modeconn.training.core.networks import dataset_spec, load_data

    return load_data(dataset_spec(demo_config.data), "cpu")


@pytest.fixture(scope="session")
def trained_pair(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Two demo networks (the full demo config, seeds 0 and 1, on the CPU); their result dicts."""
    from modeconn.training.train import train_network

    def build(root: Path) -> list[dict[str, Any]]:
        results = []
        for seed in (0, 1):
            config = load_config(DEMO_CONFIG, {"seed": seed, "device": "cpu"})
            started = time.perf_counter()
            result = train_network(config, root / f"seed{seed}")
            print(f"\n[trained_pair] seed {seed}: test error {result['metrics']['test_error']:.2f} % "
                  f"in {time.perf_counter() - started:.1f} s")
            results.append(result)
        return results

    return _shared(tmp_path_factory, "pair", build)


@pytest.fixture(scope="session")
def demo_curve(
    trained_pair: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A Bezier curve (the demo config's curve section) between the trained pair, evaluated
    at 31 points: {"fit": fit_curve's result, "eval": evaluate_curve's result}."""
    from modeconn.training.curves.evaluate import evaluate_curve
    from modeconn.training.curves.fit import fit_curve

    def build(folder: Path) -> dict[str, Any]:
        config = load_config(DEMO_CONFIG, {"device": "cpu"})
        started = time.perf_counter()
        fit = fit_curve(
            config, Path(trained_pair[0]["checkpoint"]), Path(trained_pair[1]["checkpoint"]), folder / "bezier"
        )
        fitted = time.perf_counter()
        evaluation = evaluate_curve(Path(fit["checkpoint"]), points=DEMO_CURVE_POINTS, device="cpu")
        print(f"\n[demo_curve] fit {fitted - started:.1f} s, eval-curve {time.perf_counter() - fitted:.1f} s")
        return {"fit": fit, "eval": evaluation}

    return _shared(tmp_path_factory, "curve", build)


@pytest.fixture(scope="session")
def small_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two short MNIST-1D networks and a Bezier and a PolyChain curve between them
    (tests/support.py train_small_runs), trained once per session; tests only read them."""
    from tests.support import train_small_runs

    return _shared(tmp_path_factory, "small-runs", train_small_runs)


@pytest.fixture(scope="session")
def built_artifact(small_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The serving tests' artifact (tests/support.py), made from the small runs' Bezier curve,
    built once per session for every service test and never modified: tests that change
    files change a copy."""
    from tests.support import build_test_artifact

    return _shared(tmp_path_factory, "artifact", lambda folder: build_test_artifact(folder / "modeconn-test", small_runs))
