"""`modeconn compare`: the paper's budget table, Ind vs SSE vs FGE at 1B, 2B, 3B.

One budget B = train.epochs. For each seed s, with K = the largest budget multiple:
- Ind at kB: the ensemble of the first k of K independently trained networks.
- FGE at kB: the first Ind run's checkpoint at fge_start_epoch (80 % of B), followed by
  kB - that many FGE epochs. Snapshots accumulate, so ONE FGE run of KB - start epochs gives
  every k: its snapshots whose cycle ends inside the first kB - start epochs.
- SSE at kB: one SSE run of KB epochs; its snapshots whose cycle ends inside the first kB epochs.
- SWA at kB: one network, the average of the same FGE snapshots as FGE at kB, BN recomputed
  (training/ensembles/swa.py; no training: an averaging and one BN pass per budget).
- SWAG at kB: compare.swag_samples networks drawn from the SWAG Gaussian of the same snapshots
  (training/ensembles/swag.py), BN recomputed for each, at the covariance scale of
  compare.swag_scales with the lowest calibrated validation NLL (per seed and budget).
- Ind m=M at kB (compare.equal_budget_members): the equal-budget ensemble, M independent networks
  of kB/M epochs each on the same schedule shape, at compare.equal_budget_lr (None: train.lr); Ind m* is the one of {Ind, Ind m=M...} with the
  lowest calibrated validation NLL at that budget (mean over seeds), chosen on validation only.
- Simplex at kB (compare.simplex, k >= 2): ESPRO (Benton et al. 2021) grown from the first Ind
  network (its B epochs count) with simplex.vertices trained vertices sharing the other (k - 1)B
  epochs (as evenly as whole epochs allow, the first vertices taking the remainder); the ensemble
  of its simplex.ensemble_size sampled points, BN recomputed at each (training/simplex/). One
  run per budget: each vertex's cosine schedule spans its own epochs, so budgets do not nest.
So a seed trains K + (K - 0.8) + K budgets, plus the equal-budget networks (and with the simplex
the sum of k - 1 over the budgets).

Calibrated NLL (the temperature fitted on validation, Ashukha et al. 2020) is the headline metric;
the Deep Ensemble Equivalent of each method is the interpolated number of full-budget Ind
networks whose ensemble reaches its calibrated NLL.

Statistics (training/core/statistics.py): every metric as mean ± std over seeds, and 95 % intervals
of FGE − Ind, FGE − Ind m*, FGE − each Ind m=M, FGE − SSE, FGE − single network (the first Ind
network), SWA − single network, SWA − FGE, SWAG − FGE, Simplex − FGE, Simplex − Ind m* and
Simplex − each Ind m=M at each budget: per seed and for the seed mean over test examples
(paired bootstrap: test sampling only), and for the seed mean over seeds and test examples
(two-level bootstrap: training randomness too). Written to compare.md
(with machine, date and test-set size), compare.csv (per-seed metrics), compare_differences.csv
and compare.json.

Each sub-run has its own folder (seed-S/ind-J, seed-S/fge, seed-S/sse, seed-S/simplex-kB) and is skipped when
finished, resumed when interrupted: rerunning the command after a kill continues it. A folder
made with other settings (its config.yaml) is refused, naming the folder to delete.
`--jobs N` runs N sub-runs side by side (an FGE run after its Ind run), with the same results.
With `train.batched` (auto: on a GPU) every seed's Ind networks train in one batched pass
(training/batched.py), the FGE runs after it; each network equals its separate run to float rounding.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from modeconn.training.batched import batching_blocker, train_seeds, wants_batching
from modeconn.training.core import progress, provenance, statistics
from modeconn.training.core.checkpoint import atomic_write_json, atomic_write_text, read_finished
from modeconn.training.core.config import CompareSettings, Config, ConfigError, describe_origin
from modeconn.training.core.data import Dataset, iterations_per_epoch
from modeconn.training.core.distributed import Job, run_jobs
from modeconn.training.core.loop import checkpoint_path, resolve_device
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import dataset_spec, load_data, predict_probs
from modeconn.training.core.reports import csv_text
from modeconn.training.core.runs import RunDirError, claim_folder
from modeconn.training.core.schedules import even_cycle_iterations
from modeconn.training.ensembles.calibration import (
    calibrate,
    calibrated_columns,
    calibrated_nll,
    calibration_report,
)
from modeconn.training.ensembles.evaluate import (
    ensemble_probs,
    expand_members,
    ood_datasets,
    predict_members,
    selective_columns,
    split_prefixed,
)
from modeconn.training.ensembles.fge import run_fge
from modeconn.training.ensembles.snapshots import finished_snapshot_run
from modeconn.training.ensembles.sse import run_sse
from modeconn.training.ensembles.swa import swa_network
from modeconn.training.ensembles.swag import swag_from_checkpoints, swag_network
from modeconn.training.simplex.fit import check_shape, fit_simplex
from modeconn.training.train import fge_start_epoch, train_or_reuse

METHODS = ("Ind", "SSE", "FGE", "SWA", "SWAG")
SIMPLEX = "Simplex"
CHOSEN = "Ind m*"  # the equal-budget ensemble validation prefers
# seed s: Ind run j gets config.seed + 100 s + j, SSE config.seed + 100 s + 50, the equal-budget
# network j of M: config.seed + 100 s + 60 + 10 (M - 2) + j
_SEED_STRIDE, _SSE_OFFSET, _EQUAL_OFFSET = 100, 50, 60
# the config sections that shape each kind of sub-run (FGE starts from an Ind run: train too)
_SHAPED_BY = {"ind": ("seed", "data", "model", "train"), "fge": ("seed", "data", "model", "train", "fge"),
              "sse": ("seed", "data", "model", "sse"),
              "simplex": ("seed", "data", "model", "train", "simplex")}
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
    epochs, start = config.train.epochs, fge_start_epoch(config.train, config.fge)
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
def fge_or_reuse(config: Config, start: Path, run_dir: Path) -> None:
    """FGE from `start` into `run_dir`, unless a finished run is there (module level: workers import it)."""
    if finished_snapshot_run(run_dir, "fge") is None:
        run_fge(config, start, run_dir, resume=True)


def sse_or_reuse(config: Config, run_dir: Path) -> None:
    """SSE into `run_dir`, unless a finished run is there."""
    if finished_snapshot_run(run_dir, "sse") is None:
        run_sse(config, run_dir, resume=True)


def simplex_or_reuse(config: Config, start: Path, run_dir: Path) -> None:
    """The simplex grown from `start` into `run_dir` and its sampled ensemble (RUN/snapshots/),
    unless its evaluation (simplex.json, written last) is there; an interrupted run continues."""
    if read_finished(run_dir / "simplex.json") is None:
        fit_simplex(config, [start], run_dir, resume=True)


def _ind_runs(config: Config, seed_dir: Path, largest: int, base_seed: int) -> list[tuple[Config, Path]]:
    """The seed's K Ind runs (config, folder), each folder checked here, before anything runs."""
    runs = []
    for j in range(largest):
        run_dir, run_config = seed_dir / f"ind-{j}", _variant(config, base_seed + j)
        _check_reusable(run_dir, run_config, _SHAPED_BY["ind"])
        runs.append((run_config, run_dir))
    return runs


def equal_method(members: int) -> str:
    return f"Ind m={members}"


def _equal_runs(config: Config, seed_dir: Path, budgets: list[int], base_seed: int
                ) -> dict[tuple[str, int], list[tuple[Config, Path]]]:
    """(method, k) -> the M networks of kB/M epochs each (budgets where M networks fit)."""
    runs: dict[tuple[str, int], list[tuple[Config, Path]]] = {}
    for members in sorted(set(config.compare.equal_budget_members)):
        if members > _SEED_STRIDE - _EQUAL_OFFSET - 10 * (members - 2) or members > 9:
            raise ConfigError(f"compare.equal_budget_members: at most 9 networks, got {members}")
        for k in budgets:
            if k * config.train.epochs < members:
                continue  # fewer epochs than networks: no such ensemble at this budget
            group = []
            for j, epochs in enumerate(statistics.equal_budget_epochs(k * config.train.epochs, members)):
                run_dir = seed_dir / f"eq-{k}B-m{members}-{j}"
                fields = {"epochs": epochs, "lr": config.compare.equal_budget_lr or config.train.lr}
                run_config = _variant(config, base_seed + _EQUAL_OFFSET + 10 * (members - 2) + j, train=fields)
                _check_reusable(run_dir, run_config, _SHAPED_BY["ind"])
                group.append((run_config, run_dir))
            runs[equal_method(members), k] = group
    return runs


def _simplex_runs(config: Config, seed_dir: Path, budgets: list[int], base_seed: int) -> dict[int, tuple[Config, Path]]:
    """k -> the simplex run at kB (budgets from 2B where every trained vertex gets an epoch): the
    first Ind network's B epochs and (k - 1)B split over the trained vertices."""
    if not config.compare.simplex:
        return {}
    check_shape(1, config.simplex)  # grown from one network: refused here, before anything runs
    runs = {}
    for k in budgets:
        rest = (k - 1) * config.train.epochs
        if rest < config.simplex.vertices:
            continue  # 1B: the network has spent the budget
        fields = {"vertex_epochs": statistics.equal_budget_epochs(rest, config.simplex.vertices)}
        run_dir, run_config = seed_dir / f"simplex-{k}B", _variant(config, base_seed, simplex=fields)
        _check_reusable(run_dir, run_config, _SHAPED_BY["simplex"])
        runs[k] = (run_config, run_dir)
    return runs


def _seed_jobs(config: Config, seed_dir: Path, largest: int, base_seed: int, first: int,
               ind_job: int | None = None) -> list[Job]:
    """K Ind runs, then one FGE run from the first Ind run's fge_start_epoch checkpoint (long
    enough for K budgets), then one SSE run; `first` is the index of this seed's first job.
    `ind_job`: the index of the one job that trains every seed's Ind runs in one batched pass
    (then this seed lists no Ind jobs of its own). Each folder is checked here, before anything runs."""
    inds = [] if ind_job is not None else _ind_runs(config, seed_dir, largest, base_seed)
    jobs = [Job(train_or_reuse, run) for run in inds]
    start_epoch = fge_start_epoch(config.train, config.fge)
    fge_config = _variant(config, base_seed, fge={"epochs": largest * config.train.epochs - start_epoch})
    _check_reusable(seed_dir / "fge", fge_config, _SHAPED_BY["fge"])
    start = checkpoint_path(seed_dir / "ind-0", start_epoch)
    jobs.append(Job(fge_or_reuse, (fge_config, start, seed_dir / "fge"), after=(first if ind_job is None else ind_job,)))
    sse_config = _variant(config, base_seed + _SSE_OFFSET, sse={"epochs": largest * config.train.epochs})
    _check_reusable(seed_dir / "sse", sse_config, _SHAPED_BY["sse"])
    jobs.append(Job(sse_or_reuse, (sse_config, seed_dir / "sse")))
    return jobs


# ---------------------------------------------------------------- evaluation
# the differences that matter (the paper's table): FGE against each baseline at the same budget;
# and SWA, the one network from the same snapshots, against the single network and against FGE
COMPARISONS = (("FGE - Ind", "FGE", "Ind"), ("FGE - Ind m*", "FGE", CHOSEN), ("FGE - SSE", "FGE", "SSE"),
               ("FGE - single network", "FGE", "single"), ("SWA - single network", "SWA", "single"),
               ("SWA - FGE", "SWA", "FGE"), ("SWAG - FGE", "SWAG", "FGE"), ("Simplex - FGE", SIMPLEX, "FGE"))
# calibrated NLL first: the headline metric
KEYS = ("cnll", *statistics.LOSSES)
Losses = dict[str, np.ndarray]  # statistics.LOSSES -> per-example values on the test set


def _snapshots_within(states: list[dict[str, Any]], iterations: int) -> int:
    """How many snapshots (in collection order) come from cycles that end inside `iterations`."""
    return sum(1 for s in states if s["snapshot"]["cycle_end"] <= iterations)


def _seed_rows(config: Config, seed: int, finals: list[Path], fge_dir: Path, sse_dir: Path,
               budgets: list[int], data: Dataset, device: torch.device,
               equal: dict[tuple[str, int], list[tuple[Config, Path]]] | None = None,
               simplex: dict[int, tuple[Config, Path]] | None = None,
               ) -> tuple[list[dict[str, Any]], dict[tuple[str, int], Losses]]:
    """The seed's metric rows, and the per-example test losses of every (method, k) and of
    ("single", k): the first Ind network alone (FGE's starting run), the same at every k.
    Rows of method "Ind curve" hold the ensembles of the first j Ind networks (for the DEE)."""
    epochs, start = config.train.epochs, fge_start_epoch(config.train, config.fge)
    fge_steps = iterations_per_epoch(data, config.fge.batch_size)
    sse_steps = iterations_per_epoch(data, config.sse.batch_size)
    ood = ood_datasets(config.compare.ood, data, config.seed)
    ind = predict_members(finals, device, data, ood=ood)
    fge = predict_members(expand_members([fge_dir]), device, data, ood=ood)
    sse = predict_members(expand_members([sse_dir]), device, data, ood=ood)
    members = {"Ind": ind, "FGE": fge, "SSE": sse}
    _, single = _row("single", 1, seed, 1, ind.probs[0], None if ind.val_probs is None else ind.val_probs[0],
                     epochs, data)
    rows, losses = [], {}
    for k in budgets:
        counts = {
            "Ind": k,
            "FGE": _snapshots_within(fge.states, round((k * epochs - start) * fge_steps)),
            "SSE": _snapshots_within(sse.states, k * epochs * sse_steps),
        }
        for method in METHODS:
            if method in ("SWA", "SWAG"):
                continue
            if counts[method] == 0:
                raise ValueError("an ensemble of 0 members")  # _check_budgets rules this out
            chosen, count = members[method], counts[method]
            val = None if chosen.val_probs is None else ensemble_probs(chosen.val_probs[:count])
            row, losses[method, k] = _row(method, k, seed, count, ensemble_probs(chosen.probs[:count]), val, epochs, data,
                                          {name: ensemble_probs(p[:count]) for name, p in chosen.ood_probs.items()})
            rows.append(row)
        # SWA: one network from the same snapshots as FGE at this budget (cheap: no training)
        rows.append(_swa_row(fge.paths[:counts["FGE"]], k, seed, epochs, data, device, losses, ood))
        if config.compare.swag_samples and counts["FGE"] >= 2:  # a Gaussian needs a spread
            rows.append(_swag_row(fge.paths[:counts["FGE"]], k, seed, epochs, config.compare, data, device, losses,
                                  ood))
        losses["single", k] = single
    for (method, k), group in (equal or {}).items():
        chosen = predict_members([d / "final.pt" for _, d in group], device, data, ood=ood)
        val = None if chosen.val_probs is None else ensemble_probs(chosen.val_probs)
        row, losses[method, k] = _row(method, k, seed, len(group), ensemble_probs(chosen.probs), val, epochs, data,
                                      {name: ensemble_probs(p) for name, p in chosen.ood_probs.items()})
        rows.append(row)
    for k, (_, run_dir) in (simplex or {}).items():  # its sampled points, saved as ordinary checkpoints
        chosen = predict_members(expand_members([run_dir]), device, data, ood=ood)
        val = None if chosen.val_probs is None else ensemble_probs(chosen.val_probs)
        row, losses[SIMPLEX, k] = _row(SIMPLEX, k, seed, len(chosen.probs), ensemble_probs(chosen.probs), val, epochs,
                                       data, {name: ensemble_probs(p) for name, p in chosen.ood_probs.items()})
        rows.append(row)
    if ind.val_probs is not None:  # the deep ensemble's calibrated NLL curve: 1, 2, ... full-budget networks
        for j in range(1, len(finals) + 1):
            row, _ = _row("Ind curve", j, seed, j, ensemble_probs(ind.probs[:j]), ensemble_probs(ind.val_probs[:j]),
                          epochs, data)
            rows.append(row)
    return rows, losses


def _row(method: str, k: int, seed: int, members: int, probs: torch.Tensor, val_probs: torch.Tensor | None,
         epochs: int, data: Dataset, ood_probs: dict[str, torch.Tensor] | None = None
         ) -> tuple[dict[str, Any], Losses]:
    """A metric row of compare.csv (at k budgets of `epochs`) and the per-example test losses of
    `probs` (with "cnll": the NLL at the temperature fitted on validation; the raw NLL without a
    validation split). The row also has AURC, E-AURC and the AUROC against each OOD set of
    `ood_probs` (name -> [N_set, C])."""
    val, calibrated, scaled = {}, {}, probs
    if val_probs is not None:
        val = split_prefixed(classification_metrics(val_probs, data.y_val), "val")
        # Ashukha et al. 2020: compare ensembles at their best temperature (fitted on validation)
        report = calibration_report(val_probs, data.y_val, probs, data.y_test)
        calibrated = {**calibrated_columns(report), "calibrated_val_nll": report["calibrated_val_nll"]}
        scaled = calibrate(probs, report["temperature"])
    row = {"method": method, "k": k, "budget_epochs": k * epochs, "seed": seed, "members": members,
           **val, **split_prefixed(classification_metrics(probs, data.y_test)), **calibrated,
           **selective_columns(probs, data.y_test, ood_probs or {})}
    losses = statistics.per_example_losses(probs, data.y_test)
    losses["cnll"] = statistics.per_example_losses(scaled, data.y_test)["nll"]
    return row, losses


def _swa_row(snapshots: list[Path], k: int, seed: int, epochs: int, data: Dataset, device: torch.device,
             losses: dict[tuple[str, int], Losses], ood: dict[str, Dataset] | None = None) -> dict[str, Any]:
    """The SWA network of `snapshots` (members: how many were averaged); its losses go into `losses`."""
    net, _ = swa_network(snapshots, data, device)
    val = predict_probs(net, data, "val").double() if len(data.y_val) else None
    row, losses["SWA", k] = _row("SWA", k, seed, len(snapshots), predict_probs(net, data, "test").double(), val,
                                 epochs, data, {name: predict_probs(net, s, "test").double() for name, s in (ood or {}).items()})
    return row


def _swag_row(snapshots: list[Path], k: int, seed: int, epochs: int, settings: CompareSettings, data: Dataset,
              device: torch.device, losses: dict[tuple[str, int], Losses], ood: dict[str, Dataset] | None = None
              ) -> dict[str, Any]:
    """The ensemble of SWAG draws from `snapshots` at the scale validation prefers (members:
    draws). Every scale's draws are judged on validation alone; only the chosen scale's are
    evaluated on the test and OOD sets (the same row as evaluating all, for a third of the work)."""
    moments, model, _ = swag_from_checkpoints(snapshots, device)
    best: tuple[float, float, list[dict[str, torch.Tensor]], torch.Tensor | None] | None = None
    for scale in settings.swag_scales:  # the same draws' noise at every scale: only the scale differs
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        draws, val = [], []
        for _ in range(settings.swag_samples):
            net = swag_network(model, moments, generator, scale, data)
            draws.append({name: v.clone() for name, v in net.state_dict().items()})
            if len(data.y_val):
                val.append(predict_probs(net, data, "val").double())
        val_probs = ensemble_probs(torch.stack(val)) if val else None
        # the criterion `_row` reports (no validation split: the first scale)
        score = 0.0 if val_probs is None else calibrated_nll(val_probs, data.y_val)[0]
        if best is None or score < best[0]:
            best = (score, scale, draws, val_probs)
    _, scale, draws, val_probs = best
    test, outs = [], {name: [] for name in ood or {}}
    for draw in draws:
        model.load_state_dict(draw)
        test.append(predict_probs(model, data, "test").double())
        for name, split in (ood or {}).items():
            outs[name].append(predict_probs(model, split, "test").double())
    row, losses["SWAG", k] = _row("SWAG", k, seed, len(test), ensemble_probs(torch.stack(test)), val_probs, epochs,
                                  data, {name: ensemble_probs(torch.stack(p)) for name, p in outs.items()})
    return {**row, "swag_scale": scale}


def _methods(rows: list[dict[str, Any]]) -> list[str]:
    """The methods of the table in their order: Ind, its equal-budget ensembles, Ind m*, the rest."""
    present = {r["method"] for r in rows}
    equal = sorted((m for m in present if m.startswith("Ind m=")), key=lambda m: int(m.split("=")[1]))
    return [m for m in ("Ind", *equal, CHOSEN, "SSE", "FGE", "SWA", "SWAG", SIMPLEX) if m in present]


def _aggregate(rows: list[dict[str, Any]], budgets: list[int]) -> dict[str, dict[int, dict[str, float]]]:
    """Per method and budget: mean and std over seeds of each test metric (cells a method has)."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for method in [*_methods(rows), "Ind curve"]:
        for k in sorted({r["k"] for r in rows if r["method"] == method}):
            cell = [r for r in rows if r["method"] == method and r["k"] == k]
            entry: dict[str, float] = {}
            metrics = [("test", m) for m in ("error", "nll", "ece", "brier")]
            if "val_nll" in cell[0]:
                metrics += [("val", "error"), ("val", "nll"), ("calibrated_test", "nll"), ("calibrated_val", "nll")]
            for split, metric in metrics:
                spread = statistics.mean_std([r[f"{split}_{metric}"] for r in cell])
                entry[f"{split}_{metric}_mean"], entry[f"{split}_{metric}_std"] = spread["mean"], spread["std"]
            for key in (k for k in cell[0] if k.startswith(SELECTIVE_PREFIXES)):  # selective.py's metrics
                spread = statistics.mean_std([r[key] for r in cell])
                entry[f"{key}_mean"], entry[f"{key}_std"] = spread["mean"], spread["std"]
            entry["members"] = statistics.mean_std([r["members"] for r in cell])["mean"]
            entry["seeds"] = len(cell)
            if "chosen" in cell[0]:
                entry["chosen"] = cell[0]["chosen"]
            table.setdefault(method, {})[k] = entry
    return table


def _choose_equal_budget(rows: list[dict[str, Any]], losses: list[dict[tuple[str, int], Losses]],
                         budgets: list[int]) -> list[dict[str, Any]]:
    """Ind m*: at each budget, of Ind and the equal-budget ensembles, the one with the lowest
    calibrated validation NLL (mean over seeds); its rows and losses again under CHOSEN."""
    chosen_rows = []
    for k in budgets:
        candidates = {}
        for method in ("Ind", *(m for m in _methods(rows) if m.startswith("Ind m="))):
            cell = [r for r in rows if r["method"] == method and r["k"] == k]
            key = "calibrated_val_nll" if cell and "calibrated_val_nll" in cell[0] else "val_nll"
            if cell and key in cell[0]:
                candidates[method] = statistics.mean_std([r[key] for r in cell])["mean"]
        if not candidates:
            continue  # no validation split: nothing to choose on
        best = min(candidates, key=candidates.__getitem__)
        for r in rows:
            if r["method"] == best and r["k"] == k:
                chosen_rows.append({**r, "method": CHOSEN, "chosen": best})
        for seed_losses in losses:
            seed_losses[CHOSEN, k] = seed_losses[best, k]
    return chosen_rows


def comparisons(losses: list[dict[tuple[str, int], Losses]]) -> list[tuple[str, str, str]]:
    """COMPARISONS with FGE against each equal-budget ensemble the runs have, after FGE − Ind m*:
    where validation prefers one network, the baseline that may win is in those rows; and, where
    there is a simplex, Simplex against the one validation prefers and each of them too."""
    present = {method for seed_losses in losses for method, _ in seed_losses}
    equal = sorted((m for m in present if m.startswith("Ind m=")), key=lambda m: int(m.split("=")[1]))
    at = [name for name, *_ in COMPARISONS].index("FGE - Ind m*") + 1
    simplex = [(f"{SIMPLEX} - {m}", SIMPLEX, m) for m in (CHOSEN, *equal)] if SIMPLEX in present else []
    return [*COMPARISONS[:at], *((f"FGE - {m}", "FGE", m) for m in equal), *COMPARISONS[at:], *simplex]


def _differences(losses: list[dict[tuple[str, int], Losses]], budgets: list[int]) -> dict[str, dict[str, Any]]:
    """For each comparison and budget: every seed's interval, mean ± std of the per-seed
    differences, the interval of the seed-mean difference over test examples (resampled once for
    all seeds) and, with two seeds or more, over seeds and test examples (two-level bootstrap)."""
    out: dict[str, dict[str, Any]] = {}
    for name, method, baseline in comparisons(losses):
        for k in budgets:
            if any((method, k) not in s or (baseline, k) not in s for s in losses):
                continue
            first = [seed_losses[method, k] for seed_losses in losses]
            base = [seed_losses[baseline, k] for seed_losses in losses]
            per_seed = [statistics.loss_differences(a, b, keys=KEYS) for a, b in zip(first, base, strict=True)]
            stacked_a = {m: np.stack([a[m] for a in first]) for m in KEYS}
            stacked_b = {m: np.stack([b[m] for b in base]) for m in KEYS}
            seed_mean = statistics.loss_differences(stacked_a, stacked_b, keys=KEYS)
            two_level = ({m: statistics.two_level_bootstrap(stacked_a[m], stacked_b[m]) for m in KEYS}
                         if len(losses) > 1 else None)
            out.setdefault(name, {})[f"{k}B"] = {
                "seed_mean": statistics.intervals_json(seed_mean),
                "seeds_and_examples": statistics.intervals_json(two_level) if two_level else None,
                "over_seeds": {m: statistics.mean_std([d[m].mean for d in per_seed]) for m in KEYS},
                "per_seed": [statistics.intervals_json(d) for d in per_seed],
            }
    return out


def _deep_ensemble_equivalents(table: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[int, float]]:
    """Per method and budget: the DEE of its mean calibrated test NLL against the Ind curve
    (ensembles of 1, 2, ... full-budget networks, mean over seeds)."""
    curve_cells = table.get("Ind curve", {})
    if not curve_cells or "calibrated_test_nll_mean" not in next(iter(curve_cells.values())):
        return {}
    curve = [curve_cells[j]["calibrated_test_nll_mean"] for j in sorted(curve_cells)]
    return {method: {k: statistics.deep_ensemble_equivalent(cell["calibrated_test_nll_mean"], curve)
                     for k, cell in cells.items()}
            for method, cells in table.items() if method != "Ind curve"}


def _cell(interval: dict[str, Any], metric: str, two_level: dict[str, Any] | None = None) -> str:
    """`diff [low, high]` (test sampling), then `⟨low, high⟩` (seeds and test sampling) when given;
    starred when the widest interval given excludes 0."""
    text = statistics.Interval(**interval).text(statistics.DIGITS[metric])
    widest = interval
    if two_level is not None:
        digits = statistics.DIGITS[metric]
        text += f" ⟨{two_level['low']:+.{digits}f}, {two_level['high']:+.{digits}f}⟩"
        widest = two_level
    return text + (" *" if widest["low"] > 0 or widest["high"] < 0 else "")


def _verdict(name: str, k: int, metric: str, cell: dict[str, Any]) -> str | None:
    """One sentence of what a difference shows, from its widest interval; None when it shows nothing."""
    interval = cell["seeds_and_examples"][metric] if cell["seeds_and_examples"] else cell["seed_mean"][metric]
    first, second = name.split(" - ")
    covers = "seeds and test examples" if cell["seeds_and_examples"] else "test examples only"
    digits = statistics.DIGITS[metric]
    span = f"{interval['mean']:+.{digits}f} [{interval['low']:+.{digits}f}, {interval['high']:+.{digits}f}]"
    if interval["high"] < 0:
        return f"{first} is better than {second} at {k}B in {statistics.LABELS[metric]}: {span} ({covers})."
    if interval["low"] > 0:
        return f"**{second} is better than {first}** at {k}B in {statistics.LABELS[metric]}: {span} ({covers})."
    return None


def _markdown(config: Config, table: dict[str, dict[int, dict[str, float]]], differences: dict[str, dict[str, Any]],
              budgets: list[int], seeds: int, info: dict[str, Any], dee: dict[str, dict[int, float]],
              origin: dict[str, Any] | None = None) -> str:
    epochs, start = config.train.epochs, fge_start_epoch(config.train, config.fge)
    columns = " | ".join(f"{k}B ({k * epochs} ep)" for k in budgets)
    rule = "|---|---|" + "---|" * len(budgets)
    lines = [
        f"**Budget comparison: {config.model.label} on {config.data.name}** (config `{config.name}`)",
        "",
        *provenance.markdown_lines(info),
        "- Settings: " + (f"from {describe_origin(origin)}; " if origin else "")
        + "the effective config, overrides included, is `config` in compare.json.",
        "",
        f"B = {epochs} epochs. Ensemble test metrics (SWA: one network), mean ± std over {seeds} seed(s). The headline "
        "is the calibrated NLL (each ensemble at its temperature fitted on validation); DEE: how many full-budget "
        "independent networks give the same calibrated NLL (interpolated; ∞: more than the largest Ind ensemble). "
        "Ensemble size (SWA: snapshots averaged; Ind m*: the ensemble validation chose; Simplex: points sampled) in brackets.",
        "",
        f"| method | metric | {columns} |",
        rule,
    ]
    for method in [m for m in table if m != "Ind curve"]:
        cells = [table[method].get(k) for k in budgets]
        rows = [("calibrated_test_nll", "calibrated NLL", 4), ("dee", "DEE", 2), ("test_error", "error %", 2),
                ("test_nll", "NLL", 4), ("test_brier", "Brier", 4), ("test_ece", "ECE", 4)]
        for key, label, digits in rows:
            values = []
            for k, c in zip(budgets, cells, strict=True):
                if c is None:
                    values.append("—")
                elif key == "dee":
                    value = dee.get(method, {}).get(k)
                    values.append("—" if value is None else "∞" if math.isinf(value) else f"{value:.{digits}f}")
                elif f"{key}_mean" not in c:
                    values.append("—")  # no validation split: nothing to fit a temperature on
                else:
                    bracket = f" [{c['chosen']}]" if "chosen" in c else f" [{c['members']:g}]"
                    values.append(f"{c[f'{key}_mean']:.{digits}f} ± {c[f'{key}_std']:.{digits}f}"
                                  + (bracket if key == "test_error" else ""))
            if any(v != "—" for v in values):
                lines.append(f"| {method} | {label} | {' | '.join(values)} |")
    two = seeds > 1
    lines += [
        "",
        f"Differences, the first minus the second at the same budget (negative: the first lower), on the {info['test_size']:,} "
        "test examples: `diff [low, high]` is the seed-mean difference with its 95 % paired bootstrap interval over the "
        "test examples only (resampled once for all seeds)"
        + ("; `⟨low, high⟩` is the 95 % two-level bootstrap interval over seeds and test examples, which also covers "
           "training randomness" if two else "; with one seed no interval covers training randomness")
        + ". * marks a difference whose widest interval excludes 0.",
        "",
        f"| comparison | metric | {columns} |",
        rule,
    ]
    for name in differences:  # in the order of `comparisons`
        for metric in KEYS:
            cells = []
            for k in budgets:
                cell = differences[name].get(f"{k}B")
                cells.append("—" if cell is None else _cell(cell["seed_mean"][metric], metric,
                                                            (cell["seeds_and_examples"] or {}).get(metric)))
            lines.append(f"| {name.replace(' - ', ' − ')} | {statistics.LABELS[metric]} | {' | '.join(cells)} |")
    verdicts = [v for name in differences if name != "SWA - single network" for k in budgets
                if f"{k}B" in differences[name]
                for metric in ("cnll", "error") if (v := _verdict(name, k, metric, differences[name][f"{k}B"]))]
    lines += ["", "What the table shows (generated from the intervals above; a difference whose interval "
              "includes 0 is not listed):", ""]
    lines += [f"- {v}" for v in verdicts] or ["- no difference between the methods is shown at this size."]
    lines += [
        "",
        "Per seed: mean ± std over seeds of the per-seed differences, then each seed's own interval (test examples only).",
        "",
        "| comparison | metric | budget | mean ± std | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |",
        "|---|---|---|---|" + "---|" * seeds,
    ]
    for name in differences:
        for metric in KEYS:
            digits = statistics.DIGITS[metric]
            for k in budgets:
                cell = differences.get(name, {}).get(f"{k}B")
                if cell is None:
                    continue
                spread = cell["over_seeds"][metric]
                per_seed = " | ".join(_cell(d[metric], metric) for d in cell["per_seed"])
                lines.append(f"| {name.replace(' - ', ' − ')} | {statistics.LABELS[metric]} | {k}B | "
                             f"{spread['mean']:+.{digits}f} ± {spread['std']:.{digits}f} | {per_seed} |")
    members = ", ".join(str(m) for m in sorted(set(config.compare.equal_budget_members)))
    lines += [
        "",
        f"- Ind at kB: k independently trained networks of {epochs} epochs (train.lr {config.train.lr}).",
        f"- Ind m=M at kB (M = {members}): M independent networks of kB/M epochs each, the same schedule shape at "
        f"lr {config.compare.equal_budget_lr or config.train.lr} (the equal-budget ensemble); Ind m*: of Ind and these, "
        "the lowest calibrated validation NLL at that budget.",
        f"- FGE at kB: the first Ind network's epoch-{start} checkpoint (momentum kept), then kB − {start} FGE epochs "
        f"(cycle {config.fge.cycle_epochs} epochs, lr1 {config.fge.lr1}, lr2 {config.fge.lr2}; snapshots with "
        + ("BN recomputed on the training split)." if config.fge.bn_update else "the BN running averages of training)."),
        f"- SSE at kB: the first kB epochs of one SSE run from scratch (cycle {config.sse.cycle_epochs} epochs, "
        f"lr {config.sse.lr}).",
        "- SWA at kB: one network, the average of FGE's snapshots at kB (BN recomputed on the training split).",
        f"- SWAG at kB: {config.compare.swag_samples} networks drawn from the SWAG Gaussian of FGE's snapshots at kB "
        f"(BN recomputed for each), at the covariance scale of {config.compare.swag_scales} with the lowest "
        "calibrated validation NLL.",
        "- single network: the first Ind network alone (1B), the one FGE starts from.",
    ]
    if config.compare.simplex:
        lines.insert(-1, f"- Simplex at kB (from 2B): ESPRO grown from the first Ind network (its {epochs} epochs count) "
                     f"with {config.simplex.vertices} trained vertices sharing the other (k − 1) × {epochs} epochs (as "
                     f"evenly as whole epochs allow; lr {config.simplex.lr} cosine-annealed over each vertex's epochs, "
                     f"λ {config.simplex.volume_weight:g}); the ensemble of {config.simplex.ensemble_size} points "
                     "sampled uniformly on it, BN recomputed at each.")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    header = ["method", "chosen", "k", "budget_epochs", "seed", "members", "swag_scale", "val_error", "val_nll",
              "calibrated_val_nll", "test_error", "test_nll", "test_ece", "test_brier", "temperature",
              "calibrated_test_nll", "calibrated_test_ece", "calibrated_test_brier"]
    selective = [k for k in rows[0] if k.startswith(SELECTIVE_PREFIXES)] if rows else []
    return csv_text(header + selective, rows)


# ---------------------------------------------------------------- selective prediction and OOD detection
SELECTIVE_PREFIXES = ("test_aurc", "test_eaurc", "auroc_")


def _selective_markdown(table: dict[str, dict[int, dict[str, float]]], budgets: list[int], seeds: int,
                        info: dict[str, Any]) -> str:
    """The second table: each method's AURC, E-AURC and AUROC per OOD set, mean ± std over seeds."""
    methods = [m for m in table if m != "Ind curve"]
    first = next((table[m][k] for m in methods for k in table[m]), {})
    keys = [k[:-5] for k in first if k.endswith("_mean") and k.startswith(SELECTIVE_PREFIXES)]
    if not keys:
        return ""
    lines = [
        "",
        f"Selective prediction and out-of-distribution detection (training/ensembles/selective.py), on the "
        f"{info['test_size']:,} test examples, mean ± std over {seeds} seed(s): AURC, the mean error rate (a "
        "fraction) of the most confident fraction over coverages 1/n .. 1 (confidence: the largest probability), "
        "lower is better; E-AURC, AURC minus that of the best ranking of the same errors (0: every error less "
        "confident than every correct prediction); AUROC SCORE: SET, the probability that an input of the OOD set "
        "scores higher than a test input (entropy, or minus the largest probability), 0.5: no better than chance.",
        "",
        "| method | metric | " + " | ".join(f"{k}B" for k in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for method in methods:
        for key in keys:
            cells = [table[method].get(k) for k in budgets]
            values = ["—" if c is None or f"{key}_mean" not in c else f"{c[f'{key}_mean']:.4f} ± {c[f'{key}_std']:.4f}"
                      for c in cells]
            lines.append(f"| {method} | {_selective_label(key)} | {' | '.join(values)} |")
    return "\n".join(lines) + "\n"


def _selective_label(key: str) -> str:
    """test_aurc -> AURC, test_eaurc -> E-AURC, auroc_entropy:SET -> AUROC entropy: SET."""
    if key.startswith("auroc_"):
        score, _, name = key.removeprefix("auroc_").partition(":")
        return f"AUROC {score.replace('_', ' ')}: {name}"
    return {"test_aurc": "AURC", "test_eaurc": "E-AURC"}[key]


def _differences_csv(differences: dict[str, dict[str, Any]]) -> str:
    """One row per comparison, budget, metric and seed ("mean": the seed-mean difference over test
    examples; "seeds and examples": its two-level interval)."""
    header = ["comparison", "budget", "metric", "seed", "diff", "low", "high", "resamples", "bootstrap_seed"]
    return csv_text(header, (
        [name, budget, metric, seed, d[metric]["mean"], d[metric]["low"], d[metric]["high"], d[metric]["resamples"],
         d[metric]["seed"]]
        for name, cells in differences.items()
        for budget, cell in cells.items()
        for metric in KEYS
        for seed, d in [*enumerate(cell["per_seed"]), ("mean", cell["seed_mean"]),
                        *([("seeds and examples", cell["seeds_and_examples"])] if cell["seeds_and_examples"] else [])]
    ))


def compare_budgets(config: Config, run_dir: Path, force: bool = False, jobs_at_once: int = 1,
                    ray: str | None = None, origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or reuse) every sub-run, `jobs_at_once` side by side, or each a task on the Ray
    cluster at `ray` (training/core/distributed.py `run_jobs`; the same results as one after
    the other), then write compare.md and compare.csv into `run_dir`. `origin`
    (config.config_origin): the config file and overrides, recorded with the effective config."""
    started = time.perf_counter()
    claim_folder(run_dir, "compare", force=force, container=True)  # --force deletes only the comparison's own files
    device = resolve_device(config.device)
    data = load_data(dataset_spec(config.data), device)
    budgets = _check_budgets(config, iterations_per_epoch(data, config.fge.batch_size),
                             iterations_per_epoch(data, config.sse.batch_size))
    largest, seeds = budgets[-1], config.compare.seeds
    seed_dirs = [run_dir / f"seed-{s}" for s in range(seeds)]
    base_seeds = [config.seed + _SEED_STRIDE * s for s in range(seeds)]
    inds = [run for d, b in zip(seed_dirs, base_seeds, strict=True) for run in _ind_runs(config, d, largest, b)]
    # every seed's Ind networks in one batched pass (training/batched.py), when they can be
    blocker = batching_blocker([c for c, _ in inds]) if wants_batching(config.train, config.device) else "train.batched"
    batched = blocker is None
    if config.train.batched is True and blocker is not None and len(inds) > 1:
        progress.log(f"[dim]compare: the Ind networks one after another ({blocker})[/dim]")
    jobs: list[Job] = [Job(train_seeds, ([c for c, _ in inds], [d for _, d in inds]))] if batched else []
    equal, simplex = {}, {}
    for seed_dir, base_seed in zip(seed_dirs, base_seeds, strict=True):
        first = len(jobs)  # this seed's first Ind run (ind-0) without batching
        jobs += _seed_jobs(config, seed_dir, largest, base_seed, first, 0 if batched else None)
        equal[seed_dir] = _equal_runs(config, seed_dir, budgets, base_seed)
        jobs += [Job(train_or_reuse, run) for group in equal[seed_dir].values() for run in group]
        simplex[seed_dir] = _simplex_runs(config, seed_dir, budgets, base_seed)
        jobs += [Job(simplex_or_reuse, (run_config, seed_dir / "ind-0" / "final.pt", run_dir),
                     after=(0 if batched else first,)) for run_config, run_dir in simplex[seed_dir].values()]
    where = f"on Ray ({ray})" if ray else f"{jobs_at_once} at a time"
    progress.log(f"[bold]compare: {seeds} seed(s), {len(jobs)} runs, {where}[/bold] ({run_dir})")
    run_jobs(jobs, jobs_at_once, device, ray=ray)
    rows: list[dict[str, Any]] = []
    losses: list[dict[tuple[str, int], Losses]] = []
    with progress.task("compare: evaluating", seeds) as advance:  # minutes on a CPU: every member on the test set
        for s, seed_dir in enumerate(seed_dirs):
            evaluating = time.perf_counter()
            finals = [seed_dir / f"ind-{j}" / "final.pt" for j in range(largest)]
            seed_rows, seed_losses = _seed_rows(config, s, finals, seed_dir / "fge", seed_dir / "sse", budgets, data,
                                                device, equal[seed_dir], simplex[seed_dir])
            rows += seed_rows
            losses.append(seed_losses)
            progress.log(f"compare: seed {s} evaluated ({time.perf_counter() - evaluating:.1f}s)")
            advance()
    rows += _choose_equal_budget(rows, losses, budgets)
    table = _aggregate(rows, budgets)
    dee = _deep_ensemble_equivalents(table)
    differences = _differences(losses, budgets)
    info = provenance.provenance(len(data.y_test))
    paths = {name: run_dir / f"compare{suffix}" for name, suffix in
             (("markdown", ".md"), ("csv", ".csv"), ("differences_csv", "_differences.csv"), ("json", ".json"))}
    markdown = _markdown(config, table, differences, budgets, seeds, info, dee, origin) + _selective_markdown(
        table, budgets, seeds, info)
    result = {"run_dir": str(run_dir), **{k: str(p) for k, p in paths.items()},
              "table": {m: {f"{k}B": cell for k, cell in cells.items()} for m, cells in table.items()},
              # None: more than the largest Ind ensemble (JSON has no infinity)
              "deep_ensemble_equivalent": {m: {f"{k}B": v if math.isfinite(v) else None for k, v in cells.items()}
                                           for m, cells in dee.items()},
              "differences": differences, "provenance": info, "test_size": len(data.y_test), "seeds": seeds,
              "config": config.model_dump(mode="json"), "config_origin": origin}
    atomic_write_text(paths["markdown"], markdown)
    atomic_write_text(paths["csv"], _csv(rows))
    atomic_write_text(paths["differences_csv"], _differences_csv(differences))
    result["seconds"] = time.perf_counter() - started
    atomic_write_json(paths["json"], result)
    progress.log(markdown + f"\ncompare: {seeds} seed(s) in {result['seconds']:.1f}s -> {paths['markdown']}")
    return result
