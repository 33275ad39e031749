"""Serving peers side by side, one run.

The same `ensemble.onnx` behind four servers, each in its own process group, started and
stopped by this script and measured one after the other, in rounds whose order rotates:
  modeconn          `bentoml serve modeconn.serving.service:ModeConnService` (its own batcher)
  bentoml-batching  a minimal BentoML service with BentoML's adaptive batching
                    (`@bentoml.api(batchable=True)`, benchmarks/peers/bentoml_batching.py)
  bentoml-microbatcher  the same minimal service with modeconn's batcher (serving/batching.py)
                    instead of BentoML's: the two batchers with everything else equal
  litserve          LitServe with its batching (benchmarks/peers/litserve_peer.py)
  floor             Starlette + uvicorn + onnxruntime, the session run inline, no batching
                    (benchmarks/peers/floor.py)
Every server has the same process layout and onnxruntime settings: --workers processes
(modeconn's default, 2), each session with --ort-threads intra-op threads (default 1: the
cores shared among the workers, as modeconn does) and spinning on (modeconn's default);
LitServe's workers are its inference processes, beside one API server process. Every server
answers the same body (serving.runtime.summarize of the ensemble outputs; BentoML's batching
API answers it as one object per row).

Per server and encoding: p50/p99 latency at batch 1 with one keep-alive client, and rows/s
with --clients concurrent keep-alive clients sending batch-1 requests. Encodings: JSON
({"inputs": [[...]]}) and binary (raw little-endian float32, C order, Content-Type
application/octet-stream; rows from the byte count). modeconn's binary rows need the
service's binary input (branch serving-io): without it they read "unsupported". Every
server's answer to one row is checked against the in-process session before it is timed.

--artifact cifar: an artifact of 8 PreResNet-20 members with random (untrained, seeded)
weights on CIFAR-shaped inputs, exported by training/export/ (its parity gate on a small
synthetic CIFAR-10 folder; tests/support.py build_image_artifact), and rows/s served at --clients clients as a share of
the in-process session's rows/s at the batch sizes the server ran.

The client is one asyncio process of raw HTTP/1.1 keep-alive connections (http_serving.py's)
on the same 2 cores as the servers; its CPU time is recorded beside each throughput.

Usage: python benchmarks/serving_peers.py [--artifact demo|cifar] [--artifact-dir DIR] [--quick]
       [--peers modeconn,modeconn-baseline --baseline-python OTHER/.venv/bin/python --interleave]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import http_serving as hs
import numpy as np

ROOT = common.ROOT
BINARY = "application/octet-stream"
JSON = "application/json"
SOURCE_NOTE = "SOURCE.txt"  # beside an artifact built with --build-only: how it was made


# ---------------------------------------------------------------- servers
@dataclass(frozen=True)
class Peer:
    name: str
    ready: str  # GET path that answers 200 once the model is loaded
    json_path: str
    binary_path: str


PEERS = {
    "modeconn": Peer("modeconn", "/readyz", "/predict", "/predict"),
    # the same service from another checkout's interpreter (--baseline-python): before/after in one run
    "modeconn-baseline": Peer("modeconn-baseline", "/readyz", "/predict", "/predict"),
    "bentoml-batching": Peer("bentoml-batching", "/readyz", "/predict", "/predict_raw"),
    "bentoml-microbatcher": Peer("bentoml-microbatcher", "/readyz", "/predict", "/predict_raw"),
    "litserve": Peer("litserve", "/health", "/predict", "/predict"),
    "floor": Peer("floor", "/readyz", "/predict", "/predict"),
}


@dataclass
class Settings:
    artifact: Path
    home: Path  # BENTOML_HOME, with the artifact stored as `tag`
    tag: str
    workers: int
    ort_threads: int
    spinning: bool
    max_batch_rows: int = 1024
    litserve_wait_s: float = 0.001

    def env(self) -> dict[str, str]:
        spin = "1" if self.spinning else "0"
        return {"MODECONN_MODEL": self.tag, "MODECONN_WORKERS": str(self.workers),
                "MODECONN_ORT_THREADS": str(self.ort_threads), "MODECONN_ORT_SPINNING": spin,
                "MODECONN_MAX_BATCH_ROWS": str(self.max_batch_rows),
                "PEER_ARTIFACT": str(self.artifact), "PEER_WORKERS": str(self.workers),
                "PEER_ORT_THREADS": str(self.ort_threads), "PEER_ORT_SPINNING": spin,
                "PEER_MAX_BATCH_ROWS": str(self.max_batch_rows),
                "PEER_LITSERVE_WAIT_S": str(self.litserve_wait_s)}


BASELINE_PYTHON: list[str] = []  # --baseline-python, once parsed


def command(peer: str, port: int, workers: int) -> list[str]:
    py = sys.executable
    if peer in ("modeconn", "modeconn-baseline"):
        if peer == "modeconn-baseline" and not BASELINE_PYTHON:
            raise ValueError("peer modeconn-baseline needs --baseline-python (another checkout's interpreter)")
        py = BASELINE_PYTHON[0] if peer == "modeconn-baseline" else py
        return [py, "-m", "bentoml", "serve", "modeconn.serving.service:ModeConnService", "--port", str(port),
                "--host", "127.0.0.1"]
    if peer == "bentoml-batching":
        return [py, "-m", "bentoml", "serve", "benchmarks.peers.bentoml_batching:Peer", "--port", str(port),
                "--host", "127.0.0.1"]
    if peer == "bentoml-microbatcher":
        return [py, "-m", "bentoml", "serve", "benchmarks.peers.bentoml_batching:PeerMicroBatcher", "--port",
                str(port), "--host", "127.0.0.1"]
    if peer == "litserve":
        return [py, "-m", "benchmarks.peers.litserve_peer", str(port)]
    if peer == "floor":
        return [py, "-m", "uvicorn", "benchmarks.peers.floor:app", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


class PeerServer(hs.Server):
    """One peer in its own process group on a free loopback port (readiness, logs and stop as
    http_serving's Server)."""

    def __init__(self, peer: str, settings: Settings, log: Path) -> None:
        self.peer = PEERS[peer]
        self.name, self.ready_path = self.peer.name, self.peer.ready
        self.port = hs.free_port()
        self.log = log
        self.proc = self.launch(command(peer, self.port, settings.workers),
                                hs.server_env(settings.home, **settings.env()))

    def pids(self) -> list[int]:
        """The server's process and all its descendants (BentoML's workers start their own
        sessions, so the process group alone misses them)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(stat.parent.name))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def cpu_seconds(self, pids: list[int]) -> float:
        total = 0
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def idle_cores(self, seconds: float = 2.0) -> float:
        """Cores the server uses with no request in flight (a polling loop shows here)."""
        pids = self.pids()
        before = self.cpu_seconds(pids)
        time.sleep(seconds)
        return (self.cpu_seconds(pids) - before) / seconds

    def stop(self) -> None:
        """SIGTERM to the whole group (LitServe and uvicorn --workers start children), then SIGKILL."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # children left behind by the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


# ---------------------------------------------------------------- requests
@dataclass
class Encoded:
    """One encoding of the request rows: bodies, content type and the path per peer."""

    name: str
    content_type: str
    bodies: list[bytes] = field(default_factory=list)

    def path(self, peer: Peer) -> str:
        return peer.binary_path if self.content_type == BINARY else peer.json_path


def encodings(rows: list[np.ndarray]) -> dict[str, Encoded]:
    return {"json": Encoded("json", JSON, [json.dumps({"inputs": r.tolist()}).encode() for r in rows]),
            "binary": Encoded("binary", BINARY, [np.ascontiguousarray(r, dtype="<f4").tobytes() for r in rows])}


def probabilities(payload: bytes) -> np.ndarray:
    """The probabilities of a peer's answer: {"probabilities": [[...]]} or [{"probabilities": [...]}]."""
    data = json.loads(payload)
    if isinstance(data, list):
        return np.asarray([row["probabilities"] for row in data], dtype=np.float64)
    return np.asarray(data["probabilities"], dtype=np.float64)


async def check_answer(port: int, path: str, enc: Encoded, expected: np.ndarray) -> str | None:
    """None if the answer to the first row equals the in-process session's; else why not."""
    conn = hs.Connection(port)
    try:
        status, payload = await conn.request("POST", path, enc.bodies[0], enc.content_type)
    finally:
        await conn.close()
    if status != 200:
        return f"HTTP {status}: {payload[:200].decode(errors='replace')}"
    try:
        got = probabilities(payload)
    except (ValueError, KeyError, TypeError) as exc:
        return f"unexpected answer ({exc}): {payload[:200].decode(errors='replace')}"
    if got.shape != expected.shape or not np.allclose(got, expected, atol=1e-5, rtol=0):
        return f"probabilities {got.tolist()} differ from the in-process session's {expected.tolist()}"
    return None


async def sequential(port: int, path: str, enc: Encoded, count: int, warmup: int) -> tuple[list[float], list[int]]:
    conn = hs.Connection(port)
    seconds, statuses = [], []
    try:
        for i in range(warmup + count):
            started = time.perf_counter()
            status, _ = await conn.request("POST", path, enc.bodies[i % len(enc.bodies)], enc.content_type)
            if i >= warmup:
                seconds.append(round(time.perf_counter() - started, 6))  # microseconds: enough, and a smaller file
                statuses.append(status)
    finally:
        await conn.close()
    return seconds, statuses


def modeconn_batches(port: int) -> float | None:
    """Mean rows per session call of the worker that answers /info (modeconn only)."""
    card = hs.info(port)
    return card.get("batching", {}).get("stats", {}).get("ensemble", {}).get("mean_rows_per_batch")


# ---------------------------------------------------------------- artifacts
def cifar_artifact(work: Path, members: int = 8, depth: int = 20) -> tuple[Path, str]:
    from tests.support import ImageArtifact, build_image_artifact

    out = build_image_artifact(work, "modeconn-bench-cifar", ImageArtifact(members=members, depth=depth))
    return out, (f"{members} PreResNet-{depth} members, random (untrained, seeded 0..{members - 1}) weights, "
                 "BN statistics recomputed on the synthetic images, CIFAR-shaped")


def build_artifact(kind: str, work: Path, quick: bool) -> tuple[Path, str]:
    if kind == "cifar":
        return cifar_artifact(work)
    return hs.build_artifact(work, quick)


# ---------------------------------------------------------------- in-process reference
def in_process(artifact: Path, rows: list[np.ndarray], settings: Settings, batch_sizes: list[int],
               quick: bool, threads: int = 0) -> dict[str, Any]:
    """The ensemble session in this process, with `threads` intra-op threads (0: onnxruntime's
    default pool, one thread per core) and the servers' spinning: p50 of one call at batch 1,
    and rows/s per batch size. A spinning pool slows far more than the load suggests when
    other jobs hold the cores; --reference-threads 1 avoids the pool (no spinning threads)."""
    from modeconn.contract.artifact import load_artifact
    from modeconn.serving.runtime import Runtime, SessionSettings

    art = load_artifact(artifact)
    runtime = Runtime(art, ["CPUExecutionProvider"], SessionSettings(threads=threads, spinning=settings.spinning))
    x_all = np.concatenate(rows)
    cases = {n: (lambda n=n: runtime.run_ensemble(None, np.ascontiguousarray(np.resize(x_all, (n, *art.input_shape)))))
             for n in batch_sizes}
    timed = common.interleaved({f"batch {n}": fn for n, fn in cases.items()}, rounds=3 if quick else 5,
                               min_sample_s=0.3, quiet_wait_s=10)
    lat = common.latencies(lambda: runtime.run_ensemble(None, rows[0]), 100 if quick else 500, warmup=20)
    return {"rows_per_s": {n: n / timed[f"batch {n}"].value for n in batch_sizes},
            "samples": {k: v.as_dict() for k, v in timed.items()}, "batch1_latency_s": lat,
            "expected": [runtime.run_ensemble(None, r)[0].astype(np.float64) for r in rows[:1]]}


# ---------------------------------------------------------------- the run
def answers_of(peers: list[str], raw: np.ndarray, artifact: Path) -> dict[str, np.ndarray]:
    """What each peer must answer: the graph's probabilities; modeconn's are temperature-scaled by
    default when the artifact has a temperature (the peers have no such step; its cost, one
    log/exp over 10 numbers, is part of what modeconn's row measures)."""
    from modeconn.contract.artifact import load_artifact
    from modeconn.serving.calibration import scale

    temperature = load_artifact(artifact).spec.ensemble_temperature
    return {peer: scale(raw, temperature) if peer.startswith("modeconn") and temperature is not None else raw
            for peer in peers}


def start(peer: str, settings: Settings, args: Any, log: Path) -> tuple[PeerServer, dict[str, Any]]:
    """A peer's server, ready and idle (its start-up time and idle CPU measured)."""
    server = PeerServer(peer, settings, log)
    try:
        facts = {"ready_s": server.wait_ready()}
        monitor = common.CpuMonitor(server.pids())
        facts["others_cores_before"] = common.wait_for_quiet(monitor, args.quiet_wait)
        facts["idle_cores"] = server.idle_cores()
    except BaseException:
        server.stop()
        raise
    return server, facts


def measure_running(server: PeerServer, encs: dict[str, Encoded], expected: np.ndarray,
                    args: Any) -> dict[str, Any]:
    """One client's latency, then --clients clients' rows/s, per encoding, on a running server."""
    peer, out = server.peer.name, {}
    monitor = common.CpuMonitor(server.pids())
    for name, enc in encs.items():
        path = enc.path(server.peer)
        problem = asyncio.run(check_answer(server.port, path, enc, expected))
        if problem is not None:
            out[name] = {"unsupported": problem}
            print(f"  {peer} {name}: not measured: {problem[:160]}", flush=True)
            continue
        pids = server.pids()
        cpu0 = server.cpu_seconds(pids)
        lat, statuses = asyncio.run(sequential(server.port, path, enc, args.latency_requests, warmup=30))
        cpu1 = server.cpu_seconds(pids)
        before = monitor.snapshot()
        load = asyncio.run(hs.concurrent_clients(server.port, enc.bodies, args.clients, args.per_client, path=path,
                                                 ready=server.peer.ready, content_type=enc.content_type))
        load["others_cores"] = monitor.others(before, monitor.snapshot())  # other jobs on the machine
        # the servers' own CPU per request: far steadier than wall time when other jobs load the cores
        load["server_cpu_ms"] = (server.cpu_seconds(pids) - cpu1) / load["requests"] * 1e3
        load["server_cpu_ms_1_client"] = (cpu1 - cpu0) / (args.latency_requests + 30) * 1e3
        out[name] = {"latency_s": lat, "latency_statuses": sorted(set(statuses)), "load": load,
                     "mean_rows_per_batch": modeconn_batches(server.port) if peer.startswith("modeconn") else None}
        print(f"  {peer} {name}: p50 {common.percentile(lat, 50) * 1e3:.2f} ms, "
              f"{load['rows_per_s']:.0f} rows/s at {args.clients} clients {load['statuses']} "
              f"(other work: {load['others_cores']:.2f} cores; server CPU {load['server_cpu_ms_1_client']:.2f} / "
              f"{load['server_cpu_ms']:.2f} ms per request at 1 / {args.clients} clients)", flush=True)
    return out


def measure(peer: str, settings: Settings, encs: dict[str, Encoded], expected: np.ndarray, args: Any,
            log: Path) -> dict[str, Any]:
    """One start of one peer: started, measured, stopped."""
    server, facts = start(peer, settings, args, log)
    try:
        return {**facts, **measure_running(server, encs, expected, args)}
    finally:
        server.stop()


def measure_interleaved(peers: list[str], settings: Settings, encs: dict[str, Encoded],
                        answers: dict[str, np.ndarray], args: Any, work: Path) -> dict[str, list[dict[str, Any]]]:
    """Every peer started once and kept up; each round measures each of them in turn (order
    rotated), so all see the same machine within seconds of each other: the way to compare two
    versions of one server, whose difference is smaller than the spread between server starts."""
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in peers}
    servers: dict[str, tuple[PeerServer, dict[str, Any]]] = {}
    try:
        for peer in peers:
            servers[peer] = start(peer, settings, args, work / f"{peer}.log")
        for r in range(args.rounds):
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            print(f"round {r + 1}/{args.rounds}: {', '.join(order)} (load {common.load_average()})", flush=True)
            for peer in order:
                server, facts = servers[peer]
                results[peer].append({**facts, **measure_running(server, encs, answers[peer], args)})
    finally:
        for server, _ in servers.values():
            server.stop()
    return results


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--artifact", choices=("demo", "cifar"), default="demo")
    parser.add_argument("--artifact-dir", type=Path, help="an exported artifact folder instead of building one")
    parser.add_argument("--build-only", type=Path, metavar="DIR",
                        help="build the artifact into DIR and stop (outside a timing lock), for --artifact-dir")
    parser.add_argument("--peers", default=",".join(p for p in PEERS if p != "modeconn-baseline"),
                        help=f"comma-separated subset of {','.join(PEERS)} (modeconn-baseline only with "
                             "--baseline-python)")
    parser.add_argument("--encodings", default="json,binary")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-client", type=int, default=0, help="requests per client (default 40, cifar 8, quick 3)")
    parser.add_argument("--latency-requests", type=int, default=0, help="one-client requests (default 500, quick 100)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds: server starts per peer, order rotated; with --interleave, measurements "
                             "per peer of servers started once (default 3, quick 1)")
    parser.add_argument("--workers", type=int, default=2, help="server processes per peer (modeconn's default: 2)")
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    parser.add_argument("--reference-threads", type=int, default=0,
                        help="intra-op threads of the in-process reference session (0: one per core)")
    parser.add_argument("--label", default="", help="added to the results file name (serving_peers-LABEL-date)")
    parser.add_argument("--quiet-wait", type=float, default=60.0,
                        help="seconds to wait, per server start, for other work to use < 0.25 cores")
    parser.add_argument("--no-spinning", action="store_true", help="onnxruntime spinning off for every session")
    parser.add_argument("--interleave", action="store_true",
                        help="start every peer once and measure them in turn, round after round, instead of "
                             "one server start per peer and round")
    parser.add_argument("--baseline-python", default="",
                        help="for peer modeconn-baseline: the python of another checkout (its venv), "
                             "to compare the service before and after a change in one run")
    args = parser.parse_args()
    BASELINE_PYTHON[:] = [args.baseline_python] if args.baseline_python else []
    cifar = args.artifact == "cifar"
    args.per_client = args.per_client or (3 if args.quick else 8 if cifar else 40)
    args.latency_requests = args.latency_requests or (100 if args.quick else 200 if cifar else 500)
    args.rounds = args.rounds or (1 if args.quick else 3)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for p in peers:
        command(p, 0, 1)  # an unknown name fails here, before minutes of set-up
    run = common.start_run("serving_peers" + ("-cifar" if cifar else "") + (f"-{args.label}" if args.label else ""))
    run["quick"], run["command"] = args.quick, common.command_line()
    work = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        started = time.perf_counter()
        if args.artifact_dir:
            note = args.artifact_dir / SOURCE_NOTE  # written by --build-only
            artifact, source = args.artifact_dir, note.read_text() if note.is_file() else str(args.artifact_dir)
        else:
            artifact, source = build_artifact(args.artifact, work, args.quick)
        if args.build_only:
            shutil.copytree(artifact, args.build_only)
            (args.build_only / SOURCE_NOTE).write_text(source)
            print(f"artifact ({source}) in {args.build_only}")
            return
        run["artifact"] = {"kind": args.artifact, "source": source, "build_seconds": time.perf_counter() - started}
        manifest = json.loads((artifact / "manifest.json").read_text())
        low, high = manifest["input"]["range"]
        rng = np.random.default_rng(0)
        rows = [rng.uniform(low, high, size=(1, *manifest["input"]["shape"])).astype(np.float32) for _ in range(256)]
        encs = {k: v for k, v in encodings(rows).items() if k in args.encodings.split(",")}
        home = work / "bentoml"
        settings = Settings(artifact, home, hs.store(artifact, home), args.workers, args.ort_threads,
                            not args.no_spinning)
        run["settings"] = {k: str(v) for k, v in settings.__dict__.items() if k not in ("home", "artifact")}
        reference = in_process(artifact, rows, settings, [1, 2, 4, 8, 16, 32, 64], args.quick,
                               args.reference_threads)
        expected = reference.pop("expected")[0]
        answers = answers_of(peers, expected, artifact)
        if args.interleave:
            results = measure_interleaved(peers, settings, encs, answers, args, work)
        else:
            results = {p: [] for p in peers}
            for r in range(args.rounds):
                order = peers[r % len(peers):] + peers[:r % len(peers)]  # no peer always first
                print(f"round {r + 1}/{args.rounds}: {', '.join(order)} (load {common.load_average()})", flush=True)
                for peer in order:
                    results[peer].append(measure(peer, settings, encs, answers[peer], args, work / f"{peer}-{r}.log"))
        report(run, reference, results, args, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.write_results(run, summary=summary(run), out_dir=args.out)


# ---------------------------------------------------------------- tables
def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def aggregate(starts: list[dict[str, Any]], enc: str) -> dict[str, Any] | None:
    """Per peer and encoding: median over starts of p50 and of rows/s; p99 over all requests."""
    ok = [s[enc] for s in starts if enc in s and "unsupported" not in s[enc]]
    if not ok:
        return None
    return {"starts": len(ok),
            "p50_ms": _median([common.percentile(s["latency_s"], 50) * 1e3 for s in ok]),
            "p50_per_start": [common.percentile(s["latency_s"], 50) * 1e3 for s in ok],
            "p99_ms": common.percentile([v for s in ok for v in s["latency_s"]], 99) * 1e3,
            "rows_per_s": _median([s["load"]["rows_per_s"] for s in ok]),
            "rows_per_s_per_start": [s["load"]["rows_per_s"] for s in ok],
            "load_p50_ms": common.percentile([v for s in ok for v in s["load"]["latencies_s"]], 50) * 1e3,
            "load_p99_ms": common.percentile([v for s in ok for v in s["load"]["latencies_s"]], 99) * 1e3,
            "statuses": _sum_statuses([s["load"]["statuses"] for s in ok]),
            "client_cpu_s": _median([s["load"]["client_cpu_s"] for s in ok]),
            "others_cores": [round(s["load"].get("others_cores", float("nan")), 2) for s in ok],
            "server_cpu_ms_1_client": _median([s["load"]["server_cpu_ms_1_client"] for s in ok]),
            "server_cpu_ms": _median([s["load"]["server_cpu_ms"] for s in ok]),
            "mean_rows_per_batch": _median([s["mean_rows_per_batch"] for s in ok if s.get("mean_rows_per_batch")]),
            "ready_s": _median([s["ready_s"] for s in starts]),
            "idle_cores": _median([s["idle_cores"] for s in starts if "idle_cores" in s])}


def _sum_statuses(many: list[dict[int, int]]) -> str:
    total: dict[int, int] = {}
    for statuses in many:
        for k, v in statuses.items():
            total[k] = total.get(k, 0) + v
    return ", ".join(f"{k}: {v}" for k, v in sorted(total.items()))


def report(run: dict, reference: dict, results: dict, args: Any, manifest: dict) -> None:
    ref_p50 = common.percentile(reference["batch1_latency_s"], 50) * 1e3
    rps = reference["rows_per_s"]
    rows, table = [], {}
    for enc in args.encodings.split(","):
        for peer, starts in results.items():
            agg = aggregate(starts, enc)
            table[(peer, enc)] = agg
            if agg is None:
                why = next((s[enc]["unsupported"] for s in starts if enc in s and "unsupported" in s[enc]), "")
                rows.append([peer, enc, 0, "unsupported", "", "", "", "", "", "", why[:100], "", "", "", "", "", ""])
                continue
            floor = (table.get(("floor", enc)) or {}).get("p50_ms")
            rows.append([peer, enc, agg["starts"], agg["p50_ms"], ", ".join(f"{v:.2f}" for v in agg["p50_per_start"]),
                         agg["p99_ms"], agg["p50_ms"] - floor if floor is not None and peer != "floor" else "",
                         agg["rows_per_s"], ", ".join(f"{v:.0f}" for v in agg["rows_per_s_per_start"]),
                         agg["load_p99_ms"], agg["statuses"], agg["client_cpu_s"],
                         ", ".join(f"{v:.2f}" for v in agg["others_cores"]), agg["idle_cores"], agg["ready_s"],
                         agg["server_cpu_ms_1_client"], agg["server_cpu_ms"]])
    # the floor is measured last in the table but its p50 is needed above: fill the column now
    for row in rows:
        floor = (table.get(("floor", row[1])) or {}).get("p50_ms")
        if isinstance(row[3], float) and floor is not None and row[0] != "floor":
            row[6] = row[3] - floor
    arch = manifest["architecture"]
    common.add_section(
        run, f"Peers, {arch['name']} ({len(manifest['members'])} members), batch-1 requests",
        ["server", "encoding", "starts", "p50 ms, 1 client (median of starts)", "p50 per start", "p99 ms (all)",
         "p50 - floor's, ms", f"rows/s, {args.clients} clients (median)", "rows/s per start",
         f"p99 ms at {args.clients} clients", "statuses", "client CPU s",
         "other work, cores (per start)", "idle server, cores", "ready s",
         "server CPU ms/request, 1 client", f"server CPU ms/request, {args.clients} clients"], rows,
        notes=(f"Same ensemble.onnx in every server: {args.workers} processes each, onnxruntime "
               f"{args.ort_threads} intra-op thread(s) per session, spinning {'off' if args.no_spinning else 'on'}; "
               f"batches of at most {1024} rows (LitServe: requests), no waiting for company except LitServe's "
               f"{1e3 * 0.001:.0f} ms window (0 makes its worker loop poll without sleeping). One client: "
               f"{args.latency_requests} requests after 30 warm-up; {args.clients} clients x {args.per_client} requests "
               "each, released together. The client is one asyncio process on the same 2 cores (client CPU s: its "
               "share). Other work: cores that processes outside this run used during each throughput measurement "
               "(/proc/stat; each server start first waits up to --quiet-wait s for < 0.25). Idle server: CPU its "
               "processes used over 2 s with no request, after loading. Server CPU ms/request: CPU time of all the "
               "server's processes (utime + stime) over the measurement / requests: what each request costs the "
               "server, steadier than wall time when other jobs share the cores. "
               f"In-process session call at batch 1: p50 {ref_p50:.3f} ms."),
        data={"table": {f"{p}/{e}": v for (p, e), v in table.items()}, "starts": results})
    paired_section(run, results, args)
    rows = [[f"batch {n}", v, v / rps[1]] for n, v in rps.items()]
    pool = "onnxruntime's default pool: one thread per core" if not args.reference_threads \
        else f"{args.reference_threads} intra-op thread(s)"
    common.add_section(run, f"In-process session (this process, {pool})",
                       ["batch", "rows/s", "x batch 1"], rows,
                       notes="Timed round-robin (benchmarks/common.py interleaved), median of quiet samples.",
                       data={"samples": reference["samples"], "batch1_latency_s": reference["batch1_latency_s"]})
    rows = []
    for (peer, enc), agg in table.items():
        if agg is None:
            continue
        batch = agg["mean_rows_per_batch"] if peer == "modeconn" and agg["mean_rows_per_batch"] == agg["mean_rows_per_batch"] else None
        near = min(rps, key=lambda n: abs(n - batch)) if batch else None
        rows.append([peer, enc, agg["rows_per_s"], "" if batch is None else batch,
                     "" if near is None else agg["rows_per_s"] / rps[near], agg["rows_per_s"] / rps[64],
                     agg["rows_per_s"] / rps[1]])
    common.add_section(
        run, f"Served rows/s at {args.clients} clients as a share of the in-process session's",
        ["server", "encoding", "rows/s", "mean rows per session call (modeconn /info)",
         "share at that batch size", "share of batch 64", "share of batch 1"], rows,
        notes=("modeconn's mean rows per call is the count of the worker that answered /info, warm-up included; "
               "'that batch size' is the measured in-process batch size nearest to it."),
        data={"in_process_rows_per_s": rps})


def _measured(start: dict[str, Any], enc: str) -> dict[str, Any] | None:
    m = start.get(enc)
    return None if m is None or "unsupported" in m else m


def paired_section(run: dict, results: dict, args: Any) -> None:
    """modeconn against each peer within each round (measured minutes apart, under the same
    background load), then the median over rounds: steadier than comparing medians when
    other jobs come and go on the machine."""
    if "modeconn" not in results:
        return
    rows = []
    for enc in args.encodings.split(","):
        for peer, starts in results.items():
            if peer == "modeconn":
                continue
            ratios, gaps = [], []
            for ours, theirs in zip(results["modeconn"], starts, strict=True):
                a, b = _measured(ours, enc), _measured(theirs, enc)
                if a is None or b is None:
                    continue
                ratios.append(a["load"]["rows_per_s"] / b["load"]["rows_per_s"])
                gaps.append((common.percentile(a["latency_s"], 50) - common.percentile(b["latency_s"], 50)) * 1e3)
            if ratios:
                rows.append([peer, enc, len(ratios), _median(ratios), ", ".join(f"{r:.2f}" for r in ratios),
                             _median(gaps), ", ".join(f"{g:+.2f}" for g in gaps)])
    common.add_section(
        run, "modeconn against each peer, round by round",
        ["peer", "encoding", "rounds", "modeconn rows/s / peer's (median)", "per round",
         "modeconn p50 - peer's, ms (median)", "per round"], rows,
        notes=("Interleaved: every server started once and kept up; each round measures each in turn "
               "(order rotated per round)." if args.interleave else
               "Each round starts every server once, one after the other (order rotated per round)."),
        data=rows)


def compact_table(run: dict) -> str:
    """The README's peer table: p50 at one client and rows/s at many, per encoding."""
    section = run["sections"][0]["data"]["table"]
    peers = list(dict.fromkeys(k.split("/")[0] for k in section))
    encs = list(dict.fromkeys(k.split("/")[1] for k in section))
    headers, rows = ["server"], []
    for enc in encs:
        headers += [f"{enc}: p50 ms, 1 client", f"{enc}: rows/s, many clients", f"{enc}: server CPU ms/request"]
    for peer in peers:
        row: list[Any] = [peer]
        for enc in encs:
            agg = section.get(f"{peer}/{enc}")
            row += ["n/a"] * 3 if agg is None else [round(agg["p50_ms"], 2), round(agg["rows_per_s"]),
                                                     round(agg.get("server_cpu_ms", float("nan")), 2)]
        rows.append(row)
    return common.table(headers, rows)


def summary(run: dict) -> str:
    section = run["sections"][0]["data"]["table"]
    lines = ["## Side by side (medians over server starts; details below)", "", compact_table(run), "",
             "## Targets", ""]
    for enc in ("json", "binary"):
        ours, floor = section.get(f"modeconn/{enc}"), section.get(f"floor/{enc}")
        if ours is None:
            lines.append(f"- {enc}: modeconn not measured (unsupported or not run)")
            continue
        others = {k.split("/")[0]: v["rows_per_s"] for k, v in section.items()
                  if k.endswith(f"/{enc}") and v is not None and not k.startswith("modeconn/")}
        best = max(others, key=others.get) if others else None
        if best is not None:
            met = ours["rows_per_s"] >= others[best]
            lines.append(f"- {enc}: modeconn {ours['rows_per_s']:.0f} rows/s, best peer {best} {others[best]:.0f} "
                         f"(throughput >= every peer's: {'met' if met else 'MISSED'})")
        if floor is not None:
            gap = ours["p50_ms"] - floor["p50_ms"]
            lines.append(f"- {enc}: modeconn p50 {ours['p50_ms']:.2f} ms vs floor {floor['p50_ms']:.2f} ms "
                         f"(+{gap:.2f} ms; within 1 ms: {'met' if gap <= 1 else 'MISSED'})")
    share = next((s for s in run["sections"] if s["title"].startswith("Served rows/s")), None)
    if share is not None:
        for row in share["rows"]:
            if row[0] == "modeconn" and row[1] == "binary" and row[4] != "":
                lines.append(f"- binary: modeconn serves {row[4]:.0%} of the in-process rows/s at its batch size "
                             f"({row[3]:.1f} rows; target >= 50%: {'met' if row[4] >= 0.5 else 'MISSED'}), "
                             f"{row[5]:.0%} of batch 64's")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
