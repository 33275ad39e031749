"""Soak: many keep-alive clients for a minute against a real server, every
answer checked against the offline ensemble graph.

The script builds the demo-shaped artifact (tests/support.py: cnn1d members and a
curve on MNIST-1D; or takes --artifact DIR), stores it in a temporary BENTOML_HOME, starts
`bentoml serve modeconn.serving.service:ModeConnService` on a free loopback port with the service's
defaults, warms it up under full load, then runs --clients keep-alive connections (one
asyncio HTTP/1.1 client each, benchmarks/http_serving.py's) that send POST /predict back to
back for --seconds. A request holds 1 row (4 in 5) or 8 rows, drawn from a pool of inputs
(the artifact's MNIST-1D test set for an MNIST-1D artifact: uniform noise in the input range would make
almost every answer "class 8 with probability 1", so a mixed-up answer would pass as right)
whose answers onnxruntime computed offline, in this process, from the artifact's
ensemble.onnx; an answer is wrong unless its probabilities match to 1e-5 and its
predictions and labels are the offline argmax. Reported: requests, statuses, errors
(connection failures and non-200 answers), wrong answers, p50/p99/max latency, throughput,
and the resident memory (RSS) of the server's worker process(es) before and after the run,
sampled every 5 s in between; --rounds N repeats the measured run on the same server, so
growth that levels off (allocator and onnxruntime arenas warming up to the batch sizes seen)
can be told from a leak.

Usage: python benchmarks/soak.py [--clients 64] [--seconds 60] [--artifact DIR]
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
from http_serving import Connection, Server, build_artifact, store

ATOL = 1e-5
POOL_ROWS = 2000  # distinct inputs; their request bodies are encoded once and cached
RSS_EVERY_S = 5.0


def worker_pids(root: int) -> list[int]:
    """The BentoML worker processes under `root` (the `bentoml serve` process)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        for child in children.get(pid, []):
            stack.append(child)
            with contextlib.suppress(OSError):
                if b"_bentoml_impl.worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(child)
    return sorted(found)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Reference:
    """The pool of inputs and the offline answers for them."""

    def __init__(self, artifact: Path, seed: int = 0) -> None:
        import onnxruntime as ort

        manifest = json.loads((artifact / "manifest.json").read_text())
        if manifest["dataset"].get("name") == "mnist1d":
            from modeconn.training.core.networks import (
                load_data,  # the variant the manifest records
            )

            x_test = load_data(manifest["dataset"], "cpu").x_test.numpy().astype(np.float32)
            self.x = x_test[:POOL_ROWS]
            self.source = f"the artifact's MNIST-1D test set (its first {len(self.x)} samples)"
        else:
            low, high = manifest["input"]["range"]
            rng = np.random.default_rng(seed)
            self.x = rng.uniform(low, high, size=(POOL_ROWS, *manifest["input"]["shape"])).astype(np.float32)
            self.source = f"{POOL_ROWS} uniform samples in the manifest's input range"
        session = ort.InferenceSession(str(artifact / "ensemble.onnx"), providers=["CPUExecutionProvider"])
        self.probabilities = session.run(["probabilities"], {"x": self.x})[0]
        self.predictions = self.probabilities.argmax(axis=1)
        self.class_names = manifest["dataset"]["class_names"]
        self.bodies: dict[tuple[int, int], bytes] = {}

    def body(self, start: int, rows: int) -> bytes:
        key = (start, rows)
        if key not in self.bodies:
            self.bodies[key] = json.dumps({"inputs": self.x[start : start + rows].tolist()}).encode()
        return self.bodies[key]

    def is_right(self, start: int, rows: int, answer: dict[str, Any]) -> bool:
        expected = self.probabilities[start : start + rows]
        top = self.predictions[start : start + rows]
        got = np.asarray(answer.get("probabilities"), dtype=np.float64)
        return (
            got.shape == expected.shape
            and bool(np.all(np.abs(got - expected) <= ATOL))
            and answer.get("predictions") == top.tolist()
            and answer.get("labels") == [self.class_names[i] for i in top]
        )


async def client(port: int, ref: Reference, until: float, seed: int, out: dict[str, Any]) -> None:
    rng = random.Random(seed)
    conn = Connection(port)
    try:
        while time.monotonic() < until:
            rows = 8 if rng.random() < 0.2 else 1
            start = rng.randrange(len(ref.x) - rows + 1)
            started = time.perf_counter()
            try:
                status, payload = await conn.request("POST", "/predict", ref.body(start, rows))
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                out["errors"].append(f"{type(exc).__name__}: {exc}")
                await conn.close()
                continue
            out["latencies_s"].append(time.perf_counter() - started)
            out["statuses"][status] = out["statuses"].get(status, 0) + 1
            out["rows"] += rows
            if status != 200:
                out["errors"].append(f"HTTP {status}: {payload[:200]!r}")
            elif not ref.is_right(start, rows, json.loads(payload)):
                out["wrong"].append({"start": start, "rows": rows, "answer": payload[:300].decode(errors="replace")})
    finally:
        await conn.close()


async def load(port: int, ref: Reference, clients: int, seconds: float, pids: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"latencies_s": [], "statuses": {}, "errors": [], "wrong": [], "rows": 0, "rss_mib": []}
    started = time.monotonic()
    until = started + seconds

    async def sample_rss() -> None:
        while time.monotonic() < until:
            out["rss_mib"].append([round(time.monotonic() - started, 1), [rss_mib(p) for p in pids]])
            await asyncio.sleep(RSS_EVERY_S)

    cpu0 = time.process_time()
    sampler = asyncio.create_task(sample_rss())
    await asyncio.gather(*(client(port, ref, until, seed, out) for seed in range(clients)))
    await sampler
    out["seconds"] = time.monotonic() - started
    out["client_cpu_s"] = time.process_time() - cpu0
    return out


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="an exported artifact folder (default: build one)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measured runs back to back on the same server (RSS after each: growth or warm-up?)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup_seconds = 10.0, 2.0
    run = common.start_run("soak")
    run["quick"], run["command"] = args.quick, common.command_line()
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        if args.artifact:
            artifact, source = args.artifact, str(args.artifact)
        else:
            artifact, source = build_artifact(work, quick=False)
        ref = Reference(artifact)
        home = work / "bentoml"
        server = Server(home, store(artifact, home), work / "server.log")
        try:
            ready_s = server.wait_ready()
            pids = worker_pids(server.proc.pid)
            if not pids:
                raise RuntimeError(f"no worker process found under {server.proc.pid}")
            idle = [rss_mib(p) for p in pids]
            warm = asyncio.run(load(server.port, ref, args.clients, args.warmup_seconds, pids))
            rss = [[rss_mib(p) for p in pids]]  # after warm-up, then after each round
            rounds = []
            for _ in range(args.rounds):
                rounds.append(asyncio.run(load(server.port, ref, args.clients, args.seconds, pids)))
                rss.append([rss_mib(p) for p in pids])
            still = asyncio.run(load(server.port, ref, 1, 1.0, pids))
            alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        finally:
            server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run["artifact"] = source
    rows = []
    for i, result in enumerate(rounds):
        lat = result["latencies_s"]
        rows.append([i + 1, args.clients, round(result["seconds"], 1), len(lat), result["rows"],
                     len(lat) / result["seconds"], ", ".join(f"{k}: {v}" for k, v in sorted(result["statuses"].items())),
                     len(result["errors"]), len(result["wrong"]), common.percentile(lat, 50) * 1e3,
                     common.percentile(lat, 99) * 1e3, max(lat) * 1e3, result["client_cpu_s"]])
    common.add_section(
        run, f"{args.clients} keep-alive clients for {args.seconds:.0f} s, POST /predict",
        ["round", "clients", "seconds", "requests", "rows", "requests/s", "statuses", "errors", "wrong answers",
         "p50 ms", "p99 ms", "max ms", "client CPU s"], rows,
        notes=(f"Artifact: {source}. Server: the service's defaults (one worker, adaptive batching), ready in "
               f"{ready_s:.1f} s, then {args.warmup_seconds:.0f} s of the same load as warm-up (not counted: "
               f"{len(warm['latencies_s'])} requests, {len(warm['errors'])} errors, {len(warm['wrong'])} wrong). "
               f"A request holds 1 row (80 %) or 8 rows of {ref.source}; every answer is compared with onnxruntime's "
               f"offline ensemble.onnx output (probabilities within {ATOL}, predictions and labels equal). Client "
               "and server share this machine's cores; client CPU s is the client's share. After the last round "
               f"one more client for 1 s: {len(still['latencies_s'])} answers, {len(still['errors'])} errors, "
               f"{len(still['wrong'])} wrong."),
        # latencies to 10 us: the raw floats made the file 3 MB
        data=[{"latencies_s": [round(v, 5) for v in r["latencies_s"]], "errors": r["errors"][:50], "wrong": r["wrong"][:20]} for r in rounds])
    rss_rows = [[pid, idle[i], *(r[i] for r in rss), rss[-1][i] - rss[0][i], pid in alive] for i, pid in enumerate(pids)]
    common.add_section(
        run, "Worker memory (RSS, MiB)",
        ["worker pid", "idle after start", "after warm-up", *(f"after round {k + 1}" for k in range(len(rounds))),
         "growth over the rounds", "same process"], rss_rows,
        notes=f"Sampled every {RSS_EVERY_S:.0f} s during each round (seconds into the round: MiB per worker): "
              + " | ".join(f"round {k + 1}: " + "; ".join(f"{t}: {', '.join(f'{v:.1f}' for v in vs)}"
                                                      for t, vs in r["rss_mib"]) for k, r in enumerate(rounds)),
        data={"rss_mib": [r["rss_mib"] for r in rounds], "after": rss})
    errors = sum(len(r["errors"]) for r in rounds) + len(still["errors"])
    wrong = sum(len(r["wrong"]) for r in rounds) + len(still["wrong"])
    total = sum(len(r["latencies_s"]) for r in rounds)
    per_round = [max(rss[k + 1][i] - rss[k][i] for i in range(len(pids))) for k in range(len(rounds))]
    summary = "\n".join([
        "## Outcome", "",
        f"- {total} requests in {len(rounds)} x {args.seconds:.0f} s from {args.clients} clients: {errors} errors, "
        f"{wrong} wrong answers; p50 {rows[0][9]:.1f} ms, p99 {rows[0][10]:.1f} ms (round 1)",
        f"- worker RSS after warm-up {', '.join(f'{v:.1f}' for v in rss[0])} MiB, after the last round "
        f"{', '.join(f'{v:.1f}' for v in rss[-1])} MiB; growth per round (largest worker): "
        + ", ".join(f"{g:+.1f}" for g in per_round) + " MiB",
    ])
    common.write_results(run, summary=summary, out_dir=args.out)


if __name__ == "__main__":
    main()
