"""The served contract: the start-up check holds every graph to the manifest (input shape,
class count, class names) and stops `bentoml serve` naming the graph and both values;
manifests too large or too deep are refused in one line; a running server serves what it
verified at start whatever happens to the store, replacement workers included; and modeconn's
own Prometheus metrics on /metrics count the traffic sent.

Real `bentoml serve` subprocesses on the artifact of tests/support.py; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import psutil
import pytest
import requests
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from modeconn.contract.artifact import MAX_MANIFEST_BYTES, ArtifactError, load_artifact
from modeconn.contract.onnx_refs import CLASS_NAMES_KEY
from modeconn.serving.contract_check import check_contract
from tests.support import (
    ATOL,
    Server,
    demo_inputs,
    start_server,
    stop_server,
    store_artifact,
    wait_ready,
)
from tests.test_serving_faults import (
    _edit_manifest,
    _replace_file,
    _serve_until_exit,
    _stored,
    _until,
    _worker_pid_answering,
    _workers,
)

MODEL = "modeconn-test"
DEADLINE_S = 90


@pytest.fixture(scope="module")
def home(built_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("contract") / "bentoml"
    store_artifact(built_artifact, MODEL, home)
    return home


@pytest.fixture
def copy(built_artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built_artifact, tmp_path / "artifact"))


def _softmax_graph(features: int, classes: int) -> bytes:
    """x [N, features] -> probabilities [N, classes]: a member's contract with other sizes."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(features, classes)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probabilities"])],
        "other-shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


# -- the start-up check, offline -------------------------------------------------------------------


def test_exported_graphs_carry_the_class_names_and_pass(built_artifact: Path) -> None:
    artifact = load_artifact(built_artifact)
    for path in [*artifact.member_files, artifact.ensemble_file, artifact.swa_file, artifact.curve_file]:
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        assert json.loads(props[CLASS_NAMES_KEY]) == list(artifact.class_names), path
    check_contract(artifact)


def test_more_classes_in_the_manifest_than_the_graphs_answer(copy: Path) -> None:
    names = [f"class {i}" for i in range(12)]
    _edit_manifest(copy, lambda m: m["dataset"].update(num_classes=12, class_names=names))
    with pytest.raises(ArtifactError, match=r"graph 'members/member-000\.onnx'.*(10 classes|class names).*12"):
        check_contract(load_artifact(copy))


def test_graph_class_names_other_than_the_manifests(copy: Path) -> None:
    path = copy / "ensemble.onnx"
    model = onnx.load(str(path))
    helper.set_model_props(model, {CLASS_NAMES_KEY: json.dumps([f"digit {i}" for i in range(10)])})
    _replace_file(copy, "ensemble.onnx", model.SerializeToString())
    with pytest.raises(ArtifactError, match=r"graph 'ensemble\.onnx': class names \['digit 0'.*the manifest's"):
        check_contract(load_artifact(copy))


def test_manifest_input_shape_other_than_the_graphs(copy: Path) -> None:
    _edit_manifest(copy, lambda m: m["input"].update(shape=[41]))
    with pytest.raises(ArtifactError, match=r"'members/member-000\.onnx': input 'x' has shape \[N, 40\]; .*\[41\]"):
        check_contract(load_artifact(copy))


def test_manifest_over_the_size_bound_is_refused_in_one_line(copy: Path) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["architecture"]["kwargs"]["padding"] = "x" * (50 << 20)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=rf"manifest\.json: \d+ bytes; a manifest has at most {MAX_MANIFEST_BYTES}"):
        load_artifact(copy)


@pytest.mark.parametrize("depth", [100_000, 900])
def test_deeply_nested_manifest_is_refused_in_one_line(copy: Path, depth: int) -> None:
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["architecture"]["kwargs"]["deep"] = "DEEP"
    nested = "[" * depth + "]" * depth  # 100,000: past the JSON decoder's recursion limit; 900: within it
    (copy / "manifest.json").write_text(json.dumps(manifest).replace('"DEEP"', nested))
    with pytest.raises(ArtifactError, match=r"manifest\.json: nested .*deep") as caught:
        load_artifact(copy)
    assert "\n" not in str(caught.value)


# -- the start-up check stops `bentoml serve` ------------------------------------------------------


def _one_error(home: Path, tmp_path: Path, breakage: Callable[[Path], None]) -> str:
    broken = tmp_path / "bentoml"
    shutil.copytree(home, broken)
    breakage(_stored(broken))
    code, log = _serve_until_exit(broken, MODEL, tmp_path / "serve.log")
    errors = [line for line in log.splitlines() if "Error" in line]
    assert code != 0, log
    assert len(errors) == 1 and f"cannot serve model {MODEL}:" in errors[0], log
    assert "worker" not in log.lower() and "Traceback" not in log, log  # stopped before any worker
    return errors[0]


def test_twelve_class_graph_under_a_ten_class_manifest_stops_serve(home: Path, tmp_path: Path) -> None:
    line = _one_error(home, tmp_path, lambda f: _replace_file(f, "swa.onnx", _softmax_graph(40, 12)))
    assert "graph 'swa.onnx': output 'probabilities' has 12 classes" in line, line
    assert "dataset.class_names has 10" in line, line


def test_graph_input_of_41_under_a_manifest_of_40_stops_serve(home: Path, tmp_path: Path) -> None:
    line = _one_error(home, tmp_path, lambda f: _replace_file(f, "members/member-001.onnx", _softmax_graph(41, 10)))
    assert "graph 'members/member-001.onnx': input 'x' has shape [N, 41]" in line, line
    assert "the manifest's input.shape is [40]" in line, line


# -- a running server and its store ----------------------------------------------------------------


def _status(server: Server, method: str, path: str, **kw: Any) -> int | None:
    try:
        return requests.request(method, server.url + path, timeout=10, headers={"Connection": "close"}, **kw).status_code
    except requests.RequestException:
        return None


@pytest.fixture
def two_workers(home: Path, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    own = tmp_path / "bentoml"
    shutil.copytree(home, own)
    server = start_server(own, MODEL, tmp_path / "serve.log", MODECONN_WORKERS="2")
    try:
        wait_ready(server)  # both workers logged that they are ready
        assert len(_workers(server)) == 2, server.log_tail()
        yield server, own
    finally:
        stop_server(server)


def _private_copy(server: Server) -> Path:
    (pid, *_) = _workers(server)
    return Path(psutil.Process(pid).environ()["MODECONN_ARTIFACT_DIR"])


def _answers(server: Server, x: np.ndarray) -> dict[str, Any]:
    bodies = {"ensemble": ("/predict", {"inputs": x.tolist()}), "swa": ("/predict", {"inputs": x.tolist(), "model": "swa"}),
              "curve": ("/predict_curve", {"inputs": x.tolist(), "ts": [0.25, 0.7]})}
    out = {}
    for name, (path, body) in bodies.items():
        r = requests.post(server.url + path, json=body, timeout=30, headers={"Connection": "close"})
        assert r.status_code == 200, (name, r.text)
        out[name] = r.json()
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k]["labels"] == b[k]["labels"] and np.allclose(a[k]["probabilities"], b[k]["probabilities"], atol=ATOL)
               for k in a)


def test_store_changed_under_a_running_server_then_a_worker_killed(two_workers: tuple[Server, Path]) -> None:
    server, home = two_workers
    x = demo_inputs(3, seed=5)
    before = _answers(server, x)
    private = _private_copy(server)
    assert private.is_dir() and (private / "ensemble.onnx").stat().st_mode & 0o222 == 0  # read-only
    store = _stored(home)  # the store changes: graphs deleted, replaced and rewritten
    (store / "ensemble.onnx").unlink()
    _replace_file(store, "swa.onnx", _softmax_graph(40, 10))
    (store / "curve.onnx").write_bytes(b"not a graph")
    victims = _workers(server)
    os.kill(min(victims), signal.SIGKILL)
    server.wait_for_log("ready in ", 3, timeout=DEADLINE_S)  # the replacement loaded its private copy
    new = _workers(server) - victims
    assert len(new) == 1, (victims, new)
    # which worker takes a fresh connection is the kernel's choice: probing until the
    # replacement answers is how to see it serve, and the probe must say 200 throughout
    readyz: list[int | None] = []
    _until("the replacement answering", DEADLINE_S, lambda: readyz.append(_status(server, "GET", "/readyz")) or
           _worker_pid_answering(server) in new, server)
    assert set(readyz) == {200}, readyz  # the probe never flapped meanwhile
    for _ in range(12):  # fresh connections land on either worker
        assert _same(_answers(server, x), before)
    run_dir = private.parent
    stop_server(server)
    assert not run_dir.exists()  # the private copy goes with the server


def test_replacement_that_cannot_load_takes_no_traffic(two_workers: tuple[Server, Path]) -> None:
    server, _ = two_workers
    private = _private_copy(server)
    member = private / "members/member-001.onnx"
    member.chmod(0o644)  # the copy is read-only: only a deliberate change can break it
    data = bytearray(member.read_bytes())
    data[len(data) // 2] ^= 1
    member.write_bytes(bytes(data))
    victims = _workers(server)
    os.kill(min(victims), signal.SIGKILL)
    server.wait_for_log("takes no connections and retries", timeout=DEADLINE_S)  # the replacement's refusal
    assert len(_workers(server) - victims) == 1
    for _ in range(30):  # the sibling answers everything meanwhile
        assert _status(server, "GET", "/readyz") == 200
        assert _status(server, "POST", "/predict", json={"inputs": [[0.5] * 40]}) == 200
    assert "member-001.onnx" in server.log_tail(10**6)


# -- metrics ---------------------------------------------------------------------------------------


def _scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and labels.items() <= dict(lab).items())


def test_metrics_count_the_traffic_sent(two_workers: tuple[Server, Path]) -> None:
    server, _ = two_workers
    x = demo_inputs(3, seed=1)
    http = requests.Session()
    before = _scrape(server)  # the fixture's own probes (a prediction while loading) came first

    for _ in range(20):
        assert http.post(server.url + "/predict", json={"inputs": x.tolist()}, timeout=30).status_code == 200
    for _ in range(6):
        assert http.post(server.url + "/predict_curve", json={"inputs": x[:2].tolist(), "t": 0.3}, timeout=30).ok
    for _ in range(5):
        assert http.post(server.url + "/predict", json={"inputs": [[0.0] * 39]}, timeout=30).status_code == 400
    info = requests.get(server.url + "/info", timeout=10).json()["batching"]
    assert info["worker_index"] in (1, 2) and info["worker_pid"] in _workers(server)
    m = _scrape(server)

    def sent(name: str, **labels: str) -> float:
        return _total(m, name, **labels) - _total(before, name, **labels)

    assert sent("modeconn_request_seconds_count", endpoint="/predict", status="200") == 20
    assert sent("modeconn_request_seconds_count", endpoint="/predict_curve", status="200") == 6
    assert sent("modeconn_refusals_total", endpoint="/predict", status="400", reason="bad_request") == 5
    # every row sent went through one session call; batches are at most one per request
    assert sent("modeconn_session_rows_sum", graph="ensemble") == 20 * 3
    assert 1 <= sent("modeconn_session_rows_count", graph="ensemble") <= 20
    assert sent("modeconn_session_seconds_count", graph="ensemble") == sent(
        "modeconn_session_rows_count", graph="ensemble")
    assert sent("modeconn_session_rows_sum", graph="curve") == 6 * 2
    curve_calls = sent("modeconn_session_rows_count", graph="curve")
    hits, misses = (sent("modeconn_curve_cache_events_total", event=e) for e in ("hit", "miss"))
    assert hits + misses == curve_calls and misses >= 1
    assert _total(m, "modeconn_queue_rows", graph="ensemble") == 0  # nothing waits once all answered
    tags = {dict(lab)["tag"] for (n, lab), v in m.items() if n == "modeconn_artifact_info" and v == 1}
    workers = {dict(lab)["worker"] for (n, lab), v in m.items() if n == "modeconn_artifact_info"}
    assert len(tags) == 1 and next(iter(tags)).startswith(f"{MODEL}:") and workers == {"1", "2"}
