"""The demo pipeline on a quiet machine and on a busy one, and what passive waiting costs.

1. `modeconn pipeline --config configs/mnist1d.yaml` into a temporary RUNS folder (the artifact
   into a temporary folder too, not the BentoML store) on a quiet machine, then again while
   --hogs busy-loop processes (`python -c "while True: pass"`, started and stopped here) hold
   the cores. Reported: both wall times, their ratio (the target: busy at most 3x quiet), the
   cores other work used meanwhile (/proc/stat, benchmarks/common.py) and the load averages.
2. One demo epoch (`modeconn train --epochs 1`) on the quiet machine with idle OpenMP threads
   sleeping (OMP_WAIT_POLICY=PASSIVE, what modeconn sets when the machine is shared as it
   starts) against spinning (ACTIVE, what a quiet machine keeps), runs interleaved, --repeats
   each: the epoch's own time from metrics.jsonl and the process's wall time.

The runs use the modeconn defaults for threads (modeconn/contract/threads.py) unless the
environment overrides them (MODECONN_THREADS, OMP_NUM_THREADS); the settings are recorded.

Usage: python benchmarks/busy_machine.py [--quick] [--hogs 2] [--repeats 3] [--set KEY=VALUE ...]
(--quick: 1 epoch per stage and a coarse curve grid, to check the script, not for the record)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

from modeconn.contract import threads

CONFIG = common.ROOT / "configs" / "mnist1d.yaml"
MODECONN = [sys.executable, "-m", "modeconn"]
QUICK = ["train.epochs=1", "curve.epochs=1", "fge.epochs=1", "fge.cycle_epochs=1", "curve.eval_points=3",
         "export.bn_grid_points=3", "export.max_bn_interpolation_pp=100"]
TARGET_RATIO = 3.0


def start_hogs(count: int) -> list[subprocess.Popen]:
    """`count` processes that each keep one core busy until stopped."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def stop_hogs(hogs: list[subprocess.Popen]) -> None:
    for hog in hogs:
        hog.kill()
    for hog in hogs:
        hog.wait()


def timed(cmd: list[str], env: dict[str, str], monitor_pids: list[int] | None = None) -> dict[str, Any]:
    """Run `cmd`; its wall time, the cores other work used meanwhile, the load averages."""
    load_start = common.load_average()
    process = subprocess.Popen(cmd, env=env, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    monitor = common.CpuMonitor([process.pid, *(monitor_pids or [])])
    before = monitor.snapshot()
    stdout, stderr = process.communicate()
    after = monitor.snapshot()
    if process.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({process.returncode}):\n{stderr[-3000:]}")
    return {"seconds": after[0] - before[0], "other_cores": round(monitor.others(before, after), 2),
            "load_average_start": load_start, "load_average_end": common.load_average(),
            "result": json.loads(stdout.strip().splitlines()[-1])}


def pipeline(tmp: Path, name: str, sets: list[str], env: dict[str, str]) -> dict[str, Any]:
    cmd = [*MODECONN, "pipeline", "--config", str(CONFIG), "--runs", str(tmp / name / "runs"),
           "--out", str(tmp / name / "artifact"), "--json", *(a for s in sets for a in ("--set", s))]
    return timed(cmd, env)


def one_epoch(tmp: Path, name: str, sets: list[str], env: dict[str, str]) -> dict[str, Any]:
    out = tmp / name
    cmd = [*MODECONN, "train", "--config", str(CONFIG), "--epochs", "1", "--out", str(out), "--json",
           *(a for s in sets for a in ("--set", s))]
    run = timed(cmd, env)
    run["epoch_seconds"] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["seconds"]
    return run


def main() -> None:
    parser = common.arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--hogs", type=int, default=2, help="busy-loop processes during the busy run (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="one-epoch runs per wait policy (interleaved)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    args = parser.parse_args()
    sets = [*(QUICK if args.quick else []), *args.set, "device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(common.ROOT)}
    env.pop("OMP_WAIT_POLICY", None)  # modeconn decides (passive when the machine is shared) unless a row sets it
    run = common.start_run("busy_machine")
    run.update(quick=args.quick, command=common.command_line(), sets=sets,
               threads=threads.describe(threads.threads_per_process(1)))

    with tempfile.TemporaryDirectory(prefix="busy-machine-") as folder:
        tmp = Path(folder)
        quiet_wait = 5.0 if args.quick else 120.0
        common.wait_for_quiet(max_wait_s=quiet_wait)
        quiet = pipeline(tmp, "quiet", sets, env)
        hogs = start_hogs(args.hogs)
        try:
            time.sleep(1.0)  # the hogs are running before the clock starts
            busy = pipeline(tmp, "busy", sets, env)
        finally:
            stop_hogs(hogs)
        ratio = busy["seconds"] / quiet["seconds"]
        rows = [[label, r["seconds"], r["seconds"] / quiet["seconds"], r["other_cores"],
                 " / ".join(map(str, r["load_average_start"])), " / ".join(map(str, r["load_average_end"]))]
                for label, r in (("quiet", quiet), (f"busy ({args.hogs} busy loops)", busy))]
        common.add_section(
            run, "Demo pipeline, quiet and busy",
            ["machine", "seconds", "x quiet", "other work (cores)", "load at start", "load at end"], rows,
            notes=f"Target: busy at most {TARGET_RATIO:g}x quiet; measured {ratio:.2f}x "
                  f"({'met' if ratio <= TARGET_RATIO else 'NOT met'}).",
            data={"quiet": quiet, "busy": busy, "ratio": ratio})

        policies: dict[str, list[dict[str, Any]]] = {"PASSIVE": [], "ACTIVE": []}
        for i in range(args.repeats):
            for policy, runs in policies.items():
                common.wait_for_quiet(max_wait_s=quiet_wait / 4)
                runs.append(one_epoch(tmp, f"epoch-{policy}-{i}", sets, {**env, "OMP_WAIT_POLICY": policy}))
        passive = common.median([r["epoch_seconds"] for r in policies["PASSIVE"]])
        rows = [[f"OMP_WAIT_POLICY={policy}", common.median([r["epoch_seconds"] for r in runs]),
                 common.median([r["epoch_seconds"] for r in runs]) / passive,
                 common.median([r["seconds"] for r in runs]), max(r["other_cores"] for r in runs)]
                for policy, runs in policies.items()]
        common.add_section(
            run, "One demo epoch on the quiet machine: passive against spinning waits",
            ["wait policy", "epoch seconds (median)", "x passive", "process seconds (median)", "other work (cores, max)"],
            rows, notes=f"{args.repeats} runs each, interleaved; the epoch's time from metrics.jsonl.",
            data=policies)

    summary = (f"Threads per process: {run['threads']['threads']} of {run['threads']['usable_cores']} usable cores "
               f"(override: {run['threads']['override'] or 'none'}). Busy / quiet: {ratio:.2f}x "
               f"(target <= {TARGET_RATIO:g}x).")
    common.write_results(run, summary, args.out)


if __name__ == "__main__":
    main()
