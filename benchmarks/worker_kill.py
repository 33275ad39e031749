"""A worker killed under load, against real `bentoml serve` processes.

For each setting (MODECONN_WORKERS=1, =2, and 2 workers with one onnxruntime thread each),
--clients keep-alive clients send batch-1 POST /predict back to back for --seconds; at
--kill-at seconds one worker process (a child of the arbiter) gets SIGKILL. Reported per
setting: requests that failed, by kind (reset: the connection closed or was reset under the
request; 503; other: any other status, or no answer within 30 s), the time until a
replacement worker is spawned and until it answers, and the time until throughput (over a
sliding 1 s window) is back to 90 % of its level before the kill. Before the kill: requests/s,
p50/p99 latency and the RSS of the workers, which is what the default number of workers is
chosen from. A client whose request fails reconnects and goes on.

Usage: python benchmarks/worker_kill.py [--quick] [--artifact DIR] [--clients 16] [--starts 2]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import psutil
from http_serving import Connection, Server, build_artifact, one_request, store

# The service's defaults give each of W workers usable cores // W onnxruntime threads
# (modeconn/contract/threads.py); the last setting is 2 workers that each claim
# every core, onnxruntime's default, to show why; "1 worker, 1 ORT thread" separates the
# gain of the second worker from that of the smaller pool.
SETTINGS = {
    "1 worker": {"MODECONN_WORKERS": "1"},
    "1 worker, 1 ORT thread": {"MODECONN_WORKERS": "1", "MODECONN_ORT_THREADS": "1"},
    "2 workers": {"MODECONN_WORKERS": "2"},
    "2 workers, ORT threads = cores each": {"MODECONN_WORKERS": "2", "MODECONN_ORT_THREADS": "0"},
}
REQUEST_TIMEOUT_S = 30.0
WINDOW_S = 1.0  # throughput is counted over sliding windows of this length
RECOVERED = 0.9  # "back to its level": a window at >= 90 % of the rate before the kill


def workers(arbiter: int) -> list[int]:
    """Live worker pids, children of the `bentoml serve` process."""
    pids = []
    for child in psutil.Process(arbiter).children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and "_bentoml_impl.worker.service" in child.cmdline():
                pids.append(child.pid)
    return sorted(pids)


def answering_pid(port: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        status, payload = asyncio.run(one_request(port, "GET", "/info", b""))
        if status == 200:
            return json.loads(payload)["batching"]["worker_pid"]
    return None


def wait_all_answering(server: Server, count: int, timeout_s: float = 120) -> list[int]:
    """Until `count` workers exist and each has answered a fresh connection."""
    deadline = time.monotonic() + timeout_s
    seen: set[int] = set()
    while time.monotonic() < deadline:
        pids = workers(server.proc.pid)
        if (pid := answering_pid(server.port)) is not None:
            seen.add(pid)
        if len(pids) == count and seen >= set(pids):
            return pids
        time.sleep(0.05)
    raise RuntimeError(f"{count} workers not answering after {timeout_s} s:\n{server.log_tail()}")


def watch_replacement(server: Server, before: list[int], t0: float, stop: threading.Event, out: dict) -> None:
    """Times (from t0) when a new worker pid appears and when it first answers /info."""
    while not stop.is_set():
        new = set(workers(server.proc.pid)) - set(before)
        if new and "spawned_s" not in out:
            out["spawned_s"] = time.monotonic() - t0
        if new and answering_pid(server.port) in new:
            out["answering_s"] = time.monotonic() - t0
            return
        time.sleep(0.1)


async def load(port: int, bodies: list[bytes], clients: int, seconds: float, kill_at: float,
               kill: Any) -> tuple[list[tuple[float, float, str]], float]:
    """(send, end, outcome) of every request, times relative to the start; and the kill time."""
    t0 = time.monotonic()
    records: list[tuple[float, float, str]] = []
    killed = {"at": float("nan")}

    async def client(i: int) -> None:
        conn = Connection(port)
        j = 0
        while (sent := time.monotonic() - t0) < seconds:
            try:
                status, _ = await asyncio.wait_for(conn.request("POST", "/predict", bodies[(i + j) % len(bodies)]),
                                                   REQUEST_TIMEOUT_S)
                outcome = "200" if status == 200 else "503" if status == 503 else "other"
            except (ConnectionError, asyncio.IncompleteReadError, IndexError, ValueError):
                outcome = "reset"  # closed under the request (an empty status line is IndexError)
            except (TimeoutError, OSError):
                outcome = "other"
            if outcome != "200":
                await conn.close()
                conn = Connection(port)
            records.append((sent, time.monotonic() - t0, outcome))
            j += 1
        await conn.close()

    async def killer() -> None:
        await asyncio.sleep(kill_at)
        killed["at"] = time.monotonic() - t0
        kill()

    await asyncio.gather(killer(), *(client(i) for i in range(clients)))
    return records, killed["at"]


def recovery(records: list[tuple[float, float, str]], killed_at: float, seconds: float) -> dict[str, Any]:
    ends = np.array(sorted(end for _, end, outcome in records if outcome == "200"))
    warm = 1.0  # the first second (connections, caches) is not the level
    before = ends[(ends >= warm) & (ends < killed_at)]
    rate = len(before) / (killed_at - warm)
    back = float("nan")
    for start in np.arange(killed_at, seconds - WINDOW_S, 0.05):
        n = np.count_nonzero((ends >= start) & (ends < start + WINDOW_S))
        if n >= RECOVERED * rate * WINDOW_S:
            back = float(start + WINDOW_S - killed_at)  # the window's end: when the level was reached
            break
    dip = min(np.count_nonzero((ends >= s) & (ends < s + WINDOW_S))
              for s in np.arange(killed_at, min(killed_at + 10, seconds - WINDOW_S), 0.05)) / WINDOW_S
    return {"rps_before": rate, "recovered_s": back, "lowest_rps_after": float(dip)}


def rss_mb(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out.append(psutil.Process(pid).memory_info().rss / 2**20)
    return out


def run_setting(home: Path, tag: str, log: Path, env: dict[str, str], bodies: list[bytes], clients: int,
                seconds: float, kill_at: float) -> dict[str, Any]:
    server = Server(home, tag, log, **env)
    try:
        server.wait_ready()
        before = wait_all_answering(server, int(env["MODECONN_WORKERS"]))
        status, payload = asyncio.run(one_request(server.port, "GET", "/info", b""))
        ort_settings = json.loads(payload)["batching"]["onnxruntime"] if status == 200 else {}
        rss = rss_mb(before)
        arbiter_rss = rss_mb([server.proc.pid])[0]
        victim = before[0]
        stop = threading.Event()
        replacement: dict[str, float] = {}
        t_kill: dict[str, float] = {}

        def kill() -> None:
            t_kill["t"] = time.monotonic()
            psutil.Process(victim).send_signal(signal.SIGKILL)
            threading.Thread(target=watch_replacement, args=(server, before, t_kill["t"], stop, replacement),
                             daemon=True).start()

        cpu0 = time.process_time()
        records, killed_at = asyncio.run(load(server.port, bodies, clients, seconds, kill_at, kill))
        client_cpu = time.process_time() - cpu0
        deadline = time.monotonic() + 60
        while "answering_s" not in replacement and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
    finally:
        server.stop()
    counts = {k: sum(1 for _, _, o in records if o == k) for k in ("200", "reset", "503", "other")}
    lat = [end - sent for sent, end, o in records if o == "200" and 1.0 <= sent and end < killed_at]
    return {"onnxruntime": ort_settings, "workers_before": before, "victim": victim, "rss_mb": rss, "arbiter_rss_mb": arbiter_rss,
            "killed_at_s": killed_at, "counts": counts, "replacement": replacement,
            "p50_ms": common.percentile(lat, 50) * 1e3, "p99_ms": common.percentile(lat, 99) * 1e3,
            "client_cpu_s": client_cpu, **recovery(records, killed_at, seconds),
            "timeline": timeline(records)}


def timeline(records: list[tuple[float, float, str]], step: float = 0.25) -> dict[str, Any]:
    """Outcomes per `step` seconds by completion time (the raw records are ~10^4 per run)."""
    bins = int(max((end for _, end, _ in records), default=0) / step) + 1
    counts = {k: [0] * bins for k in ("200", "reset", "503", "other")}
    for _, end, outcome in records:
        counts[outcome][int(end / step)] += 1
    return {"step_s": step, **counts}


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an exported artifact folder (default: build one)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=0, help="load duration (default 20, quick 8)")
    parser.add_argument("--kill-at", type=float, default=0, help="seconds into the load (default 8, quick 3)")
    parser.add_argument("--starts", type=int, default=0, help="server starts per setting (default 2, quick 1)")
    args = parser.parse_args()
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    kill_at = args.kill_at or (3.0 if args.quick else 8.0)
    starts = args.starts or (1 if args.quick else 2)
    run = common.start_run("worker_kill")
    run["quick"], run["command"] = args.quick, common.command_line()
    work = Path(tempfile.mkdtemp(prefix="bench-kill-"))
    try:
        artifact, source = (args.artifact, str(args.artifact)) if args.artifact else build_artifact(work, args.quick)
        run["artifact"] = source
        manifest = json.loads((artifact / "manifest.json").read_text())
        low, high = manifest["input"]["range"]
        rng = np.random.default_rng(0)
        bodies = [json.dumps({"inputs": rng.uniform(low, high, size=(1, *manifest["input"]["shape"])).tolist()})
                  .encode() for _ in range(64)]
        home = work / "bentoml"
        tag = store(artifact, home)
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
        for i in range(starts):  # settings interleaved, so load that comes and goes hits all
            for name, env in SETTINGS.items():
                res = run_setting(home, tag, work / f"{name.replace(' ', '_')}-{i}.log", env, bodies,
                                  args.clients, seconds, kill_at)
                res["load_average"] = common.load_average()
                results[name].append(res)
                print(f"{name}, start {i + 1}: {res['rps_before']:.0f} req/s before, failed {res['counts']}, "
                      f"replacement answering after {res['replacement'].get('answering_s', float('nan')):.1f} s, "
                      f"throughput back after {res['recovered_s']:.1f} s (load {res['load_average']})", flush=True)
        report(run, results, args.clients, seconds, kill_at)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.write_results(run, summary=summary(run), out_dir=args.out)


def report(run: dict, results: dict, clients: int, seconds: float, kill_at: float) -> None:
    rows = []
    for name, starts in results.items():
        for i, r in enumerate(starts):
            c = r["counts"]
            rows.append([name, i + 1, r["onnxruntime"].get("threads"), r["rps_before"], r["p50_ms"], r["p99_ms"], " + ".join(f"{m:.0f}" for m in r["rss_mb"]),
                         c["reset"], c["503"], c["other"], c["200"], r["lowest_rps_after"],
                         r["replacement"].get("spawned_s", float("nan")), r["replacement"].get("answering_s", float("nan")),
                         r["recovered_s"], r["load_average"][0]])
    common.add_section(
        run, f"SIGKILL of one worker, {clients} clients, {seconds:.0f} s, kill at {kill_at:.0f} s",
        ["setting", "start", "ORT threads/session (0: one per core)", "req/s before", "p50 ms before", "p99 ms before", "worker RSS MB", "failed: reset",
         "failed: 503", "failed: other", "answered 200", "lowest req/s after (1 s window)", "replacement spawned s",
         "replacement answering s", "throughput back s", "load (1 min)"], rows,
        notes=("req/s, p50 and p99 are over [1 s, kill) of answered requests; failed requests are counted over "
               "the whole run (only the kill makes any). 'replacement spawned/answering' is from the kill to the "
               "new worker pid appearing under the arbiter and to it answering GET /info on a fresh connection; "
               "'throughput back' is from the kill to the end of the first 1 s window with >= 90 % of the rate "
               "before the kill. Client and server share the machine's 2 cores (and the machine is shared)."),
        data={name: [{k: v for k, v in r.items()} for r in starts] for name, starts in results.items()})


def summary(run: dict) -> str:
    rows = run["sections"][0]["rows"]
    lines = ["## Summary (median over starts)", ""]
    for name in SETTINGS:
        mine = [r for r in rows if r[0] == name]
        med = lambda k, mine=mine: float(np.median([r[k] for r in mine]))  # noqa: E731
        lines.append(f"- {name}: {med(3):.0f} req/s, p99 {med(5):.1f} ms before the kill; failed requests "
                     f"{med(7) + med(8) + med(9):.0f} (reset {med(7):.0f}, 503 {med(8):.0f}, other {med(9):.0f}); "
                     f"lowest {med(11):.0f} req/s after it; replacement answering after {med(13):.1f} s; "
                     f"throughput back after {med(14):.1f} s; workers' RSS {mine[0][6]} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
