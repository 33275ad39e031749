"""The serving stage against a real `bentoml serve` subprocess.

One artifact is built (tests/support.py), stored twice in a temporary BentoML store
(as is, and as a copy without a curve and without an SWA network), and served by three servers
started side by side: batching on (the default) with PRELOAD fixed-t curve sessions built
before readiness; batching off (MODECONN_BATCHING=0) on the reduced copy; and one whose worker
is held just before it opens its sessions (modeconn/contract/hooks.py), to be seen loading.
Expected numbers come from onnxruntime run offline on the same graphs.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
import yaml

from modeconn.contract import threads as thread_choice
from modeconn.contract.artifact import ArtifactError, file_record, load_artifact
from modeconn.serving import nchwc
from modeconn.serving.batching import BatchSettings, MicroBatcher
from modeconn.serving.schemas import InputError
from tests.holds import hold
from tests.support import (
    ATOL,
    ENDPOINT_MEMBERS,
    MODEL,
    REPO,
    START_TIMEOUT_S,
    Offline,
    Server,
    base_env,
    conformal_set,
    conformal_u,
    demo_inputs,
    queued,
    start_server,
    stop_server,
    store_artifact,
    wait_all_ready,
)

MNIST1D_CLASSES = [str(i) for i in range(10)]  # the class names the exporter records
MODEL_NO_CURVE = "modeconn-test-nocurve"
PRELOAD = 48  # fixed-t sessions built at start: t = i / 47
CURVE_CACHE = 64
CURVE = "/predict_curve"


# -- fixtures -------------------------------------------------------------------------------


def _without_curve(src: Path, dst: Path) -> Path:
    """A copy without curve.onnx and swa.onnx (an artifact exported without them), and without
    prediction-set thresholds (as exported before them)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["curve"] = None
    del manifest["files"]["curve.onnx"], manifest["swa"], manifest["files"]["swa.onnx"]
    del manifest["ensemble"]["prediction_sets"]
    (dst / "curve.onnx").unlink()
    (dst / "swa.onnx").unlink()
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


@pytest.fixture(scope="module")
def artifact_dir(built_artifact: Path) -> Path:
    return built_artifact


@pytest.fixture(scope="module")
def servers(
    artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server, Server]]:
    tmp = tmp_path_factory.mktemp("serving")
    home = tmp / "bentoml"
    store_artifact(artifact_dir, MODEL, home)
    store_artifact(_without_curve(artifact_dir, tmp / "no-curve"), MODEL_NO_CURVE, home)
    # one worker each: the tests read per-worker state (/info's batching statistics)
    with hold("serve:load") as loading_hold:
        loading = start_server(home, MODEL, tmp / "loading.log", MODECONN_WORKERS="1", **loading_hold.env)
        main = start_server(
            home, MODEL, tmp / "main.log", MODECONN_WORKERS="1",
            MODECONN_CURVE_PRELOAD=str(PRELOAD), MODECONN_CURVE_CACHE=str(CURVE_CACHE),
        )  # fmt: skip
        plain = start_server(home, MODEL_NO_CURVE, tmp / "plain.log", MODECONN_BATCHING="0", MODECONN_WORKERS="1")
        try:
            loading_hold.reached(loading.proc, timeout=START_TIMEOUT_S)
            wait_all_ready(main, plain)
            yield main, plain, loading
        finally:
            for started in (main, plain, loading):
                stop_server(started)


@pytest.fixture(scope="module")
def server(servers: tuple[Server, Server, Server]) -> Server:
    return servers[0]


@pytest.fixture(scope="module")
def plain_server(servers: tuple[Server, Server, Server]) -> Server:
    return servers[1]


@pytest.fixture(scope="module")
def loading_server(servers: tuple[Server, Server, Server]) -> Server:
    """A server whose one worker stays in its load (held there) until the module ends."""
    return servers[2]


@pytest.fixture(scope="module")
def offline(artifact_dir: Path) -> Offline:
    return Offline(artifact_dir)


def _entropy(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)


def _check_fields(body: dict[str, Any], answered: np.ndarray, per_model: np.ndarray) -> None:
    """`answered`: the probabilities expected back (calibrated unless asked otherwise);
    `per_model`: the raw models' [M, N, C], which the uncertainty fields describe."""
    probs = np.asarray(body["probabilities"])
    np.testing.assert_allclose(probs, answered, atol=ATOL, rtol=0)
    top = answered.argmax(axis=1)
    assert body["predictions"] == top.tolist()
    assert body["labels"] == [MNIST1D_CLASSES[i] for i in top]
    mean = per_model.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(body["entropy"], _entropy(mean), atol=1e-5)
    expected = np.mean([_entropy(p) for p in per_model], axis=0)
    np.testing.assert_allclose(body["expected_entropy"], expected, atol=1e-5)
    np.testing.assert_allclose(body["mutual_information"], _entropy(mean) - expected, atol=1e-5)
    agreement = (per_model.argmax(axis=2) == top[None]).mean(axis=0)
    np.testing.assert_allclose(body["agreement"], agreement, atol=1e-12)


# -- readiness, health, info -----------------------------------------------------------------


def test_a_loading_worker_is_alive_not_ready_and_refuses_predictions(loading_server: Server, server: Server) -> None:
    url = loading_server.url
    assert requests.get(url + "/livez", timeout=10).status_code == 200
    assert requests.get(url + "/readyz", timeout=10).status_code == 503
    # requests that come too early are refused cleanly, not failed with a 500
    for r in (requests.post(url + "/predict", json={"inputs": [[0.0] * 40]}, timeout=10),
              requests.post(url + CURVE, json={"inputs": [[0.0] * 40], "t": 0.5}, timeout=10)):
        assert (r.status_code, r.headers.get("retry-after")) == (503, "1"), r.text
        assert r.json() == {"error": "model is still loading; poll /readyz"}, r.text
    assert "ready in " not in loading_server.log_tail(10**6)
    # the same artifact loaded: ready
    assert requests.get(server.url + "/readyz", timeout=10).status_code == 200


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
    assert set(card["execution_providers"]) == {"ensemble", "curve", "swa"}
    assert card["models"] == ["ensemble", "swa"]
    assert card["swa"] == {k: manifest["swa"][k] for k in ("kind", "averaged", "bn_recomputed", "metrics")}
    assert card["calibration"]["swa"] == {**manifest["swa"]["calibration"], "metrics": manifest["swa"]["metrics"]}
    assert set(card["execution_providers"].values()) <= {
        "CPUExecutionProvider",
        "CUDAExecutionProvider",
    }
    assert card["batching"]["enabled"] is True
    assert card["batching"]["workers"] == 1
    assert card["batching"]["max_wait_ms"] == 0.0  # a lone request runs at once
    # one worker: all the usable cores (the server's environment: the test's, less MODECONN_*);
    # spinning only on a quiet machine, which the load at the server's start decided
    server_env = {k: v for k, v in os.environ.items() if not k.startswith("MODECONN_")}
    assert card["batching"]["onnxruntime"]["threads"] == thread_choice.threads_per_process(1, server_env)
    assert card["batching"]["onnxruntime"]["spinning"] in (True, False)
    cache = card["batching"]["curve_cache"]
    assert cache["capacity"] == CURVE_CACHE and PRELOAD <= cache["size"] <= CURVE_CACHE
    # keys are float32 values of t, the t the graphs compute with
    assert {float(np.float32(i / (PRELOAD - 1))) for i in range(PRELOAD)} <= set(cache["ts"])
    blocked = nchwc.block_size() is not None  # the test artifact's cnn1d: every BN folds
    assert cache["new_t_blocked"] is blocked and cache["exact"] is blocked
    assert card["limits"]["max_rows_per_request"] == 1024
    assert card["ready"] is True


# -- numbers ---------------------------------------------------------------------------------


def test_predict_matches_offline_ensemble(server: Server, offline: Offline) -> None:
    x = demo_inputs(7)
    r = server.post("/predict", {"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    mean, members = offline.predict(x)
    _check_fields(r.json(), mean, members)
    assert r.json()["model"] == "ensemble"  # the default
    # one whole body with its length, not BentoML's chunked stream of a returned model
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert "chunked" not in r.headers.get("transfer-encoding", "")


def test_uncertainty_decomposes_as_the_member_graphs_say(server: Server, offline: Offline) -> None:
    """total = H(mean p), expected = mean_m H(p_m), MI = total - expected, computed here in
    numpy from the member graphs run one by one (not from ensemble.onnx)."""
    x = demo_inputs(16, seed=8)
    body = server.post("/predict", {"inputs": x.tolist()}).json()
    members = offline.members_each(x).astype(np.float64)  # [K, N, C]
    total = _entropy(members.mean(axis=0))
    expected = np.mean([_entropy(p) for p in members], axis=0)
    np.testing.assert_allclose(body["entropy"], total, atol=1e-5)
    np.testing.assert_allclose(body["expected_entropy"], expected, atol=1e-5)
    np.testing.assert_allclose(body["mutual_information"], total - expected, atol=1e-5)
    assert min(body["mutual_information"]) >= 0 and max(body["mutual_information"]) > 1e-3
    # over several ts the members are the curve's points; one t has nothing to disagree on
    ts = [0.1, 0.5, 0.9]
    body = server.post("/predict_curve", {"inputs": x.tolist(), "ts": ts}).json()
    points = np.stack([offline.at(t, x, calibrated=False) for t in ts]).astype(np.float64)
    expected = np.mean([_entropy(p) for p in points], axis=0)
    np.testing.assert_allclose(body["expected_entropy"], expected, atol=1e-5)
    np.testing.assert_allclose(body["mutual_information"], _entropy(points.mean(axis=0)) - expected, atol=1e-5)
    body = server.post("/predict_curve", {"inputs": x.tolist(), "t": 0.5}).json()
    assert body["mutual_information"] == [0.0] * len(x)
    assert body["expected_entropy"] == body["entropy"]


def test_predict_curve_endpoints_match_offline(server: Server, offline: Offline) -> None:
    x = demo_inputs(5, seed=1)
    for t in (0.0, 1.0, 0.3):
        r = server.post("/predict_curve", {"inputs": x.tolist(), "t": t})
        assert r.status_code == 200, r.text
        body = r.json()
        _check_fields(body, offline.at(t, x), offline.at(t, x, calibrated=False)[None])
        assert body["agreement"] == [1.0] * len(x)
        assert body["ts"] == [t]


def test_test_artifact_curve_ends_at_its_members(offline: Offline) -> None:
    # Exporter honesty (not a server property): phi(0), phi(1) are the endpoint members.
    x = demo_inputs(9, seed=2)
    for t, rel in ENDPOINT_MEMBERS.items():
        member = ort.InferenceSession(str(offline.artifact.root / rel))
        np.testing.assert_allclose(offline.at(t, x, calibrated=False), member.run(None, {"x": x})[0], atol=ATOL)


def test_predict_curve_ts_is_mean_of_points(server: Server, offline: Offline) -> None:
    x = demo_inputs(6, seed=3)
    ts = [0.2, 0.5, 0.8]
    r = server.post("/predict_curve", {"inputs": x.tolist(), "ts": ts})
    assert r.status_code == 200, r.text
    per_t = np.stack([offline.at(t, x) for t in ts])
    _check_fields(r.json(), per_t.mean(axis=0), np.stack([offline.at(t, x, calibrated=False) for t in ts]))
    assert r.json()["ts"] == ts


def test_served_calibrated_probabilities_equal_offline(server: Server, offline: Offline) -> None:
    """The manifest's temperatures applied by the server equal training's calibration of the
    same graphs' outputs (≤ 1e-6); "calibrated": false answers the graphs' raw output."""
    import torch

    from modeconn.training.ensembles.calibration import calibrate, interpolated_temperature

    def offline_calibrated(raw: np.ndarray, temperature: float) -> np.ndarray:
        return calibrate(torch.from_numpy(raw), temperature).numpy()

    x = demo_inputs(16, seed=5)
    raw_mean, members = offline.predict(x, calibrated=False)
    assert offline.temperature != pytest.approx(1.0, abs=1e-3)  # else this test shows nothing
    body = server.post("/predict", {"inputs": x.tolist()}).json()
    want = offline_calibrated(raw_mean, offline.temperature)
    np.testing.assert_allclose(body["probabilities"], want, atol=1e-6, rtol=0)
    assert body["predictions"] == raw_mean.argmax(axis=1).tolist()
    raw = server.post("/predict", {"inputs": x.tolist(), "calibrated": False}).json()
    np.testing.assert_allclose(raw["probabilities"], raw_mean, atol=1e-6, rtol=0)
    # the uncertainty fields describe the raw members either way
    assert raw["entropy"] == pytest.approx(body["entropy"], abs=1e-9)
    # binary bodies: ?calibrated=false
    binary = _post_bytes(server, "/predict?calibrated=false", x.tobytes(), RAW).json()
    np.testing.assert_allclose(binary["probabilities"], raw_mean, atol=1e-6, rtol=0)
    binary = _post_bytes(server, "/predict_curve?t=0.3&calibrated=true", x.tobytes(), RAW).json()
    # ATOL: t = 0.3 may be served by a fixed-t session, within 1e-5 of curve.onnx (serving/fixed_t.py)
    np.testing.assert_allclose(binary["probabilities"], offline.at(0.3, x), atol=ATOL, rtol=0)
    bad = _post_bytes(server, "/predict?calibrated=maybe", x.tobytes(), RAW)
    assert bad.status_code == 400 and "calibrated" in bad.json()["error"]

    temps = offline.curve_temperatures
    for ts in ([0.3], [0.0, 0.55, 1.0]):
        per_t = [offline_calibrated(offline.at(t, x, calibrated=False), interpolated_temperature(temps, t)) for t in ts]
        body = server.post("/predict_curve", {"inputs": x.tolist(), "ts": ts}).json()
        # ATOL: a t asked for before may be served by a fixed-t session, within 1e-5 of
        # curve.onnx (serving/fixed_t.py); the temperatures themselves are applied exactly
        np.testing.assert_allclose(body["probabilities"], np.mean(per_t, axis=0), atol=ATOL, rtol=0)
    raw_curve = server.post("/predict_curve", {"inputs": x.tolist(), "t": 0.3, "calibrated": False}).json()
    np.testing.assert_allclose(raw_curve["probabilities"], offline.at(0.3, x, calibrated=False), atol=ATOL, rtol=0)

    card = requests.get(server.url + "/info", timeout=10).json()["calibration"]
    assert card["applied_by_default"] is True
    assert card["ensemble"]["temperature"] == offline.temperature
    assert card["ensemble"]["calibrated_val_nll"] <= card["ensemble"]["val_nll"]
    assert set(card["ensemble"]["calibrated_metrics"]) == {"error", "nll", "ece", "brier"}
    assert card["curve"]["temperatures"] == temps and len(card["members"]) == 3


def test_predict_swa_equals_offline_at_its_own_temperature(server: Server, offline: Offline) -> None:
    """"model": "swa" (JSON) and ?model=swa (raw float32) answer swa.onnx run here with the SWA
    network's own T applied (<= 1e-6), raw with calibrated false; one network's uncertainty is
    its entropy (mutual_information 0, agreement 1)."""
    x = demo_inputs(16, seed=11)
    raw = offline.predict_swa(x, calibrated=False)
    calibrated = offline.predict_swa(x)
    assert offline.swa_temperature != pytest.approx(1.0, abs=1e-3)  # else calibrated = raw shows nothing
    r = server.post("/predict", {"inputs": x.tolist(), "model": "swa"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "swa"
    np.testing.assert_allclose(body["probabilities"], calibrated, atol=1e-6, rtol=0)
    _check_fields(body, calibrated, raw[None])
    assert body["mutual_information"] == [0.0] * len(x) and body["agreement"] == [1.0] * len(x)
    assert body["expected_entropy"] == body["entropy"]
    np.testing.assert_allclose(body["entropy"], _entropy(raw), atol=1e-5)  # of the raw network
    # not the ensemble's answer (the test artifact's SWA is a much worse network)
    assert np.abs(np.asarray(body["probabilities"]) - offline.predict(x)[0]).max() > 1e-2
    unscaled = server.post("/predict", {"inputs": x.tolist(), "model": "swa", "calibrated": False}).json()
    np.testing.assert_allclose(unscaled["probabilities"], raw, atol=1e-6, rtol=0)
    assert unscaled["entropy"] == pytest.approx(body["entropy"], abs=1e-9)
    binary = _post_bytes(server, "/predict?model=swa", x.tobytes(), RAW)
    assert binary.status_code == 200, binary.text
    _same_answer(binary.json(), body)
    assert binary.json()["model"] == "swa"
    binary = _post_bytes(server, "/predict?calibrated=false&model=swa", x.tobytes(), RAW).json()
    np.testing.assert_allclose(binary["probabilities"], raw, atol=1e-6, rtol=0)
    batched = requests.get(server.url + "/info", timeout=10).json()["batching"]["stats"]["swa"]
    assert batched["requests"] >= 4  # through the SWA graph's own batcher


def test_unknown_or_absent_model_is_a_4xx_naming_it(server: Server, plain_server: Server) -> None:
    x = demo_inputs(2, seed=12)
    for bad in ("SWA", "member-0", 1, None):
        r = server.post("/predict", {"inputs": x.tolist(), "model": bad})
        assert r.status_code == 400, (bad, r.text)
        (issue,) = r.json()["detail"]  # the 400 for a body that fails the request model
        assert issue["loc"] == ["model"] and issue["msg"] == "Input should be 'ensemble' or 'swa'", r.text
    r = _post_bytes(server, "/predict?model=swa2", x.tobytes(), RAW)
    assert r.status_code == 400 and r.json()["error"] == "model = 'swa2': use ensemble or swa", r.text
    r = server.post(CURVE, {"inputs": x.tolist(), "t": 0.5, "model": "swa"})  # the curve has no models
    assert r.status_code == 400 and "model" in r.text
    r = _post_bytes(server, CURVE + "?t=0.5&model=swa", x.tobytes(), RAW)
    assert r.status_code == 400 and "unknown query parameter 'model'" in r.json()["error"]
    # an artifact exported without --swa
    for r in (plain_server.post("/predict", {"inputs": x.tolist(), "model": "swa"}),
              _post_bytes(plain_server, "/predict?model=swa", x.tobytes(), RAW)):
        assert r.status_code == 404, r.text
        assert r.json()["error"] == ("this artifact has no SWA network (manifest 'swa' is absent); "
                                     "/predict models here: ensemble")
    card = requests.get(plain_server.url + "/info", timeout=10).json()
    assert card["swa"] is None and card["models"] == ["ensemble"] and card["calibration"]["swa"] is None


# -- prediction sets -------------------------------------------------------------------------


def _offline_sets(probs: np.ndarray, x: np.ndarray, sets: dict[str, Any], coverage: float, method: str,
                  t: float | None = None) -> list[list[str]]:
    """Each row's conformal set written out here (tests/support.py conformal_set, with the row's u
    from its own values) at the manifest's threshold (linear in t between the curve's grid points)."""
    column = sets["coverages"].index(coverage)
    table = sets[method]
    if t is None:
        tau = table[column]
    else:
        position = t * (len(table) - 1)
        low = min(int(position), len(table) - 2)
        tau = table[low][column] + (position - low) * (table[low + 1][column] - table[low][column])
    k_reg, penalty = (sets["raps_k_reg"], sets["raps_penalty"]) if method == "raps" else (0, 0.0)
    return [[MNIST1D_CLASSES[c] for c in conformal_set(row, conformal_u(xi), tau, k_reg, penalty)]
            for row, xi in zip(probs.astype(np.float64), x, strict=True)]


def test_prediction_sets_equal_offline(server: Server, offline: Offline, artifact_dir: Path, demo_data: Any) -> None:
    """`coverage` (JSON) and ?coverage= (raw float32) answer the sets computed here from offline
    onnxruntime probabilities at the manifest's temperatures and thresholds: the ensemble, SWA,
    and the curve at a grid t and between grid points; APS and RAPS. Without `coverage` the
    answer has none of the set fields."""
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    x = demo_data.x_test[:48].numpy()
    plain = server.post("/predict", {"inputs": x.tolist()})
    assert not {"prediction_sets", "coverage", "set_method"} & set(plain.json())
    sizes = set()
    for coverage, method in ((0.9, "aps"), (0.8, "raps"), (0.99, "raps"), (0.95, "aps")):
        for model, probs in (("ensemble", offline.predict(x)[0]), ("swa", offline.predict_swa(x))):
            want = _offline_sets(probs, x, manifest[model]["prediction_sets"], coverage, method)
            body = server.post("/predict", {"inputs": x.tolist(), "model": model, "coverage": coverage,
                                            "set_method": method}).json()
            assert body["prediction_sets"] == want, (model, coverage, method)
            assert body["coverage"] == coverage and body["set_method"] == method
            assert {k: v for k, v in body.items() if k not in ("prediction_sets", "coverage", "set_method")} \
                == server.post("/predict", {"inputs": x.tolist(), "model": model}).json()
            binary = _post_bytes(server, f"/predict?model={model}&coverage={coverage}&set_method={method}",
                                 x.tobytes(), RAW).json()
            assert binary["prediction_sets"] == want and binary["set_method"] == method
            sizes.update(len(row) for row in want)
        for t in (0.3, 0.35):  # a grid t (11 points) and one between grid points
            want = _offline_sets(offline.at(t, x), x, manifest["curve"]["prediction_sets"], coverage, method, t)
            body = server.post(CURVE, {"inputs": x.tolist(), "t": t, "coverage": coverage, "set_method": method,
                                       "calibrated": False}).json()  # sets come from calibrated probabilities
            assert body["prediction_sets"] == want, (t, coverage, method)
    assert len(sizes) >= 3 and 0 in sizes  # sets of several sizes, empty ones too: the comparison shows something
    r = server.post("/predict", {"inputs": x[:2].tolist(), "coverage": 0.9})
    assert r.json()["set_method"] == "aps"  # the default
    card = requests.get(server.url + "/info", timeout=10).json()["prediction_sets"]
    assert card["ensemble"]["coverages"] == manifest["ensemble"]["prediction_sets"]["coverages"]
    assert card["swa"]["test_coverage"] == manifest["swa"]["prediction_sets"]["test_coverage"]
    assert set(card) == {"methods", "method", "ensemble", "swa", "curve"}


def test_bad_coverage_is_a_4xx_naming_it(server: Server, plain_server: Server) -> None:
    x = demo_inputs(2, seed=13)
    available = "this artifact has 0.8, 0.85, 0.9, 0.95, 0.99"
    for body, status, text in (
        ({"coverage": 0.7}, 400, f"coverage = 0.7 has no calibrated thresholds; {available}"),
        ({"coverage": 1.0}, 400, "coverage"),
        ({"coverage": "0.9"}, 400, "coverage"),
        ({"coverage": None}, 400, "'coverage' is null"),
        ({"set_method": "raps"}, 400, "'set_method' is given without 'coverage'"),
        ({"coverage": 0.9, "set_method": "lac"}, 400, "set_method"),
    ):
        r = server.post("/predict", {"inputs": x.tolist(), **body})
        assert r.status_code == status and text in r.text, (body, r.text)
    r = server.post(CURVE, {"inputs": x.tolist(), "ts": [0.2, 0.4], "coverage": 0.9})
    assert r.status_code == 400 and "'coverage' needs one 't'" in r.text, r.text
    for query, text in (("coverage=0.7", f"coverage = 0.7 has no calibrated thresholds; {available}"),
                        ("coverage=abc", "coverage = 'abc' is not a number"),
                        ("coverage=1.5", "coverage = '1.5' is not in (0, 1)"),
                        ("set_method=raps", "set_method is given without coverage; give the coverage the sets should have"),
                        ("coverage=0.9&set_method=lac", "set_method = 'lac': use aps or raps")):
        r = _post_bytes(server, f"/predict?{query}", x.tobytes(), RAW)
        assert r.status_code == 400 and r.json()["error"] == text, (query, r.text)
    r = _post_bytes(server, CURVE + "?ts=0.2,0.4&coverage=0.9", x.tobytes(), RAW)
    assert r.status_code == 400 and "'coverage' needs one 't'" in r.json()["error"], r.text
    r = server.post("/predict", {"inputs": x.tolist(), "coverage": 0.7})
    assert r.json()["field"] == "coverage"
    # an artifact exported without thresholds (the reduced copy): 404 naming why
    for r in (plain_server.post("/predict", {"inputs": x.tolist(), "coverage": 0.9}),
              _post_bytes(plain_server, "/predict?coverage=0.9", x.tobytes(), RAW)):
        assert r.status_code == 404 and "no prediction-set thresholds for the ensemble" in r.json()["error"], r.text
    assert requests.get(plain_server.url + "/info", timeout=10).json()["prediction_sets"] is None
    document = requests.get(plain_server.url + "/docs.json", timeout=10).json()["components"]["schemas"]
    assert "coverage" not in document["PredictRequest"]["properties"]
    assert "prediction_sets" not in document["PredictResponse"]["properties"]
    document = requests.get(server.url + "/docs.json", timeout=10).json()["components"]["schemas"]
    assert document["PredictRequest"]["properties"]["coverage"]["enum"] == [0.8, 0.85, 0.9, 0.95, 0.99]
    assert document["PredictRequest"]["dependentRequired"] == {"set_method": ["coverage"]}
    assert document["PredictResponse"]["properties"]["prediction_sets"]["items"]["items"]["enum"] == MNIST1D_CLASSES


def _concurrent_batch1(server: Server, offline: Offline, n: int = 64) -> None:
    x = demo_inputs(n, seed=4)
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
    x = demo_inputs(24, seed=5)
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


# -- binary bodies -----------------------------------------------------------------------------

RAW, NPY = "application/octet-stream", "application/x-npy"


def _npy(array: np.ndarray, **kw: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kw)
    return buffer.getvalue()


def _post_bytes(server: Server, path: str, body: bytes, content_type: str) -> requests.Response:
    return requests.post(server.url + path, data=body, headers={"Content-Type": content_type}, timeout=60)


def _same_answer(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert set(got) == set(want)
    for name in ("probabilities", "entropy", "expected_entropy", "mutual_information", "agreement"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)
    assert got["predictions"] == want["predictions"] and got.get("ts") == want.get("ts")


def test_binary_encodings_answer_as_json_does(server: Server) -> None:
    x = demo_inputs(6, seed=9)
    bodies = {
        "raw float32": (x.tobytes(), RAW),
        "npy float32": (_npy(x), NPY),
        "npy float64": (_npy(x.astype(np.float64)), NPY),
        "npy big-endian": (_npy(x.astype(">f4")), NPY),
        "npy Fortran order": (_npy(np.asfortranarray(x)), NPY),
    }
    # t on the preloaded grid: both requests are answered by the same fixed-t session (a t
    # not cached is answered by the general graph and then by its fixed-t session: ~1e-6 apart)
    t1, t2, t3 = (k / (PRELOAD - 1) for k in (10, 5, 30))
    for path, query, fields in (
        ("/predict", "", {}),
        (CURVE, f"?t={t1!r}", {"t": t1}),
        (CURVE, f"?ts={t2!r},{t3!r}", {"ts": [t2, t3]}),
    ):
        want = server.post(path, {"inputs": x.tolist(), **fields}).json()
        for name, (body, content_type) in bodies.items():
            r = _post_bytes(server, path + query, body, content_type)
            assert r.status_code == 200, (name, path, r.text)
            _same_answer(r.json(), want)
    # one sample of the input shape is a batch of one
    r = _post_bytes(server, "/predict", _npy(x[0]), NPY)
    _same_answer(r.json(), server.post("/predict", {"inputs": x[:1].tolist()}).json())


def test_json_needs_application_json_and_is_refused_in_one_shape(server: Server) -> None:
    """JSON bodies are answered by the middleware (serving/fast_path.py PredictionBodies) with
    the same answer whatever the media type's parameters; another media type (text/plain,
    which BentoML would have parsed as JSON) is a 415 naming application/json; a body the
    request model refuses is a 400 naming the field, with pydantic's report in `detail`."""
    x = demo_inputs(5, seed=11)
    t, t2 = 12 / (PRELOAD - 1), 30 / (PRELOAD - 1)  # on the preloaded grid: one fixed-t session answers both
    for path, body in (("/predict", {"inputs": x.tolist()}),
                       ("/predict", {"inputs": x.tolist(), "model": "swa", "calibrated": False}),
                       (CURVE, {"inputs": x.tolist(), "t": t}),
                       (CURVE, {"inputs": x.tolist(), "ts": [t, t2], "calibrated": False})):
        data = json.dumps(body).encode()
        plain = _post_bytes(server, path, data, "application/json")
        with_charset = _post_bytes(server, path, data, "Application/JSON; charset=utf-8")
        assert plain.status_code == with_charset.status_code == 200, (path, plain.text, with_charset.text)
        assert plain.json() == with_charset.json(), (path, body.keys())
        refused = _post_bytes(server, path, data, "text/plain")
        assert refused.status_code == 415 and "application/json" in refused.json()["error"], refused.text
    for bad, field in (({"inputs": x.tolist(), "t": 0.5}, "t"), ({"inputs": x.tolist(), "calibrated": "no"}, "calibrated"),
                       ({"input": []}, "input")):  # the unknown field is named first, then the missing one
        r = _post_bytes(server, "/predict", json.dumps(bad).encode(), "application/json")
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["field"] == field and field in r.json()["error"], r.text
        assert r.json()["detail"] and "url" not in r.json()["detail"][0], r.text  # field-by-field, no links


def test_numpy_arrays_straight_from_the_bentoml_client(server: Server) -> None:
    import bentoml

    x = demo_inputs(5, seed=10)
    with bentoml.SyncHTTPClient(server.url) as client:
        got = client.predict(inputs=x)
        _same_answer(got, server.post("/predict", {"inputs": x.tolist()}).json())
        ts = [0.0, 1.0]  # preloaded, as above
        got = client.predict_curve(inputs=x, ts=ts)
        _same_answer(got, server.post(CURVE, {"inputs": x.tolist(), "ts": ts}).json())
        got = client.predict(inputs=x, model="swa")
        _same_answer(got, server.post("/predict", {"inputs": x.tolist(), "model": "swa"}).json())
        got = client.predict(inputs=x.tolist())  # lists still work
        _same_answer(got, server.post("/predict", {"inputs": x.tolist()}).json())


_X2 = demo_inputs(2, seed=13)
_NAN = _X2.copy()
_NAN[1, 3] = np.nan
BAD_BINARY = [
    # (id, path + query, body, content type, status, words the message must hold)
    ("raw-partial-row", "/predict", _X2.tobytes()[:-3], RAW, 400, ["317 bytes", "not a multiple", "160 bytes"]),
    ("raw-empty", "/predict", b"", RAW, 400, ["empty"]),
    ("raw-too-many-rows", "/predict", np.zeros((1025, 40), np.float32).tobytes(), RAW, 400,
     ["1025 rows", "maximum per request is 1024"]),
    ("raw-nan", "/predict", _NAN.tobytes(), RAW, 400, ["inputs[1][3] = nan", "not finite"]),
    ("raw-huge", "/predict", np.full((1, 40), 3e38, np.float32).tobytes(), RAW, 400,
     ["inputs[0][0]", "accepted magnitude"]),
    ("raw-over-body-limit", "/predict", b"\0" * (9 << 20), RAW, 413, ["limit"]),
    ("predict-query", "/predict?t=0.5", _X2.tobytes(), RAW, 400, ["unknown query parameter 't'"]),
    ("curve-no-t", CURVE, _X2.tobytes(), RAW, 400, ["exactly one of the query parameters"]),
    ("curve-t-and-ts", CURVE + "?t=0.1&ts=0.2", _X2.tobytes(), RAW, 400, ["exactly one"]),
    ("curve-t-text", CURVE + "?t=abc", _X2.tobytes(), RAW, 400, ["t = 'abc' is not a number"]),
    ("curve-t-nan", CURVE + "?t=nan", _X2.tobytes(), RAW, 400, ["not in [0, 1]"]),
    ("curve-ts-range", CURVE + "?ts=0.5,1.5", _X2.tobytes(), RAW, 400, ["ts[1] = '1.5' is not in [0, 1]"]),
    ("curve-ts-too-many", CURVE + "?ts=" + ",".join(["0.5"] * 17), _X2.tobytes(), RAW, 400, ["17 values", "at most 16"]),
    ("curve-t-twice", CURVE + "?t=0.1&t=0.2", _X2.tobytes(), RAW, 400, ["given 2 times"]),
    ("npy-pickle", "/predict", _npy(np.array([object()] * 40, dtype=object), allow_pickle=True), NPY, 400,
     ["pickle"]),
    ("npy-int", "/predict", _npy(np.zeros((2, 40), np.int64)), NPY, 400, ["dtype int64", "float32"]),
    ("npy-uint8", "/predict", _npy(np.zeros((2, 40), np.uint8)), NPY, 400, ["dtype uint8"]),
    ("npy-shape", "/predict", _npy(np.zeros((3, 39), np.float32)), NPY, 400, ["shape [3, 39]", "[N, 40]"]),
    ("npy-rank", "/predict", _npy(np.zeros((2, 1, 40), np.float32)), NPY, 400, ["shape [2, 1, 40]"]),
    ("npy-no-rows", "/predict", _npy(np.zeros((0, 40), np.float32)), NPY, 400, ["no rows"]),
    ("npy-corrupt", "/predict", b"\x93NUMPY garbage", NPY, 400, ["not a readable .npy"]),
    ("npy-truncated", "/predict", _npy(_X2)[:-7], NPY, 400, [".npy"]),
    ("npy-nan", "/predict", _npy(_NAN), NPY, 400, ["inputs[1][3] = nan"]),
    ("png-to-1d-model", "/predict", b"\x89PNG\r\n\x1a\n", "image/png", 415, ["not an image", "application/x-npy"]),
    ("jpeg-to-1d-model", CURVE + "?t=0.5", b"\xff\xd8\xff", "image/jpeg", 415, ["not an image"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "content_type", "status", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_BINARY],
)
def test_bad_binary_body_is_a_4xx_naming_the_problem(
    server: Server, offline: Offline, path: str, body: bytes, content_type: str, status: int, words: list[str]
) -> None:
    r = _post_bytes(server, path, body, content_type)
    assert r.status_code == status, r.text[:500]
    assert set(r.json()) == {"error"}
    for word in words:
        assert word in r.json()["error"], r.text
    _still_serves(server, offline)


# -- bad input -------------------------------------------------------------------------------

ROW = [0.5] * 40


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
    ("empty-body", "/predict", b"", None, 400, ["the body is empty", "inputs"]),
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
    x = demo_inputs(2, seed=11)
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
    r = requests.post(server.url + "/predict", data=chunks, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.text[:300]
    _still_serves(server, offline)


def test_bad_requests_do_not_poison_concurrent_good_ones(server: Server, offline: Offline) -> None:
    x = demo_inputs(32, seed=6)
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
    x = demo_inputs(4, seed=7)
    r = plain_server.post("/predict", {"inputs": x.tolist()})
    assert r.status_code == 200, r.text
    _check_fields(r.json(), *offline.predict(x))
    r = plain_server.post("/predict_curve", {"inputs": x.tolist(), "t": 0.5})
    assert r.status_code == 404
    assert "no curve" in r.json()["error"]
    r = _post_bytes(plain_server, "/predict_curve?t=0.5", x.tobytes(), RAW)
    assert r.status_code == 404 and "no curve" in r.json()["error"]
    r = _post_bytes(plain_server, "/predict", x.tobytes(), RAW)  # binary without batching
    _check_fields(r.json(), *offline.predict(x))
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
    tag = store_artifact(artifact_dir, "modeconn-mnist1d", home)  # the name bentofile.yaml names
    installed = {(d.metadata["Name"], d.version) for d in importlib.metadata.distributions()}
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag", str(REPO)],
        cwd=REPO,
        env=base_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    # BentoML pip-installs uv into the running environment when it finds none: the project lists it
    assert "uv is not installed" not in out.stdout + out.stderr
    assert {(d.metadata["Name"], d.version) for d in importlib.metadata.distributions()} == installed
    bento_dir = next((home / "bentos" / "modeconn").glob("*/bento.yaml")).parent
    bento = yaml.safe_load((bento_dir / "bento.yaml").read_text())
    assert [m["tag"] for m in bento["models"]] == [tag]
    assert bento["service"] == "serving.service:ModeConnService"
    sources = {p.relative_to(bento_dir / "src").as_posix() for p in (bento_dir / "src").rglob("*")}
    assert "serving/service.py" in sources and not any(s.startswith("tests") for s in sources)
    requirements = (bento_dir / "env/python/requirements.txt").read_text()
    assert "onnxruntime-gpu==" in requirements and "torch" not in requirements


# -- fixed-t curve sessions (no server) ---------------------------------------------------------


def test_fixed_t_sessions_equal_the_curve_graph_and_the_cache_is_bounded(
    artifact_dir: Path, offline: Offline
) -> None:
    from modeconn.serving.fixed_t import CurveSplit
    from modeconn.serving.runtime import Runtime, SessionSettings

    artifact = load_artifact(artifact_dir)
    runtime = Runtime(artifact, ["CPUExecutionProvider"], SessionSettings(0, False), curve_cache=3)
    cache = runtime.curve_cache
    assert cache is not None
    assert runtime.curve_exact is (nchwc.block_size() is not None)  # cnn1d: every BN folds
    split = CurveSplit(artifact.curve_file)  # curve.onnx as exported, cut in two
    t_part = ort.InferenceSession(split.t_part, providers=["CPUExecutionProvider"])
    x = demo_inputs(64, seed=12)
    try:
        ts = [0.0, 0.123, 0.5, 0.77, 1.0]
        for t in ts:
            reference = offline.at(t, x, calibrated=False)  # curve.onnx as exported
            # the general graph answers a t not cached (a miss): on this CPU curve.onnx on
            # NCHWc kernels (serving/nchwc.py, held to a float64 evaluation in the test below)
            miss = runtime.run_curve(t, x)[0]
            np.testing.assert_allclose(miss, reference, atol=ATOL, rtol=0)
            cached = cache.build_now(t).run(None, {"x": x})[0]
            if runtime.curve_exact:  # cut from the same blocked graph, prepacking off: bit for bit
                np.testing.assert_array_equal(cached, miss)
            # else onnxruntime's NCHWc kernels for the constant weights, and BN folded into the
            # convolutions, sum in another order: <= ATOL, the parity gate's tolerance
            np.testing.assert_allclose(cached, reference, atol=ATOL, rtol=0)
            # With NCHWc and BN folding off, a fixed-t session of curve.onnx as exported computes
            # what curve.onnx computes: w(t) as constants and the 2D rewrite change nothing else.
            plain = ort.InferenceSession(
                split.fixed(t_part.run(split.boundary, {"t": np.array([t], np.float32)})),
                providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer", "ConvBNFusion"],
            )  # fmt: skip
            np.testing.assert_allclose(plain.run(None, {"x": x})[0], reference, atol=1e-6, rtol=0)
            np.testing.assert_allclose(runtime.run_curve(t, x)[0], cached, atol=0, rtol=0)  # a hit
            assert len(cache.keys()) <= 3
        key = [float(np.float32(t)) for t in ts]
        assert cache.keys() == key[2:]  # the three most recently used
        assert cache.get(0.5) is not None  # used again: now the most recent
        cache.build_now(0.9)
        assert cache.keys() == [key[4], key[2], float(np.float32(0.9))]  # 0.77 was least recent
        stats = cache.stats.as_dict()
        assert stats["size"] == 3 and stats["capacity"] == 3 and stats["evictions"] == 3
        # a t missed twice is built in the background; the bound still holds once it lands
        assert cache.get(0.31) is None and cache.get(0.32) is None and cache.get(0.31) is None
        cache.close(wait=True)  # the background build has landed
        assert cache.keys()[-1] == float(np.float32(0.31)) and len(cache.keys()) == 3
        assert float(np.float32(0.32)) not in cache.keys()  # asked for once: not built
    finally:
        runtime.close()


def _float64_curve(path: Path) -> Any:
    """curve.onnx evaluated in float64 by onnx's reference evaluator (numpy): the yardstick
    for float32 graphs that sum in different orders."""
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return ReferenceEvaluator(model)


def test_new_t_runs_on_nchwc_convolutions_as_accurately_as_curve_onnx(
    artifact_dir: Path, offline: Offline, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """serving/nchwc.py: on the CPU the general curve session is curve.onnx with every conv on
    onnxruntime's blocked kernels (BN folded in, Relu fused), w(t) still computed per call.
    Its float32 sums run in another order than curve.onnx's, so it is held to a float64
    evaluation of curve.onnx: no further from it than curve.onnx itself, + 2e-6 (about 16 float32
    ulps of a probability near 1: the reordered sums of four convolutions; 1e-6 was exceeded by
    2.0e-6 vs 1.97e-6 for a network trained with other thread settings)."""
    import onnx

    from modeconn.serving.runtime import Runtime, SessionSettings

    block = nchwc.block_size()
    if block is None:
        pytest.skip("onnxruntime has no NCHWc kernels on this CPU: curve.onnx is served as exported")
    artifact = load_artifact(artifact_dir)
    runtime = Runtime(artifact, ["CPUExecutionProvider"], SessionSettings(0, False))
    try:
        assert runtime.curve_blocked
        graph = nchwc.nchwc_graph(artifact.curve_file, block)
        assert graph is not None
        ops = [(n.domain, n.op_type) for n in onnx.load_from_string(graph).graph.node]
        exported = [n.op_type for n in onnx.load(str(artifact.curve_file)).graph.node]
        assert ops.count((nchwc.NCHWC, "Conv")) == exported.count("Conv") == 4
        assert ("", "Conv") not in ops and ("", "BatchNormalization") not in ops
        assert nchwc.every_bn_folded(graph)  # so its fixed-t sessions are cut from it (exact)
        unfolded = nchwc.nchwc_graph(artifact.curve_file, block, fold_bn=False)
        assert unfolded is not None and not nchwc.every_bn_folded(unfolded)
        truth = _float64_curve(artifact.curve_file)
        x = demo_inputs(64, seed=13)
        for t in (0.0, 0.123, 0.5, 0.77, 1.0):
            want = truth.run(None, {"x": x.astype(np.float64), "t": np.array([t], np.float64)})[0]
            as_exported = np.abs(offline.at(t, x, calibrated=False) - want).max()
            got = runtime.run_curve(t, x)[0]  # no fixed-t cache: the general session
            assert np.abs(got - want).max() <= as_exported + 2e-6, (t, np.abs(got - want).max(), as_exported)
    finally:
        runtime.close()
    # a layout onnxruntime does not use (the wrong block size) answers other numbers: the
    # load-time comparison with curve.onnx refuses it, and curve.onnx is served as exported
    monkeypatch.setattr(nchwc, "block_size", lambda: 8 if block == 16 else 16)
    with caplog.at_level("WARNING", logger="bentoml.serve.serving.runtime"):
        fallback = Runtime(artifact, ["CPUExecutionProvider"], SessionSettings(0, False))
    try:
        assert not fallback.curve_blocked
        assert "served as exported" in caplog.text
        np.testing.assert_array_equal(fallback.run_curve(0.3, x)[0], offline.at(0.3, x, calibrated=False))
    finally:
        fallback.close()


# -- image decoding (no server: the test artifact takes 1D signals) ------------------------------


def _image_bytes(pixels: np.ndarray, fmt: str, **kw: Any) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_png_and_jpeg_decode_to_what_training_feeds() -> None:
    """Training feeds uint8 / 255 (training/data.py); the graphs normalise themselves."""
    from modeconn.serving import encodings

    rng = np.random.default_rng(14)
    rgb = rng.integers(0, 256, size=(8, 6, 3), dtype=np.uint8)  # H = 8, W = 6
    want = rgb.transpose(2, 0, 1).astype(np.float32) / 255
    got = encodings.decode(encodings.PNG, _image_bytes(rgb, "PNG"), (3, 8, 6))
    assert got.dtype == np.float32 and got.shape == (1, 3, 8, 6)
    np.testing.assert_array_equal(got[0], want)
    gray = rgb[..., 0]
    got = encodings.decode(encodings.PNG, _image_bytes(gray, "PNG"), (1, 8, 6))
    np.testing.assert_array_equal(got[0, 0], gray.astype(np.float32) / 255)
    smooth = np.repeat(np.linspace(0, 255, 6, dtype=np.uint8)[None, :, None], 8, axis=0).repeat(3, axis=2)
    got = encodings.decode(encodings.JPEG, _image_bytes(smooth, "JPEG", quality=100), (3, 8, 6))
    assert np.abs(got[0] - smooth.transpose(2, 0, 1) / 255).max() <= 3 / 255  # lossy, barely
    assert encodings.image_shape((3, 32, 32), (0.0, 1.0)) == (3, 32, 32)
    assert encodings.image_shape((40,), (0.0, 1.0)) is None
    assert encodings.image_shape((3, 32, 32), (-1.0, 1.0)) is None  # not pixels in [0, 1]
    assert encodings.image_shape((4, 32, 32), (0.0, 1.0)) is None


def test_bad_images_are_refused_naming_the_problem() -> None:
    from modeconn.serving import encodings

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    png = _image_bytes(rgb, "PNG")
    cases = {
        "size": (encodings.PNG, png, (3, 8, 6), "8x8 (width x height); this model takes 6x8"),
        "corrupt": (encodings.PNG, png[:40], (3, 8, 8), "not a readable PNG image"),
        "not-an-image": (encodings.JPEG, b"hello", (3, 8, 8), "not a readable JPEG image"),
        "mislabelled": (encodings.JPEG, png, (3, 8, 8), "a PNG image, but the content type says image/jpeg"),
        "gray-for-rgb": (encodings.PNG, _image_bytes(rgb[..., 0], "PNG"), (3, 8, 8), "mode 'L'"),
        "rgb-for-gray": (encodings.PNG, png, (1, 8, 8), "mode 'RGB'; this model takes 1-channel"),
        "transparent": (encodings.PNG, _image_bytes(rgba, "PNG"), (3, 8, 8), "transparent pixels"),
        "16-bit": (encodings.PNG, _image_bytes(np.zeros((8, 8), np.uint16), "PNG"), (1, 8, 8), "mode 'I;16'"),
    }
    for name, (kind, body, shape, words) in cases.items():
        with pytest.raises(InputError) as caught:
            encodings.decode(kind, body, shape)
        assert words in str(caught.value), (name, str(caught.value))
    opaque = rgba.copy()
    opaque[..., 3] = 255  # RGBA with every pixel opaque is an RGB image
    np.testing.assert_array_equal(encodings.decode(encodings.PNG, _image_bytes(opaque, "PNG"), (3, 8, 8)), 0)


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
            assert await asyncio.to_thread(started.wait, 30)  # the lone request is running, alone
            rest = [asyncio.ensure_future(batcher.submit(None, np.full((1, 2), i, np.float32))) for i in range(5)]
            await queued(batcher, rows=5)
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
    from modeconn.serving.runtime import SessionSettings

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
    from modeconn.serving.env import env_flag

    monkeypatch.delenv("MODECONN_BATCHING", raising=False)
    assert env_flag("MODECONN_BATCHING", True) is True and env_flag("MODECONN_BATCHING", False) is False
    for value, expected in (("1", True), (" On ", True), ("yes", True), ("0", False), ("OFF", False), ("no", False)):
        monkeypatch.setenv("MODECONN_BATCHING", value)
        assert env_flag("MODECONN_BATCHING", not expected) is expected, value
        assert BatchSettings.from_env().enabled is expected, value
    monkeypatch.setenv("MODECONN_BATCHING", "maybe")
    with pytest.raises(ValueError, match="MODECONN_BATCHING='maybe'"):
        BatchSettings.from_env()



def test_service_settings_are_one_object_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from modeconn.serving.settings import ServiceSettings, SettingsError

    for name in list(os.environ):
        if name.startswith("MODECONN_"):
            monkeypatch.delenv(name)
    defaults = ServiceSettings.from_env()
    assert (defaults.model, defaults.workers, defaults.curve_cache, defaults.curve_preload) == (
        "modeconn-mnist1d", 2, 16, 0
    )
    assert defaults.batching == BatchSettings() and defaults.max_body_bytes == 8 << 20
    monkeypatch.setenv("MODECONN_CURVE_CACHE", "4")
    monkeypatch.setenv("MODECONN_CURVE_PRELOAD", "3")
    monkeypatch.setenv("MODECONN_WORKERS", "1")
    settings = ServiceSettings.from_env()
    from modeconn.contract.threads import threads_per_process

    # one worker: the process's share of the usable cores (the same choice as training's)
    assert settings.curve_preload_ts == [0.0, 0.5, 1.0] and settings.onnxruntime.threads == threads_per_process(1)
    for name, value, words in (
        ("MODECONN_CURVE_PRELOAD", "5", "more than the cache keeps (MODECONN_CURVE_CACHE=4)"),
        ("MODECONN_CURVE_PRELOAD", "1", "at least 2 points"),
        ("MODECONN_CURVE_CACHE", "-1", "MODECONN_CURVE_CACHE='-1': must be at least 0"),
        ("MODECONN_PROVIDER", "tpu", "MODECONN_PROVIDER='tpu'"),
        ("MODECONN_MAX_BODY_BYTES", "lots", "MODECONN_MAX_BODY_BYTES='lots': not an integer"),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises((SettingsError, ValueError), match=re.escape(words)):
                ServiceSettings.from_env()


def test_a_batch_summarised_once_answers_each_request_as_summarising_it_alone() -> None:
    """The service summarises a whole batch (RowAnswers) and gives each request its rows: the
    same fields, raw and calibrated, as summarising that request's rows on their own."""
    from modeconn.serving.calibration import scale
    from modeconn.serving.runtime import SPLIT_AXES, RowAnswers, summarize

    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 7, 4)) * 3
    members = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    mean = members.mean(axis=0)
    names = ["a", "b", "c", "d"]
    whole = RowAnswers.of(mean, members, temperature=1.7)
    start = 0
    for rows in (2, 1, 4):  # three requests batched together
        part = RowAnswers(*(np.take(a, range(start, start + rows), axis) for a, axis in zip(whole, SPLIT_AXES, strict=True)))
        m, ms = mean[start:start + rows], members[:, start:start + rows]
        assert part.fields(names, calibrated=True) == summarize(m, ms, names, scale(m, 1.7))
        assert part.fields(names, calibrated=False) == summarize(m, ms, names)
        start += rows
    assert RowAnswers.of(mean, members, None).fields(names, True) == summarize(mean, members, names)
    bad = mean.copy()
    bad[[1, 5], 0] = np.nan
    assert RowAnswers.of(bad, members, 1.7).finite.tolist() == [True, False, True, True, True, False, True]
