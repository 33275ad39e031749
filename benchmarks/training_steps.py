"""Training cost, side by side.

1. One SGD step (forward, loss, backward, optimizer step, batch 128) of a curve (Bezier,
   3 bends, training/curves/model.py CurveModel with its L2 term, as `modeconn curve` trains it)
   against a plain network (as `modeconn train` trains it): the demo's cnn1d on MNIST-1D
   batches, and PreResNet-20 on random CIFAR-shaped batches. Steps are timed round-robin;
   a torch.profiler table says where the curve step's extra time goes.
2. An FGE epoch (`modeconn fge`: cyclical LR, a snapshot with BN recomputation every cycle)
   against a plain training epoch (`modeconn train`), from the runs' own per-epoch seconds.
3. `modeconn eval-curve`: seconds per evaluated point (each point: BN recomputation, train
   and test predictions; the curve and the straight line both count), with one point's
   parts timed separately.
4. The step options (training/core/step.py as `fit` runs them): fp32 vs bf16
   vs fp16 autocast, channels_last and torch.compile, plain step, on this CPU; the default is
   chosen from these numbers. `--options-only` runs this section alone (results file
   training_step_options-DATE).

Usage: python benchmarks/training_steps.py [--quick] [--options-only]
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch
import torch.nn.functional as F

from modeconn.models import build_model
from modeconn.training.core.config import load_config
from modeconn.training.curves.model import CurveModel

CONFIG = common.ROOT / "configs" / "mnist1d.yaml"


# ---------------------------------------------------------------- 1. steps
def step_pair(arch: str, kwargs: dict, batches: list[tuple[torch.Tensor, torch.Tensor]], wd: float) -> dict[str, Any]:
    """Callables for one plain and one curve step, set up as train.py / curve_train.py do."""
    torch.manual_seed(0)
    ends = [build_model(arch, num_classes=10, **kwargs).state_dict() for _ in range(2)]
    plain = build_model(arch, num_classes=10, **kwargs).train()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=wd)
    curve = CurveModel(build_model(arch, num_classes=10, **kwargs), ends[0], ends[1], "bezier", 3).train()
    curve_opt = torch.optim.SGD([curve.free_points], lr=0.01, momentum=0.9, weight_decay=0.0)
    it = {"plain": 0, "curve": 0}

    def plain_step() -> None:
        x, y = batches[it["plain"] % len(batches)]
        it["plain"] += 1
        loss = F.cross_entropy(plain(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    def curve_step() -> None:
        x, y = batches[it["curve"] % len(batches)]
        it["curve"] += 1
        loss = F.cross_entropy(curve(x), y) + 0.5 * wd * curve.last_l2
        curve_opt.zero_grad(set_to_none=True)
        loss.backward()
        curve_opt.step()

    parameters = sum(p.numel() for p in plain.parameters())
    return {"plain": plain_step, "curve": curve_step, "parameters": parameters, "curve_model": curve}


def curve_step_parts(curve: CurveModel, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median ms of the curve step's parts: weights at t, forward with them, backward, optimizer."""
    opt = torch.optim.SGD([curve.free_points], lr=0.01, momentum=0.9)
    y = torch.zeros(len(x), dtype=torch.long)
    parts: dict[str, list[float]] = {"weights w(t) (flat_weights + unflatten)": [], "forward (functional_call)": [],
                                     "backward": [], "optimizer step": []}
    for _ in range(rounds + 1):
        t0 = time.perf_counter()
        t = torch.rand(())
        weights = curve.unflatten(curve.flat_weights(t))
        t1 = time.perf_counter()
        out = torch.func.functional_call(curve.base, weights, (x,))
        loss = F.cross_entropy(out, y)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        for key, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key].append(v)
    return {k: common.median(v[1:]) * 1e3 for k, v in parts.items()}


def section_steps(run: dict, quick: bool) -> None:
    from modeconn.training.core.data import normalize, train_batches
    from modeconn.training.core.networks import load_data

    data = load_data({"name": "mnist1d"}, "cpu")
    gen = torch.Generator().manual_seed(0)
    mnist = [(x, y) for x, y in train_batches(data, 128, gen)][:20]
    cifar_x = torch.rand(4, 128, 3, 32, 32, generator=gen)
    cifar = [(normalize(x, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]), torch.randint(0, 10, (128,), generator=gen))
             for x in cifar_x]
    rows, data_out, profiles = [], {}, {}
    workloads = [("demo cnn1d, MNIST-1D", "cnn1d", {}, mnist, 5e-4),
                 ("PreResNet-20, CIFAR-shaped (random)", "preresnet", {"depth": 8 if quick else 20}, cifar, 3e-4)]
    for label, arch, kwargs, batches, wd in workloads:
        pair = step_pair(arch, kwargs, batches, wd)
        slow = arch != "cnn1d"
        rounds = (3 if slow else 10) if quick else (12 if slow else 40)
        times = common.interleaved({"plain step": pair["plain"], "curve step": pair["curve"]}, rounds, min_sample_s=0.0,
                                   warmup=2)
        p, c = times["plain step"].value, times["curve step"].value
        rows.append([label, pair["parameters"], p * 1e3, common.spread(times["plain step"]), c * 1e3,
                     common.spread(times["curve step"]), times["curve step"].quiet_count, c / p, "<= 1.3"])
        data_out[label] = {name: t.as_dict() for name, t in times.items()}
        profiles[label] = {"parts_ms": curve_step_parts(pair["curve_model"], batches[0][0], 3 if quick else 10),
                           "profile": profile_step(pair["curve"], 3 if quick else 5)}
    common.add_section(
        run, "Item 4a: curve step vs plain step (batch 128)",
        ["workload", "parameters", "plain ms", "spread", "curve ms", "spread", "quiet", "curve / plain", "target"],
        rows,
        notes=("Curve: Bezier, 3 bends, ends fixed (one trainable bend), loss + 0.5 wd ||w(t)||^2, as curve_train.py; "
               "plain: SGD with weight decay, as train.py. Steps alternate plain/curve; median of the samples."),
        data=data_out)
    prow = []
    for label, p in profiles.items():
        for part, ms in p["parts_ms"].items():
            prow.append([label, part, ms])
    common.add_section(run, "Item 4a: where the curve step's time goes", ["workload", "part", "ms (median)"], prow,
                       notes="Top operators of the curve step (torch.profiler, self CPU) are in the JSON.",
                       data=profiles)


def profile_step(step: Any, steps: int) -> list[dict[str, Any]]:
    from torch.profiler import profile

    step()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), profile() as prof:
        for _ in range(steps):
            step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in rows]


# ---------------------------------------------------------------- 4. step options
def option_step(arch: str, kwargs: dict, batches: list[tuple[torch.Tensor, torch.Tensor]], options: dict[str, Any],
                ) -> Any:
    """One plain step as `fit` runs it with `step` settings `options` (autocast wrapper, fp32
    loss, GradScaler, channels_last, compile)."""
    from modeconn.training.core.config import StepSettings
    from modeconn.training.core.step import grad_scaler, prepare_model, step_model

    settings = StepSettings(**options)
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10, **kwargs).train()
    prepare_model(model, settings, batches[0][0].dim())
    cpu = torch.device("cpu")
    run = step_model(model, settings, cpu, arch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = grad_scaler(settings, cpu)
    it = [0]

    def step() -> None:
        x, y = batches[it[0] % len(batches)]
        it[0] += 1
        loss = F.cross_entropy(run(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def section_options(run: dict, quick: bool, compile_too: bool = True, compile_only: bool = False) -> None:
    from modeconn.training.core.data import normalize, train_batches
    from modeconn.training.core.networks import load_data

    data = load_data({"name": "mnist1d"}, "cpu")
    gen = torch.Generator().manual_seed(0)
    mnist = [(x, y) for x, y in train_batches(data, 128, gen)][:20]
    cifar = [(normalize(torch.rand(128, 3, 32, 32, generator=gen), [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]),
              torch.randint(0, 10, (128,), generator=gen)) for _ in range(4)]
    depth = 8 if quick else 20
    workloads = [
        ("demo cnn1d, MNIST-1D", "cnn1d", {}, mnist,
         {"fp32": {}, "bf16": {"precision": "bf16"}, "fp16 + GradScaler": {"precision": "fp16"}}),
        (f"PreResNet-{depth}, CIFAR-shaped (random)", "preresnet", {"depth": depth}, cifar,
         {"fp32": {}, "bf16": {"precision": "bf16"}, "fp32 channels_last": {"channels_last": True},
          "bf16 channels_last": {"precision": "bf16", "channels_last": True}}),
    ]
    rows, out = [], {}
    for label, arch, kwargs, batches, variants in workloads:
        if compile_only:
            compile_row = measure_compile(arch, kwargs, batches, 2 if quick else 6)
            rows.append([label, "fp32 torch.compile", compile_row.get("step_ms", float("nan")), "",
                         compile_row["eager_ms"] / compile_row["step_ms"] if "step_ms" in compile_row else float("nan"),
                         "", compile_row["note"]])
            out[label] = {"compile": compile_row}
            continue
        steps = {name: option_step(arch, kwargs, batches, opts) for name, opts in variants.items()}
        slow = arch != "cnn1d"
        rounds = (2 if slow else 4) if quick else (8 if slow else 20)
        times = common.interleaved(steps, rounds, min_sample_s=0.0, warmup=2, quiet_wait_s=5.0)
        base = times["fp32"].value
        for name, t in times.items():
            rows.append([label, name, t.value * 1e3, common.spread(t), base / t.value, t.quiet_count, ""])
        out[label] = {name: t.as_dict() for name, t in times.items()}
        if not compile_too:
            continue
        compile_row = measure_compile(arch, kwargs, batches, 2 if quick else 6)
        rows.append([label, "fp32 torch.compile", compile_row.get("step_ms", float("nan")), "",
                     compile_row["eager_ms"] / compile_row["step_ms"] if "step_ms" in compile_row else float("nan"),
                     "", compile_row["note"]])
        out[label]["compile"] = compile_row
    common.add_section(
        run, "Item 14.6: step options on this CPU (plain step, batch 128; training/core/step.py)",
        ["workload", "step", "ms", "spread", "speed-up vs fp32", "quiet", "notes"], rows,
        notes=("Each variant is the step `fit` runs with those `step` settings: autocast forward, fp32 loss, "
               "GradScaler (fp16), channels_last model and inputs, torch.compile (inductor) of the model. "
               "Variants alternate round-robin; median of the samples. Compile time: the first three "
               "steps' seconds, which include compilation."),
        data=out)


def measure_compile(arch: str, kwargs: dict, batches: list, rounds: int) -> dict[str, Any]:
    """Seconds of compiling (the first three compiled steps), then the compiled step against the
    eager fp32 step, round-robin."""
    from modeconn.training.core.config import ConfigError

    started = time.perf_counter()
    try:
        step = option_step(arch, kwargs, batches, {"compile": True})
        for _ in range(3):
            step()
    except ConfigError as err:
        return {"note": f"compile unavailable: {err}"}
    first = time.perf_counter() - started
    times = common.interleaved({"eager": option_step(arch, kwargs, batches, {}), "compiled": step}, rounds,
                               min_sample_s=0.0, warmup=1, quiet_wait_s=5.0)
    ms, eager_ms = times["compiled"].value * 1e3, times["eager"].value * 1e3
    return {"step_ms": ms, "eager_ms": eager_ms, "compile_s": first,
            "samples": {name: t.as_dict() for name, t in times.items()},
            "note": f"compile + first 3 steps {first:.1f} s; round-robin with eager fp32 ({eager_ms:.0f} ms here)"}


# ---------------------------------------------------------------- 2. and 3. epochs and eval-curve
def epoch_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def section_epochs(run: dict, work: Path, quick: bool) -> None:
    from modeconn.training.core.bn import recompute_bn
    from modeconn.training.core.networks import load_data, predict_probs
    from modeconn.training.curves.evaluate import evaluate_curve
    from modeconn.training.curves.fit import fit_curve, load_curve
    from modeconn.training.curves.model import network_at
    from modeconn.training.ensembles.fge import run_fge

    epochs = 2 if quick else 4
    overrides = {"device": "cpu", "train.epochs": epochs, "train.save_every": 1, "fge.epochs": epochs,
                 "fge.cycle_epochs": 2, "curve.epochs": 1 if quick else 2}
    quiet = contextlib.redirect_stderr(io.StringIO())
    with quiet:
        trained = []
        for seed in (0, 1):
            config = load_config(CONFIG, {**overrides, "seed": seed})
            from modeconn.training.train import train_network

            trained.append(train_network(config, work / f"train{seed}"))
        config = load_config(CONFIG, overrides)
        start = work / "train0" / "checkpoints" / f"epoch-{epochs:04d}.pt"
        fge = run_fge(config, start, work / "fge")
        curve = fit_curve(config, Path(trained[0]["checkpoint"]), Path(trained[1]["checkpoint"]), work / "curve")
    train_rows, fge_rows, curve_rows = (epoch_rows(work / d) for d in ("train0", "fge", "curve"))
    plain_epoch = common.median([r["seconds"] for r in train_rows])
    fge_epoch = sum(r["seconds"] for r in fge_rows) / len(fge_rows)
    curve_epoch = common.median([r["seconds"] for r in curve_rows])
    snapshots = fge.get("snapshots", "?")
    rows = [
        ["plain epoch (modeconn train)", plain_epoch, 1.0, f"{len(train_rows)} epochs; median; test eval each epoch"],
        ["FGE epoch (modeconn fge)", fge_epoch, fge_epoch / plain_epoch,
         f"{len(fge_rows)} epochs, cycle 2 epochs, {snapshots} snapshot(s) with BN recomputation; mean; "
         f"per epoch {[round(r['seconds'], 2) for r in fge_rows]}"],
        ["curve epoch (modeconn curve)", curve_epoch, curve_epoch / plain_epoch, f"{len(curve_rows)} epochs; median"],
    ]
    common.add_section(run, "Item 4b: FGE epoch vs plain epoch (demo: cnn1d, MNIST-1D, batch 128, CPU)",
                       ["run", "seconds per epoch", "x plain", "notes"], rows,
                       data={"train": train_rows, "fge": fge_rows, "curve": curve_rows,
                             "fge_total_seconds": fge.get("seconds")})

    points = 3 if quick else 11
    with contextlib.redirect_stderr(io.StringIO()):
        result = evaluate_curve(Path(curve["checkpoint"]), points=points, out_dir=work / "eval", device="cpu")
    per_point = result["seconds"] / (2 * points)
    # one point's parts, as evaluate_point runs them
    model, state = load_curve(Path(curve["checkpoint"]))
    data = load_data(state["dataset"], "cpu")
    parts: dict[str, list[float]] = {"network_at (weights at t)": [], "recompute_bn (one pass over train)": [],
                                     "predict train split": [], "predict test split": []}
    for t in (0.3, 0.6, 0.9):
        t0 = time.perf_counter()
        net = network_at(model, t)
        t1 = time.perf_counter()
        recompute_bn(net, data).eval()
        t2 = time.perf_counter()
        predict_probs(net, data, "train")
        t3 = time.perf_counter()
        predict_probs(net, data, "test")
        t4 = time.perf_counter()
        for key, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[key].append(v)
    part_ms = {k: common.median(v) for k, v in parts.items()}
    rows = [["eval-curve, whole command", points, 2 * points, result["seconds"], per_point,
             f"train {len(data.y_train)} / test {len(data.y_test)} samples"]]
    rows += [[f"  one point: {k}", "", "", "", v, ""] for k, v in part_ms.items()]
    rows.append(["  rest (plot, files, line/curve setup, per-point metrics)", "", "", "",
                 per_point - sum(part_ms.values()), "per point"])
    common.add_section(run, "Item 4c: eval-curve, seconds per evaluated point (demo curve)",
                       ["what", "points", "evaluated (curve + line)", "seconds", "seconds per point", "notes"], rows,
                       data={"seconds": result["seconds"], "points": points, "parts_s": parts})


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--options-only", action="store_true", help="only section 4 (precision, channels_last, compile)")
    parser.add_argument("--no-compile", action="store_true", help="section 4 without torch.compile (minutes of compiling)")
    parser.add_argument("--compile-only", action="store_true", help="section 4: only torch.compile against eager fp32")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: every core; 1 is steadier on a loaded machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.options_only or args.compile_only:
        run = common.start_run("training_step_compile" if args.compile_only else "training_step_options")
        run["quick"], run["command"], run["torch_threads"] = args.quick, common.command_line(), torch.get_num_threads()
        section_options(run, args.quick, compile_too=not args.no_compile, compile_only=args.compile_only)
        common.write_results(run, out_dir=args.out)
        return
    run = common.start_run("training_steps")
    run["quick"], run["command"] = args.quick, common.command_line()
    run["torch_threads"] = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="bench-training-"))
    try:
        section_steps(run, args.quick)
        section_epochs(run, work, args.quick)
        section_options(run, args.quick, compile_too=not args.no_compile)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.write_results(run, summary=summary(run), out_dir=args.out)


def summary(run: dict) -> str:
    lines = ["## Targets", ""]
    for s in run["sections"]:
        if s["title"].startswith("Item 4a: curve step"):
            for r in s["rows"]:
                lines.append(f"- {r[0]}: curve step {r[7]:.2f}x the plain step (target <= 1.3x: "
                             f"{'met' if r[7] <= 1.3 else 'MISSED'})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
