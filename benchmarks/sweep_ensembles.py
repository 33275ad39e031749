"""Choose every method's settings on the VALIDATION split, with the same effort per method.

For a config and S seeds, at the 1B budget of `compare` (B = train.epochs):
1. Ind: one network per train.lr of the grid (the paper's schedule shape kept). The lr with
   the lowest mean calibrated validation NLL becomes train.lr: Ind's, FGE's start network's
   and the equal-budget members' setting (their networks differ only in length). The full grid
   also trains the equal-budget pair of 1B (2 networks of B/2 epochs) at every lr of the grid,
   to show whether a choice of its own would differ.
2. SSE: one run of sse.epochs from scratch per (snapshots per budget, lr).
3. FGE: from each seed's network at the CHOSEN train.lr (its fge_start_epoch checkpoint), one run
   of fge.epochs per (cycle, lr1), lr2 = lr1 / 10. Every snapshot keeps the BN running averages
   beside the recomputed statistics, so BN recomputation on and off are both evaluated on the
   same runs (what fge.bn_update false saves; no training) and chosen with the rest.
4. Simplex: ESPRO grown from each seed's network at the CHOSEN train.lr (its final.pt), one run
   per simplex.volume_weight λ, its simplex.vertices trained vertices sharing B epochs: compare's
   Simplex at 2B, its smallest budget (at 1B the network has spent the budget). Scored as compare
   scores it: the ensemble of the first simplex.ensemble_size points sampled on it, BN recomputed
   at each (training data only).
The grids have the same number of configurations per method. Each is ranked by the mean over
seeds of the calibrated validation NLL (the temperature fitted on validation: compare's
headline), raw validation NLL and error beside it. Only validation predictions are computed:
the sweep never reads the test split.

    python benchmarks/sweep_ensembles.py --config configs/mnist1d.yaml --seeds 2 --jobs 2
    python benchmarks/sweep_ensembles.py --methods simplex ...  # Ind (for train.lr) and the simplex only

Sub-runs live under --work (default runs/sweep-<config name>) and are reused when finished,
so an interrupted sweep continues where it stopped. The results go to
benchmarks/results/sweep-ensembles-<config name>-<date>.{md,json}.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from common import RESULTS, add_section, arguments, command_line, start_run, write_results

from modeconn.training.core import progress
from modeconn.training.core.config import Config, load_config
from modeconn.training.core.data import Dataset
from modeconn.training.core.distributed import Job, run_jobs
from modeconn.training.core.loop import checkpoint_path, resolve_device
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import dataset_spec, load_data, load_network, predict_probs
from modeconn.training.core.statistics import equal_budget_epochs
from modeconn.training.ensembles.calibration import calibrated_nll
from modeconn.training.ensembles.compare import fge_or_reuse, sse_or_reuse
from modeconn.training.ensembles.evaluate import ensemble_probs, expand_members
from modeconn.training.simplex.evaluate import ensemble_points, point_network
from modeconn.training.simplex.fit import grown_simplex, load_simplex
from modeconn.training.train import fge_start_epoch, train_or_reuse

GRIDS: dict[str, dict[str, Any]] = {
    # six configurations per method: the lr over a factor of 32 for Ind; lr and cycle shape for
    # FGE (cycle in epochs) and SSE (snapshots per budget)
    "full": {
        "train": [{"lr": lr} for lr in (0.025, 0.05, 0.1, 0.2, 0.4, 0.8)],
        "fge": [{"cycle_epochs": c, "lr1": lr1} for c in (1.0, 2.0) for lr1 in (0.2, 0.4, 0.8)],
        "sse": [{"snapshots": n, "lr": lr} for n in (3, 5) for lr in (0.1, 0.2, 0.4)],
        # λ of −λ log(V² + ε): a doubling of the simplex changes log V² by a fixed amount (a triangle:
        # 4 log 2 = 2.8) whatever its size, so λ trades against the change in training loss it buys.
        # Swept alone (0 to 1) at the reference code's vertex lr 0.01, λ 0 to 1e-2 differed by 0.004
        # and 1 dominated the loss (sweep-ensembles-simplex-volume-demo-2026-12-07): the vertices'
        # lr decides how far they move, so it is swept with the two useful λ
        "simplex": [{"lr": lr, "volume_weight": v} for lr in (0.01, 0.1, 0.4) for v in (1e-2, 1e-1)],
        "equal_check": True,
    },
    # four per method, the lr only (each method's cycle as the config has it), for larger data
    "small": {
        "train": [{"lr": lr} for lr in (0.05, 0.1, 0.2, 0.4)],
        "fge": [{"lr1": lr1} for lr1 in (0.05, 0.1, 0.2, 0.4)],
        "sse": [{"lr": lr} for lr in (0.05, 0.1, 0.2, 0.4)],
        "simplex": [{"volume_weight": v} for v in (1e-3, 1e-2, 1e-1, 1.0)],
        "equal_check": False,
    },
}
METHODS = ("ind", "equal", "sse", "fge", "simplex")  # Ind always runs: the others start from its choice
SEED_BASE = 1000  # seeds of their own, apart from the pipeline's (0, 1) and compare's (0, 100, 200, ...)
EQUAL_MEMBERS = 2  # the equal-budget check: the pair of 1B, the ensemble closest to FGE there


def equal_seed(seed: int, member: int) -> int:
    """The seed of member j of the equal-budget pair of sweep seed `seed` (1000 + s): apart from
    every other seed's members, so no network is shared between seeds."""
    return seed + 100 * (member + 1)


def equal_folder(fields: dict[str, Any], seed: int, member: int) -> str:
    return f"{_folder('equal', fields)}-seed{equal_seed(seed, member)}"
Scores = dict[str, float]


# ---------------------------------------------------------------- the settings of each sub-run
def _variant(config: Config, seed: int, section: str, fields: dict[str, Any]) -> Config:
    tree = config.model_dump()
    tree["seed"] = seed
    tree[section].update(fields)
    return Config.model_validate(tree)


def fge_fields(config: Config, setting: dict[str, Any]) -> dict[str, Any]:
    """FGE's fields for a grid setting: lr2 = lr1 / 10, BN recomputed (the running averages are
    kept beside it, so both can be evaluated)."""
    cycle = setting.get("cycle_epochs", config.fge.cycle_epochs)
    return {"cycle_epochs": cycle, "lr1": setting["lr1"], "lr2": round(setting["lr1"] / 10, 6), "bn_update": True}


def sse_fields(config: Config, setting: dict[str, Any]) -> dict[str, Any]:
    cycle = config.sse.epochs / setting["snapshots"] if "snapshots" in setting else config.sse.cycle_epochs
    return {"cycle_epochs": round(cycle, 6), "lr": setting["lr"]}


def simplex_fields(config: Config, setting: dict[str, Any]) -> dict[str, Any]:
    """The simplex's fields for a grid setting: its trained vertices share B epochs (compare's 2B)."""
    return {**setting, "vertex_epochs": equal_budget_epochs(config.train.epochs, config.simplex.vertices)}


def _name(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in fields.items() if k != "bn_update")


def _folder(prefix: str, fields: dict[str, Any]) -> str:
    return prefix + "".join(f"-{k}{v:g}" for k, v in fields.items() if k != "bn_update")


# ---------------------------------------------------------------- the jobs (module level: workers import them)
def _train(config: Config, run_dir: Path) -> None:
    train_or_reuse(config, run_dir)


def _grow_simplex(config: Config, start: Path, run_dir: Path) -> None:
    """The simplex grown from `start` (an interrupted one continued, a finished one kept); no test split read."""
    grown_simplex(config, [start], run_dir, resume=True)


# ---------------------------------------------------------------- validation scores
@torch.no_grad()
def val_probs(paths: list[Path], data: Dataset, device: torch.device, running_bn: bool = False) -> torch.Tensor:
    """[K, N_val, C] validation softmax outputs of each checkpoint; `running_bn`: with the BN
    running averages a snapshot keeps beside its recomputed statistics (its own otherwise)."""
    out = []
    for path in paths:
        model, state = load_network(path, device)
        if running_bn and "bn_running_averages" in state:
            model.load_state_dict({**model.state_dict(), **state["bn_running_averages"]})
        out.append(predict_probs(model, data, "val"))
    return torch.stack(out)


def val_scores(member_probs: torch.Tensor, labels: torch.Tensor) -> Scores:
    """The ensemble's calibrated validation NLL (T fitted on validation), raw NLL and error %."""
    probs = ensemble_probs(member_probs)
    metrics = classification_metrics(probs, labels)
    cal_nll, temperature = calibrated_nll(probs, labels)
    return {"cal_nll": cal_nll, "nll": metrics["nll"],
            "error": metrics["error"], "temperature": temperature}


def rank(results: dict[str, list[Scores]]) -> list[list[Any]]:
    """Table rows, best (lowest mean calibrated validation NLL) first; a setting that diverged
    (a non-finite score on any seed) ranks last, its mean inf."""
    rows = []
    for name, per_seed in results.items():
        cal = [r["cal_nll"] for r in per_seed]
        finite = all(math.isfinite(v) for v in cal)
        spread = (statistics.stdev(cal) if len(cal) > 1 else 0.0) if finite else math.nan
        rows.append([name, statistics.fmean(cal) if finite else math.inf, spread,
                     statistics.fmean(r["nll"] for r in per_seed), statistics.fmean(r["error"] for r in per_seed),
                     " / ".join(f"{v:.4f}" for v in cal)])
    return sorted(rows, key=lambda r: r[1])


HEADERS = ["setting", "cal. val NLL (mean)", "std", "val NLL (mean)", "val error % (mean)", "cal. val NLL per seed"]


# ---------------------------------------------------------------- the sweep
def simplex_scores(run_dir: Path, config: Config, data: Dataset, device: torch.device) -> Scores:
    """The validation scores of the ensemble compare takes from the simplex in `run_dir`: its first
    simplex.ensemble_size sampled points (drawn with the run's seed), BN recomputed at each."""
    simplex, _ = load_simplex(run_dir, device)
    members = [predict_probs(point_network(simplex, w, data), data, "val")
               for w in ensemble_points(simplex, config.simplex, config.seed)]
    return val_scores(torch.stack(members), data.y_val)


def sweep(config: Config, seeds: int, grid: dict[str, Any], work: Path, jobs: int,
          methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """Train (or reuse) every sub-run of `methods` and score it on validation; returns the
    per-method results and the chosen settings."""
    device = resolve_device(config.device)
    data = load_data(dataset_spec(config.data), device)
    if not len(data.y_val):
        raise SystemExit(f"{config.name}: no validation split (data.val_size 0): nothing to choose on")
    seed_dirs = {SEED_BASE + s: work / f"seed-{SEED_BASE + s}" for s in range(seeds)}
    first: list[Job] = []
    for seed, seed_dir in seed_dirs.items():
        for fields in grid["train"]:
            first.append(Job(_train, (_variant(config, seed, "train", fields), seed_dir / _folder("train", fields))))
            if grid["equal_check"] and "equal" in methods:
                for j, epochs in enumerate(equal_budget_epochs(config.train.epochs, EQUAL_MEMBERS)):
                    run = _variant(config, equal_seed(seed, j), "train", {**fields, "epochs": epochs})
                    first.append(Job(_train, (run, seed_dir / equal_folder(fields, seed, j))))
        for setting in grid["sse"] if "sse" in methods else []:
            fields = sse_fields(config, setting)
            first.append(Job(sse_or_reuse, (_variant(config, seed, "sse", fields), seed_dir / _folder("sse", fields))))
    progress.log(f"[bold]sweep {config.name}: {len(first)} Ind/SSE runs, {jobs} at a time[/bold] ({work})")
    run_jobs(first, jobs, device)

    ind: dict[str, list[Scores]] = {}
    equal: dict[str, list[Scores]] = {}
    for seed, seed_dir in seed_dirs.items():
        for fields in grid["train"]:
            name = _name(fields)
            ind.setdefault(name, []).append(val_scores(val_probs([seed_dir / _folder("train", fields) / "final.pt"],
                                                                 data, device), data.y_val))
            if grid["equal_check"] and "equal" in methods:
                members = [seed_dir / equal_folder(fields, seed, j) / "final.pt" for j in range(EQUAL_MEMBERS)]
                equal.setdefault(name, []).append(val_scores(val_probs(members, data, device), data.y_val))
    sse: dict[str, list[Scores]] = {}
    for seed_dir in seed_dirs.values():
        for setting in grid["sse"] if "sse" in methods else []:
            fields = sse_fields(config, setting)
            snapshots = expand_members([seed_dir / _folder("sse", fields)])
            sse.setdefault(_name(fields), []).append(val_scores(val_probs(snapshots, data, device), data.y_val))
    chosen_train = grid["train"][[_name(f) for f in grid["train"]].index(rank(ind)[0][0])]

    start_epoch = fge_start_epoch(config.train, config.fge)
    second = [Job(fge_or_reuse, (_variant(config, seed, "fge", fge_fields(config, setting)),
                         checkpoint_path(seed_dir / _folder("train", chosen_train), start_epoch),
                         seed_dir / _folder(f"fge-from-{_folder('train', chosen_train)}", fge_fields(config, setting))))
              for seed, seed_dir in seed_dirs.items() for setting in (grid["fge"] if "fge" in methods else [])]
    simplexes = [Job(_grow_simplex, (_variant(config, seed, "simplex", simplex_fields(config, setting)),
                                     seed_dir / _folder("train", chosen_train) / "final.pt",
                                     seed_dir / _folder(f"simplex-from-{_folder('train', chosen_train)}", setting)))
                 for seed, seed_dir in seed_dirs.items() for setting in (grid["simplex"] if "simplex" in methods else [])]
    progress.log(f"[bold]sweep {config.name}: {len(second)} FGE and {len(simplexes)} simplex runs from train.lr "
                 f"{chosen_train['lr']:g}[/bold]")
    run_jobs(second + simplexes, jobs, device)
    simplex: dict[str, list[Scores]] = {}
    for job in simplexes:
        run_config, _, run_dir = job.args
        setting = next(s for s in grid["simplex"] if all(getattr(run_config.simplex, k) == v for k, v in s.items()))
        simplex.setdefault(_name(setting), []).append(simplex_scores(run_dir, run_config, data, device))
    fge: dict[str, list[Scores]] = {}
    for job in second:
        run_config, _, run_dir = job.args
        snapshots = expand_members([run_dir])
        fields = fge_fields(config, {"cycle_epochs": run_config.fge.cycle_epochs, "lr1": run_config.fge.lr1})
        for bn, running in (("BN recomputed", False), ("BN running averages", True)):
            scores = val_scores(val_probs(snapshots, data, device, running_bn=running), data.y_val)
            fge.setdefault(f"{_name(fields)}, {bn}", []).append(scores)
    chosen = {"train": chosen_train}
    if fge:
        best_fge = rank(fge)[0][0]
        chosen["fge"] = {**fge_fields(config, next(s for s in grid["fge"]
                                                   if best_fge.startswith(_name(fge_fields(config, s))))),
                         "bn_update": best_fge.endswith("BN recomputed")}
    if sse:
        chosen["sse"] = sse_fields(config, next(s for s in grid["sse"] if _name(sse_fields(config, s)) == rank(sse)[0][0]))
    if simplex:
        chosen["simplex"] = next(s for s in grid["simplex"] if _name(s) == rank(simplex)[0][0])
    return {"ind": ind, "equal": equal, "sse": sse, "fge": fge, "simplex": simplex, "chosen": chosen,
            "start_epoch": start_epoch}


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/mnist1d.yaml"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--jobs", type=int, default=1, help="sub-runs side by side")
    parser.add_argument("--work", type=Path, default=None, help="sub-run folder (default runs/sweep-<config name>)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="the methods swept (Ind always: the others start from its train.lr); a subset "
                             "writes sweep-ensembles-<methods>-<config name>")
    args = parser.parse_args()
    config = load_config(args.config, {"device": "cpu"})
    grid = GRIDS[args.grid]
    methods = tuple(m for m in METHODS if m == "ind" or m in args.methods)
    subset = "" if methods == METHODS else "-".join(m for m in methods if m != "ind") + "-"
    run = start_run(f"sweep-ensembles-{subset}{config.name}")
    run["command"] = command_line()
    found = sweep(config, args.seeds, grid, args.work or Path("runs") / f"sweep-{config.name}", args.jobs, methods)
    data = config.data
    where = (f"{config.name}: {data.name} (val_size {data.val_size}, generation {data.generation}); "
             f"{args.seeds} seeds ({SEED_BASE}..{SEED_BASE + args.seeds - 1}); grid `{args.grid}`")
    epochs = config.train.epochs
    add_section(run, f"Ind: one network of {epochs} epochs per train.lr (the paper's schedule), by calibrated "
                "validation NLL", HEADERS, rank(found["ind"]), notes=where, data=found["ind"])
    if found["equal"]:
        add_section(run, f"Equal-budget check: {EQUAL_MEMBERS} networks of {epochs / EQUAL_MEMBERS:g} epochs (Ind m=2 "
                    "at 1B) per train.lr", HEADERS, rank(found["equal"]), notes=where, data=found["equal"])
    if found["fge"]:
        add_section(run, f"FGE: {config.fge.epochs:g} epochs from the epoch-{found['start_epoch']} checkpoint of the "
                    f"network at the chosen train.lr {found['chosen']['train']['lr']:g} (1B); lr2 = lr1 / 10; BN "
                    "recomputed or not, the same snapshots", HEADERS, rank(found["fge"]), notes=where, data=found["fge"])
    if found["sse"]:
        add_section(run, f"SSE: {config.sse.epochs} epochs from scratch (1B), cycle = {config.sse.epochs} epochs / "
                    "snapshots", HEADERS, rank(found["sse"]), notes=where, data=found["sse"])
    if found["simplex"]:
        split = equal_budget_epochs(epochs, config.simplex.vertices)
        add_section(run, f"Simplex: ESPRO from the network at the chosen train.lr {found['chosen']['train']['lr']:g}, "
                    f"{config.simplex.vertices} trained vertices of {' + '.join(map(str, split))} epochs (cosine from lr), "
                    f"per setting of simplex ({', '.join(grid['simplex'][0])}): compare's 2B, its smallest budget; the "
                    f"ensemble of {config.simplex.ensemble_size} sampled points, BN recomputed", HEADERS,
                    rank(found["simplex"]), notes=where, data=found["simplex"])
    chosen = found["chosen"]
    add_section(run, "Chosen (lowest mean calibrated validation NLL)", ["section", "settings"],
                [[section, _name(fields) + (f", bn_update {fields['bn_update']}" if "bn_update" in fields else "")]
                 for section, fields in chosen.items()], data=chosen)
    count = {m: len(grid[m]) for m in ("train", "fge", "sse", "simplex")}
    swept = [f"Ind {count['train']}"] + [text for method, text in (
        ("fge", f"FGE {count['fge']} (each evaluated with BN recomputed and with the running averages)"),
        ("sse", f"SSE {count['sse']}"), ("simplex", f"Simplex {count['simplex']}")) if method in methods]
    write_results(run, out_dir=args.out if args.out != RESULTS else RESULTS, summary=(
        f"Settings ranked by the ensemble's calibrated validation NLL (mean over seeds); the test split is not read. "
        f"Configurations per method: {', '.join(swept)}."))
    return 0


if __name__ == "__main__":
    sys.exit(main())
