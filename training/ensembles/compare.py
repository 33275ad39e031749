"""`modeconn compare`: the paper's budget table, Ind vs SSE vs FGE at 1B, 2B, 3B.

One budget B = train.epochs. For each seed s, with K = the largest budget multiple:
- Ind at kB: the ensemble of the first k of K independently trained networks.
- FGE at kB: the first Ind run's checkpoint at fge_start_epoch (80 % of B), followed by
  kB - that many FGE epochs. Snapshots accumulate, so ONE FGE run of KB - start epochs gives
  every k: its snapshots whose cycle ends inside the first kB - start epochs.
- SSE at kB: one SSE run of KB epochs; its snapshots whose cycle ends inside the first kB epochs.
- SWA at kB: one network, the average of the same FGE snapshots as FGE at kB, BN recomputed
  (training/ensembles/swa.py; no training: an averaging and one BN pass per budget).
So a seed trains K + (K - 0.8) + K budgets (8.2 B for K = 3).

Statistics (training/core/statistics.py): every metric as mean ± std over seeds, and paired bootstrap
95 % intervals over the test examples of FGE − Ind, FGE − SSE, FGE − single network (the
first Ind network), SWA − single network and SWA − FGE at each budget, per seed and for the seed mean. Written to compare.md
(with machine, date and test-set size), compare.csv (per-seed metrics), compare_differences.csv
and compare.json.

Each sub-run has its own folder (seed-S/ind-J, seed-S/fge, seed-S/sse) and is skipped when
finished, resumed when interrupted: rerunning the command after a kill continues it. A folder
made with other settings (its config.yaml) is refused, naming the folder to delete.
`--jobs N` runs N sub-runs side by side (an FGE run after its Ind run), with the same results.
With `train.batched` (auto: on a GPU) every seed's Ind networks train in one batched pass
(training/batched.py), the FGE runs after it; each network equals its separate run to float rounding.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from modeconn.training.batched import batching_blocker, train_seeds, wants_batching
from modeconn.training.core import progress, provenance, statistics
from modeconn.training.core.checkpoint import atomic_write_json, atomic_write_text
from modeconn.training.core.config import Config, ConfigError
from modeconn.training.core.data import Dataset, iterations_per_epoch
from modeconn.training.core.distributed import Job, run_jobs
from modeconn.training.core.loop import checkpoint_path, resolve_device
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import dataset_spec, load_data, predict_probs
from modeconn.training.core.reports import csv_text
from modeconn.training.core.runs import RunDirError, claim_folder
from modeconn.training.core.schedules import even_cycle_iterations
from modeconn.training.ensembles.calibration import calibrated_columns, calibration_report
from modeconn.training.ensembles.evaluate import (
    ensemble_probs,
    expand_members,
    predict_members,
    split_prefixed,
)
from modeconn.training.ensembles.fge import run_fge
from modeconn.training.ensembles.snapshots import finished_snapshot_run
from modeconn.training.ensembles.sse import run_sse
from modeconn.training.ensembles.swa import swa_network
from modeconn.training.train import fge_start_epoch, train_or_reuse

METHODS = ("Ind", "SSE", "FGE", "SWA")
# seed s: Ind run j gets config.seed + 100 s + j, SSE config.seed + 100 s + 50
_SEED_STRIDE, _SSE_OFFSET = 100, 50
# the config sections that shape each kind of sub-run (FGE starts from an Ind run: train too)
_SHAPED_BY = {"ind": ("seed", "data", "model", "train"), "fge": ("seed", "data", "model", "train", "fge"),
              "sse": ("seed", "data", "model", "sse")}
# fields that change how a sub-run is executed, not its settings: a folder is reused across them
_HOW_ONLY = {"train": ("batched",)}


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
    changed = [k for k in sections if _shaping(saved.get(k), k) != _shaping(current[k], k)]
    if changed:
        raise RunDirError(
            f"{run_dir} was made with other {', '.join(changed)} settings; delete it to redo it with the "
            "current ones, or pass --force to start the whole comparison over"
        )


def _shaping(section: Any, name: str) -> Any:
    """A config section without the fields that say how a run is executed, not what it computes."""
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in _HOW_ONLY.get(name, ())}
    return section


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


def _ind_runs(config: Config, seed_dir: Path, largest: int, base_seed: int) -> list[tuple[Config, Path]]:
    """The seed's K Ind runs (config, folder), each folder checked here, before anything runs."""
    runs = []
    for j in range(largest):
        run_dir, run_config = seed_dir / f"ind-{j}", _variant(config, base_seed + j)
        _check_reusable(run_dir, run_config, _SHAPED_BY["ind"])
        runs.append((run_config, run_dir))
    return runs


def _seed_jobs(config: Config, seed_dir: Path, largest: int, base_seed: int, first: int,
               ind_job: int | None = None) -> list[Job]:
    """K Ind runs, then one FGE run from the first Ind run's fge_start_epoch checkpoint (long
    enough for K budgets), then one SSE run; `first` is the index of this seed's first job.
    `ind_job`: the index of the one job that trains every seed's Ind runs in one batched pass
    (then this seed lists no Ind jobs of its own). Each folder is checked here, before anything runs."""
    inds = [] if ind_job is not None else _ind_runs(config, seed_dir, largest, base_seed)
    jobs = [Job(train_or_reuse, run) for run in inds]
    fge_config = _variant(config, base_seed, fge={"epochs": largest * config.train.epochs - fge_start_epoch(config)})
    _check_reusable(seed_dir / "fge", fge_config, _SHAPED_BY["fge"])
    start = checkpoint_path(seed_dir / "ind-0", fge_start_epoch(config))
    jobs.append(Job(_fge_run, (fge_config, start, seed_dir / "fge"), after=(first if ind_job is None else ind_job,)))
    sse_config = _variant(config, base_seed + _SSE_OFFSET, sse={"epochs": largest * config.train.epochs})
    _check_reusable(seed_dir / "sse", sse_config, _SHAPED_BY["sse"])
    jobs.append(Job(_sse_run, (sse_config, seed_dir / "sse")))
    return jobs


# ---------------------------------------------------------------- evaluation
# the differences that matter (the paper's table): FGE against each baseline at the same budget;
# and SWA, the one network from the same snapshots, against the single network and against FGE
COMPARISONS = (("FGE - Ind", "FGE", "Ind"), ("FGE - SSE", "FGE", "SSE"), ("FGE - single network", "FGE", "single"),
               ("SWA - single network", "SWA", "single"), ("SWA - FGE", "SWA", "FGE"))
Losses = dict[str, np.ndarray]  # statistics.LOSSES -> per-example values on the test set


def _snapshots_within(states: list[dict[str, Any]], iterations: int) -> int:
    """How many snapshots (in collection order) come from cycles that end inside `iterations`."""
    return sum(1 for s in states if s["snapshot"]["cycle_end"] <= iterations)


def _seed_rows(config: Config, seed: int, finals: list[Path], fge_dir: Path, sse_dir: Path,
               budgets: list[int], data: Dataset, device: torch.device
               ) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Losses]]:
    """The seed's metric rows, and the per-example test losses of every (method, k) and of
    ("single", k): the first Ind network alone (FGE's starting run), the same at every k."""
    epochs, start = config.train.epochs, fge_start_epoch(config)
    fge_steps = iterations_per_epoch(data, config.fge.batch_size)
    sse_steps = iterations_per_epoch(data, config.sse.batch_size)
    ind = predict_members(finals, device, data)
    fge = predict_members(expand_members([fge_dir]), device, data)
    sse = predict_members(expand_members([sse_dir]), device, data)
    members = {"Ind": ind, "FGE": fge, "SSE": sse}
    single = statistics.per_example_losses(ind.probs[0], data.y_test)
    rows, losses = [], {}
    for k in budgets:
        counts = {
            "Ind": k,
            "FGE": _snapshots_within(fge.states, round((k * epochs - start) * fge_steps)),
            "SSE": _snapshots_within(sse.states, k * epochs * sse_steps),
        }
        for method in METHODS:
            if method == "SWA":
                continue
            if counts[method] == 0:
                raise ValueError("an ensemble of 0 members")  # _check_budgets rules this out
            chosen, count = members[method], counts[method]
            val = None if chosen.val_probs is None else ensemble_probs(chosen.val_probs[:count])
            row, losses[method, k] = _row(method, k, seed, count, ensemble_probs(chosen.probs[:count]), val, config, data)
            rows.append(row)
        # SWA: one network from the same snapshots as FGE at this budget (cheap: no training)
        rows.append(_swa_row(fge.paths[:counts["FGE"]], k, seed, config, data, device, losses))
        losses["single", k] = single
    return rows, losses


def _row(method: str, k: int, seed: int, members: int, probs: torch.Tensor, val_probs: torch.Tensor | None,
         config: Config, data: Dataset) -> tuple[dict[str, Any], Losses]:
    """A metric row of compare.csv and the per-example test losses of `probs`."""
    val, calibrated = {}, {}
    if val_probs is not None:
        val = split_prefixed(classification_metrics(val_probs, data.y_val), "val")
        # Ashukha et al. 2020: compare ensembles at their best temperature (fitted on validation)
        calibrated = calibrated_columns(calibration_report(val_probs, data.y_val, probs, data.y_test))
    row = {"method": method, "k": k, "budget_epochs": k * config.train.epochs, "seed": seed, "members": members,
           **val, **split_prefixed(classification_metrics(probs, data.y_test)), **calibrated}
    return row, statistics.per_example_losses(probs, data.y_test)


def _swa_row(snapshots: list[Path], k: int, seed: int, config: Config, data: Dataset, device: torch.device,
             losses: dict[tuple[str, int], Losses]) -> dict[str, Any]:
    """The SWA network of `snapshots` (members: how many were averaged); its losses go into `losses`."""
    net, _ = swa_network(snapshots, data, device)
    val = predict_probs(net, data, "val").double() if len(data.y_val) else None
    row, losses["SWA", k] = _row("SWA", k, seed, len(snapshots), predict_probs(net, data, "test").double(), val,
                                 config, data)
    return row


def _aggregate(rows: list[dict[str, Any]], budgets: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    """Per method and budget: mean and std over seeds of each test metric."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for method in METHODS:
        for k in budgets:
            cell = [r for r in rows if r["method"] == method and r["k"] == k]
            entry: dict[str, float] = {}
            metrics = [("test", m) for m in ("error", "nll", "ece", "brier")]
            if "val_nll" in cell[0]:
                metrics += [("val", "error"), ("val", "nll"), ("calibrated_test", "nll")]
            for split, metric in metrics:
                spread = statistics.mean_std([r[f"{split}_{metric}"] for r in cell])
                entry[f"{split}_{metric}_mean"], entry[f"{split}_{metric}_std"] = spread["mean"], spread["std"]
            entry["members"] = statistics.mean_std([r["members"] for r in cell])["mean"]
            entry["seeds"] = len(cell)
            table.setdefault(method, {})[k] = entry
    return table


def _differences(losses: list[dict[tuple[str, int], Losses]], budgets: list[int]) -> dict[str, dict[str, Any]]:
    """For each comparison and budget: every seed's interval, mean ± std of the per-seed
    differences, and the interval of the seed-mean difference (test examples resampled once
    for all seeds; see training/core/statistics.py)."""
    out: dict[str, dict[str, Any]] = {}
    for name, method, baseline in COMPARISONS:
        for k in budgets:
            fge = [seed_losses[method, k] for seed_losses in losses]
            base = [seed_losses[baseline, k] for seed_losses in losses]
            per_seed = [statistics.loss_differences(a, b) for a, b in zip(fge, base, strict=True)]
            stacked = {m: np.stack([a[m] for a in fge]) for m in statistics.LOSSES}
            seed_mean = statistics.loss_differences(stacked, {m: np.stack([b[m] for b in base]) for m in statistics.LOSSES})
            out.setdefault(name, {})[f"{k}B"] = {
                "seed_mean": statistics.intervals_json(seed_mean),
                "over_seeds": {m: statistics.mean_std([d[m].mean for d in per_seed]) for m in statistics.LOSSES},
                "per_seed": [statistics.intervals_json(d) for d in per_seed],
            }
    return out


def _cell(interval: dict[str, Any], metric: str) -> str:
    """`diff [low, high]`, starred when the interval excludes 0."""
    text = statistics.Interval(**interval).text(statistics.DIGITS[metric])
    return text + (" *" if interval["low"] > 0 or interval["high"] < 0 else "")


def _markdown(config: Config, table: dict[str, dict[int, dict[str, float]]], differences: dict[str, dict[str, Any]],
              budgets: list[int], seeds: int, info: dict[str, Any]) -> str:
    epochs, start = config.train.epochs, fge_start_epoch(config)
    columns = " | ".join(f"{k}B ({k * epochs} ep)" for k in budgets)
    rule = "|---|---|" + "---|" * len(budgets)
    lines = [
        f"**Budget comparison: {config.model.label} on {config.data.name}** (config `{config.name}`)",
        "",
        *provenance.markdown_lines(info),
        "",
        f"B = {epochs} epochs. Ensemble test metrics (SWA: one network), mean ± std over {seeds} seed(s); ensemble "
        "size (SWA: snapshots averaged) in brackets.",
        "",
        f"| method | metric | {columns} |",
        rule,
    ]
    for method in METHODS:
        cells = [table[method][k] for k in budgets]
        rows = [("test_error", "error %", 2), ("test_nll", "NLL", 4), ("calibrated_test_nll", "calibrated NLL", 4),
                ("test_brier", "Brier", 4), ("test_ece", "ECE", 4)]
        for key, label, digits in rows:
            if f"{key}_mean" not in cells[0]:
                continue  # no validation split: nothing to fit a temperature on
            values = " | ".join(f"{c[f'{key}_mean']:.{digits}f} ± {c[f'{key}_std']:.{digits}f}"
                                + (f" [{c['members']:g}]" if key == "test_error" else "") for c in cells)
            lines.append(f"| {method} | {label} | {values} |")
    lines += [
        "",
        f"Differences, the first minus the second at the same budget (negative: the first lower), on the {info['test_size']:,} "
        "test examples: `diff [low, high]` is the seed-mean difference with its 95 % paired bootstrap interval "
        "(the test examples resampled once for all seeds); * marks an interval that excludes 0.",
        "",
        f"| comparison | metric | {columns} |",
        rule,
    ]
    for name, *_ in COMPARISONS:
        for metric in statistics.LOSSES:
            cells = [_cell(differences[name][f"{k}B"]["seed_mean"][metric], metric) for k in budgets]
            lines.append(f"| {name.replace(' - ', ' − ')} | {statistics.LABELS[metric]} | {' | '.join(cells)} |")
    lines += [
        "",
        "Per seed: mean ± std over seeds of the per-seed differences, then each seed's own interval.",
        "",
        "| comparison | metric | budget | mean ± std | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |",
        "|---|---|---|---|" + "---|" * seeds,
    ]
    for name, *_ in COMPARISONS:
        for metric in statistics.LOSSES:
            digits = statistics.DIGITS[metric]
            for k in budgets:
                cell = differences[name][f"{k}B"]
                spread = cell["over_seeds"][metric]
                per_seed = " | ".join(_cell(d[metric], metric) for d in cell["per_seed"])
                lines.append(f"| {name.replace(' - ', ' − ')} | {statistics.LABELS[metric]} | {k}B | "
                             f"{spread['mean']:+.{digits}f} ± {spread['std']:.{digits}f} | {per_seed} |")
    lines += [
        "",
        f"- Ind at kB: k independently trained networks of {epochs} epochs (train.lr {config.train.lr}).",
        f"- FGE at kB: the first Ind network's epoch-{start} checkpoint (momentum kept), then kB − {start} FGE epochs "
        f"(cycle {config.fge.cycle_epochs} epochs, lr1 {config.fge.lr1}, lr2 {config.fge.lr2}).",
        f"- SSE at kB: the first kB epochs of one SSE run from scratch (cycle {config.sse.cycle_epochs} epochs, "
        f"lr {config.sse.lr}).",
        "- SWA at kB: one network, the average of FGE's snapshots at kB (BN recomputed on the training split).",
        "- single network: the first Ind network alone (1B), the one FGE starts from.",
    ]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    header = ["method", "k", "budget_epochs", "seed", "members", "val_error", "val_nll",
              "test_error", "test_nll", "test_ece", "test_brier", "temperature", "calibrated_test_nll",
              "calibrated_test_ece", "calibrated_test_brier"]
    return csv_text(header, rows)


def _differences_csv(differences: dict[str, dict[str, Any]]) -> str:
    """One row per comparison, budget, metric and seed ("mean" for the seed-mean difference)."""
    header = ["comparison", "budget", "metric", "seed", "diff", "low", "high", "resamples", "bootstrap_seed"]
    return csv_text(header, (
        [name, budget, metric, seed, d[metric]["mean"], d[metric]["low"], d[metric]["high"], d[metric]["resamples"],
         d[metric]["seed"]]
        for name, cells in differences.items()
        for budget, cell in cells.items()
        for metric in statistics.LOSSES
        for seed, d in [*enumerate(cell["per_seed"]), ("mean", cell["seed_mean"])]
    ))


def compare_budgets(config: Config, run_dir: Path, force: bool = False, jobs_at_once: int = 1,
                    ray: str | None = None) -> dict[str, Any]:
    """Train (or reuse) every sub-run, `jobs_at_once` side by side, or each a task on the Ray
    cluster at `ray` (training/core/distributed.py `run_jobs`; the same results as one after
    the other), then write compare.md and compare.csv into `run_dir`."""
    started = time.perf_counter()
    claim_folder(run_dir, "compare", force=force, container=True)  # --force deletes only the comparison's own files
    device = resolve_device(config.device)
    data = load_data(dataset_spec(config), device)
    budgets = _check_budgets(config, iterations_per_epoch(data, config.fge.batch_size),
                             iterations_per_epoch(data, config.sse.batch_size))
    largest, seeds = budgets[-1], config.compare.seeds
    seed_dirs = [run_dir / f"seed-{s}" for s in range(seeds)]
    base_seeds = [config.seed + _SEED_STRIDE * s for s in range(seeds)]
    inds = [run for d, b in zip(seed_dirs, base_seeds, strict=True) for run in _ind_runs(config, d, largest, b)]
    # every seed's Ind networks in one batched pass (training/batched.py), when they can be
    blocker = batching_blocker([c for c, _ in inds]) if wants_batching(config) else "train.batched"
    batched = blocker is None
    if config.train.batched is True and blocker is not None and len(inds) > 1:
        progress.log(f"[dim]compare: the Ind networks one after another ({blocker})[/dim]")
    jobs: list[Job] = [Job(train_seeds, ([c for c, _ in inds], [d for _, d in inds]))] if batched else []
    for seed_dir, base_seed in zip(seed_dirs, base_seeds, strict=True):
        jobs += _seed_jobs(config, seed_dir, largest, base_seed, len(jobs), 0 if batched else None)
    where = f"on Ray ({ray})" if ray else f"{jobs_at_once} at a time"
    progress.log(f"[bold]compare: {seeds} seed(s), {len(jobs)} runs, {where}[/bold] ({run_dir})")
    run_jobs(jobs, jobs_at_once, device, ray=ray)
    rows: list[dict[str, Any]] = []
    losses: list[dict[tuple[str, int], Losses]] = []
    for s, seed_dir in enumerate(seed_dirs):
        finals = [seed_dir / f"ind-{j}" / "final.pt" for j in range(largest)]
        seed_rows, seed_losses = _seed_rows(config, s, finals, seed_dir / "fge", seed_dir / "sse", budgets, data, device)
        rows += seed_rows
        losses.append(seed_losses)
    table = _aggregate(rows, budgets)
    differences = _differences(losses, budgets)
    info = provenance.provenance(len(data.y_test))
    paths = {name: run_dir / f"compare{suffix}" for name, suffix in
             (("markdown", ".md"), ("csv", ".csv"), ("differences_csv", "_differences.csv"), ("json", ".json"))}
    markdown = _markdown(config, table, differences, budgets, seeds, info)
    result = {"run_dir": str(run_dir), **{k: str(p) for k, p in paths.items()},
              "table": {m: {f"{k}B": cell for k, cell in cells.items()} for m, cells in table.items()},
              "differences": differences, "provenance": info, "test_size": len(data.y_test), "seeds": seeds}
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_text(paths["csv"], _csv(rows))
    atomic_write_text(paths["differences_csv"], _differences_csv(differences))
    result["seconds"] = time.perf_counter() - started
    atomic_write_json(paths["json"], result)
    progress.log(markdown + f"\ncompare: {seeds} seed(s) in {result['seconds']:.1f}s -> {paths['markdown']}")
    return result
