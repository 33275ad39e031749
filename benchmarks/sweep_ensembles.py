"""Choose the demo's FGE and SSE settings on the VALIDATION split (never the test split).

For each seed, one network is trained with the config's train section; FGE runs from its
checkpoint at fge.start_fraction for fge.epochs (the 1B budget of `compare`), SSE from scratch
for sse.epochs, over a grid of settings. The table ranks the settings by the ensemble's mean
validation NLL over the seeds (validation error beside it); test metrics are not read at all.

    python benchmarks/sweep_ensembles.py --config configs/mnist1d.yaml --seeds 2

Sub-runs live under --work (default runs/sweep) and are reused when finished, so an
interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

from common import RESULTS, add_section, arguments, command_line, start_run, write_results

from modeconn.training.core.config import Config, load_config
from modeconn.training.core.loop import checkpoint_path
from modeconn.training.ensembles.fge import run_fge
from modeconn.training.ensembles.snapshots import finished_snapshot_run
from modeconn.training.ensembles.sse import run_sse
from modeconn.training.train import fge_start_epoch, finished_result, train_network

FGE_GRID = {"cycle_epochs": [1.0, 2.0], "lr1": [0.05, 0.1, 0.2, 0.4, 0.8, 1.6], "lr2_fraction": [0.1]}
SSE_GRID = {"lr": [0.1, 0.2, 0.4, 0.8]}
SEED_BASE = 1000  # seeds of their own, apart from the pipeline's (0, 1) and compare's (0, 100, 200, ...)


def _variant(config: Config, seed: int, section: str, fields: dict[str, Any]) -> Config:
    tree = config.model_dump()
    tree["seed"] = seed
    tree[section].update(fields)
    return Config.model_validate(tree)


def _validation(summary: dict[str, Any]) -> dict[str, float]:
    ensemble = summary["ensemble"]
    return {"val_nll": ensemble["val_nll"], "val_error": ensemble["val_error"]}


def _rank(results: dict[str, list[dict[str, float]]]) -> list[list[Any]]:
    rows = []
    for name, per_seed in results.items():
        nll = [r["val_nll"] for r in per_seed]
        err = [r["val_error"] for r in per_seed]
        rows.append([name, statistics.fmean(nll), statistics.stdev(nll) if len(nll) > 1 else 0.0,
                     statistics.fmean(err), " / ".join(f"{v:.4f}" for v in nll)])
    return sorted(rows, key=lambda r: r[1])


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/mnist1d.yaml"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/sweep"))
    args = parser.parse_args()
    config = load_config(args.config, {"device": "cpu"})
    run = start_run("sweep-ensembles")
    run["command"] = command_line()
    fge: dict[str, list[dict[str, float]]] = {}
    sse: dict[str, list[dict[str, float]]] = {}
    start_epoch = fge_start_epoch(config.train, config.fge)
    for s in range(args.seeds):
        seed = SEED_BASE + s
        seed_dir = args.work / f"seed-{seed}"
        train_dir = seed_dir / "train"
        seeded = _variant(config, seed, "train", {})
        finished_result(train_dir) or train_network(seeded, train_dir, resume=True)
        start = checkpoint_path(train_dir, start_epoch)
        for cycle, lr1, fraction in itertools.product(*FGE_GRID.values()):
            fields = {"cycle_epochs": cycle, "lr1": lr1, "lr2": round(lr1 * fraction, 6)}
            name = f"cycle {cycle:g} ep, lr1 {lr1:g}, lr2 {fields['lr2']:g}"
            run_dir = seed_dir / f"fge-c{cycle:g}-a{lr1:g}-b{fields['lr2']:g}"
            summary = finished_snapshot_run(run_dir, "fge") or run_fge(
                _variant(config, seed, "fge", fields), start, run_dir, resume=True)
            fge.setdefault(name, []).append(_validation(summary))
        for lr in SSE_GRID["lr"]:
            run_dir = seed_dir / f"sse-lr{lr:g}"
            summary = finished_snapshot_run(run_dir, "sse") or run_sse(
                _variant(config, seed, "sse", {"lr": lr}), run_dir, resume=True)
            sse.setdefault(f"lr {lr:g}", []).append(_validation(summary))
    headers = ["setting", "val NLL (mean)", "std", "val error % (mean)", "val NLL per seed"]
    data = config.data
    where = (f"{config.data.name} (val_size {data.val_size}, generation {data.generation}); "
             f"{args.seeds} seeds ({SEED_BASE}..{SEED_BASE + args.seeds - 1}); train {config.train.epochs} epochs "
             f"at lr {config.train.lr}")
    add_section(run, f"FGE: {config.fge.epochs:g} epochs from the epoch-{start_epoch} checkpoint (1B), by validation NLL",
                headers, _rank(fge), notes=where, data=fge)
    add_section(run, f"SSE: {config.sse.epochs} epochs from scratch, cycle {config.sse.cycle_epochs:g} epochs (1B), "
                "by validation NLL", headers, _rank(sse), notes=where, data=sse)
    write_results(run, summary="Settings ranked by the ensemble's validation NLL; the test split is not read.",
                  out_dir=args.out if args.out != RESULTS else RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
