"""The service's declared contract (GET /docs.json, serving/openapi.py) against the live
server, and the overload path (503 + Retry-After of a full queue) over HTTP.

Two real `bentoml serve` subprocesses on the shared test artifact: one with the defaults
(schemathesis fuzzes it, through its Python API and its command line), one with a one-row
batching queue (overload).

The schemathesis run, per operation of the document (every one: /predict, /predict_curve,
GET and POST /info, /healthz, /livez, /readyz, /metrics):
- its coverage phase (boundary values and mutations it derives from the schema, including
  unexpected methods and content types), and
- its fuzzing phase, positive (schema-valid) and, for operations with a body, negative
  (schema-invalid) data, hypothesis max_examples=FUZZ_EXAMPLES each, deadline=None.
Checks on every response (CHECKS): not_a_server_error (no 5xx), status_code_conformance
(the status is declared), content_type_conformance, response_schema_conformance (the body
matches the declared schema of that status), positive_data_acceptance (schema-valid
requests answer 2xx, not schemathesis's lenient default that admits 404 and 5xx) and
negative_data_rejection (schema-invalid requests answer 4xx).
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema_rs  # comes with schemathesis
import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from modeconn.contract.artifact import load_artifact
from modeconn.serving.openapi import inputs_schema, openapi_document
from modeconn.serving.schemas import MAX_ABS_INPUT, InputError, parse_inputs
from tests.support import (
    ATOL,
    MODEL,
    Offline,
    Server,
    demo_inputs,
    start_server,
    stop_server,
    store_artifact,
    wait_all_ready,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    positive_data_acceptance,
    negative_data_rejection,
]
FUZZ_EXAMPLES = 150  # x 3 operations with a body x (positive, negative) + the rest > 1000
MIN_CASES = 1000
CLI_EXAMPLES = 300  # per operation and phase: about 1,100 cases over the document's 8 operations
OVERLOAD_CLIENTS = 48


@pytest.fixture(scope="module")
def servers(
    built_artifact: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("contract")
    home = tmp / "bentoml"
    store_artifact(built_artifact, MODEL, home)
    main = start_server(home, MODEL, tmp / "main.log")
    # One row may wait while one batch runs; everything beyond that is refused. One
    # onnxruntime thread makes each batch take long enough for requests to pile up.
    tiny = start_server(
        home,
        MODEL,
        tmp / "tiny.log",
        MODECONN_MAX_BATCH_ROWS="1",
        MODECONN_MAX_QUEUE_ROWS="1",
        MODECONN_ORT_THREADS="1",
    )
    try:
        wait_all_ready(main, tiny)
        yield main, tiny
    finally:
        stop_server(main)
        stop_server(tiny)


@pytest.fixture(scope="module")
def offline(built_artifact: Path) -> Offline:
    return Offline(built_artifact)


def _schema(server: Server) -> Any:
    config = schemathesis.Config.from_dict(
        {"checks": {"positive_data_acceptance": {"expected-statuses": ["2xx"]}}}
    )
    return schemathesis.openapi.from_url(server.url + "/docs.json", config=config)


# -- the document ------------------------------------------------------------------------------


def test_docs_json_states_the_artifacts_contract(servers: tuple[Server, Server], built_artifact: Path) -> None:
    doc = requests.get(servers[0].url + "/docs.json", timeout=30).json()
    artifact = load_artifact(built_artifact)
    assert doc == openapi_document(
        artifact, max_body_bytes=8 << 20, version=f"{artifact.name} {artifact.manifest['created_at']}"
    )
    schemas = doc["components"]["schemas"]
    rows = schemas["PredictRequest"]["properties"]["inputs"]
    assert (rows["minItems"], rows["maxItems"]) == (1, 1024)
    assert (rows["items"]["minItems"], rows["items"]["maxItems"]) == (40, 40)  # manifest shape
    assert rows["items"]["items"] == {"type": "number", "minimum": -MAX_ABS_INPUT, "maximum": MAX_ABS_INPUT}
    model = schemas["PredictRequest"]["properties"]["model"]
    assert (model["enum"], model["default"]) == (["ensemble", "swa"], "ensemble")  # the artifact has swa.onnx
    assert schemas["PredictResponse"]["properties"]["model"]["enum"] == ["ensemble", "swa"]
    assert "model" not in schemas["CurvePredictRequest"]["properties"]
    curve = schemas["CurvePredictRequest"]
    assert curve["oneOf"] == [{"title": "one t", "required": ["t"]}, {"title": "several ts", "required": ["ts"]}]
    assert curve["properties"]["ts"]["maxItems"] == 16
    assert set(doc["paths"]["/info"]) == {"get", "post"}
    for path, code in (("/predict", "413"), ("/predict", "415"), ("/predict_curve", "404"), ("/predict", "404"),
                       ("/predict", "503")):
        ref = doc["paths"][path]["post"]["responses"][code]["content"]["application/json"]["schema"]
        assert ref == {"$ref": "#/components/schemas/ErrorResponse"}
    probabilities = schemas["PredictResponse"]["properties"]["probabilities"]["items"]
    assert probabilities["minItems"] == probabilities["maxItems"] == 10


def test_declared_inputs_schema_and_the_validator_agree() -> None:
    """For a 2-d input shape (as CIFAR's 3-d): what the schema admits, parse_inputs accepts."""
    shape = (3, 4)
    validator = jsonschema_rs.Draft202012Validator({"type": "object", "properties": {"inputs": inputs_schema(shape, 8)}})
    row = np.arange(12, dtype=np.float32).reshape(3, 4).tolist()
    cases = {
        "ok": [row, row],
        "ints": [[[1, 2, 3, 4]] * 3],
        "short-inner": [[[1.0, 2.0, 3.0]] * 3],
        "short-outer": [[[1.0] * 4] * 2],
        "flat": [[1.0] * 12],
        "bool": [[[True, 0.5, 0.5, 0.5]] + [[0.5] * 4] * 2],
        "string": [[["1", 0.5, 0.5, 0.5]] + [[0.5] * 4] * 2],
        "too-big": [[[MAX_ABS_INPUT * 10, 0.5, 0.5, 0.5]] + [[0.5] * 4] * 2],
        "int-beyond-int64": [[[10**20, 0.5, 0.5, 0.5]] + [[0.5] * 4] * 2],  # numpy: object array
        "edge": [[[-MAX_ABS_INPUT, MAX_ABS_INPUT, 0, 1]] * 3],
        "too-many-rows": [row] * 9,
        "empty": [],
    }
    verdicts = {}
    for name, inputs in cases.items():
        declared = validator.is_valid({"inputs": inputs})
        try:
            parse_inputs(inputs, shape, max_rows=8)
            accepted = True
        except InputError:
            accepted = False
        verdicts[name] = (declared, accepted)
    assert verdicts == {
        name: (name in ("ok", "ints", "edge"),) * 2 for name in cases
    }, verdicts


# -- schemathesis against the live server ------------------------------------------------------


def test_schemathesis_finds_the_contract_true(servers: tuple[Server, Server]) -> None:
    server = servers[0]
    schema = _schema(server)
    session = requests.Session()
    cases: collections.Counter[tuple[str, str, str]] = collections.Counter()
    skipped: collections.Counter[str] = collections.Counter()
    failures: list[str] = []

    def check(case: Any, phase: str) -> None:
        if case.media_type not in (None, "application/json"):
            # The document declares JSON bodies only (binary ones are under x-binary-bodies:
            # JSON Schema cannot say which bytes are valid); tests/test_service.py checks every
            # binary encoding and its refusals. Counted, and asserted to be none, below.
            skipped[case.media_type] += 1
            return
        response = case.call(base_url=server.url, session=session, timeout=60)
        cases[(phase, case.operation.label, case.meta.generation.mode.value)] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except FailureGroup as exc:  # keep going, report them all
            failures.append(f"{case.operation.label} ({phase}): {exc}"[:3000])

    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert labels == {
        "POST /predict", "POST /predict_curve", "GET /info", "POST /info",
        "GET /healthz", "GET /livez", "GET /readyz", "GET /metrics",
    }  # fmt: skip
    for op in operations:
        generation = schema.config.generation_for(operation=op, phase="coverage")
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
        for case in schema.iter_coverage_cases(op, generation_modes=modes, generation_config=generation):
            check(case, "coverage")
        # Operations without a body have nothing to make invalid (hypothesis: unsatisfiable).
        json_only = {"media_type": "application/json"} if op.method.upper() == "POST" else {}
        for mode in modes if op.method.upper() == "POST" else modes[:1]:

            @hypothesis.settings(
                max_examples=FUZZ_EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(case=op.as_strategy(generation_mode=mode, **json_only))
            def fuzz(case: Any) -> None:
                check(case, "fuzzing")

            fuzz()

    total = sum(cases.values())
    by_operation = collections.Counter()
    for (_, label, mode), n in cases.items():
        by_operation[(label, mode)] += n
    print(f"\nschemathesis: {total} cases, {len(failures)} failures; {dict(sorted(by_operation.items()))}; "
          f"binary bodies skipped: {dict(skipped)}")
    assert not failures, "\n\n".join(failures[:5])
    assert not skipped, skipped
    assert total >= MIN_CASES, cases
    for op in ("POST /predict", "POST /predict_curve", "POST /info"):
        assert by_operation[(op, "positive")] >= 50 and by_operation[(op, "negative")] >= 50, by_operation


def test_schemathesis_cli_with_every_check_finds_nothing(servers: tuple[Server, Server], tmp_path: Path) -> None:
    """`schemathesis run --checks all` as an operator would run it: every phase it runs by
    default, every check (Allow headers on OPTIONS, unsupported methods, missing headers,
    response headers... beyond CHECKS above), at least MIN_CASES cases, no failure."""
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", servers[0].url + "/docs.json", "--checks", "all",
           "--max-examples", str(CLI_EXAMPLES), "--workers", "2", "--continue-on-failure", "--seed", "1",
           "--no-color",
           # the service's own bound (serving/service.py TRAFFIC_TIMEOUT_S, 60 s), not the CLI's
           # default 10 s: a 4-row request queued behind the other worker's 1024-row x 16-t curve
           # requests took 14 s with the rest of the suite on the 2 cores (2026-12-07)
           "--max-response-time", "60"]
    # run from a scratch folder: the CLI writes its crash cache (.schemathesis/) where it runs
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    report = out.stdout + out.stderr
    print(report[-1500:])
    generated = re.search(r"(\d+) generated", report)
    assert out.returncode == 0 and "No issues found" in report, report[-6000:]
    assert generated is not None and int(generated.group(1)) >= MIN_CASES, report[-2000:]


def test_the_checks_can_fail(servers: tuple[Server, Server]) -> None:
    """A negative control: the same checks flag an answer the document does not declare."""
    server = servers[0]
    schema = _schema(server)
    case = schema["/info"]["GET"].Case()
    wrong = requests.get(server.url + "/no-such-route", timeout=10)  # 404, text/plain
    with pytest.raises(FailureGroup, match="Undocumented status code"):
        case.validate_response(wrong, checks=CHECKS)


# -- overload ----------------------------------------------------------------------------------


def test_full_queue_answers_503_with_retry_after_and_the_rest_correctly(
    servers: tuple[Server, Server], offline: Offline
) -> None:
    tiny = servers[1]
    x = demo_inputs(OVERLOAD_CLIENTS, seed=21)
    mean, _ = offline.predict(x)
    barrier = threading.Barrier(OVERLOAD_CLIENTS)

    def one(i: int) -> tuple[int, dict[str, Any], str | None]:
        with requests.Session() as s:
            s.get(tiny.url + "/readyz", timeout=30)  # connect first: all then post together
            barrier.wait(timeout=60)
            answers = []
            for _ in range(4):
                r = s.post(tiny.url + "/predict", json={"inputs": [x[i].tolist()]}, timeout=60)
                answers.append((r.status_code, r.json(), r.headers.get("retry-after")))
            return answers

    with ThreadPoolExecutor(max_workers=OVERLOAD_CLIENTS) as pool:
        results = list(pool.map(one, range(OVERLOAD_CLIENTS)))
    statuses = collections.Counter(status for answers in results for status, _, _ in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0 and statuses[200] > 0, statuses
    for i, answers in enumerate(results):
        for status, body, retry_after in answers:
            if status == 503:
                assert retry_after == "1", body
                assert set(body) == {"error"} and "queue bound is 1" in body["error"], body
            else:
                np.testing.assert_allclose(body["probabilities"], mean[i : i + 1], atol=ATOL, rtol=0)
    print(f"\noverload: {dict(statuses)} from {OVERLOAD_CLIENTS} clients x 4 requests")
    # and it still answers, correctly, once the burst is over
    r = tiny.post("/predict", {"inputs": x[:1].tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["probabilities"], mean[:1], atol=ATOL, rtol=0)
    assert requests.get(tiny.url + "/readyz", timeout=10).status_code == 200
