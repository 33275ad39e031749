"""The service under hostile traffic and a changing store: each attack against a real
`bentoml serve` on loopback, bounded in time and count, with a verdict per attack.

Attacks (one row each):
- idle-sockets: N connections opened and left silent for --hold seconds; a probe client
  meanwhile. Held: every probe answered, and the server closed >= 90 % of them by the end.
- half-headers: N connections that send half a request head and stall. Same verdict.
- slow-uploads: N uploads announcing an 8 MiB body, trickling 1 KiB a second. Held: every
  probe answered, and worker RSS after is within 20 % of before.
- large-json: C concurrent JSON bodies just under the body limit (1,024 valid rows padded
  with whitespace), R rounds. Held: every answer 200 or 503 with Retry-After, RSS after
  within 20 % of before.
- mismatched-manifest: a 12-class swa.onnx under the 10-class manifest, and a member with
  input 41 under a manifest of 40. Held: `bentoml serve` exits non-zero with one error line
  naming the graph, before it answers anything.
- heavy-curve: 2 clients x 1,024 rows x 16 ts for --seconds, after one client alone for
  half as long. Held: each client >= 30 % of the solo rate, every failure a 503 with Retry-After.
- store-tamper-kill: on its own 2-worker server, the store's graphs deleted or rewritten, a
  worker SIGKILLed; /readyz polled until the replacement answers /info. Held: no /readyz
  other than 200 meanwhile, every later answer equal to the one before.
- bad-requests: 11 malformed requests. Held: no traceback and at most one log line each.

RSS: the workers' resident memory summed (psutil, else /proc), before the attack, its peak
(sampled every 0.2 s) and after the attack's connections are closed (after --settle s).
Results: benchmarks/results/hostile-<date>.md/.json with the machine and the load average.

Usage: python benchmarks/hostile.py [--artifact DIR] [--quick]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import common
import numpy as np
from http_serving import Server, build_artifact, free_port, server_env, store
from soak import worker_pids

ROW = [0.5] * 40
MODEL_NAME = "modeconn-bench"  # http_serving.store's name
EXIT_TIMEOUT_S = 120


@dataclass
class Sizes:
    sockets: int = 300
    hold_s: float = 30.0
    uploads: int = 200
    large: int = 64
    large_rounds: int = 2
    curve_s: float = 20.0
    probes: int = 20
    settle_s: float = 5.0

    @classmethod
    def quick(cls) -> Sizes:
        return cls(sockets=40, hold_s=4.0, uploads=16, large=8, large_rounds=1, curve_s=4.0, probes=5, settle_s=1.0)


@dataclass
class Row:
    attack: str
    answers: int = 0
    errors: int = 0
    rss: list[float] = field(default_factory=lambda: [float("nan")] * 3)  # before, peak, after (MiB)
    held: bool = False
    notes: str = ""


# ---------------------------------------------------------------- measuring
def rss_mib(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(Exception):
            try:
                import psutil

                total += psutil.Process(pid).memory_info().rss / 2**20
            except ImportError:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
    return total


class RssPeak:
    """Peak of the workers' summed RSS while the block runs (workers looked up each sample)."""

    def __init__(self, server: Server) -> None:
        self.server, self.peak, self._stop = server, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, rss_mib(worker_pids(self.server.proc.pid)))

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def request(port: int, method: str, path: str, body: bytes = b"", timeout: float = 10.0,
            content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body); status 0 for no answer."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type, "Connection": "close"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, {"error": type(exc).__name__}, b""
    finally:
        conn.close()


def outcome(status: int, headers: dict[str, str]) -> str:
    """'200', '503+retry', '0 ConnectionResetError' (no answer, and why)..."""
    if status == 503 and "retry-after" in headers:
        return "503+retry"
    return str(status) if status else f"0 {headers.get('error', '')}".strip()


def probe(port: int, count: int) -> Counter[str]:
    """The outcomes of `count` small predictions on fresh connections ("200": answered)."""
    body = json.dumps({"inputs": [ROW]}).encode()
    return Counter(outcome(*request(port, "POST", "/predict", body)[:2]) for _ in range(count))


def closed_by_server(sockets: list[socket.socket]) -> int:
    closed = 0
    for s in sockets:
        s.setblocking(False)
        try:
            closed += s.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def wait_all_workers(server: Server, workers: int, timeout_s: float = 120.0) -> None:
    """Until every worker has logged that it is ready (one /readyz 200 says only that one is)."""
    deadline = time.monotonic() + timeout_s
    while server.log.read_text(errors="replace").count("ready in ") < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every worker ready after {timeout_s:g} s:\n{server.log_tail()}")
        time.sleep(0.2)


# ---------------------------------------------------------------- attacks on a running server
def held_sockets(server: Server, sizes: Sizes, name: str, first_bytes: bytes) -> Row:
    row, pids = Row(name), worker_pids(server.proc.pid)
    row.rss[0] = rss_mib(pids)
    sockets: list[socket.socket] = []
    with RssPeak(server) as peak:
        try:
            for _ in range(sizes.sockets):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                if first_bytes:
                    s.sendall(first_bytes)
                sockets.append(s)
        except OSError as exc:
            row.notes = f"opened {len(sockets)} of {sizes.sockets}: {exc}; "
        deadline = time.monotonic() + sizes.hold_s
        seen = probe(server.port, sizes.probes)
        row.answers, row.errors = seen["200"], sizes.probes - seen["200"]
        time.sleep(max(0.0, deadline - time.monotonic()))
        closed = closed_by_server(sockets)
        for s in sockets:
            s.close()
    time.sleep(sizes.settle_s)
    row.rss[1:] = [peak.peak, rss_mib(pids)]
    row.held = row.errors == 0 and closed >= 0.9 * len(sockets)
    row.notes += f"{len(sockets)} sockets held {sizes.hold_s:g} s; the server closed {closed}; probes {sizes.probes}: {dict(seen)}"
    return row


def slow_uploads(server: Server, sizes: Sizes) -> Row:
    row, pids = Row("slow-uploads"), worker_pids(server.proc.pid)
    row.rss[0] = rss_mib(pids)
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {8 << 20}\r\n\r\n").encode()
    sockets: list[socket.socket] = []
    with RssPeak(server) as peak:
        with contextlib.suppress(OSError):
            for _ in range(sizes.uploads):
                s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                s.sendall(head + b" " * (256 << 10))  # a first quarter MiB at once, then a trickle
                sockets.append(s)
        stop = time.monotonic() + sizes.hold_s
        probed: list[Counter[str]] = []
        probes = threading.Thread(target=lambda: probed.append(probe(server.port, sizes.probes)))
        probes.start()
        while time.monotonic() < stop:
            for s in sockets:
                with contextlib.suppress(OSError):
                    s.send(b" " * 1024)
            time.sleep(1.0)
        probes.join()
        for s in sockets:
            s.close()
    time.sleep(sizes.settle_s)
    row.rss[1:] = [peak.peak, rss_mib(pids)]
    seen = probed[0]
    row.answers, row.errors = seen["200"], sizes.probes - seen["200"]
    row.held = row.errors == 0 and row.rss[2] <= 1.2 * row.rss[0]
    row.notes = f"{len(sockets)} uploads of 8 MiB at 1 KiB/s for {sizes.hold_s:g} s; probes {sizes.probes}: {dict(seen)}"
    return row


def large_body(limit: int) -> bytes:
    """1,024 valid rows, padded with whitespace to just under the body limit."""
    body = json.dumps({"inputs": [[0.1000000000000000055511151231257827] * 40] * 1024}).encode()
    return body[:-1] + b" " * max(0, limit - len(body) - 1024) + b"}"


def large_json(server: Server, sizes: Sizes, limit: int) -> Row:
    row, pids = Row("large-json"), worker_pids(server.proc.pid)
    row.rss[0] = rss_mib(pids)
    body = large_body(limit)
    outcomes: list[str] = []

    def one() -> None:
        status, headers, _ = request(server.port, "POST", "/predict", body, timeout=120)
        outcomes.append(outcome(status, headers))

    with RssPeak(server) as peak:
        for _ in range(sizes.large_rounds):
            threads = [threading.Thread(target=one) for _ in range(sizes.large)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    time.sleep(sizes.settle_s)
    row.rss[1:] = [peak.peak, rss_mib(pids)]
    counts = Counter(outcomes)
    row.answers = counts["200"]
    row.errors = len(outcomes) - counts["200"] - counts["503+retry"]
    row.held = row.errors == 0 and row.rss[2] <= 1.2 * row.rss[0]
    row.notes = f"{sizes.large_rounds} x {sizes.large} concurrent bodies of {len(body) / 2**20:.1f} MiB: {dict(counts)}"
    return row


def heavy_curve(server: Server, sizes: Sizes) -> Row:
    row, pids = Row("heavy-curve"), worker_pids(server.proc.pid)
    row.rss[0] = rss_mib(pids)
    x = np.random.default_rng(0).uniform(-4, 4, size=(1024, 40)).astype(np.float32)
    body = json.dumps({"inputs": x.tolist(), "ts": [i / 15 for i in range(16)]}).encode()

    def client(seconds: float, out: Counter) -> None:
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            status, headers, _ = request(server.port, "POST", "/predict_curve", body, timeout=60)
            out["200" if status == 200 else "503+retry" if status == 503 and "retry-after" in headers else str(status)] += 1

    with RssPeak(server) as peak:
        solo: Counter = Counter()
        client(sizes.curve_s / 2, solo)
        pair: list[Counter] = [Counter(), Counter()]
        threads = [threading.Thread(target=client, args=(sizes.curve_s, c)) for c in pair]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    row.rss[1:] = [peak.peak, rss_mib(pids)]
    solo_rate = solo["200"] / (sizes.curve_s / 2)
    rates = [c["200"] / sizes.curve_s for c in pair]
    row.answers = sum(c["200"] for c in pair)
    row.errors = sum(n for c in pair for k, n in c.items() if k not in ("200", "503+retry"))
    row.held = row.errors == 0 and solo_rate > 0 and all(r >= 0.3 * solo_rate for r in rates)
    row.notes = (f"solo {solo_rate:.2f} answers/s; two clients {', '.join(f'{r:.2f}' for r in rates)} answers/s; "
                 f"{[dict(c) for c in pair]}")
    return row


BAD_REQUESTS: list[tuple[str, str, bytes, str]] = [
    ("POST", "/predict", b"{}", "application/json"),
    ("POST", "/predict", b'{"inputs": []}', "application/json"),
    ("POST", "/predict", json.dumps({"inputs": [[0.0] * 39]}).encode(), "application/json"),
    ("POST", "/predict", json.dumps({"inputs": [ROW], "unknown": 1}).encode(), "application/json"),
    ("POST", "/predict", json.dumps({"inputs": [ROW] * 1025}).encode(), "application/json"),
    ("POST", "/predict", b"not json", "application/json"),
    ("POST", "/predict", json.dumps({"inputs": [ROW]}).encode(), "application/x-www-form-urlencoded"),
    ("POST", "/predict_curve", json.dumps({"inputs": [ROW], "t": 1.5}).encode(), "application/json"),
    ("POST", "/predict_curve", json.dumps({"inputs": [ROW]}).encode(), "application/json"),
    ("POST", "/predict?foo=1", json.dumps({"inputs": [ROW]}).encode(), "application/json"),
    ("POST", "/predict", b"\x00\x01", "application/octet-stream"),
]


def bad_requests(server: Server) -> Row:
    row = Row("bad-requests")
    before = server.log.read_text(errors="replace")
    statuses = [request(server.port, m, p, b, content_type=ct)[0] for m, p, b, ct in BAD_REQUESTS]
    time.sleep(1.0)  # let the workers' log lines reach the file
    added = server.log.read_text(errors="replace")[len(before):].splitlines()
    tracebacks = sum("Traceback" in line for line in added)
    errors = sum(" ERROR " in line or "[ERROR]" in line for line in added)
    row.answers = sum(400 <= s < 500 for s in statuses)
    row.errors = len(statuses) - row.answers
    row.held = row.errors == 0 and tracebacks == 0 and errors == 0 and len(added) <= len(statuses)
    row.notes = f"statuses {statuses}; {len(added)} log lines, {errors} at ERROR, {tracebacks} tracebacks"
    return row


# ---------------------------------------------------------------- attacks that need their own server
def _stored(home: Path) -> Path:
    (manifest,) = (home / "models" / MODEL_NAME).glob("*/manifest.json")
    return manifest.parent


def _rerecord(folder: Path, rel: str, data: bytes) -> None:
    from modeconn.contract.artifact import file_record

    (folder / rel).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][rel] = file_record(folder / rel)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def softmax_graph(features: int, classes: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((features, classes), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["probabilities"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()


def mismatched_manifest(home: Path, work: Path) -> Row:
    row = Row("mismatched-manifest")
    cases = {"swa.onnx": softmax_graph(40, 12), "members/member-001.onnx": softmax_graph(41, 10)}
    outcomes = []
    for rel, graph in cases.items():
        broken = work / f"broken-{rel.replace('/', '-')}"
        shutil.copytree(home, broken)
        _rerecord(_stored(broken), rel, graph)
        log = work / f"{broken.name}.log"
        port = free_port()
        cmd = [sys.executable, "-m", "bentoml", "serve", "modeconn.serving.service:ModeConnService",
               "--port", str(port), "--host", "127.0.0.1"]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=common.ROOT, env=server_env(broken, MODECONN_MODEL=MODEL_NAME),
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = None
        lines = [line for line in log.read_text(errors="replace").splitlines() if "Error" in line]
        ok = code not in (0, None) and len(lines) == 1 and rel in lines[0]
        outcomes.append(ok)
        row.notes += f"{rel}: exit {code}, {lines[0][lines[0].find('cannot serve'):][:220] if lines else 'no error line'}; "
    row.answers, row.errors = sum(outcomes), len(outcomes) - sum(outcomes)
    row.held = all(outcomes)
    return row


def answering_pid(port: int) -> int | None:
    status, _, body = request(port, "GET", "/info")
    return json.loads(body)["batching"]["worker_pid"] if status == 200 else None


def store_tamper_kill(home: Path, work: Path, sizes: Sizes) -> Row:
    row = Row("store-tamper-kill")
    own = work / "tamper-home"
    shutil.copytree(home, own)
    server = Server(own, MODEL_NAME, work / "tamper.log", MODECONN_WORKERS="2")
    try:
        server.wait_ready()
        body = json.dumps({"inputs": np.random.default_rng(3).uniform(-4, 4, (4, 40)).tolist()}).encode()
        before = request(server.port, "POST", "/predict", body)[2]
        pids = worker_pids(server.proc.pid)
        row.rss[0] = rss_mib(pids)
        store = _stored(own)
        (store / "ensemble.onnx").unlink()
        (store / "members/member-000.onnx").write_bytes(b"not a graph")
        os.kill(min(pids), signal.SIGKILL)
        readyz: list[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            readyz.append(request(server.port, "GET", "/readyz")[0])
            new = set(worker_pids(server.proc.pid)) - set(pids)
            if new and answering_pid(server.port) in new:
                break
            time.sleep(0.1)
        else:
            row.notes = "no replacement answered within 120 s; "
        answers = [request(server.port, "POST", "/predict", body)[2] for _ in range(sizes.probes * 2)]
        same = [json.loads(a)["probabilities"] == json.loads(before)["probabilities"] if a else False for a in answers]
        row.rss[1] = row.rss[2] = rss_mib(worker_pids(server.proc.pid))
        row.answers, row.errors = sum(same), len(same) - sum(same)
        flaps = sum(s != 200 for s in readyz)
        row.held = row.errors == 0 and flaps == 0 and not row.notes
        row.notes += f"/readyz while replacing: {dict(Counter(readyz))}; {len(answers)} later answers, {sum(same)} unchanged"
    finally:
        server.stop()
    return row


# ---------------------------------------------------------------- the run
def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an exported artifact folder with a curve (default: build one)")
    parser.add_argument("--only", default="", help="comma-separated attack names to run (default: all)")
    args = parser.parse_args()
    only = {a.strip() for a in args.only.split(",") if a.strip()}
    sizes = Sizes.quick() if args.quick else Sizes()
    run = common.start_run("hostile")
    run["quick"], run["command"], run["sizes"] = args.quick, common.command_line(), sizes.__dict__
    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    rows: list[Row] = []
    try:
        artifact = args.artifact or build_artifact(work, quick=False)[0]
        home = work / "bentoml"
        store(artifact, home)
        limit = 8 << 20
        server = Server(home, MODEL_NAME, work / "server.log", MODECONN_WORKERS="2")
        attacks: dict[str, Callable[[], Row]] = {
            "idle-sockets": lambda: held_sockets(server, sizes, "idle-sockets", b""),
            "half-headers": lambda: held_sockets(server, sizes, "half-headers", b"POST /predict HTTP/1.1\r\nHost: x\r\n"),
            "slow-uploads": lambda: slow_uploads(server, sizes),
            "large-json": lambda: large_json(server, sizes, limit),
            "heavy-curve": lambda: heavy_curve(server, sizes),
            "bad-requests": lambda: bad_requests(server),
        }
        try:
            server.wait_ready()
            wait_all_workers(server, 2)
            for name, attack in attacks.items():
                if not only or name in only:
                    rows.append(attack())
                    print(rows[-1], flush=True)
        finally:
            server.stop()
        if not only or "mismatched-manifest" in only:
            rows.append(mismatched_manifest(home, work))
        if not only or "store-tamper-kill" in only:
            rows.append(store_tamper_kill(home, work, sizes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = [[r.attack, r.answers, r.errors, *(round(v, 1) for v in r.rss), "held" if r.held else "FAILED", r.notes]
             for r in rows]
    common.add_section(run, "Attacks", ["attack", "answers", "errors", "RSS before MiB", "RSS peak MiB",
                                        "RSS after MiB", "verdict", "notes"], table,
                       notes="RSS: the workers' summed resident memory; loopback only; sizes: " + json.dumps(sizes.__dict__))
    held = sum(r.held for r in rows)
    summary = f"## Outcome\n\n- {held} of {len(rows)} attacks held: " + ", ".join(
        f"{r.attack} {'held' if r.held else 'FAILED'}" for r in rows)
    common.write_results(run, summary=summary, out_dir=args.out)


if __name__ == "__main__":
    main()
