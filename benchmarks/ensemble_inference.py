"""Ensemble inference, side by side.

Item 1, for the demo artifact (cnn1d on MNIST-1D) and a CIFAR-shaped ensemble (K = 8
PreResNet-20 with random weights and BN statistics, random 3x32x32 inputs): samples per
second at batch 1, 64 and 1024 of
  (a) member loop      K member sessions (members/*.onnx) one after another, mean in numpy
  (a') the same with the sessions' thread spinning off (idle pool threads of one session
                       otherwise compete with the next session's)
  (b) fused ensemble   ensemble.onnx as training/export/graphs.py's EnsembleGraph writes it now:
                       the K members one after another in one graph, 1D convs run as 2D
  (b0) fused, stacked  the design shipped before: the members stacked into one K-times-wide
                       network of grouped convs (benchmarks/ensemble_designs.py)
  (b1) fused, plain in turn   the first design: the members in turn, 1D convs left 1D
                       (benchmarks/ensemble_designs.py); 1D nets only
  (c) torch eager      PyTorch over the K models
with FLOPs per sample (FlopCounterMode: 2 x multiply-adds of conv/linear) and the achieved
GFLOP/s against this machine's fp32 matmul peak, measured in the same run.
Item 3: curve.onnx at a new t on every call against a member graph of the same architecture.
Also: onnxruntime session options on the fused graphs, and an onnxruntime profile of where
the time goes (batch 64).

Every ORT session is opened as serving/runtime.py opens it (ORT_ENABLE_ALL, default threads,
spinning on) unless a row says otherwise. Each way runs in a process of its own (this script with
--worker), driven round-robin over pipes: sessions in one process disturb each other (each
has its own intra-op thread pool, whose threads spin after a call), which made in-process
comparisons depend on which way ran after the member loop. Usage:
  python benchmarks/ensemble_inference.py [--quick] [--artifact DIR|TAG] [--members 8]
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common
import numpy as np
import onnxruntime as ort
import torch
from ensemble_designs import PlainInTurnEnsembleGraph, StackedEnsembleGraph
from torch import nn

from modeconn.models import build_model
from modeconn.training.curves.model import CurveModel
from modeconn.training.export import CurveGraph, EnsembleGraph, MemberGraph, Normalize, export_onnx

QUIET_NOTE = ("Each number is the median over the timing samples taken while other processes used < "
              f"{common.QUIET_CORES} cores ('quiet' counts them; all samples if fewer than 2 were quiet); "
              "spread = fastest/slowest of those vs the median.")
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


# ---------------------------------------------------------------- graphs
def session(path: Path, threads: int = 0, spinning: bool = True, parallel: int = 0,
            level: str = "all") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = parallel
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def conv_count(path: Path) -> int:
    import onnx

    return sum(node.op_type == "Conv" for node in onnx.load(str(path), load_external_data=False).graph.node)


def quiet_export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> float:
    started = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        export_onnx(module, args, path, inputs, outputs)
    return time.perf_counter() - started


# ---------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    input_shape: tuple[int, ...]
    members: list[Path]
    fused: Path
    member_flops: int  # per sample, one member
    stacked: Path | None = None
    plain_in_turn: Path | None = None
    nets_file: Path | None = None  # the torch nets and Normalize, for the eager worker
    curve: Path | None = None
    nets: list[nn.Module] | None = None
    normalize: Normalize | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def k(self) -> int:
        return len(self.members)


def randomize_bn(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Plausible BN statistics and affine parameters, so no layer is an identity."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=generator) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.data.copy_(torch.rand(m.num_features, generator=generator) * 0.2 - 0.1)
    return net.eval()


def bn_grid(nets: tuple[nn.Module, nn.Module], points: int) -> dict[str, torch.Tensor]:
    """A BN-statistics grid for CurveGraph: linear between the two ends (stand-in for recomputed ones)."""
    a, b = (dict(n.named_buffers()) for n in nets)
    ts = torch.linspace(0, 1, points)[:, None]
    return {k: (1 - ts) * a[k] + ts * b[k] for k in a if k.endswith(("running_mean", "running_var"))}


def synthetic_workload(name: str, arch: str, kwargs: dict, k: int, shape: tuple[int, ...], mean: list[float],
                       std: list[float], work: Path, with_curve: bool = True) -> Workload:
    """K random members of `arch`, exported as member graphs, both fused designs and a curve graph."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    nets = [randomize_bn(build_model(arch, num_classes=10, **kwargs), generator) for _ in range(k)]
    normalize = Normalize(mean, std, 1 + len(shape))
    example = torch.rand(2, *shape)
    folder = work / name
    members = []
    seconds: dict[str, float] = defaultdict(float)
    for i, net in enumerate(nets):
        members.append(folder / f"member-{i:03d}.onnx")
        seconds["members"] += quiet_export(MemberGraph(net, normalize), (example,), members[-1], ["x"], ["probabilities"])
    outputs = ["probabilities", "member_probabilities"]
    seconds["fused"] = quiet_export(EnsembleGraph(nets, normalize), (example,), folder / "ensemble.onnx", ["x"], outputs)
    stacked, plain_in_turn = folder / "ensemble-stacked.onnx", None
    seconds["stacked"] = quiet_export(StackedEnsembleGraph(nets, normalize), (example,), stacked, ["x"], outputs)
    if has_conv1d(nets[0]):
        plain_in_turn = folder / "ensemble-plain-in-turn.onnx"
        seconds["plain in turn"] = quiet_export(PlainInTurnEnsembleGraph(nets, normalize), (example,), plain_in_turn,
                                                ["x"], outputs)
    curve_path = None
    if with_curve:
        curve = CurveModel(copy.deepcopy(nets[0]), nets[0].state_dict(), nets[1].state_dict(), "bezier", 3)
        with torch.no_grad():  # a middle bend off the straight line, as after training
            curve.free_points.add_(0.01 * torch.randn(curve.free_points.shape, generator=generator))
        graph = CurveGraph(curve.eval(), bn_grid((nets[0], nets[1]), 61), 61, normalize)
        curve_path = folder / "curve.onnx"
        seconds["curve"] = quiet_export(graph, (example, torch.tensor([0.5])), curve_path, ["x", "t"], ["probabilities"])
    flops = common.flops_per_sample(lambda x: nets[0](normalize(x)), torch.rand(1, *shape))
    nets_file = folder / "nets.pt"
    torch.save({"nets": nets, "normalize": normalize}, nets_file)
    return Workload(name, shape, members, folder / "ensemble.onnx", flops, stacked, plain_in_turn, nets_file, curve_path,
                    nets, normalize, [f"export seconds: { {k: round(v, 1) for k, v in seconds.items()} }"])


def has_conv1d(net: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv1d) for m in net.modules())


def artifact_workload(spec: str | None, work: Path) -> Workload:
    """The demo artifact: a folder or BentoML tag, else a small real one built like the tests'."""
    from modeconn.contract.artifact import load_artifact
    from modeconn.training.core.networks import load_network

    notes = []
    if spec is None:
        from tests.support import build_test_artifact

        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            folder = build_test_artifact(work / "demo-artifact")
        notes.append(f"artifact built by tests/support.py (3 members: points of a short MNIST-1D curve) "
                     f"in {time.perf_counter() - started:.0f} s")
    elif Path(spec).is_dir():
        folder = Path(spec)
    else:
        from modeconn.contract.store import artifact_path_in_store

        folder = artifact_path_in_store(spec)
    artifact = load_artifact(folder)
    manifest = artifact.manifest
    members = [folder / m["file"] for m in manifest["members"]]
    fused = folder / manifest["ensemble"]["file"]
    nets = None
    sources = [Path(m.get("source", "")) for m in manifest["members"]]
    if all(s.is_file() for s in sources):
        nets = [load_network(s)[0] for s in sources]
    norm = manifest["input"]["normalization"]
    shape = tuple(manifest["input"]["shape"])
    normalize = Normalize(norm["mean"], norm["std"], 1 + len(shape))
    stacked = plain_in_turn = nets_file = None
    if nets is not None:
        outputs, example = ["probabilities", "member_probabilities"], (torch.rand(2, *shape),)
        stacked = work / "demo-stacked.onnx"
        quiet_export(StackedEnsembleGraph(nets, normalize), example, stacked, ["x"], outputs)
        if has_conv1d(nets[0]):
            plain_in_turn = work / "demo-plain-in-turn.onnx"
            quiet_export(PlainInTurnEnsembleGraph(nets, normalize), example, plain_in_turn, ["x"], outputs)
        nets_file = work / "demo-nets.pt"
        torch.save({"nets": nets, "normalize": normalize}, nets_file)
        flops = common.flops_per_sample(lambda x: nets[0](normalize(x)), torch.rand(1, *shape))
    else:
        notes.append("member checkpoints not found: no PyTorch eager or other-design rows")
        flops = 0
    name = f"demo artifact ({manifest['architecture']['name']}, {manifest['dataset']['name']})"
    notes.append(f"ensemble.onnx has {conv_count(fused)} Conv nodes, a member graph {conv_count(members[0])}")
    return Workload(name, shape, members, fused, flops, stacked, plain_in_turn, nets_file, artifact.curve_file, nets,
                    normalize, notes)


# ---------------------------------------------------------------- the ways
# ---------------------------------------------------------------- worker processes
def build_call(spec: dict[str, Any], batch: int) -> Any:
    """One call of a way at `batch` (inside a worker process)."""
    rng = np.random.default_rng(batch)
    x = rng.random((batch, *spec["shape"]), dtype=np.float32)
    kind, opts = spec["kind"], spec.get("options", {})
    if kind == "session":
        s = spec.setdefault("_sessions", [session(Path(spec["paths"][0]), **opts)])[0]
        return lambda: s.run(None, {"x": x})
    if kind == "curve":
        s = spec.setdefault("_sessions", [session(Path(spec["paths"][0]))])[0]
        return lambda: s.run(None, {"x": x, "t": rng.random(1, dtype=np.float32)})
    if kind in ("loop", "loop-threads"):
        sessions = spec.setdefault("_sessions", [session(Path(p), **opts) for p in spec["paths"]])
        if kind == "loop":
            return lambda: np.mean([s.run(None, {"x": x})[0] for s in sessions], axis=0)
        from concurrent.futures import ThreadPoolExecutor

        pool = spec.setdefault("_pool", ThreadPoolExecutor(len(os.sched_getaffinity(0))))
        return lambda: np.mean(list(pool.map(lambda s: s.run(None, {"x": x})[0], sessions)), axis=0)
    if kind == "torch":
        if "_nets" not in spec:
            spec["_nets"] = torch.load(spec["paths"][0], weights_only=False)
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        nets, normalize = spec["_nets"]["nets"], spec["_nets"]["normalize"]
        xt = torch.from_numpy(x)

        def eager() -> Any:
            with torch.inference_mode():
                z = normalize(xt)
                return torch.stack([torch.softmax(net(z), dim=1) for net in nets]).mean(dim=0)

        return eager
    raise ValueError(kind)


def worker() -> None:
    """`--worker`: read a spec line, answer 'sample BATCH MIN_S' with seconds per call."""
    spec = json.loads(sys.stdin.readline())
    calls: dict[int, Any] = {}
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            return
        batch, min_s = int(words[1]), float(words[2])
        if batch not in calls:
            calls[batch] = build_call(spec, batch)
            for _ in range(2):
                calls[batch]()
        fn, n, started = calls[batch], 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_s or n >= 1000:
                break
        print(elapsed / n, flush=True)


class Worker:
    """A way in its own process."""

    def __init__(self, kind: str, paths: list[Path], shape: tuple[int, ...], **options: Any) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=common.ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        spec = {"kind": kind, "paths": [str(p) for p in paths], "shape": list(shape), "options": options}
        self._send(json.dumps(spec))
        if self._read() != "ready":
            raise RuntimeError(f"worker for {kind} did not start")

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _read(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} died ({self.proc.poll()})")
        return line

    def sample(self, batch: int, min_s: float) -> float:
        self._send(f"sample {batch} {min_s}")
        return float(self._read())

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._send("quit")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(workers: dict[str, Worker], batch: int, rounds: int, min_s: float) -> dict[str, common.Samples]:
    """Round-robin samples of every worker at `batch`, after a warm-up call and a quiet wait."""
    monitor = common.CpuMonitor([w.proc.pid for w in workers.values()])
    for w in workers.values():
        w.sample(batch, 0.0)  # builds and warms this batch size
    common.wait_for_quiet(monitor, 20)
    samples = {name: common.Samples() for name in workers}
    for _ in range(rounds):
        for name, w in workers.items():
            time.sleep(0.05)
            before = monitor.snapshot()
            samples[name].seconds.append(w.sample(batch, min_s))
            samples[name].background.append(monitor.others(before, monitor.snapshot()))
    return samples


@contextlib.contextmanager
def started(workers: dict[str, Worker]) -> Any:
    try:
        yield workers
    finally:
        for w in workers.values():
            w.close()


def way_workers(w: Workload) -> dict[str, Worker]:
    out = {"(a) member loop": Worker("loop", w.members, w.input_shape),
           "(a') member loop, spinning off": Worker("loop", w.members, w.input_shape, spinning=False),
           "(b) fused ensemble.onnx": Worker("session", [w.fused], w.input_shape)}
    if w.stacked is not None:
        out["(b0) fused, stacked (before)"] = Worker("session", [w.stacked], w.input_shape)
    if w.plain_in_turn is not None:
        out["(b1) fused, plain in turn (first)"] = Worker("session", [w.plain_in_turn], w.input_shape)
    if w.nets_file is not None:
        out["(c) torch eager"] = Worker("torch", [w.nets_file], w.input_shape)
    return out


def parity(w: Workload) -> dict[str, float]:
    """Max |mean probabilities - the member loop's| at batch 64, in this process."""
    x = np.random.default_rng(0).random((64, *w.input_shape), dtype=np.float32)
    reference = np.mean([session(p).run(None, {"x": x})[0] for p in w.members], axis=0)
    out = {}
    for label, path in (("(b)", w.fused), ("(b0)", w.stacked), ("(b1)", w.plain_in_turn)):
        if path is not None:
            out[label] = float(np.abs(session(path).run(None, {"x": x})[0] - reference).max())
    if w.nets is not None:
        with torch.inference_mode():
            z = w.normalize(torch.from_numpy(x))
            eager = torch.stack([torch.softmax(net(z), dim=1) for net in w.nets]).mean(dim=0).numpy()
        out["(c)"] = float(np.abs(eager - reference).max())
    return out


def rounds_for(batch: int, quick: bool) -> tuple[int, float]:
    if quick:
        return 2, 0.05
    return (4, 0.25) if batch < 1024 else (2, 0.0)


def item1(run: dict, w: Workload, batches: list[int], peak: float, quick: bool) -> None:
    rows, data = [], {}
    flops = w.k * w.member_flops
    diffs = parity(w)
    with started(way_workers(w)) as workers:
        for batch in batches:
            times = measure(workers, batch, *rounds_for(batch, quick))
            base = times["(a) member loop"].value
            for name, t in times.items():
                sec = t.value
                gflops = flops * batch / sec / 1e9 if flops else float("nan")
                rows.append([w.name, w.k, batch, name, batch / sec, sec * 1e3, common.spread(t), t.quiet_count, gflops,
                             100 * gflops / peak, base / sec])
            data[batch] = {name: t.as_dict() for name, t in times.items()}
    common.add_section(
        run, f"Item 1: {w.name}, K = {w.k}",
        ["workload", "K", "batch", "way", "samples/s", "ms/call", "spread", "quiet", "GFLOP/s", "% matmul peak",
         "x member loop"],
        rows,
        notes=(f"FLOPs per sample: {flops / 1e6:.2f} MFLOP ({w.k} x {w.member_flops / 1e6:.2f}). "
               f"Matmul peak {peak:.1f} GFLOP/s. {QUIET_NOTE} Max |mean prob - member loop's| at batch 64: "
               + ", ".join(f"{k}={v:.1e}" for k, v in diffs.items()) + ". " + " ".join(w.notes)),
        data={"times_s": data, "flops_per_sample": flops, "parity": diffs},
    )


def options_sweep(run: dict, w: Workload, batch: int, quick: bool) -> None:
    """The fused graph under other onnxruntime session options, and the member loop in threads."""
    cores = len(os.sched_getaffinity(0))
    shape = w.input_shape
    workers = {f"fused, {label}": Worker("session", [w.fused], shape, **kw) for label, kw in (
        ("as serving (spinning on)", {}), ("spinning off", {"spinning": False}),
        ("ORT_ENABLE_EXTENDED (no NCHWc layout)", {"level": "extended"}), ("intra_op 1 thread", {"threads": 1}))}
    workers[f"fused, ORT_PARALLEL inter_op {cores} x intra_op 1"] = Worker("session", [w.fused], shape, threads=1,
                                                                          parallel=cores)
    if w.stacked is not None:
        workers["stacked design (before), as serving"] = Worker("session", [w.stacked], shape)
    workers[f"member loop, {cores} Python threads x intra_op 1"] = Worker("loop-threads", w.members, shape, threads=1)
    workers["member loop, spinning off"] = Worker("loop", w.members, shape, spinning=False)
    workers["member loop, as serving (spinning on)"] = Worker("loop", w.members, shape)
    with started(workers):
        times = measure(workers, batch, 2 if quick else 3, 0.05 if quick else 0.25)
    base = times["member loop, as serving (spinning on)"].value
    rows = [[w.name, batch, name, batch / t.value, t.value * 1e3, common.spread(t), t.quiet_count, base / t.value]
            for name, t in times.items()]
    common.add_section(run, f"Session options: {w.name}, K = {w.k}, batch {batch}",
                       ["workload", "batch", "variant", "samples/s", "ms/call", "spread", "quiet", "x member loop"],
                       rows, notes=QUIET_NOTE, data={name: t.as_dict() for name, t in times.items()})


def ort_profile(path: Path, x: np.ndarray, runs: int) -> dict[str, Any]:
    """onnxruntime's own per-node timing: ms per run by op type, and the costliest nodes."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"ort-profile-{os.getpid()}")
    s = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feeds = {"x": x}
    if any(i.name == "t" for i in s.get_inputs()):  # the curve graph, at an off-grid t
        feeds["t"] = np.array([0.4321], dtype=np.float32)
    for _ in range(runs + 1):
        s.run(None, feeds)
    trace = Path(s.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            by_op[op] += e["dur"] / 1e3 / (runs + 1)
            shapes = [list(d.values())[0] for d in e["args"].get("input_type_shape", [])[:2]]
            entry = nodes.setdefault(e["name"][: -len("_kernel_time")], [op, 0.0, shapes])
            entry[1] += e["dur"] / 1e3 / (runs + 1)
    total = sum(by_op.values())
    top = sorted(nodes.items(), key=lambda kv: -kv[1][1])[:6]
    return {"total_ms": total, "by_op_ms": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
            "top_nodes": [{"node": k, "op": v[0], "ms": v[1], "inputs": v[2]} for k, v in top]}


def profile_section(run: dict, w: Workload, batch: int, quick: bool) -> None:
    x = np.random.default_rng(2).random((batch, *w.input_shape), dtype=np.float32)
    runs = 2 if quick else 5
    graphs = {"member graph (one member)": w.members[0], "fused ensemble.onnx": w.fused}
    if w.stacked is not None:
        graphs["fused, stacked (before)"] = w.stacked
    if w.plain_in_turn is not None:
        graphs["fused, plain in turn (first)"] = w.plain_in_turn
    if w.curve is not None:
        graphs["curve.onnx (weights computed in the graph)"] = w.curve
    rows, data = [], {}
    for label, path in graphs.items():
        p = ort_profile(path, x, runs)
        data[label] = p
        scale = w.k if label.startswith("member") else 1
        shares = ", ".join(f"{op} {ms / p['total_ms'] * 100:.0f}%" for op, ms in list(p["by_op_ms"].items())[:4])
        rows.append([label, p["total_ms"], p["total_ms"] * scale, shares])
    common.add_section(
        run, f"Where the time goes: {w.name}, batch {batch} (onnxruntime profile)",
        ["graph", "kernel ms/run", f"x K ({w.k}) for the member", "top op types (after ORT fusions)"], rows,
        notes=("ORT fuses BN+ReLU into Conv and turns a BN it cannot fuse (pre-activation BN) into a depthwise "
               "1x1 Conv, so 'Conv' covers nearly everything. Costliest nodes are in the JSON."),
        data=data)


def item3(run: dict, w: Workload, batches: list[int], quick: bool) -> None:
    if w.curve is None:
        return
    rows, data = [], {}
    workers = {"member graph": Worker("session", [w.members[0]], w.input_shape),
               "curve.onnx, new t": Worker("curve", [w.curve], w.input_shape)}
    with started(workers):
        for batch in batches:
            n_rounds, min_s = rounds_for(batch, quick)
            times = measure(workers, batch, n_rounds + 1, min_s)
            m, c = times["member graph"].value, times["curve.onnx, new t"].value
            rows.append([w.name, batch, m * 1e3, c * 1e3, c / m, times["curve.onnx, new t"].quiet_count,
                         "<= 1.5" if batch == 64 else ""])
            data[batch] = {name: t.as_dict() for name, t in times.items()}
    common.add_section(run, f"Item 3: curve at any t, {w.name}",
                       ["workload", "batch", "member graph ms", "curve.onnx ms (new t per call)", "curve / member",
                        "quiet", "target"],
                       rows, notes=QUIET_NOTE, data={"times_s": data})


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--artifact", help="demo artifact folder or BentoML tag (default: build a small one)")
    parser.add_argument("--members", type=int, default=8, help="K of the CIFAR-shaped ensemble")
    parser.add_argument("--depth", type=int, default=20, help="PreResNet depth of the CIFAR-shaped ensemble")
    parser.add_argument("--keep", type=Path, help="keep the exported graphs in this folder")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    run = common.start_run("ensemble_inference")
    run["quick"], run["command"] = args.quick, common.command_line()
    work = Path(tempfile.mkdtemp(prefix="bench-ensemble-"))
    try:
        peak = common.matmul_peak(threads, args.quick)
        run["matmul_peak"] = peak
        print(f"fp32 matmul peak: {peak['gflops']} GFLOP/s ({peak['by']}, {threads} threads)", flush=True)
        if args.quick:
            demo = synthetic_workload("demo-shaped (cnn1d, random)", "cnn1d", {}, 3, (40,), [0.0], [1.0], work)
            cifar = synthetic_workload("CIFAR-shaped PreResNet-8 (random)", "preresnet", {"depth": 8}, 2,
                                       (3, 32, 32), CIFAR_MEAN, CIFAR_STD, work)
            batches = [1, 64]
        else:
            demo = artifact_workload(args.artifact, work)
            cifar = synthetic_workload(f"CIFAR-shaped PreResNet-{args.depth} (random)", "preresnet",
                                       {"depth": args.depth}, args.members, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, work)
            batches = [1, 64, 1024]
        for w in (demo, cifar):
            item1(run, w, batches, peak["gflops"], args.quick)
        for w in (demo, cifar):
            options_sweep(run, w, 64, args.quick)
        for w in (demo, cifar):
            profile_section(run, w, 64, args.quick)
        for w in (demo, cifar):
            item3(run, w, [1, 64], args.quick)
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.write_results(run, summary=summary(run), out_dir=args.out)


def summary(run: dict) -> str:
    """Targets: fused >= 2x the member loop at batch 64; >= 50 % of the matmul peak at batch >= 64;
    curve <= 1.5x a member at batch 64."""
    lines = ["## Targets", ""]
    for s in run["sections"]:
        if s["title"].startswith("Item 1"):
            for r in s["rows"]:
                if r[3].startswith("(b) ") and r[2] >= 64:
                    ok2 = r[10] >= 2 if r[2] == 64 else None
                    fair = next(x for x in s["rows"] if x[2] == r[2] and x[3].startswith("(a')"))
                    lines.append(f"- {r[0]}, batch {r[2]}: fused {r[10]:.2f}x the member loop "
                                 f"({r[10] / fair[10]:.2f}x the loop with spinning off)"
                                 + ("" if ok2 is None else f" (target >= 2x: {'met' if ok2 else 'MISSED'})")
                                 + f"; {r[9]:.0f} % of the matmul peak (target >= 50 %: {'met' if r[9] >= 50 else 'MISSED'})")
        if s["title"].startswith("Item 3"):
            for r in s["rows"]:
                if r[1] == 64:
                    lines.append(f"- {r[0]}, batch 64: curve.onnx {r[4]:.2f}x the member graph "
                                 f"(target <= 1.5x: {'met' if r[4] <= 1.5 else 'MISSED'})")
    return "\n".join(lines) if len(lines) > 2 else ""


if __name__ == "__main__":
    worker() if "--worker" in sys.argv else main()
