"""`modeconn compare` run two ways on the same machine: its sub-runs in `--jobs 2` local worker
processes, and as tasks on a local Ray instance with 2 CPUs (`--ray auto`, training/core/cluster.py).
Each way is the real command in its own process, one thread per sub-run, the same settings; the
two compare.csv files must be identical (checked here, like tests/test_cluster.py), and the wall
times say what handing the jobs to Ray costs on one machine.

The settings: the demo (configs/mnist1d.yaml) at a smaller budget (10-epoch networks, budgets 1
and 2, 2 seeds), a few minutes each way; `--set KEY=VALUE` adds overrides. Rounds alternate the
two ways. Ray is the `cluster` extra (in the dev extra too).

Usage: python benchmarks/compare_engines.py [--quick] [--rounds 1] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

CONFIG = common.ROOT / "configs" / "mnist1d.yaml"
SETTINGS = ["train.epochs=10", "compare.budgets=[1, 2]", "compare.seeds=2"]
QUICK = ["train.epochs=2", "fge.start_fraction=0.5", "fge.cycle_epochs=1", "sse.cycle_epochs=1",
         "compare.budgets=[1]", "compare.seeds=1", "compare.equal_budget_members=[2]"]


def run_compare(out: Path, engine: list[str], overrides: list[str]) -> dict[str, Any]:
    """One `modeconn compare` into `out`: its wall time and the load averages around it."""
    cmd = [sys.executable, "-m", "modeconn", "compare", "--config", str(CONFIG), "--device", "cpu", "--out", str(out),
           *engine, *(a for o in overrides for a in ("--set", o))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per sub-run either way
    load_start, started = common.load_average(), time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=common.ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "load_start": load_start, "load_end": common.load_average()}


def main() -> None:
    import ray

    parser = common.arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="alternations of the two ways (default 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = (QUICK if args.quick else SETTINGS) + args.overrides
    run = common.start_run("compare_engines")
    run.update(quick=args.quick, command=common.command_line(), settings=overrides)
    rows, data = [], []
    with tempfile.TemporaryDirectory(prefix="compare-engines-") as tmp:
        for r in range(args.rounds):
            local = run_compare(Path(tmp) / f"local-{r}", ["--jobs", "2"], overrides)
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # `--ray auto` finds it
            try:
                on_ray = run_compare(Path(tmp) / f"ray-{r}", ["--ray", "auto"], overrides)
            finally:
                ray.shutdown()
            same = (Path(tmp) / f"local-{r}" / "compare.csv").read_text() == (
                Path(tmp) / f"ray-{r}" / "compare.csv").read_text()
            rows.append([r + 1, local["seconds"], on_ray["seconds"], on_ray["seconds"] / local["seconds"],
                         "identical" if same else "DIFFERENT", local["load_start"], on_ray["load_start"]])
            data.append({"local": local, "ray": on_ray, "same_table": same})
            if not same:
                raise SystemExit("the two compare.csv differ: a bug (tests/test_cluster.py checks they do not)")
    common.add_section(
        run, "compare: --jobs 2 against a local Ray instance with 2 CPUs (--ray auto)",
        ["round", "--jobs 2 s", "--ray s", "ray / jobs", "compare.csv", "load at start (jobs)", "load at start (ray)"],
        rows, data=data,
        notes=f"Settings: `{CONFIG.relative_to(common.ROOT)}` with " + ", ".join(f"`{o}`" for o in overrides)
              + ". One thread per sub-run (OMP_NUM_THREADS=1); Ray started in this process, outside the "
                "timed command; evaluation runs in the command's own process either way.")
    common.write_results(run, out_dir=args.out)


if __name__ == "__main__":
    main()
