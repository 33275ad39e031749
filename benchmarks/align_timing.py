"""Permutation alignment: `modeconn align` time on demo networks, weight matching on PreResNet-164
shapes, and the straight line's barrier before and after alignment (eval-curve's reports).

    python benchmarks/align_timing.py --runs RUNS [--widths 16 32] [--quick]

RUNS holds, per cnn1d width W, `wW/train-seed0/final.pt`, `wW/train-seed1/final.pt` and the
curve between them evaluated by eval-curve, `wW/curve/curve.json` (the commands are in the
results file). Timing runs one after another in this process (run it under
`flock /tmp/modeconn-bench.lock`); the load average is recorded at the start and the end.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import common
import torch

from modeconn.models import build_model
from modeconn.training.core import statistics
from modeconn.training.curves.align import align_checkpoints, weight_matching
from modeconn.training.curves.permutations import derive_spec


def _demo_align(runs: Path, widths: list[int], repeats: int) -> list[list]:
    rows = []
    for width in widths:
        a, b = (runs / f"w{width}" / f"train-seed{s}" / "final.pt" for s in (0, 1))
        seconds, result = [], {}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(repeats):
                started = time.perf_counter()
                result = align_checkpoints(a, b, Path(tmp) / "aligned.pt")
                seconds.append(time.perf_counter() - started)
        rows.append([width, result["groups"], result["iterations"], f"{result['objective_before']:.1f}",
                     f"{result['objective_after']:.1f}", f"{common.median(seconds):.2f}",
                     f"{min(seconds):.2f}-{max(seconds):.2f}"])
    return rows


def _preresnet164(seeds: list[int]) -> list[list]:
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        a, b = build_model("preresnet", 10, depth=164), build_model("preresnet", 10, depth=164)
        started = time.perf_counter()
        spec = derive_spec(a, torch.zeros(2, 3, 32, 32))
        traced = time.perf_counter() - started
        learnable = {n for n, _ in a.named_parameters()}
        matching = weight_matching(spec, a.state_dict(), b.state_dict(), learnable, seed=seed)
        rows.append([seed, sum(p.numel() for p in a.parameters()), len(spec.sizes), max(spec.sizes.values()),
                     f"{traced:.2f}", matching.iterations, f"{matching.seconds:.2f}",
                     f"{matching.seconds / matching.iterations:.2f}",
                     f"{matching.objective_before:.1f} -> {matching.objective_after:.1f}"])
    return rows


def _interval(cell: dict) -> str:
    return statistics.Interval(**cell["error"]).text()


def _barriers(runs: Path, widths: list[int]) -> tuple[list[list], dict]:
    rows, data = [], {}
    for width in widths:
        report = json.loads((runs / f"w{width}" / "curve" / "curve.json").read_text())
        h, d = report["headline"], report["differences"]
        worse = max(h["start_test_error"], h["end_test_error"])
        data[width] = {"headline": h, "differences": d, "alignment": report["settings"].get("alignment"),
                       "test_size": report["test_size"]}
        rows.append([width, f"{h['start_test_error']:.2f} / {h['end_test_error']:.2f}",
                     f"{h['line_max_test_error']:.2f}", f"{h['aligned_line_max_test_error']:.2f}",
                     f"{h['curve_max_test_error']:.2f}",
                     _interval(d["line max - worse endpoint"]), _interval(d["aligned line max - worse endpoint"]),
                     f"{(h['aligned_line_max_test_error'] - worse) / max(h['line_max_test_error'] - worse, 1e-9):.2f}"])
    return rows, data


def main() -> None:
    parser = common.arguments(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of wW/ runs (see the docstring)")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32], help="cnn1d widths found in --runs")
    args = parser.parse_args()
    run = common.start_run("align")
    run["quick"], run["command"], run["threads"] = args.quick, common.command_line(), torch.get_num_threads()
    common.add_section(
        run, "`modeconn align` on the demo networks (cnn1d, seeds 0 and 1)",
        ["width", "groups", "sweeps", "objective before", "objective after", "seconds (median)", "range"],
        _demo_align(args.runs, args.widths, 1 if args.quick else 3),
        notes="Whole command: load both checkpoints, trace the network (torch.fx), weight matching until a sweep "
              "improves nothing, save. Objective: Σ <W_A, P(W_B)> over every learnable weight.")
    common.add_section(
        run, "Weight matching on PreResNet-164 shapes (random weights, 10 classes)",
        ["seed", "parameters", "groups", "largest group", "trace s", "sweeps", "matching s", "s per sweep",
         "objective"],
        _preresnet164([0] if args.quick else [0, 1]),
        notes="Random He-initialised weights (the timing depends on shapes, not values); matching on one thread.")
    rows, data = _barriers(args.runs, args.widths)
    test_size = next(iter(data.values()))["test_size"]
    common.add_section(
        run, "Straight line from A to B, before and after aligning B to A (eval-curve, 61 points, BN recomputed)",
        ["width", "ends test error %", "line max %", "aligned line max %", "Bezier curve max %",
         "line max − worse end (pp)", "aligned line max − worse end (pp)", "barrier left"],
        rows, data=data,
        notes=f"{test_size:,} test signals; `diff [low, high]`: 95 % paired bootstrap interval "
              "(training/core/statistics.py) of (error at the t of the largest test error) − (error of the worse "
              "end); that t is picked on the same test set, so the differences lean high. Barrier left: aligned "
              "barrier / unaligned barrier (max − worse end).")
    common.write_results(run, out_dir=args.out)


if __name__ == "__main__":
    main()
