"""The curve at any t, and the ensemble graph measured fairly.

Item 3, per workload and batch size, seconds per call of
  (m) member graph           members/member-000.onnx
  (c) curve.onnx, new t      the exported graph, a new t on every call
  (n) NCHWc rewrite, new t   curve.onnx rewritten for onnxruntime's blocked convolutions, BN
                             folded into them (serving/nchwc.py): the service's general graph on CPU
  (n0) ..., BN not folded    the same rewrite with the BatchNormalization nodes left as they are
  (f) fixed-t, repeated t    a cached fixed-t session (serving/fixed_t.py): w(t) constants
  (s) service path, new t    Runtime.run_curve at a new t each call: the general graph (a t
                             is built only once it was asked for twice: MODECONN_CURVE_BUILD_AFTER)
  (s1) ..., building at once the same with a build started at every first miss (BUILD_AFTER=1):
                             the background builds compete with the requests
and the time to build one fixed-t session. Targets at batch 64: (f) <= 1.2x (m), new t <= 2x.
(curve.onnx with its 1D convs as 2D, weights still per call, took more CPU than (c):
benchmarks/results/curve_inference-2026-12-02.md, way (g); it is no longer measured.)
Every session here runs with onnxruntime's spinning OFF (idle pool threads do not busy-wait),
all in this process, sampled round-robin after waiting (at most 30 s) for a quiet machine:
the same settings for every way. Besides wall time, each sample records this process's CPU
time per call (all threads): with spinning off that is the work a call does, which other
processes on a shared machine do not inflate the way they inflate wall time (they take
the cores; they do not add instructions), so the "CPU" ratios are the ones to read when
the `quiet` column is low.

Item 4, ensemble.onnx against the loop over the K member sessions (mean in numpy), batch 1,
64 and 1024: in this process with spinning off for every session, and each in its own
process (benchmarks/ensemble_inference.py's workers) with spinning off and on.
Usage: python benchmarks/curve_inference.py [--quick] [--artifact DIR|TAG] [--members 8]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import onnxruntime as ort
from ensemble_inference import (
    CIFAR_MEAN,
    CIFAR_STD,
    Worker,
    Workload,
    artifact_workload,
    measure,
    started,
)
from ensemble_inference import synthetic_workload as synthetic

from modeconn.contract.artifact import Artifact, load_artifact
from modeconn.serving import nchwc
from modeconn.serving.runtime import Runtime, SessionSettings

OFF = SessionSettings(threads=0, spinning=False)
NOTE = ("Median seconds per call over the samples taken while other processes used < "
        f"{common.QUIET_CORES} cores ('quiet' counts them); spread = fastest/slowest vs the median.")


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def session(source: Path | bytes) -> ort.InferenceSession:
    model = str(source) if isinstance(source, Path) else source
    return ort.InferenceSession(model, sess_options=session_options(), providers=["CPUExecutionProvider"])


def interleaved(cases: dict[str, Any], rounds: int, min_s: float) -> dict[str, dict[str, Any]]:
    """common.interleaved, also recording this process's CPU seconds per call."""
    monitor = common.CpuMonitor()
    for fn in cases.values():
        fn()
    common.wait_for_quiet(monitor, 30)
    out = {name: {"wall": common.Samples(), "cpu": []} for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            time.sleep(0.05)
            calls, before, cpu0 = 0, monitor.snapshot(), time.process_time()
            while True:
                fn()
                calls += 1
                if time.perf_counter() - before[0] >= min_s:
                    break
            after, cpu1 = monitor.snapshot(), time.process_time()
            out[name]["wall"].seconds.append((after[0] - before[0]) / calls)
            out[name]["wall"].background.append(monitor.others(before, after))
            out[name]["cpu"].append((cpu1 - cpu0) / calls)
    return out


def stand_in_artifact(w: Workload) -> Artifact:
    """serving's Runtime wants an Artifact; the synthetic workload has the graphs, not a manifest."""
    return Artifact(root=w.fused.parent, manifest={}, spec=None, name=w.name,  # type: ignore[arg-type]
                    class_names=tuple(map(str, range(10))),
                    input_shape=w.input_shape, input_dtype="float32", input_range=(0.0, 1.0),
                    member_files=tuple(w.members), ensemble_file=w.fused, curve_file=w.curve)


def item3(run: dict, w: Workload, artifact: Artifact, batches: list[int], quick: bool) -> None:
    runtime = Runtime(artifact, ["CPUExecutionProvider"], OFF, curve_cache=4)
    eager = Runtime(artifact, ["CPUExecutionProvider"], OFF, curve_cache=4, curve_build_after=1)
    cache = runtime.curve_cache
    assert cache is not None and runtime.curve is not None
    member, exported = session(w.members[0]), session(w.curve)
    fixed = cache.build_now(0.37)
    block = nchwc.block_size()
    assert block is not None and runtime.curve_blocked, "no NCHWc kernels on this CPU: nothing to compare"
    blocked = session(nchwc.nchwc_graph(w.curve, block))
    unfolded = session(nchwc.nchwc_graph(w.curve, block, fold_bn=False))
    rng = np.random.default_rng(0)
    rows, data = [], {}
    for batch in batches:
        x = rng.random((batch, *w.input_shape), dtype=np.float32)

        def new_t() -> np.ndarray:
            return np.array([rng.uniform(0.01, 0.99)], dtype=np.float32)

        ways = {
            "(m) member graph": lambda x=x: member.run(None, {"x": x}),
            "(c) curve.onnx, new t": lambda x=x: exported.run(None, {"x": x, "t": new_t()}),
            "(n) NCHWc rewrite, new t": lambda x=x: blocked.run(None, {"x": x, "t": new_t()}),
            "(n0) NCHWc rewrite, BN not folded, new t": lambda x=x: unfolded.run(None, {"x": x, "t": new_t()}),
            "(f) fixed-t, repeated t": lambda x=x: fixed.run(None, {"x": x}),
            "(s) service path, new t": lambda x=x: runtime.run_curve(float(new_t()[0]), x),
            "(s1) service path, new t, building at once": lambda x=x: eager.run_curve(float(new_t()[0]), x),
        }
        min_s = 0.05 if quick else (0.3 if batch < 1024 else 0.0)
        times = interleaved(ways, rounds=2 if quick else 5, min_s=min_s)
        base, base_cpu = times["(m) member graph"]["wall"].value, np.median(times["(m) member graph"]["cpu"])
        for name, t in times.items():
            wall, cpu = t["wall"], float(np.median(t["cpu"]))
            rows.append([w.name, batch, name, wall.value * 1e3, wall.value / base, cpu * 1e3, cpu / base_cpu,
                         common.spread(wall), wall.quiet_count])
        data[batch] = {name: {"wall": t["wall"].as_dict(), "cpu_s": t["cpu"]} for name, t in times.items()}
    builds = []
    for t in np.linspace(0.05, 0.95, 3 if quick else 10):
        began = time.perf_counter()
        cache.build_now(float(t))
        builds.append(time.perf_counter() - began)
    at = {"x": x, "t": np.array([0.37], np.float32)}
    diff = float(np.abs(fixed.run(None, {"x": x})[0] - exported.run(None, at)[0]).max())
    diff_n = float(np.abs(blocked.run(None, at)[0] - exported.run(None, at)[0]).max())
    runtime.close()
    eager.close()
    common.add_section(
        run, f"Item 3: curve at any t, {w.name}",
        ["workload", "batch", "way", "ms/call", "x member", "CPU ms/call", "CPU x member", "spread", "quiet"],
        rows,
        notes=(f"{NOTE} Every session: intra-op threads onnxruntime's default (one per core, "
               f"{os.cpu_count()}), spinning off. Building one fixed-t session: median {np.median(builds) * 1e3:.1f} ms "
               f"({len(builds)} builds). Max |fixed-t - curve.onnx| at t = 0.37: {diff:.1e}; "
               f"max |NCHWc rewrite - curve.onnx|: {diff_n:.1e} (NCHWc block {block})."),
        data={"times_s": data, "build_s": builds, "max_abs_diff": diff, "max_abs_diff_nchwc": diff_n,
              "nchwc_block": block})


def item4(run: dict, w: Workload, batches: list[int], quick: bool) -> None:
    members = [session(p) for p in w.members]
    fused = session(w.fused)
    rng = np.random.default_rng(1)
    rows, data = [], {}
    with started({
        "loop, own process, spinning off": Worker("loop", w.members, w.input_shape, spinning=False),
        "loop, own process, spinning on": Worker("loop", w.members, w.input_shape),
        "ensemble.onnx, own process, spinning off": Worker("session", [w.fused], w.input_shape, spinning=False),
        "ensemble.onnx, own process, spinning on": Worker("session", [w.fused], w.input_shape),
    }) as workers:
        for batch in batches:
            x = rng.random((batch, *w.input_shape), dtype=np.float32)
            min_s = 0.05 if quick else (0.3 if batch < 1024 else 0.0)
            rounds = 2 if quick else (5 if batch < 1024 else 3)
            here = interleaved({
                "loop, this process, spinning off":
                    lambda x=x: np.mean([s.run(None, {"x": x})[0] for s in members], axis=0),
                "ensemble.onnx, this process, spinning off": lambda x=x: fused.run(None, {"x": x}),
            }, rounds=rounds, min_s=min_s)
            cpu = {name: float(np.median(t["cpu"])) for name, t in here.items()}
            own = measure(workers, batch, rounds, min_s)
            times = {**{name: t["wall"] for name, t in here.items()}, **own}
            for loop_name, fused_name in (("loop, this process, spinning off", "ensemble.onnx, this process, spinning off"),
                                          ("loop, own process, spinning off", "ensemble.onnx, own process, spinning off"),
                                          ("loop, own process, spinning on", "ensemble.onnx, own process, spinning on")):
                lo, fu = times[loop_name], times[fused_name]
                cpu_ratio = cpu[loop_name] / cpu[fused_name] if loop_name in cpu else float("nan")
                rows.append([w.name, w.k, batch, fused_name.split(", ", 1)[1], lo.value * 1e3, fu.value * 1e3,
                             lo.value / fu.value, cpu_ratio, f"{lo.quiet_count} / {fu.quiet_count}"])
            data[batch] = {**{name: t.as_dict() for name, t in times.items()}, "cpu_s": cpu}
    common.add_section(
        run, f"Item 4: ensemble.onnx vs the member loop, fairly, {w.name}",
        ["workload", "K", "batch", "how", "loop ms", "ensemble.onnx ms", "loop / ensemble", "CPU loop / ensemble",
         "quiet"], rows,
        notes=NOTE + " 'own process': each way in a process of its own, measured round-robin (wall time only). "
        "CPU: this process's CPU seconds per call (spinning off: the work done).",
        data={"times_s": data})


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--artifact", help="demo artifact folder or BentoML tag (default: build a small one)")
    parser.add_argument("--members", type=int, default=8, help="K of the CIFAR-shaped ensemble")
    parser.add_argument("--skip-cifar", action="store_true", help="only the demo artifact")
    parser.add_argument("--items", default="3,4", help="which items to run (default 3,4)")
    parser.add_argument("--cifar-batch-max", type=int, default=1024, help="largest CIFAR batch of item 4")
    args = parser.parse_args()
    run = common.start_run("curve_inference" if args.items == "3,4" else f"curve_inference-items{args.items.replace(',', '')}")
    run["quick"], run["command"] = args.quick, common.command_line()
    work = Path(tempfile.mkdtemp(prefix="bench-curve-"))
    try:
        items = set(args.items.split(","))
        run["items"] = sorted(items)
        demo = artifact_workload(args.artifact, work)
        if "3" in items:
            item3(run, demo, load_artifact(demo.fused.parent), [1, 64] if args.quick else [1, 64, 1024], args.quick)
        if "4" in items:
            item4(run, demo, [1, 64] if args.quick else [1, 64, 1024], args.quick)
        if not args.skip_cifar:
            with contextlib.redirect_stdout(sys.stderr):
                cifar = synthetic(f"CIFAR-shaped PreResNet-20 (random), K = {args.members}", "preresnet",
                                  {"depth": 20}, args.members, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, work)
            if "3" in items:
                item3(run, cifar, stand_in_artifact(cifar), [1, 64], args.quick)
            if "4" in items:  # batch 1024 of K = 8 PreResNet-20s: seconds per call on 2 cores
                item4(run, cifar, [1, 64] if args.quick or args.cifar_batch_max < 1024 else [1, 64, 1024],
                      args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.write_results(run, summary=summary(run), out_dir=args.out)


def summary(run: dict) -> str:
    lines = ["## Targets (batch 64)", ""]
    for s in run["sections"]:
        if s["title"].startswith("Item 3"):
            at64 = {r[2]: r[4] for r in s["rows"] if r[1] == 64}
            cpu64 = {r[2]: r[6] for r in s["rows"] if r[1] == 64}
            fixed, new = at64["(f) fixed-t, repeated t"], at64["(s) service path, new t"]
            lines.append(f"- {s['title'][len('Item 3: curve at any t, '):]}: repeated t {fixed:.2f}x a member "
                         f"(CPU {cpu64['(f) fixed-t, repeated t']:.2f}x; target <= 1.2x: "
                         f"{'met' if fixed <= 1.2 else 'MISSED'}); new t {new:.2f}x (CPU "
                         f"{cpu64['(s) service path, new t']:.2f}x; target <= 2x: {'met' if new <= 2 else 'MISSED'}); "
                         f"its graph, the NCHWc rewrite, {at64['(n) NCHWc rewrite, new t']:.2f}x (CPU "
                         f"{cpu64['(n) NCHWc rewrite, new t']:.2f}x); "
                         f"curve.onnx as exported {at64['(c) curve.onnx, new t']:.2f}x (CPU "
                         f"{cpu64['(c) curve.onnx, new t']:.2f}x)")
        if s["title"].startswith("Item 4"):
            for r in s["rows"]:
                lines.append(f"- {r[0]}, batch {r[2]}, {r[3]}: the loop takes {r[6]:.2f}x ensemble.onnx's time"
                             + ("" if r[7] != r[7] else f" ({r[7]:.2f}x its CPU time)"))
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torch (exports) must not spin beside the sessions
    main()
