"""SWA beside FGE and the single network, and the time of `modeconn plane` at G = 21, on the demo.

    python benchmarks/swa_plane.py --runs RUNS [--grid 21] [--out benchmarks/results]

RUNS holds the demo's stages as the pipeline names them: train-seed0/ (the single network, whose
epoch-24 checkpoint FGE started from), fge/ (its snapshots) and curve/ (the Bezier curve). SWA is
`modeconn swa RUNS/fge`; the plane is `modeconn plane RUNS/curve --grid G`, run as its own
process and timed wall-clock from start to exit (start-up included), with the load average
before and after: on a shared machine the time says as much about the neighbours as about the
command. Writes swa_plane-DATE.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modeconn.training.core import provenance, statistics  # noqa: E402
from modeconn.training.core.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402
from modeconn.training.core.metrics import classification_metrics  # noqa: E402
from modeconn.training.core.networks import load_network, predict_probs  # noqa: E402
from modeconn.training.ensembles.evaluate import ensemble_probs, expand_members, predict_members  # noqa: E402
from modeconn.training.ensembles.swa import run_swa  # noqa: E402


def swa_rows(runs: Path, work: Path) -> dict:
    """Test metrics of the single network, the FGE ensemble and SWA, and SWA's intervals against both."""
    single = predict_members([runs / "train-seed0" / "final.pt"], "cpu")
    data, labels = single.data, single.data.y_test
    fge = predict_members(expand_members([runs / "fge"]), "cpu", data)
    swa = run_swa([runs / "fge"], work / "swa.pt", device="cpu")
    net, _ = load_network(work / "swa.pt")
    probs = {"single network": single.probs[0].double(), f"FGE ensemble ({len(fge.paths)} snapshots)":
             ensemble_probs(fge.probs), f"SWA (average of the {len(fge.paths)} snapshots)":
             predict_probs(net, data, "test").double()}
    names = list(probs)
    return {
        "metrics": {name: classification_metrics(p, labels) for name, p in probs.items()},
        "differences": {f"SWA − {names[k]}": statistics.intervals_json(statistics.compare_probs(probs[names[2]],
                                                                                                probs[names[k]], labels))
                        for k in (0, 1)},
        "swa_seconds": swa["seconds"],
        "test_size": len(labels),
    }


def time_plane(runs: Path, grid: int, work: Path, split: str) -> dict:
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "modeconn", "plane", str(runs / "curve"), "--grid", str(grid),
                           "--out", str(work / f"plane-{split}"), "--device", "cpu", "--split", split, "--json"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          check=True)
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # CPU time (user + system) of the process: what the work costs whatever the neighbours do;
    # on an idle machine the wall time is about this over the cores it keeps busy
    return {"grid": grid, "split": split, "wall_seconds": seconds, "command_seconds": report["seconds"], "cpu_seconds": cpu,
            "threads": os.environ.get("OMP_NUM_THREADS", "default (torch: one per core)"),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
            "points": report["points"], "line_max_error": report[f"line_max_{split}_error"],
            "plane_min_error": report[f"plane_min_{split}_error"], "dx": report["dx"], "dy": report["dy"]}


def markdown(result: dict) -> str:
    info, plane = result["provenance"], result["plane"]
    lines = ["**SWA and the plane on the demo** (`benchmarks/swa_plane.py`)", "", *provenance.markdown_lines(info), "",
             "| model | test error % | NLL | ECE | Brier |", "|---|---|---|---|---|"]
    for name, m in result["swa"]["metrics"].items():
        lines.append(f"| {name} | {m['error']:.2f} | {m['nll']:.4f} | {m['ece']:.4f} | {m['brier']:.4f} |")
    lines += ["", "| difference | error (pp) | NLL | Brier |", "|---|---|---|---|"]
    for name, cell in result["swa"]["differences"].items():
        cells = [statistics.Interval(**cell[k]).text(statistics.DIGITS[k]) for k in statistics.LOSSES]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    split = plane["split"]
    at = ", ".join(f"{p['label']} {p[f'{split}_error']:.2f} %" for p in plane["points"])
    lines += ["", f"`modeconn plane RUNS/curve --grid {plane['grid']} --split {split}` ({plane['grid'] ** 2} grid points, BN recomputed at "
              f"each): {plane['wall_seconds']:.0f} s wall from start to exit ({plane['command_seconds']:.0f} s in the "
              f"command), {plane['cpu_seconds']:.0f} s of CPU time, threads {plane['threads']}, load average {plane['load_before']} before and "
              f"{plane['load_after']} after.", "",
              f"{'Test' if split == 'test' else 'Validation'} error at the grid points of {at}; along the straight "
              f"line up to {plane['line_max_error']:.2f} %; the plane's lowest {plane['plane_min_error']:.2f} %; "
              f"|w1 − w0| = {plane['dx']:.2f}, θ's distance from the line {plane['dy']:.2f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--grid", type=int, default=21)
    parser.add_argument("--split", choices=["test", "val"], default="test", help="the plane's error split")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--keep", type=Path, help="keep swa.pt and the plane's files here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        swa = swa_rows(args.runs, work)
        plane = time_plane(args.runs, args.grid, work, args.split)
    result = {"provenance": provenance.provenance(swa["test_size"]), "swa": swa, "plane": plane}
    suffix = "" if args.split == "test" else f"-{args.split}"
    stem = args.out / f"swa_plane{suffix}-{datetime.now(UTC).strftime('%Y-%m-%d')}"
    atomic_write_json(stem.with_suffix(".json"), result)
    atomic_write_text(stem.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
