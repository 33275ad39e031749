"""The serving stage against a real `bentoml serve` subprocess.

One artifact is built (tests/artifact_builder.py), stored twice in a temporary BentoML store
(as is, and as a copy without a curve), and served by two servers started side by side:
batching on (the default) with a lengthened warm-up so /readyz can be seen non-200, and
batching off (MODECONN_BATCHING=0) on the curve-less copy. Expected numbers come from
onnxruntime run offline on the same graphs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
import yaml

from serving.artifact import ArtifactError, file_record, load_artifact
from serving.batching import BatchSettings, MicroBatcher
from tests.artifact_builder import ENDPOINT_MEMBERS

REPO = Path(__file__).resolve().parents[1]
MODEL = "modeconn-test"
MNIST1D_CLASSES = [str(i) for i in range(10)]  # the class names the exporter records
MODEL_NO_CURVE = "modeconn-test-nocurve"
WARMUP_DELAY_S = 1.5
START_TIMEOUT_S = 90
ATOL = 1e-5


# -- fixtures -------------------------------------------------------------------------------


def _base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODECONN_", "BENTOML_"))}
    env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True", PYTHONPATH=str(REPO))
    return env


def _store(artifact_dir: Path, name: str, home: Path) -> str:
    """Store via serving.store in a subprocess: BentoML fixes its home at first use, so an
    in-process store would follow whichever test touched BentoML first."""
    code = (
        "import sys; from pathlib import Path; from serving.store import save_to_bentoml_store;"
        "print(save_to_bentoml_store(Path(sys.argv[1]), sys.argv[2], "
        "labels={'stage': 'test'}, metadata={'source': 'tests'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(artifact_dir), name],
        cwd=REPO,
        env=_base_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def _without_curve(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["curve"] = None
    del manifest["files"]["curve.onnx"]
    (dst / "curve.onnx").unlink()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    # /readyz statuses seen from process start until the first 200 (None = no connection)
    readyz_history: list[int | None] = field(default_factory=list)
    # /predict statuses seen while /readyz said 503
    predict_while_loading: list[int] = field(default_factory=list)

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def post(self, path: str, payload: Any, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, json=payload, timeout=60, **kw)


def _start(home: Path, model: str, log: Path, **env: str) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "serving.service:ModeConnService"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO,
        env={**_base_env(home), "MODECONN_MODEL": model, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so teardown reaches the workers
    )
    return Server(f"http://127.0.0.1:{port}", proc, log)


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            status: int | None = requests.get(server.url + "/readyz", timeout=2).status_code
        except requests.RequestException:
            status = None
        server.readyz_history.append(status)
        if status == 200:
            return
        if status == 503 and len(server.predict_while_loading) < 3:
            r = requests.post(server.url + "/predict", json={"inputs": [[0.0] * 40]}, timeout=10)
            server.predict_while_loading.append(r.status_code)
        time.sleep(0.05)
    pytest.fail(f"server not ready after {START_TIMEOUT_S} s:\n{server.log_tail()}")


def _wait_all_ready(*servers: Server) -> None:
    """Poll every server at once (so each history starts at its process start) until all are ready."""
    waiters = [threading.Thread(target=_wait_ready, args=(s,)) for s in servers]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join()
    for s in servers:
        if not s.readyz_history or s.readyz_history[-1] != 200:
            pytest.fail(f"server did not become ready:\n{s.log_tail()}")


def _stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def artifact_dir(built_artifact: Path) -> Path:
    return built_artifact


@pytest.fixture(scope="module")
def servers(
    artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("serving")
    home = tmp / "bentoml"
    _store(artifact_dir, MODEL, home)
    _store(_without_curve(artifact_dir, tmp / "no-curve"), MODEL_NO_CURVE, home)
    # one worker each: the tests read per-worker state (/info's batching statistics)
    main = _start(home, MODEL, tmp / "main.log", MODECONN_WARMUP_DELAY_S=str(WARMUP_DELAY_S), MODECONN_WORKERS="1")
    plain = _start(home, MODEL_NO_CURVE, tmp / "plain.log", MODECONN_BATCHING="0", MODECONN_WORKERS="1")
    try:
        _wait_all_ready(main, plain)
        yield main, plain
    finally:
        _stop(main)
        _stop(plain)


@pytest.fixture(scope="module")
def server(servers: tuple[Server, Server]) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def plain_server(servers: tuple[Server, Server]) -> Server:
    return servers[1]


# -- offline reference ------------------------------------------------------------------------


def _temperature_scaled(p: np.ndarray, temperature: float) -> np.ndarray:
    """p^(1/T), renormalised: softmax(log p / T) computed another way."""
    powered = p.astype(np.float64) ** (1.0 / temperature)
    return powered / powered.sum(axis=-1, keepdims=True)


class Offline:
    """What the server should answer, from onnxruntime run here and the manifest's temperatures
    (the served probabilities are temperature-scaled unless a request says calibrated: false)."""

    def __init__(self, root: Path) -> None:
        self.artifact = load_artifact(root)
        manifest = json.loads((root / "manifest.json").read_text())
        self.temperature = manifest["ensemble"]["calibration"]["temperature"]
        self.curve_temperatures = manifest["curve"]["calibration"]["temperatures"]
        opts = ["CPUExecutionProvider"]
        self.ensemble = ort.InferenceSession(str(self.artifact.ensemble_file), providers=opts)
        self.curve = ort.InferenceSession(str(self.artifact.curve_file), providers=opts)
        self.members = [
            ort.InferenceSession(str(f), providers=opts) for f in self.artifact.member_files
        ]

    def predict(self, x: np.ndarray, calibrated: bool = True) -> tuple[np.ndarray, np.ndarray]:
        mean, members = self.ensemble.run(None, {"x": x})
        return (_temperature_scaled(mean, self.temperature) if calibrated else mean), members

    def at(self, t: float, x: np.ndarray, calibrated: bool = True) -> np.ndarray:
        probs = self.curve.run(None, {"x": x, "t": np.array([t], np.float32)})[0]
        return _temperature_scaled(probs, self.curve_temperature(t)) if calibrated else probs

    def curve_temperature(self, t: float) -> float:
        """T(t): linear between the grid points i / (n - 1), written out here independently."""
        temps = self.curve_temperatures
        position = t * (len(temps) - 1)
        low = min(int(position), len(temps) - 2)
        return temps[low] + (position - low) * (temps[low + 1] - temps[low])


@pytest.fixture(scope="module")
def offline(artifact_dir: Path) -> Offline:
    return Offline(artifact_dir)


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-4.1, 4.3, size=(n, 40)).astype(np.float32)


def _entropy(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)


def _check_fields(body: dict[str, Any], mean: np.ndarray, per_model: np.ndarray) -> None:
    probs = np.asarray(body["probabilities"])
    np.testing.assert_allclose(probs, mean, atol=ATOL, rtol=0)
    top = mean.argmax(axis=1)
    assert body["predictions"] == top.tolist()
    assert body["labels"] == [MNIST1D_CLASSES[i] for i in top]
    np.testing.assert_allclose(body["entropy"], _entropy(mean), atol=1e-5)
    agreement = (per_model.argmax(axis=2) == top[None]).mean(axis=0)
    np.testing.assert_allclose(body["agreement"], agreement, atol=1e-12)


# -- readiness, health, info -----------------------------------------------------------------


def test_readyz_is_not_200_while_loading(server: Server) -> None:
    history = server.readyz_history
    assert history[-1] == 200
    assert 503 in history[:-1], f"never saw 'not ready' while loading: {history}"
    first_ok = history.index(200)
    assert all(s != 200 for s in history[:first_ok])
    # requests that come too early are refused cleanly, not failed with a 500
    assert server.predict_while_loading and set(server.predict_while_loading) == {503}


def test_bentoml_system_endpoints(server: Server) -> None:
    for path in ("/healthz", "/livez", "/readyz"):
        assert requests.get(server.url + path, timeout=10).status_code == 200, path
    metrics = requests.get(server.url + "/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "bentoml_service_request" in metrics.text


def test_info_get_and_post(server: Server, artifact_dir: Path) -> None:
    got = requests.get(server.url + "/info", timeout=10)
    posted = server.post("/info", {})
    assert got.status_code == posted.status_code == 200
    card = got.json()
    assert {k: v for k, v in card.items() if k != "batching"} == {
        k: v for k, v in posted.json().items() if k != "batching"
    }
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    assert card["name"] == manifest["name"]
    assert card["architecture"] == manifest["architecture"]
    assert card["dataset"]["class_names"] == manifest["dataset"]["class_names"]
    assert card["input"] == manifest["input"]
    assert card["num_members"] == 3
    assert card["member_metrics"] == [m["metrics"] for m in manifest["members"]]
    assert card["ensemble"]["metrics"] == manifest["ensemble"]["metrics"]
    assert card["curve"]["type"] == "bezier" and card["curve"]["num_bends"] == 3
    assert card["curve"]["metrics"] == manifest["curve"]["metrics"]
    assert set(card["execution_providers"]) == {"ensemble", "curve"}
    assert set(card["execution_providers"].values()) <= {
        "CPUExecutionProvider",
        "CUDAExecutionProvider",
    }
    assert card["batching"]["enabled"] is True
    assert card["batching"]["workers"] == 1
    assert card["batching"]["max_wait_ms"] == 0.0  # a lone request runs at once
    assert card["batching"]["onnxruntime"] == {"threads": 0, "spinning": True}
    assert card["limits"]["max_rows_per_request"] == 1024
    assert card["ready"] is True


# -- numbers ---------------------------------------------------------------------------------


def test_predict_matches_offline_ensemble(server: Server, offline: Offline) -> None:
    x = _inputs(7)
    r = server.post("/predict", {"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    mean, members = offline.predict(x)
    _check_fields(r.json(), mean, members)
    # one whole body with its length, not BentoML's chunked stream of a returned model
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert "chunked" not in r.headers.get("transfer-encoding", "")


def test_predict_curve_endpoints_match_offline(server: Server, offline: Offline) -> None:
    x = _inputs(5, seed=1)
    for t in (0.0, 1.0, 0.3):
        r = server.post("/predict_curve", {"inputs": x.tolist(), "t": t})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = offline.at(t, x)
        _check_fields(body, expected, expected[None])
        assert body["agreement"] == [1.0] * len(x)
        assert body["ts"] == [t]


def test_test_artifact_curve_ends_at_its_members(offline: Offline) -> None:
    # Exporter honesty (not a server property): phi(0), phi(1) are the endpoint members.
    x = _inputs(9, seed=2)
    for t, rel in ENDPOINT_MEMBERS.items():
        member = ort.InferenceSession(str(offline.artifact.root / rel))
        np.testing.assert_allclose(offline.at(t, x, calibrated=False), member.run(None, {"x": x})[0], atol=ATOL)


def test_predict_curve_ts_is_mean_of_points(server: Server, offline: Offline) -> None:
    x = _inputs(6, seed=3)
    ts = [0.2, 0.5, 0.8]
    r = server.post("/predict_curve", {"inputs": x.tolist(), "ts": ts})
    assert r.status_code == 200, r.text
    per_t = np.stack([offline.at(t, x) for t in ts])
    _check_fields(r.json(), per_t.mean(axis=0), per_t)
    assert r.json()["ts"] == ts


def test_served_calibrated_probabilities_equal_offline(server: Server, offline: Offline) -> None:
    """The manifest's temperatures applied by the server equal training's calibration of the
    same graphs' outputs (≤ 1e-6); "calibrated": false answers the graphs' raw output."""
    import torch

    from training.ensembles.calibration import calibrate, interpolated_temperature

    def offline_calibrated(raw: np.ndarray, temperature: float) -> np.ndarray:
        return calibrate(torch.from_numpy(raw), temperature).numpy()

    x = _inputs(16, seed=5)
    raw_mean, members = offline.predict(x, calibrated=False)
    assert offline.temperature != pytest.approx(1.0, abs=1e-3)  # else this test shows nothing
    body = server.post("/predict", {"inputs": x.tolist()}).json()
    want = offline_calibrated(raw_mean, offline.temperature)
    np.testing.assert_allclose(body["probabilities"], want, atol=1e-6, rtol=0)
    assert body["predictions"] == raw_mean.argmax(axis=1).tolist()
    raw = server.post("/predict", {"inputs": x.tolist(), "calibrated": False}).json()
    np.testing.assert_allclose(raw["probabilities"], raw_mean, atol=1e-6, rtol=0)

    temps = offline.curve_temperatures
    for ts in ([0.3], [0.0, 0.55, 1.0]):
        per_t = [offline_calibrated(offline.at(t, x, calibrated=False), interpolated_temperature(temps, t)) for t in ts]
        body = server.post("/predict_curve", {"inputs": x.tolist(), "ts": ts}).json()
        np.testing.assert_allclose(body["probabilities"], np.mean(per_t, axis=0), atol=1e-6, rtol=0)
    raw_curve = server.post("/predict_curve", {"inputs": x.tolist(), "t": 0.3, "calibrated": False}).json()
    np.testing.assert_allclose(raw_curve["probabilities"], offline.at(0.3, x, calibrated=False), atol=1e-6, rtol=0)

    card = requests.get(server.url + "/info", timeout=10).json()["calibration"]
    assert card["applied_by_default"] is True
    assert card["ensemble"]["temperature"] == offline.temperature
    assert card["ensemble"]["calibrated_val_nll"] <= card["ensemble"]["val_nll"]
    assert set(card["ensemble"]["calibrated_metrics"]) == {"error", "nll", "ece", "brier"}
    assert card["curve"]["temperatures"] == temps and len(card["members"]) == 3


def _concurrent_batch1(server: Server, offline: Offline, n: int = 64) -> None:
    x = _inputs(n, seed=4)
    mean, members = offline.predict(x)

    start = threading.Barrier(n)  # all requests leave together, not as the pool's threads start

    def one(i: int) -> tuple[int, dict[str, Any]]:
        start.wait(timeout=60)
        r = requests.post(server.url + "/predict", json={"inputs": [x[i].tolist()]}, timeout=60)
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    assert [status for status, _ in results] == [200] * n, results[:3]
    for i, (_, body) in enumerate(results):
        _check_fields(body, mean[i : i + 1], members[:, i : i + 1])


def _ensemble_stats(server: Server) -> dict[str, Any]:
    return requests.get(server.url + "/info", timeout=10).json()["batching"]["stats"]["ensemble"]


def test_64_concurrent_clients_batched(server: Server, offline: Offline) -> None:
    before = _ensemble_stats(server)
    _concurrent_batch1(server, offline)
    after = _ensemble_stats(server)
    assert after["requests"] - before["requests"] == 64
    # coalesced: fewer session calls than requests
    assert after["batches"] - before["batches"] < 64, (before, after)


def test_mixed_t_requests_share_batches_correctly(server: Server, offline: Offline) -> None:
    x = _inputs(24, seed=5)
    ts = [0.0, 0.25, 0.5, 1.0] * 6

    def one(i: int) -> dict[str, Any]:
        r = server.post("/predict_curve", {"inputs": [x[i].tolist()], "t": ts[i]})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(max_workers=24) as pool:
        bodies = list(pool.map(one, range(24)))
    for i, body in enumerate(bodies):
        expected = offline.at(ts[i], x[i : i + 1])
        np.testing.assert_allclose(body["probabilities"], expected, atol=ATOL)


# -- bad input -------------------------------------------------------------------------------

ROW = [0.5] * 40
CURVE = "/predict_curve"


def _raw(text: str) -> bytes:
    return text.encode()


BAD_REQUESTS = [
    # (id, path, body: bytes or JSON-able, content type, status, words the message must hold)
    ("short-row", "/predict", {"inputs": [ROW, ROW, ROW, ROW[:39]]}, None, 400,
     ["inputs[3] has length 39; expected 40"]),
    ("flat-rank", "/predict", {"inputs": ROW}, None, 400, ["inputs[0] is a number", "[N, 40]"]),
    ("deep-rank", "/predict", {"inputs": [[[0.5]] * 40]}, None, 400,
     ["inputs[0][0] is a list", "expected a number"]),
    ("empty-batch", "/predict", {"inputs": []}, None, 400, ["inputs", "at least 1"]),
    ("too-many-rows", "/predict", {"inputs": [ROW] * 1025}, None, 400, ["inputs", "at most 1024"]),
    ("string-value", "/predict", {"inputs": [ROW[:5] + ["x"] + ROW[6:]]}, None, 400,
     ["inputs[0][5] is a string"]),
    ("bool-value", "/predict", {"inputs": [[True] + ROW[1:]]}, None, 400,
     ["inputs[0][0] is a boolean"]),
    ("null-value", "/predict", {"inputs": [[None] + ROW[1:]]}, None, 400, ["inputs[0][0] is null"]),
    ("nan-literal", "/predict", _raw('{"inputs": [[0.5, NaN' + ", 0.5" * 38 + "]]}"), None, 400,
     ["inputs[0][1]", "not finite"]),
    ("infinity-literal", "/predict", _raw('{"inputs": [[-Infinity' + ", 0.5" * 39 + "]]}"), None,
     400, ["inputs[0][0]", "not finite"]),
    ("float32-overflow", "/predict", {"inputs": [[1e39] + ROW[1:]]}, None, 400,
     ["inputs[0][0]", "overflows float32"]),
    ("missing-inputs", "/predict", {}, None, 400, ["inputs", "Field required"]),
    ("unknown-field", "/predict", {"inputs": [ROW], "temperature": 2}, None, 400,
     ["temperature", "Extra inputs are not permitted"]),
    ("malformed-json", "/predict", _raw('{"inputs": [[0.5, 0.5'), None, 400, ["Invalid JSON"]),
    ("not-an-object", "/predict", [ROW], None, 400, ["should be an object"]),
    ("empty-body", "/predict", b"", None, 400, ["inputs", "Field required"]),
    ("multipart", "/predict", b"--x\r\n", "multipart/form-data", 415, ["not accepted"]),
    ("pickle", "/predict", b"\x80\x04", "application/vnd.bentoml+pickle", 415, ["not accepted"]),
    ("t-above-1", CURVE, {"inputs": [ROW], "t": 1.5}, None, 400, ["t", "less than or equal to 1"]),
    ("t-below-0", CURVE, {"inputs": [ROW], "t": -0.1}, None, 400, ["t", "greater than or equal"]),
    ("t-nan", CURVE, _raw('{"inputs": [[' + ", ".join(["0.5"] * 40) + ']], "t": NaN}'), None,
     400, ["t", "finite"]),
    ("t-string", CURVE, {"inputs": [ROW], "t": "0.5"}, None, 400, ["t", "valid number"]),
    ("ts-empty", CURVE, {"inputs": [ROW], "ts": []}, None, 400, ["ts", "at least 1"]),
    ("ts-too-long", CURVE, {"inputs": [ROW], "ts": [0.5] * 17}, None, 400, ["ts", "at most 16"]),
    ("ts-out-of-range", CURVE, {"inputs": [ROW], "ts": [0.5, 2.0]}, None, 400,
     ["ts", "less than or equal to 1"]),
    ("t-and-ts", CURVE, {"inputs": [ROW], "t": 0.5, "ts": [0.5]}, None, 400, ["exactly one"]),
    ("neither-t-nor-ts", CURVE, {"inputs": [ROW]}, None, 400, ["exactly one"]),
    ("curve-bad-row", CURVE, {"inputs": [ROW[:3]], "t": 0.5}, None, 400,
     ["inputs[0] has length 3; expected 40"]),
]  # fmt: skip


def _send(url: str, body: Any, content_type: str | None) -> requests.Response:
    if isinstance(body, bytes):
        headers = {"Content-Type": content_type or "application/json"}
        return requests.post(url, data=body, headers=headers, timeout=60)
    return requests.post(url, json=body, timeout=60)


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_input_is_a_4xx_naming_the_problem(
    server: Server,
    offline: Offline,
    path: str,
    body: Any,
    content_type: str | None,
    status: int,
    words: list[str],
) -> None:
    r = _send(server.url + path, body, content_type)
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.text, r.text
    _still_serves(server, offline)


def _still_serves(server: Server, offline: Offline) -> None:
    x = _inputs(2, seed=11)
    r = server.post("/predict", {"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probabilities"], offline.predict(x)[0], atol=ATOL)


def test_body_above_limit_is_413(server: Server, offline: Offline) -> None:
    big = b'{"inputs": [' + b"[" + b"0.5," * (9 << 18) + b"0.5]]}"  # ~9 MiB
    r = requests.post(
        server.url + "/predict",
        data=big,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413, r.text[:300]
    assert "limit" in r.json()["error"]
    # the same without Content-Length (chunked upload)
    chunks = (big[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20))
    r = requests.post(server.url + "/predict", data=chunks, timeout=60)
    assert r.status_code == 413, r.text[:300]
    _still_serves(server, offline)


def test_bad_requests_do_not_poison_concurrent_good_ones(server: Server, offline: Offline) -> None:
    x = _inputs(32, seed=6)
    mean, _ = offline.predict(x)

    def one(i: int) -> tuple[int, Any]:
        if i % 2:  # every other client sends a broken row
            r = server.post("/predict", {"inputs": [x[i].tolist()[:10]]})
        else:
            r = server.post("/predict", {"inputs": [x[i].tolist()]})
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(one, range(32)))
    for i, (status, body) in enumerate(results):
        if i % 2:
            assert status == 400 and "expected 40" in body["error"]
        else:
            assert status == 200
            np.testing.assert_allclose(body["probabilities"], mean[i : i + 1], atol=ATOL)


# -- batching off, no curve ------------------------------------------------------------------


def test_unbatched_server_without_curve(plain_server: Server, offline: Offline) -> None:
    card = requests.get(plain_server.url + "/info", timeout=10).json()
    assert card["curve"] is None
    assert card["batching"]["enabled"] is False
    assert set(card["execution_providers"]) == {"ensemble"}
    x = _inputs(4, seed=7)
    r = plain_server.post("/predict", {"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    _check_fields(r.json(), *offline.predict(x))
    r = plain_server.post("/predict_curve", {"inputs": x.tolist(), "t": 0.5})
    assert r.status_code == 404
    assert "no curve" in r.json()["error"]
    _concurrent_batch1(plain_server, offline)


# -- artifact loader -------------------------------------------------------------------------


@pytest.fixture
def artifact_copy(artifact_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact_dir, tmp_path / "copy"))


def test_load_artifact_reads_the_manifest(artifact_dir: Path) -> None:
    art = load_artifact(artifact_dir)
    assert art.input_shape == (40,) and art.num_classes == 10 and art.num_members == 3
    assert art.has_curve and art.curve_file == artifact_dir / "curve.onnx"


def test_load_artifact_refuses_a_changed_file(artifact_copy: Path) -> None:
    path = artifact_copy / "members/member-001.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"member-001\.onnx.*sha256"):
        load_artifact(artifact_copy)


def test_load_artifact_refuses_a_truncated_file(artifact_copy: Path) -> None:
    path = artifact_copy / "ensemble.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"ensemble\.onnx.*bytes"):
        load_artifact(artifact_copy)


def test_load_artifact_refuses_a_missing_file(artifact_copy: Path) -> None:
    (artifact_copy / "curve.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"curve\.onnx.*missing"):
        load_artifact(artifact_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version is 99"),
        (lambda m: m["dataset"].update(num_classes=9), "class_names"),
        (lambda m: m["ensemble"].update(num_members=4), "num_members"),
        (lambda m: m.pop("curve"), "curve"),
        (lambda m: m["files"].update({"../evil.onnx": file_record(Path(__file__))}), "relative"),
        (lambda m: m["files"].pop("ensemble.onnx"), "not listed"),
        (lambda m: m["input"].update(dtype="float16"), "float32"),
    ],
)
def test_load_artifact_refuses_a_bad_manifest(artifact_copy: Path, edit: Any, message: str) -> None:
    path = artifact_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact_copy)


# -- bento build -----------------------------------------------------------------------------


def test_bentoml_build_lists_the_model(artifact_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "bentoml"
    tag = _store(artifact_dir, "modeconn-mnist1d", home)  # the name bentofile.yaml names
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", str(REPO)],
        cwd=REPO,
        env=_base_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    bento_dir = next((home / "bentos" / "modeconn").glob("*/bento.yaml")).parent
    bento = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [m["tag"] for m in bento["models"]] == [tag]
    assert bento["service"] == "serving.service:ModeConnService"
    sources = {p.relative_to(bento_dir / "src").as_posix() for p in (bento_dir / "src").rglob("*")}
    assert "serving/service.py" in sources and not any(s.startswith("tests") for s in sources)
    requirements = (bento_dir / "env/python/requirements.txt").read_text()
    assert "onnxruntime-gpu==" in requirements and "torch" not in requirements


# -- micro-batcher (no server) ---------------------------------------------------------------


def test_batcher_groups_by_key_splits_back_and_isolates_failures() -> None:
    calls: list[tuple[str, int]] = []

    def run(key: Any, x: np.ndarray) -> list[np.ndarray]:
        calls.append((key, len(x)))
        if key == "bad":
            raise RuntimeError("boom")
        return [x * 2, np.stack([x, -x])]  # like probabilities [N, C], members [K, N, C]

    keys = ["a", "b", "a", "bad", "b", "a"]
    xs = [np.full((i + 1, 2), i, np.float32) for i in range(len(keys))]

    async def main() -> list[Any]:
        batcher = MicroBatcher(
            run, split_axes=(0, 1), settings=BatchSettings(max_wait_ms=50), name="test"
        )
        try:
            jobs = (batcher.submit(k, x) for k, x in zip(keys, xs, strict=True))
            return await asyncio.gather(*jobs, return_exceptions=True)
        finally:
            batcher.close()

    results = asyncio.run(main())
    for key, x, result in zip(keys, xs, results, strict=True):
        if key == "bad":
            assert isinstance(result, RuntimeError)
        else:
            np.testing.assert_array_equal(result[0], x * 2)
            np.testing.assert_array_equal(result[1], np.stack([x, -x]))
    assert sorted(calls) == [("a", 1 + 3 + 6), ("b", 2 + 5), ("bad", 4)]


def test_batcher_refuses_beyond_its_queue_bound() -> None:
    settings = BatchSettings(max_batch_rows=1, max_queue_rows=2, max_wait_ms=0)

    async def main() -> list[Any]:
        batcher = MicroBatcher(lambda key, x: [x], split_axes=(0,), settings=settings, name="test")
        try:
            x = np.zeros((1, 3), np.float32)
            return await asyncio.gather(
                *(batcher.submit(None, x) for _ in range(3)), return_exceptions=True
            )
        finally:
            batcher.close()

    results = asyncio.run(main())
    assert [type(r).__name__ for r in results] == ["list", "list", "Overloaded"]


def test_batcher_runs_a_lone_request_at_once_and_batches_what_waits_meanwhile() -> None:
    """max_wait_ms = 0 (the default): the first request starts a batch by itself; the
    requests that arrive while it runs form the next batch together."""
    assert BatchSettings().max_wait_ms == 0.0
    release = threading.Event()
    started = threading.Event()
    batches: list[int] = []

    def run(_key: Any, x: np.ndarray) -> list[np.ndarray]:
        batches.append(len(x))
        if len(batches) == 1:
            started.set()
            assert release.wait(timeout=30)  # hold the session busy until the others queue
        return [x + 1]

    async def main() -> list[Any]:
        batcher = MicroBatcher(run, split_axes=(0,), settings=BatchSettings(), name="test")
        try:
            first = asyncio.ensure_future(batcher.submit(None, np.zeros((1, 2), np.float32)))
            while not started.is_set():  # the lone request is running, alone
                await asyncio.sleep(0.001)
            rest = [asyncio.ensure_future(batcher.submit(None, np.full((1, 2), i, np.float32))) for i in range(5)]
            await asyncio.sleep(0.05)
            assert batches == [1]  # nothing else ran while the session was busy
            release.set()
            return await asyncio.gather(first, *rest)
        finally:
            batcher.close()

    results = asyncio.run(main())
    assert batches == [1, 5]
    for i, result in enumerate(results[1:]):
        np.testing.assert_array_equal(result[0], np.full((1, 2), i + 1, np.float32))


def test_session_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.runtime import SessionSettings

    monkeypatch.delenv("MODECONN_ORT_THREADS", raising=False)
    monkeypatch.delenv("MODECONN_ORT_SPINNING", raising=False)
    assert SessionSettings.from_env() == SessionSettings(threads=0, spinning=True)
    monkeypatch.setenv("MODECONN_ORT_THREADS", "1")
    monkeypatch.setenv("MODECONN_ORT_SPINNING", "off")
    assert SessionSettings.from_env() == SessionSettings(threads=1, spinning=False)
    monkeypatch.setenv("MODECONN_ORT_THREADS", "-2")
    with pytest.raises(ValueError, match="MODECONN_ORT_THREADS"):
        SessionSettings.from_env()


def test_env_flags_are_read_one_way_and_refuse_unknown_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from serving.env import env_flag

    monkeypatch.delenv("MODECONN_BATCHING", raising=False)
    assert env_flag("MODECONN_BATCHING", True) is True and env_flag("MODECONN_BATCHING", False) is False
    for value, expected in (("1", True), (" On ", True), ("yes", True), ("0", False), ("OFF", False), ("no", False)):
        monkeypatch.setenv("MODECONN_BATCHING", value)
        assert env_flag("MODECONN_BATCHING", not expected) is expected, value
        assert BatchSettings.from_env().enabled is expected, value
    monkeypatch.setenv("MODECONN_BATCHING", "maybe")
    with pytest.raises(ValueError, match="MODECONN_BATCHING='maybe'"):
        BatchSettings.from_env()

