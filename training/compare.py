"""`modeconn compare`: the paper's budget table, Ind vs SSE vs FGE at 1B, 2B, 3B.

One budget B = train.epochs. For each seed s, with K = the largest budget multiple:
- Ind at kB: the ensemble of the first k of K independently trained networks.
- FGE at kB: the first Ind run's checkpoint at fge_start_epoch (80 % of B), followed by
  kB - that many FGE epochs. Snapshots accumulate, so ONE FGE run of KB - start epochs gives
  every k: its snapshots whose cycle ends inside the first kB - start epochs.
- SSE at kB: one SSE run of KB epochs; its snapshots whose cycle ends inside the first kB epochs.
So a seed trains K + (K - 0.8) + K budgets (8.2 B for K = 3).

Each sub-run has its own folder (seed-S/ind-J, seed-S/fge, seed-S/sse) and is skipped when
finished, resumed when interrupted: rerunning the command after a kill continues it. A folder
made with other settings (its config.yaml) is refused, naming the folder to delete.
`--jobs N` runs N sub-runs side by side (an FGE run after its Ind run), with the same results.
"""

from __future__ import annotations

import csv
import io
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from training import progress
from training.checkpoint import atomic_write_text
from training.config import Config, ConfigError
from training.data import Dataset, iterations_per_epoch
from training.distributed import Job, run_jobs
from training.ensemble import (
    Members,
    ensemble_probs,
    expand_members,
    predict_members,
    split_prefixed,
)
from training.fge import finished_snapshot_run, run_fge
from training.loop import checkpoint_path, resolve_device
from training.metrics import classification_metrics
from training.networks import dataset_spec, load_data
from training.runs import RunDirError
from training.schedules import even_cycle_iterations
from training.sse import run_sse
from training.train import fge_start_epoch, train_or_reuse

METHODS = ("Ind", "SSE", "FGE")
# seed s: Ind run j gets config.seed + 100 s + j, SSE config.seed + 100 s + 50
_SEED_STRIDE, _SSE_OFFSET = 100, 50
# the config sections that shape each kind of sub-run (FGE starts from an Ind run: train too)
_SHAPED_BY = {"ind": ("seed", "data", "model", "train"), "fge": ("seed", "data", "model", "train", "fge"),
              "sse": ("seed", "data", "model", "sse")}


def _variant(config: Config, seed: int, **sections: dict[str, Any]) -> Config:
    """The config with another seed and some fields of its sections replaced."""
    tree = config.model_dump()
    tree["seed"] = seed
    for section, fields in sections.items():
        tree[section].update(fields)
    return Config.model_validate(tree)


def _check_reusable(run_dir: Path, config: Config, sections: tuple[str, ...]) -> None:
    """A sub-run folder is continued or reused only for the settings it was made with.

    Only the sections that shape that sub-run count, so new FGE settings leave the Ind and SSE
    runs reusable: the error names the folder to delete.
    """
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved, current = yaml.safe_load(path.read_text()) or {}, config.model_dump()
    changed = [k for k in sections if saved.get(k) != current[k]]
    if changed:
        raise RunDirError(
            f"{run_dir} was made with other {', '.join(changed)} settings; delete it to redo it with the "
            "current ones, or pass --force to start the whole comparison over"
        )


def _check_budgets(config: Config, fge_steps: int, sse_steps: int) -> list[int]:
    """The sorted budget multiples; an error naming the field when a method gets no snapshot at 1B."""
    budgets = sorted(set(config.compare.budgets))
    if not budgets or budgets[0] < 1 or budgets[-1] >= _SSE_OFFSET:
        raise ConfigError(f"compare.budgets must be whole numbers from 1 to {_SSE_OFFSET - 1}, got {config.compare.budgets}")
    epochs, start = config.train.epochs, fge_start_epoch(config)
    if start >= epochs:
        raise ConfigError(
            f"fge.start_fraction ({config.fge.start_fraction}) starts FGE at epoch {start} of train.epochs "
            f"({epochs}): no FGE epochs are left inside 1 budget"
        )
    if (epochs - start) * fge_steps < even_cycle_iterations(config.fge.cycle_epochs, fge_steps):
        raise ConfigError(
            f"fge.cycle_epochs ({config.fge.cycle_epochs}) is longer than the {epochs - start} FGE epochs "
            "inside 1 budget: FGE would have no snapshot at 1B"
        )
    if round(config.sse.cycle_epochs * sse_steps) > epochs * sse_steps:
        raise ConfigError(
            f"sse.cycle_epochs ({config.sse.cycle_epochs}) is longer than 1 budget (train.epochs {epochs}): "
            "SSE would have no snapshot at 1B"
        )
    return budgets


# ---------------------------------------------------------------- the sub-runs
def _fge_run(config: Config, start: Path, run_dir: Path) -> None:
    if finished_snapshot_run(run_dir, "fge") is None:
        run_fge(config, start, run_dir, resume=True)


def _sse_run(config: Config, run_dir: Path) -> None:
    if finished_snapshot_run(run_dir, "sse") is None:
        run_sse(config, run_dir, resume=True)


def _seed_jobs(config: Config, seed_dir: Path, largest: int, base_seed: int, first: int) -> list[Job]:
    """K Ind runs, then one FGE run from the first Ind run's fge_start_epoch checkpoint (long
    enough for K budgets), then one SSE run; `first` is the index of this seed's first job.
    Each folder is checked here, before anything runs."""
    jobs = []
    for j in range(largest):
        run_dir, run_config = seed_dir / f"ind-{j}", _variant(config, base_seed + j)
        _check_reusable(run_dir, run_config, _SHAPED_BY["ind"])
        jobs.append(Job(train_or_reuse, (run_config, run_dir)))
    fge_config = _variant(config, base_seed, fge={"epochs": largest * config.train.epochs - fge_start_epoch(config)})
    _check_reusable(seed_dir / "fge", fge_config, _SHAPED_BY["fge"])
    start = checkpoint_path(seed_dir / "ind-0", fge_start_epoch(config))
    jobs.append(Job(_fge_run, (fge_config, start, seed_dir / "fge"), after=(first,)))
    sse_config = _variant(config, base_seed + _SSE_OFFSET, sse={"epochs": largest * config.train.epochs})
    _check_reusable(seed_dir / "sse", sse_config, _SHAPED_BY["sse"])
    jobs.append(Job(_sse_run, (sse_config, seed_dir / "sse")))
    return jobs


# ---------------------------------------------------------------- evaluation
def _prefix_metrics(members: Members, count: int, data: Dataset) -> dict[str, float]:
    """Validation and test metrics of the ensemble of the first `count` members."""
    if count == 0:
        raise ValueError("an ensemble of 0 members")  # _check_budgets rules this out
    out = {}
    if members.val_probs is not None:
        out = split_prefixed(classification_metrics(ensemble_probs(members.val_probs[:count]), data.y_val), "val")
    return {**out, **split_prefixed(classification_metrics(ensemble_probs(members.probs[:count]), data.y_test))}


def _snapshots_within(states: list[dict[str, Any]], iterations: int) -> int:
    """How many snapshots (in collection order) come from cycles that end inside `iterations`."""
    return sum(1 for s in states if s["snapshot"]["cycle_end"] <= iterations)


def _seed_rows(config: Config, seed: int, finals: list[Path], fge_dir: Path, sse_dir: Path,
               budgets: list[int], data: Dataset, device: torch.device) -> list[dict[str, Any]]:
    epochs, start = config.train.epochs, fge_start_epoch(config)
    fge_steps = iterations_per_epoch(data, config.fge.batch_size)
    sse_steps = iterations_per_epoch(data, config.sse.batch_size)
    ind = predict_members(finals, device, data)
    fge = predict_members(expand_members([fge_dir]), device, data)
    sse = predict_members(expand_members([sse_dir]), device, data)
    rows = []
    for k in budgets:
        counts = {
            "Ind": k,
            "FGE": _snapshots_within(fge.states, round((k * epochs - start) * fge_steps)),
            "SSE": _snapshots_within(sse.states, k * epochs * sse_steps),
        }
        members = {"Ind": ind, "FGE": fge, "SSE": sse}
        for method in METHODS:
            metrics = _prefix_metrics(members[method], counts[method], data)
            rows.append({"method": method, "k": k, "budget_epochs": k * epochs, "seed": seed,
                         "members": counts[method], **metrics})
    return rows


def _aggregate(rows: list[dict[str, Any]], budgets: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    table: dict[str, dict[int, dict[str, float]]] = {}
    for method in METHODS:
        for k in budgets:
            cell = [r for r in rows if r["method"] == method and r["k"] == k]
            errors = [r["test_error"] for r in cell]
            table.setdefault(method, {})[k] = {
                "test_error_mean": statistics.fmean(errors),
                "test_error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                "test_nll_mean": statistics.fmean(r["test_nll"] for r in cell),
                "test_ece_mean": statistics.fmean(r["test_ece"] for r in cell),
                **({"val_error_mean": statistics.fmean(r["val_error"] for r in cell),
                    "val_nll_mean": statistics.fmean(r["val_nll"] for r in cell)} if "val_nll" in cell[0] else {}),
                "members": statistics.fmean(r["members"] for r in cell),
                "seeds": len(cell),
            }
    return table


def _markdown(config: Config, table: dict[str, dict[int, dict[str, float]]], budgets: list[int], seeds: int) -> str:
    epochs, start = config.train.epochs, fge_start_epoch(config)
    lines = [
        f"# Budget comparison: {config.model.name} on {config.data.name} ({config.name})",
        "",
        f"B = {epochs} epochs. Test error (%) of the ensemble, mean ± std over {seeds} seed(s); "
        "mean test NLL in parentheses; ensemble size in brackets.",
        "",
        "| method | " + " | ".join(f"{k}B ({k * epochs} ep)" for k in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method in METHODS:
        cells = [table[method][k] for k in budgets]
        lines.append(f"| {method} | " + " | ".join(
            f"{c['test_error_mean']:.2f} ± {c['test_error_std']:.2f} ({c['test_nll_mean']:.4f}) [{c['members']:g}]"
            for c in cells
        ) + " |")
    lines += [
        "",
        f"- Ind at kB: k independently trained networks of {epochs} epochs (train.lr {config.train.lr}).",
        f"- FGE at kB: the first Ind network's epoch-{start} checkpoint, then kB − {start} FGE epochs "
        f"(cycle {config.fge.cycle_epochs} epochs, lr1 {config.fge.lr1}, lr2 {config.fge.lr2}).",
        f"- SSE at kB: the first kB epochs of one SSE run from scratch (cycle {config.sse.cycle_epochs} epochs, "
        f"lr {config.sse.lr}).",
    ]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    header = ["method", "k", "budget_epochs", "seed", "members", "val_error", "val_nll",
              "test_error", "test_nll", "test_ece"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def compare_budgets(config: Config, run_dir: Path, force: bool = False, jobs_at_once: int = 1) -> dict[str, Any]:
    """Train (or reuse) every sub-run, `jobs_at_once` side by side (training/distributed.py
    `run_jobs`; the same results as one after the other), then write compare.md and
    compare.csv into `run_dir`."""
    started = time.perf_counter()
    if force and run_dir.exists():
        shutil.rmtree(run_dir)
    device = resolve_device(config.device)
    data = load_data(dataset_spec(config), device)
    budgets = _check_budgets(config, iterations_per_epoch(data, config.fge.batch_size),
                             iterations_per_epoch(data, config.sse.batch_size))
    largest, seeds = budgets[-1], config.compare.seeds
    seed_dirs = [run_dir / f"seed-{s}" for s in range(seeds)]
    jobs: list[Job] = []
    for s, seed_dir in enumerate(seed_dirs):
        jobs += _seed_jobs(config, seed_dir, largest, config.seed + _SEED_STRIDE * s, len(jobs))
    progress.log(f"[bold]compare: {seeds} seed(s), {len(jobs)} runs, {jobs_at_once} at a time[/bold] ({run_dir})")
    run_jobs(jobs, jobs_at_once, device)
    rows: list[dict[str, Any]] = []
    for s, seed_dir in enumerate(seed_dirs):
        finals = [seed_dir / f"ind-{j}" / "final.pt" for j in range(largest)]
        rows += _seed_rows(config, s, finals, seed_dir / "fge", seed_dir / "sse", budgets, data, device)
    table = _aggregate(rows, budgets)
    md_path, csv_path = run_dir / "compare.md", run_dir / "compare.csv"
    markdown = _markdown(config, table, budgets, seeds)
    atomic_write_text(md_path, markdown)
    atomic_write_text(csv_path, _csv(rows))
    seconds = time.perf_counter() - started
    progress.log(markdown + f"\ncompare: {seeds} seed(s) in {seconds:.1f}s -> {md_path}")
    return {"run_dir": str(run_dir), "markdown": str(md_path), "csv": str(csv_path), "seconds": seconds,
            "table": {m: {f"{k}B": cell for k, cell in cells.items()} for m, cells in table.items()}}
