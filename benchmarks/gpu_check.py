"""The GPU path, checked on a machine with an NVIDIA GPU, in one run.

1. `modeconn pipeline` on CUDA (training, curve, FGE), export into a BentoML store.
2. The stored artifact with onnxruntime's CUDAExecutionProvider in this process: fused
   ensemble graph against the member graphs one after another, and the curve graph at a
   new t against one member graph, at batch 1, 64 and 1024; outputs against the CPU provider.
3. A real `bentoml serve` on CUDA: /info's providers, /predict and /predict_curve against
   the offline computation, p50/p99 latency at batch 1 with one client, 64 concurrent
   clients with adaptive batching on and off (every answer checked, errors counted).

Writes gpu-check-DATE.json and .md to --out (default benchmarks/results).
Usage: python benchmarks/gpu_check.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime as dt
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/ is on sys.path when a script here runs
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "modeconn-mnist1d"


def _timed(fn, repeats: int) -> float:  # noqa: ANN001
    """Median seconds of `fn()` after two warm-up calls."""
    return statistics.median(common.latencies(fn, repeats, warmup=2))


def run_pipeline(runs: Path, env: dict[str, str], quick: bool, device: str) -> dict[str, Any]:
    args = [sys.executable, "-m", "modeconn", "pipeline", "--config", "configs/mnist1d.yaml",
            "--device", device, "--runs", str(runs), "--json"]
    if quick:
        args += ["--set", "train.epochs=4", "--set", "curve.epochs=2", "--set", "fge.epochs=2"]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - start
    (runs / "pipeline.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"seconds": seconds, "summary": json.loads(proc.stdout.strip().splitlines()[-1])}


def in_process(artifact_dir: Path) -> dict[str, Any]:
    import onnxruntime as ort

    from modeconn.contract.artifact import load_artifact
    from modeconn.serving.runtime import CUDA_PROVIDER_OPTIONS

    artifact = load_artifact(artifact_dir)
    cuda = [("CUDAExecutionProvider", CUDA_PROVIDER_OPTIONS), "CPUExecutionProvider"]

    def session(path: Path, providers: list[Any]) -> Any:
        return ort.InferenceSession(str(path), providers=providers)

    ensemble, ensemble_cpu = session(artifact.ensemble_file, cuda), session(artifact.ensemble_file, ["CPUExecutionProvider"])
    members = [session(p, cuda) for p in artifact.member_files]
    curve = session(artifact.curve_file, cuda)
    rng = np.random.default_rng(0)
    low, high = artifact.manifest["input"]["range"]
    rows = []
    for n in (1, 64, 1024):
        x = rng.uniform(low, high, size=(n, *artifact.input_shape)).astype(np.float32)
        loop = _timed(lambda x=x: np.mean([m.run(None, {"x": x})[0] for m in members], axis=0), 50)
        fused = _timed(lambda x=x: ensemble.run(None, {"x": x}), 50)
        t_new = iter(np.linspace(0.013, 0.987, 1000, dtype=np.float32))  # a new t every call
        at_t = _timed(lambda x=x, ts=t_new: curve.run(None, {"x": x, "t": np.array([next(ts)], np.float32)}), 50)
        one_member = _timed(lambda x=x: members[0].run(None, {"x": x}), 50)
        rows.append({"batch": n, "member_loop_samples_per_s": n / loop, "fused_samples_per_s": n / fused,
                     "fused_speedup": loop / fused, "curve_ms": at_t * 1e3, "member_ms": one_member * 1e3,
                     "curve_over_member": at_t / one_member})
    x = rng.uniform(low, high, size=(256, *artifact.input_shape)).astype(np.float32)
    diff = float(np.abs(ensemble.run(None, {"x": x})[0] - ensemble_cpu.run(None, {"x": x})[0]).max())
    return {"providers": {"ensemble": ensemble.get_providers()[0], "curve": curve.get_providers()[0],
                          "members": sorted({m.get_providers()[0] for m in members})},
            "cuda_vs_cpu_max_abs_diff": diff, "rows": rows, "num_members": artifact.num_members}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(env: dict[str, str], log: Path, **extra: str) -> tuple[subprocess.Popen, str]:
    import requests

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "modeconn.serving.service:ModeConnService", "--port", str(port),
         "--host", "127.0.0.1"],
        cwd=ROOT, env={**env, **extra}, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    _stop(proc)
    raise SystemExit(f"server did not get ready:\n{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _load(url: str, xs: np.ndarray, expected: np.ndarray, clients: int, per_client: int) -> dict[str, Any]:
    import requests

    def client(c: int) -> tuple[int, int, float]:
        session, errors, worst = requests.Session(), 0, 0.0
        for r in range(per_client):
            i = (c * per_client + r) % len(xs)
            resp = session.post(f"{url}/predict", json={"inputs": xs[i:i + 1].tolist(), "calibrated": False}, timeout=60)
            if resp.status_code != 200:
                errors += 1
                continue
            worst = max(worst, float(np.abs(np.asarray(resp.json()["probabilities"]) - expected[i:i + 1]).max()))
        return per_client, errors, worst

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(client, range(clients)))
    seconds = time.perf_counter() - start
    total = sum(d[0] for d in done)
    return {"clients": clients, "requests": total, "errors": sum(d[1] for d in done),
            "requests_per_s": total / seconds, "max_abs_diff": max(d[2] for d in done)}


def http(env: dict[str, str], artifact_dir: Path, work: Path, quick: bool) -> dict[str, Any]:
    import onnxruntime as ort
    import requests

    from modeconn.contract.artifact import load_artifact

    artifact = load_artifact(artifact_dir)
    cpu = ort.InferenceSession(str(artifact.ensemble_file), providers=["CPUExecutionProvider"])
    curve_cpu = ort.InferenceSession(str(artifact.curve_file), providers=["CPUExecutionProvider"])
    low, high = artifact.manifest["input"]["range"]
    xs = np.random.default_rng(1).uniform(low, high, size=(512, *artifact.input_shape)).astype(np.float32)
    expected = cpu.run(None, {"x": xs})[0]
    per_client = 5 if quick else 30
    out: dict[str, Any] = {}
    proc, url = _serve(env, work / "serve-batching.log")
    try:
        info = requests.get(f"{url}/info", timeout=10).json()
        out["info_providers"] = info["execution_providers"]
        body = requests.post(f"{url}/predict", json={"inputs": xs[:64].tolist(), "calibrated": False}, timeout=30).json()
        out["predict_max_abs_diff"] = float(np.abs(np.asarray(body["probabilities"]) - expected[:64]).max())
        body = requests.post(f"{url}/predict_curve", json={"inputs": xs[:64].tolist(), "t": 0.3, "calibrated": False},
                             timeout=30).json()
        want = curve_cpu.run(None, {"x": xs[:64], "t": np.array([0.3], np.float32)})[0]
        out["predict_curve_max_abs_diff"] = float(np.abs(np.asarray(body["probabilities"]) - want).max())
        bad = requests.post(f"{url}/predict", json={"inputs": [[1.0] * 39]}, timeout=10)
        out["bad_input"] = {"status": bad.status_code, "body": bad.text[:200]}
        session = requests.Session()
        latencies = []
        for i in range(50 if quick else 300):
            start = time.perf_counter()
            session.post(f"{url}/predict", json={"inputs": xs[i % 512:i % 512 + 1].tolist()}, timeout=30)
            latencies.append(time.perf_counter() - start)
        out["http_batch1_ms"] = {"p50": 1e3 * float(np.percentile(latencies, 50)),
                                 "p99": 1e3 * float(np.percentile(latencies, 99))}
        out["batching_on"] = _load(url, xs, expected, 64, per_client)
        out["batcher_stats"] = requests.get(f"{url}/info", timeout=10).json()["batching"].get("stats")
    finally:
        _stop(proc)
    proc, url = _serve(env, work / "serve-plain.log", MODECONN_BATCHING="0")
    try:
        out["batching_off"] = _load(url, xs, expected, 64, per_client)
    finally:
        _stop(proc)
    out["batching_speedup"] = out["batching_on"]["requests_per_s"] / out["batching_off"]["requests_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="short budgets and fewer requests (a smoke run)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of the script itself")
    args = parser.parse_args()
    import torch  # first: on the GPU machines it brings the CUDA libraries onnxruntime loads

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this check is for a GPU machine")
    work = Path(tempfile.mkdtemp(prefix="modeconn-gpu-"))
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "MODECONN_MODEL": MODEL, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    os.environ.update({"BENTOML_HOME": env["BENTOML_HOME"], "BENTOML_DO_NOT_TRACK": "True"})
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (smoke run on the CPU)"
    report: dict[str, Any] = {"date": dt.date.today().isoformat(), "gpu": gpu,
                              "torch": torch.__version__}
    report["pipeline"] = run_pipeline(work / "runs", env, args.quick, args.device)
    artifact_dir = next((work / "bentoml" / "models" / MODEL).glob("*/manifest.json")).parent
    report["in_process"] = in_process(artifact_dir)
    report["http"] = http(env, artifact_dir, work, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu-check-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    for log in ("runs/pipeline.log", "serve-batching.log", "serve-plain.log"):
        if (work / log).exists():
            (args.out / Path(log).name).write_text((work / log).read_text()[-200_000:])
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
