"""What the tests share: the serving tests' artifact (made by the real exporter from short
MNIST-1D runs), the real `bentoml serve` processes they start, and the offline reference
answers (onnxruntime run here on the same graphs).

The artifact's members are points of its curve at t = 0, 0.5 and 1 (BN recomputed, as the
curve graph does), so the served curve at t = 0 and t = 1 must equal members 0 and 2. Its
SWA network (`swa.onnx`) is the average of those three members (`modeconn swa`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import json
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
import torch

from modeconn.contract.artifact import load_artifact
from modeconn.serving.batching import MicroBatcher
from modeconn.serving.settings import DEFAULT_WORKERS
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import model_checkpoint, save_checkpoint
from modeconn.training.core.config import load_config
from modeconn.training.core.networks import build_network, load_data
from modeconn.training.curves.evaluate import save_curve_point
from modeconn.training.curves.fit import fit_curve
from modeconn.training.ensembles.swa import run_swa
from modeconn.training.export import export_artifact
from modeconn.training.train import train_network

REPO = Path(__file__).resolve().parents[1]
MODEL = "modeconn-test"  # the test artifact's name in a test BentoML store
START_TIMEOUT_S = 90
ATOL = 1e-5


# -- the artifact -------------------------------------------------------------------------------
ENDPOINT_MEMBERS = {0.0: "members/member-000.onnx", 1.0: "members/member-002.onnx"}


SMALL_RUNS = {"device": "cpu", "train.epochs": 3, "curve.epochs": 2}


def train_small_runs(base: Path, curves: tuple[str, ...] = ("bezier", "polychain")) -> dict[str, Path]:
    """Two short MNIST-1D networks (3 epochs, seeds 0 and 1: "net0", "net1", their final.pt)
    and a 2-epoch curve of each type between them (the run folders)."""
    runs = {}
    for seed in (0, 1):
        config = load_config(REPO / "configs/mnist1d.yaml", {**SMALL_RUNS, "seed": seed})
        runs[f"net{seed}"] = Path(train_network(config, base / f"net{seed}")["checkpoint"])
    for curve in curves:
        config = load_config(REPO / "configs/mnist1d.yaml", {**SMALL_RUNS, "curve.curve": curve})
        runs[curve] = Path(fit_curve(config, runs["net0"], runs["net1"], base / curve)["run_dir"])
    return runs


def build_test_artifact(out_dir: Path, runs: dict[str, Path] | None = None) -> Path:
    """The artifact of the small runs' Bezier curve (trained here unless given), three of its
    points, and their SWA network."""
    work = out_dir.parent / f"{out_dir.name}-work"
    curve = (runs or train_small_runs(work, curves=("bezier",)))["bezier"]
    points = [Path(save_curve_point(curve, t, work / f"point-{t}.pt", device="cpu")["checkpoint"]) for t in (0.0, 0.5, 1.0)]
    swa = Path(run_swa(points, work / "swa.pt", device="cpu")["checkpoint"])
    # a 2-epoch curve on an 11-point grid: BN interpolation is bounded in tests/test_export.py on the demo curve
    export_artifact([*points, curve], MODEL, out=out_dir, grid_points=11, max_interpolation_pp=100, swa=swa)
    return out_dir


# -- an image-shaped artifact --------------------------------------------------------------------
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, train: int = 64, test: int = 256, seed: int = 0) -> Path:
    """A CIFAR-10 folder of random uint8 images and labels in the original format (protocol-2
    pickles in root/cifar-10-batches-py/, what training/core/data.py reads): `train` images over
    the five training batches (train // 5 each), `test` in the test batch. Returns `root`."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)

    def dump(name: str, n: int) -> None:
        batch = {b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}-{i}.png".encode() for i in range(n)], b"batch_label": name.encode()}
        with open(base / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for i in range(1, 6):
        dump(f"data_batch_{i}", train // 5)
    dump("test_batch", test)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072}, f, protocol=2)
    return root


@dataclass(frozen=True)
class ImageArtifact:
    """What build_image_artifact makes: sizes of the synthetic CIFAR-10 and of the networks."""

    members: int = 2
    depth: int = 8  # PreResNet-8: the smallest registered image network
    train: int = 64
    test: int = 256
    val_size: int = 0  # > 0: a validation split, so the exporter fits temperatures


def build_image_artifact(work: Path, name: str, spec: ImageArtifact = ImageArtifact()) -> Path:
    """work/artifact: `spec.members` PreResNet networks with seeded random weights (seeds 0, 1,
    ...) on a synthetic CIFAR-10 folder (write_cifar10, in work/cifar), their BN statistics
    recomputed on its training images (what SWA and curve points do; the initial ones, mean 0
    and variance 1, would leave untrained activations unnormalised), exported by the real
    exporter with its parity gate."""
    data_spec = {"name": "cifar10", "root": str(write_cifar10(work / "cifar", spec.train, spec.test)),
                 "val_size": spec.val_size}
    data = load_data(data_spec, "cpu")
    arch = {"name": "preresnet", "kwargs": {"depth": spec.depth}}
    paths = []
    (work / "members").mkdir()  # beside the export's out folder, not its parent (export refuses that)
    for i in range(spec.members):
        torch.manual_seed(i)
        net = recompute_bn(build_network(arch, data.num_classes), data)
        paths.append(work / "members" / f"preresnet-{i}.pt")
        save_checkpoint(paths[-1], model_checkpoint(net, arch, {**data_spec, **data.describe()}, kind="train"))
    out = work / "artifact"
    with contextlib.redirect_stderr(io.StringIO()):  # the exporter's progress lines
        export_artifact(paths, name, out=out)
    return out


# -- servers -----------------------------------------------------------------------------------


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODECONN_", "BENTOML_"))}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(REPO))
    return env


def store_artifact(artifact_dir: Path, name: str, home: Path) -> str:
    """Store via modeconn.contract.store in a subprocess: BentoML fixes its home at first use, so an
    in-process store would follow whichever test touched BentoML first."""
    code = (
        "import sys; from pathlib import Path; from modeconn.contract.store import save_to_bentoml_store;"
        "print(save_to_bentoml_store(Path(sys.argv[1]), sys.argv[2], "
        "labels={'stage': 'test'}, metadata={'source': 'tests'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(artifact_dir), name],
        cwd=REPO,
        env=base_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_libc = ctypes.CDLL(None, use_errno=True)
IN_MODIFY = 0x2  # <sys/inotify.h>


@contextlib.contextmanager
def _writes_to(path: Path) -> Iterator[int]:
    """A descriptor (Linux inotify) that turns readable when `path` is written to."""
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        if _libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exit_of(proc: subprocess.Popen) -> Iterator[list[int]]:
    """[a pidfd that turns readable when `proc` exits], or [] when it was already reaped."""
    if proc.returncode is not None:
        yield []
        return
    fd = os.pidfd_open(proc.pid)
    try:
        yield [fd]
    finally:
        os.close(fd)


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    workers: int = DEFAULT_WORKERS

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def post(self, path: str, payload: Any, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, json=payload, timeout=60, **kw)

    def wait_for_log(self, text: str, count: int = 1, timeout: float = START_TIMEOUT_S) -> None:
        """Until the log holds `text` `count` times: woken by each write to the log, not polled;
        the test fails (with the log's end) if the server exits or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        with _writes_to(self.log) as written, _exit_of(self.proc) as exited:  # before the first read: nothing missed
            while self.log.read_text(errors="replace").count(text) < count:
                if self.proc.poll() is not None:  # its last lines were read above
                    pytest.fail(f"server exited with {self.proc.returncode} before logging {text!r} "
                                f"{count} time(s):\n{self.log_tail()}")
                if (remaining := deadline - time.monotonic()) <= 0:
                    pytest.fail(f"{text!r} not logged {count} time(s) within {timeout:g} s:\n{self.log_tail()}")
                select.select([written, *exited], [], [], remaining)
                with contextlib.suppress(BlockingIOError):
                    os.read(written, 1 << 16)  # the events themselves say nothing more


def start_server(home: Path, model: str, log: Path, **env: str) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "modeconn.serving.service:ModeConnService"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO,
        env={**base_env(home), "MODECONN_MODEL": model, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so teardown reaches the workers
    )
    return Server(f"http://127.0.0.1:{port}", proc, log, workers=int(env.get("MODECONN_WORKERS", DEFAULT_WORKERS)))


def wait_ready(server: Server) -> None:
    """Until every worker has logged that it is ready (serving/predictor.py), which it does
    after it turned ready; one /readyz 200 would speak only for the worker that answered.
    The listening socket is the arbiter's, open from the start, so a request sent now is
    answered even by a worker whose server loop is still starting."""
    server.wait_for_log("ready in ", server.workers)


def wait_all_ready(*servers: Server) -> None:
    for server in servers:
        wait_ready(server)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=5)


# -- the batcher in this process -----------------------------------------------------------------


async def queued(batcher: MicroBatcher, rows: int) -> None:
    """Let the submissions already scheduled run up to their first wait, then check that `rows`
    wait in `batcher`'s queue (its pending_rows, the depth /metrics reports). A submission
    queues its rows before it first waits, so one pass of the event loop (sleep(0): the tasks
    scheduled earlier run first) leaves nothing to chance."""
    await asyncio.sleep(0)
    assert batcher.pending_rows == rows, (batcher.pending_rows, rows)


# -- offline reference -------------------------------------------------------------------------


def temperature_scaled(p: np.ndarray, temperature: float) -> np.ndarray:
    """p^(1/T), renormalised: softmax(log p / T) computed another way."""
    powered = p.astype(np.float64) ** (1.0 / temperature)
    return powered / powered.sum(axis=-1, keepdims=True)


class Offline:
    """What the server should answer, from onnxruntime run here and the manifest's temperatures
    (the served probabilities are temperature-scaled unless a request says calibrated: false).
    The artifact needs an ensemble temperature; a curve is optional (`curve` None without)."""

    def __init__(self, root: Path) -> None:
        self.artifact = load_artifact(root)
        manifest = json.loads((root / "manifest.json").read_text())
        self.temperature = manifest["ensemble"]["calibration"]["temperature"]
        opts = ["CPUExecutionProvider"]
        self.ensemble = ort.InferenceSession(str(self.artifact.ensemble_file), providers=opts)
        self.curve = self.curve_temperatures = None
        if self.artifact.has_curve:
            self.curve_temperatures = manifest["curve"]["calibration"]["temperatures"]
            self.curve = ort.InferenceSession(str(self.artifact.curve_file), providers=opts)
        self.members = [
            ort.InferenceSession(str(f), providers=opts) for f in self.artifact.member_files
        ]
        swa = manifest.get("swa")
        self.swa = None if swa is None else ort.InferenceSession(str(root / swa["file"]), providers=opts)
        self.swa_temperature = None if swa is None else swa["calibration"]["temperature"]

    def predict(self, x: np.ndarray, calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
        mean, members = self.ensemble.run(None, {"x": x})
        return (temperature_scaled(mean, self.temperature) if calibrated else mean), members

    def predict_swa(self, x: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """swa.onnx's probabilities, at the SWA network's own temperature unless raw."""
        assert self.swa is not None and self.swa_temperature is not None
        probs = self.swa.run(None, {"x": x})[0]
        return temperature_scaled(probs, self.swa_temperature) if calibrated else probs

    def members_each(self, x: np.ndarray) -> np.ndarray:
        """[K, N, C] from the member graphs themselves (not the ensemble graph)."""
        return np.stack([m.run(None, {"x": x})[0] for m in self.members])

    def at(self, t: float, x: np.ndarray, calibrated: bool = True) -> np.ndarray:
        probs = self.curve.run(None, {"x": x, "t": np.array([t], np.float32)})[0]
        return temperature_scaled(probs, self.curve_temperature(t)) if calibrated else probs

    def curve_temperature(self, t: float) -> float:
        """T(t): linear between the grid points i / (n - 1), written out here independently."""
        temps = self.curve_temperatures
        position = t * (len(temps) - 1)
        low = min(int(position), len(temps) - 2)
        return temps[low] + (position - low) * (temps[low + 1] - temps[low])


def demo_inputs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-4.1, 4.3, size=(n, 40)).astype(np.float32)


# ---------------------------------------------------------------- conformal u, written out
def conformal_u(row: np.ndarray) -> float:
    """One input's conformal u with Python integers, as modeconn/contract/conformal.py
    input_uniforms defines it (its random multipliers are the contract's own)."""
    from modeconn.contract.conformal import _multipliers

    mask = (1 << 64) - 1
    bits = np.ascontiguousarray(row, dtype=np.float32).reshape(-1).view(np.uint32).tolist()
    h = sum(int(b) * int(m) for b, m in zip(bits, _multipliers(len(bits)).tolist(), strict=True)) & mask
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & mask
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & mask
    h ^= h >> 31
    return (h >> 11) / 2.0**53


def conformal_set(probs: np.ndarray, u: float, tau: float, k_reg: int = 0, penalty: float = 0.0) -> list[int]:
    """One row's set written out: the classes by decreasing probability (ties in class order)
    while mass before + u * own probability + penalty * max(0, rank - k_reg) stays <= tau."""
    order = sorted(range(len(probs)), key=lambda c: (-probs[c], c))
    taken, before = [], 0.0
    for rank, c in enumerate(order, start=1):
        if before + u * probs[c] + penalty * max(0, rank - k_reg) > tau:
            break
        taken.append(c)
        before += probs[c]
    return taken
