"""Faults at serving time: a broken artifact stops `bentoml serve` at once with
one line naming the model and the file; a worker killed with SIGKILL costs only its
in-flight requests while its sibling answers and a replacement starts; a worker whose own
load fails stays up answering 503 with the reason instead of crash-looping; an artifact that
points out of its folder (entries, symbolic links, ONNX external data) is refused at load.

Everything runs against real `bentoml serve` subprocesses (tests/test_service.py's helpers)
or the real loader, on the artifact of tests/support.py; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import requests
from onnx import TensorProto, helper, numpy_helper

from modeconn.contract.artifact import ArtifactError, file_record, load_artifact
from modeconn.serving.env import env_int
from tests.support import (
    ATOL,
    REPO,
    Server,
    base_env,
    free_port,
    start_server,
    stop_server,
    store_artifact,
    wait_ready,
)

MODEL = "modeconn-test"
EXIT_TIMEOUT_S = 90  # a refused start takes a few seconds (imports); this only bounds a hang
MAX_LOG_LINES = 40


@pytest.fixture(scope="module")
def home(built_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BentoML store holding the test artifact; tests that break it break a copy."""
    home = tmp_path_factory.mktemp("faults") / "bentoml"
    store_artifact(built_artifact, MODEL, home)
    return home


def _stored(home: Path) -> Path:
    (folder,) = (home / "models" / MODEL).glob("*/manifest.json")
    return folder.parent


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _replace_file(folder: Path, rel: str, data: bytes) -> None:
    """Swap a file's bytes and record them in the manifest, so only the content is wrong."""
    (folder / rel).write_bytes(data)
    _edit_manifest(folder, lambda m: m["files"].update({rel: file_record(folder / rel)}))


def _flip_byte(folder: Path) -> None:
    path = folder / "members/member-001.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    path = folder / "ensemble.onnx"
    path.write_bytes(path.read_bytes()[:-100])


# (id, how to break the stored copy, words the one error line must hold besides the model)
CORRUPTIONS: list[tuple[str, Callable[[Path], None], list[str]]] = [
    ("flipped-byte", _flip_byte, ["members/member-001.onnx", "sha256"]),
    ("truncated", _truncate, ["ensemble.onnx", "bytes"]),
    ("missing-file", lambda f: (f / "curve.onnx").unlink(), ["curve.onnx", "missing"]),
    ("not-onnx", lambda f: _replace_file(f, "members/member-000.onnx", b"not a graph\n" * 99),
     ["members/member-000.onnx", "not an ONNX model"]),
    # a member graph where the ensemble belongs: ONNX, but without member_probabilities
    ("wrong-graph", lambda f: _replace_file(f, "ensemble.onnx", (f / "members/member-000.onnx").read_bytes()),
     ["ensemble.onnx", "member_probabilities"]),
    ("format-version", lambda f: _edit_manifest(f, lambda m: m.update(format_version=99)),
     ["manifest.json", "format_version is 99"]),
    ("manifest-not-json", lambda f: (f / "manifest.json").write_text('{"format_version": 1,'),
     ["manifest.json", "not valid JSON"]),
]  # fmt: skip


def _serve_until_exit(home: Path, model: str, log: Path) -> tuple[int, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "modeconn.serving.service:ModeConnService"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), "--host", "127.0.0.1"],
            cwd=REPO,
            env={**base_env(home), "MODECONN_MODEL": model, "MODECONN_WORKERS": "2"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            pytest.fail(f"`bentoml serve` still running after {EXIT_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    return code, log.read_text(errors="replace")


@pytest.mark.parametrize(("breakage", "words"), [pytest.param(c[1], c[2], id=c[0]) for c in CORRUPTIONS])
def test_broken_artifact_stops_serve_with_one_error(
    home: Path, tmp_path: Path, breakage: Callable[[Path], None], words: list[str]
) -> None:
    broken = tmp_path / "bentoml"
    shutil.copytree(home, broken)
    folder = _stored(broken)
    breakage(folder)
    code, log = _serve_until_exit(broken, MODEL, tmp_path / "serve.log")
    lines = log.splitlines()
    assert code != 0, log
    assert len(lines) <= MAX_LOG_LINES, log
    errors = [line for line in lines if "Error" in line]
    assert len(errors) == 1, log
    assert f"cannot serve model {MODEL}:{folder.name}" in errors[0], log
    for word in words:
        assert word in errors[0], log
    assert "worker" not in log.lower(), log  # refused before any worker was spawned


def test_missing_model_stops_serve_with_one_error(home: Path, tmp_path: Path) -> None:
    code, log = _serve_until_exit(home, "modeconn-absent", tmp_path / "serve.log")
    assert code != 0
    assert len(log.splitlines()) <= MAX_LOG_LINES, log
    errors = [line for line in log.splitlines() if "Error" in line]
    assert len(errors) == 1 and "modeconn-absent" in errors[0], log


# -- a dead worker ---------------------------------------------------------------------------


def _workers(server: Server) -> set[int]:
    """pids of the arbiter's live worker processes."""
    pids = set()
    for child in psutil.Process(server.proc.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker.service" in child.cmdline():
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def _worker_pid_answering(server: Server) -> int | None:
    """The pid of whichever worker takes a fresh connection, if it has a model card."""
    try:
        r = requests.get(server.url + "/info", timeout=10, headers={"Connection": "close"})
    except requests.RequestException:
        return None
    return r.json()["batching"]["worker_pid"] if r.status_code == 200 else None


def _until(what: str, deadline_s: float, check: Callable[[], Any], server: Server) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.1)
    pytest.fail(f"{what} not within {deadline_s} s:\n{server.log_tail()}")


@pytest.fixture
def two_workers(home: Path, tmp_path: Path) -> Iterator[Server]:
    server = start_server(home, MODEL, tmp_path / "serve.log", MODECONN_WORKERS="2")
    try:
        wait_ready(server)  # both workers logged that they are ready
        assert len(_workers(server)) == 2, server.log_tail()
        yield server
    finally:
        stop_server(server)


class _Outcomes:
    """(send time, "200" | status | exception name) of the clients' requests, and a wait for
    answers that each one wakes (not a poll)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, str]] = []
        self._added = threading.Condition()

    def add(self, sent: float, outcome: str) -> None:
        with self._added:
            self.seen.append((sent, outcome))
            self._added.notify_all()

    def wait_answers(self, what: str, n: int, server: Server, sent_after: float = float("-inf"),
                     timeout_s: float = 30) -> None:
        with self._added:
            if not self._added.wait_for(lambda: sum(t > sent_after and o == "200" for t, o in self.seen) >= n,
                                        timeout_s):
                pytest.fail(f"{what}: fewer than {n} answers within {timeout_s} s:\n{server.log_tail()}")


def test_killed_worker_costs_only_its_requests_and_is_replaced(two_workers: Server, home: Path) -> None:
    server = two_workers
    artifact = load_artifact(_stored(home))
    x = np.random.default_rng(0).uniform(-4, 4, size=(4, 40)).astype(np.float32)
    session = ort.InferenceSession(str(artifact.ensemble_file), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0]
    before = _workers(server)
    victim = min(before)
    killed_at: list[float] = []
    outcomes = _Outcomes()
    wrong: list[Any] = []
    stop = threading.Event()

    def client(i: int) -> None:
        http = requests.Session()
        while not stop.is_set():
            sent = time.monotonic()
            try:
                body = {"inputs": x[i : i + 1].tolist(), "calibrated": False}  # raw: the graph's own output
                r = http.post(server.url + "/predict", json=body, timeout=30)
            except requests.RequestException as exc:
                outcomes.add(sent, type(exc).__name__)
                continue
            if r.status_code == 200 and not np.allclose(r.json()["probabilities"], expected[i : i + 1], atol=ATOL):
                wrong.append(r.json())
            outcomes.add(sent, str(r.status_code))

    clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for c in clients:
        c.start()
    try:
        outcomes.wait_answers("before the kill", 20, server)
        killed_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)
        outcomes.wait_answers("after the kill", 20, server, sent_after=killed_at[0])
        server.wait_for_log("ready in ", 3, timeout=60)  # the two first workers and the replacement
        new = _workers(server) - before
        assert len(new) == 1, (before, new)
        # which worker takes a fresh connection is the kernel's choice: asking again until the
        # replacement answers one is how to see it take traffic
        _until("the replacement answering", 60, lambda: _worker_pid_answering(server) in new, server)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=60)
    after_kill = Counter(o for t, o in outcomes.seen if t >= killed_at[0])
    failed = {o: n for o, n in Counter(o for _, o in outcomes.seen).items() if o != "200"}
    assert not wrong, wrong[:2]
    # at most one request per client was in flight on the victim; no 503s from the replacement
    assert sum(failed.values()) <= len(clients), failed
    assert all(o.endswith("Error") for o in failed), failed
    assert after_kill["200"] >= 20
    assert victim not in _workers(server) and len(_workers(server)) == 2


# -- a worker whose own load fails -----------------------------------------------------------


def test_worker_that_cannot_load_answers_503_with_the_reason(home: Path, tmp_path: Path) -> None:
    """The start-up check passed, then the server's verified copy of the artifact broke (the
    store no longer matters: serving/startup.py) and the lone worker died: its replacement
    refuses the artifact and stays up; every endpoint answers at once."""
    own = tmp_path / "bentoml"
    shutil.copytree(home, own)
    server = start_server(own, MODEL, tmp_path / "serve.log", MODECONN_WORKERS="1")
    try:
        wait_ready(server)
        (first,) = _workers(server)
        private = Path(psutil.Process(first).environ()["MODECONN_ARTIFACT_DIR"])
        (private / "members/member-001.onnx").chmod(0o644)  # the copy is read-only
        _flip_byte(private)
        os.kill(first, signal.SIGKILL)
        server.wait_for_log("cannot serve model", timeout=60)  # the replacement refused the copy
        (second,) = _workers(server)
        assert second != first
        # the listening socket is the arbiter's: this waits in its queue until the replacement's
        # server loop takes it
        livez = requests.get(server.url + "/livez", timeout=30)
        assert livez.status_code == 503, livez.text
        assert "member-001.onnx" in livez.json()["error"] and "sha256" in livez.json()["error"]
        # over a few seconds on purpose: it answers at once each time, same worker (no crash loop)
        for _ in range(20):
            for path in ("/livez", "/readyz"):
                r = requests.get(server.url + path, timeout=5)
                assert r.status_code == 503 and "member-001.onnx" in r.json()["error"], r.text
            r = requests.post(server.url + "/predict", json={"inputs": [[0.5] * 40]}, timeout=5)
            assert r.status_code == 503 and "failed to load" in r.json()["error"], r.text
            assert requests.get(server.url + "/info", timeout=5).status_code == 503
            time.sleep(0.1)
        assert _workers(server) == {second}
        assert server.log_tail(10**6).count("cannot serve model") == 1
    finally:
        stop_server(server)


# -- untrusted artifacts ---------------------------------------------------------------------


@pytest.fixture
def copy(built_artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built_artifact, tmp_path / "artifact"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["files"].update({"/etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "'/etc/passwd' is not a relative"),
        (lambda m: m["members"][0].update(file="../member-000.onnx"), "'../member-000.onnx' is not listed"),
        (lambda m: m["files"].update({"members/../../x.onnx": {"sha256": "0" * 64, "bytes": 1}}), "not a relative path"),
    ],
)  # fmt: skip
def test_manifest_entries_outside_the_folder_are_refused(copy: Path, edit: Any, message: str) -> None:
    _edit_manifest(copy, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(copy)


def test_symlink_out_of_the_folder_is_refused_even_with_the_right_bytes(copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    member = copy / "members/member-000.onnx"
    shutil.copy(member, outside)  # same bytes: the hash would pass
    member.unlink()
    member.symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"'members/member-000\.onnx' leads through a symbolic link.*outside"):
        load_artifact(copy)


def test_symlinked_folder_out_is_refused(copy: Path, tmp_path: Path) -> None:
    shutil.move(copy / "members", tmp_path / "members-elsewhere")
    (copy / "members").symlink_to(tmp_path / "members-elsewhere")
    with pytest.raises(ArtifactError, match=r"'members/member-000\.onnx' leads through a symbolic link"):
        load_artifact(copy)


def test_symlink_inside_the_folder_is_accepted(copy: Path) -> None:
    member = copy / "members/member-002.onnx"
    shutil.copy(member, copy / "members/real-002.onnx")
    member.unlink()
    member.symlink_to("real-002.onnx")
    assert load_artifact(copy).num_members == 3


def test_manifest_symlinked_out_is_refused(copy: Path, tmp_path: Path) -> None:
    shutil.move(copy / "manifest.json", tmp_path / "manifest.json")
    (copy / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ArtifactError, match=r"'manifest\.json' leads through a symbolic link"):
        load_artifact(copy)


def _graph_with_external_weight(location: str) -> bytes:
    """y = x + w, with w (40 floats) stored outside the graph file at `location`."""
    w = numpy_helper.from_array(np.ones(40, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "160")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["probabilities"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 40])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 40])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../outside.bin", r"'\.\./outside\.bin' is outside the artifact folder"),
        ("/tmp/outside.bin", r"'/tmp/outside\.bin' is outside the artifact folder"),
        ("weights.bin", r"'weights\.bin' is not listed under 'files'"),
    ],
)
def test_onnx_external_data_outside_or_unverified_is_refused(
    copy: Path, tmp_path: Path, location: str, message: str
) -> None:
    np.ones(40, np.float32).tofile(tmp_path / "outside.bin")
    np.ones(40, np.float32).tofile(copy / "members/weights.bin")  # present, but not in `files`
    _replace_file(copy, "members/member-000.onnx", _graph_with_external_weight(location))
    with pytest.raises(ArtifactError, match=r"graph 'members/member-000\.onnx', tensor 'w': external data at " + message):
        load_artifact(copy)


def test_onnx_external_data_listed_in_the_manifest_is_accepted(copy: Path) -> None:
    np.full(40, 0.5, np.float32).tofile(copy / "members/weights.bin")
    _edit_manifest(copy, lambda m: m["files"].update({"members/weights.bin": file_record(copy / "members/weights.bin")}))
    _replace_file(copy, "members/member-000.onnx", _graph_with_external_weight("weights.bin"))
    artifact = load_artifact(copy)
    session = ort.InferenceSession(str(artifact.member_files[0]), providers=["CPUExecutionProvider"])
    x = np.zeros((2, 40), np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x + 0.5)  # it really reads the file


def test_workers_variable_is_read_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODECONN_WORKERS", raising=False)
    assert env_int("MODECONN_WORKERS", 2, minimum=1) == 2
    monkeypatch.setenv("MODECONN_WORKERS", " 3 ")
    assert env_int("MODECONN_WORKERS", 2, minimum=1) == 3
    for bad, why in (("0", "must be at least 1"), ("two", "not an integer"), ("1.5", "not an integer")):
        monkeypatch.setenv("MODECONN_WORKERS", bad)
        with pytest.raises(ValueError, match=f"MODECONN_WORKERS='{bad}': {why}"):
            env_int("MODECONN_WORKERS", 2, minimum=1)


# -- a replacement that keeps failing to load stops when it should ---------------------------------

# as in a worker: uvicorn's handler only notes the signal, for an event loop the wait blocks
RETRYING = """
import logging, signal, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
noted = []
signal.signal(signal.SIGTERM, lambda number, frame: noted.append(number))
from modeconn.serving.startup import retry_until
try:
    retry_until(lambda: False, "loading the artifact")
finally:
    print("handler saw", noted, file=sys.stderr, flush=True)
"""
ORPHANING = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stderr=open(sys.argv[2], "w"))
print(child.pid, flush=True)
child.wait()
"""


def _until_retrying(read: Callable[[], str]) -> None:
    deadline = time.monotonic() + 60
    while "retries in" not in read():
        assert time.monotonic() < deadline, read()
        time.sleep(0.05)


def test_a_retrying_worker_stops_when_asked_and_when_its_server_dies(tmp_path: Path) -> None:
    """Between tries the wait blocks the worker's event loop, so uvicorn's SIGTERM handling
    cannot run: without its own check a replacement that cannot load outlived `bentoml serve`
    stopping (or the arbiter killed), retrying forever."""
    log = tmp_path / "asked.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", RETRYING], stderr=err, env=base_env(tmp_path))
    try:
        _until_retrying(log.read_text)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "loading the artifact: this worker stops (asked to)" in log.read_text()
    assert "handler saw [15]" in log.read_text()  # the handler it replaced still heard of it

    log = tmp_path / "orphaned.log"
    parent = subprocess.Popen([sys.executable, "-c", ORPHANING, RETRYING, str(log)], stdout=subprocess.PIPE,
                              text=True, env=base_env(tmp_path))
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        _until_retrying(log.read_text)
        parent.kill()  # the arbiter gone without a word: the worker is now an orphan
        parent.wait(timeout=10)
        child.wait(timeout=10)
    finally:
        if child.is_running():
            child.kill()
    assert "loading the artifact: this worker stops (its server is gone)" in log.read_text()
