"""Ensembles of ordinary checkpoints: `modeconn ensemble-eval`, and the report FGE and SSE write.

The ensemble's prediction is the mean of the members' softmax outputs (docs/design.md), not of
their logits. Any checkpoint that loads as a plain network can be a member (train runs'
final.pt, FGE/SSE snapshots, curve points), as long as all share architecture and data set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modeconn.contract.errors import ModeconnError
from modeconn.training.core import progress, statistics
from modeconn.training.core.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from modeconn.training.core.data import AUTO, Dataset, ood_inputs, ood_names, ood_split
from modeconn.training.core.loop import resolve_device
from modeconn.training.core.metrics import classification_metrics, disagreement
from modeconn.training.core.networks import load_data, load_network, predict_probs
from modeconn.training.core.reports import csv_text, png_bytes, pyplot
from modeconn.training.core.runs import check_report_folder
from modeconn.training.core.sources import check_same_network, run_members
from modeconn.training.ensembles.calibration import calibrated_columns, calibration_report
from modeconn.training.ensembles.selective import (
    SCORES,
    ood_metrics,
    selective_metrics,
    selective_report,
)

_WEIGHTS = ("model", "optimizer", "bn_running_averages", "rng", "config")


class EnsembleError(ModeconnError):
    """Members that cannot form one ensemble (missing, or of different networks or data)."""


@dataclass
class Members:
    paths: list[Path]
    probs: torch.Tensor  # [K, N, C] test softmax outputs of each member as saved
    val_probs: torch.Tensor | None  # [K, N_val, C] the same on the validation split; None without one
    running_probs: torch.Tensor | None  # the same with BN running averages; None when not asked
    states: list[dict[str, Any]]  # each checkpoint's fields, weights left out
    data: Dataset
    ood_probs: dict[str, torch.Tensor] = field(default_factory=dict)  # OOD set -> [K, N_set, C]


def expand_members(paths: list[Path]) -> list[Path]:
    """Checkpoint files as given; a run directory stands for its snapshots (FGE/SSE) or its final.pt."""
    out = [member for path in paths for member in run_members(path, EnsembleError)]
    if not out:
        raise EnsembleError("no checkpoints given")
    return out


def ood_datasets(specs: Sequence[str], data: Dataset, seed: int = 0) -> dict[str, Dataset]:
    """The OOD sets `specs` names (data.ood_names), each as `data` with those inputs for its test split."""
    return {name: ood_split(data, ood_inputs(name, data, seed)) for name in ood_names(specs, data)}


@torch.no_grad()
def predict_members(
    paths: list[Path], device: torch.device, data: Dataset | None = None, running_bn: bool = False,
    ood: Sequence[str] | dict[str, Dataset] = (), ood_seed: int = 0,
) -> Members:
    """Test probabilities of every member (each checkpoint is loaded once), and on each OOD set
    of `ood`: names (data.ood_names: built-in sets made with `ood_seed`, or paths of inputs) or
    `ood_datasets` already made.

    `running_bn` also predicts with the BN running averages that FGE/SSE snapshots keep
    beside their recomputed statistics; members without them were saved with their
    running averages already, so both predictions are the same for those.
    """
    probs, val, running, states = [], [], [], []
    ood_sets: dict[str, Dataset] = {}
    ood_probs: dict[str, list[torch.Tensor]] = {}
    for path in paths:
        model, state = load_network(path, device)
        if states:
            check_same_network([(paths[0], states[0]), (path, state)], EnsembleError)
        if data is None:
            data = load_data(state["dataset"], device)
        if not states:
            ood_sets = ood if isinstance(ood, dict) else ood_datasets(ood, data, ood_seed)
        probs.append(predict_probs(model, data, "test"))
        for name, inputs in ood_sets.items():
            ood_probs.setdefault(name, []).append(predict_probs(model, inputs, "test"))
        if len(data.y_val):
            val.append(predict_probs(model, data, "val"))
        if running_bn:
            if "bn_running_averages" in state:
                model.load_state_dict({**model.state_dict(), **state["bn_running_averages"]})
                running.append(predict_probs(model, data, "test"))
            else:
                running.append(probs[-1])
        states.append({k: v for k, v in state.items() if k not in _WEIGHTS})
    assert data is not None  # paths is never empty
    return Members(list(paths), torch.stack(probs), torch.stack(val) if val else None,
                   torch.stack(running) if running_bn else None, states, data,
                   {name: torch.stack(p) for name, p in ood_probs.items()})


def split_prefixed(metrics: dict[str, float], split: str = "test") -> dict[str, float]:
    """{"error": 1.0} -> {"test_error": 1.0} (or val_error for split="val")."""
    return {f"{split}_{k}": v for k, v in metrics.items()}


def ensemble_probs(member_probs: torch.Tensor) -> torch.Tensor:
    """[K, N, C] member probabilities -> [N, C] ensemble probabilities (in float64)."""
    return member_probs.double().mean(0)


def growing_ensemble(member_probs: torch.Tensor, labels: torch.Tensor, split: str = "test") -> list[dict[str, float]]:
    """Metrics on `split` of the ensemble of the first k members, for k = 1..K."""
    cumulative = member_probs.double().cumsum(0)
    return [
        {"members": k, **split_prefixed(classification_metrics(cumulative[k - 1] / k, labels), split)}
        for k in range(1, len(member_probs) + 1)
    ]


def member_metrics(member_probs: torch.Tensor, labels: torch.Tensor, split: str = "test") -> list[dict[str, float]]:
    return [split_prefixed(classification_metrics(p, labels), split) for p in member_probs]


def with_validation(test_rows: list[dict[str, float]], val_probs: torch.Tensor | None, labels: torch.Tensor,
                    grow: bool) -> list[dict[str, float]]:
    """Test rows (growing ensemble or per member) joined with the same rows on validation."""
    if val_probs is None:
        return test_rows
    val_rows = growing_ensemble(val_probs, labels, "val") if grow else member_metrics(val_probs, labels, "val")
    return [{**val, **test} for val, test in zip(val_rows, test_rows, strict=True)]


# ---------------------------------------------------------------- modeconn ensemble-eval
def _best_member(rows: list[dict[str, Any]]) -> tuple[int, str]:
    """The member with the lowest validation error where members have one, else the lowest test error."""
    key = "val_error" if all("val_error" in r for r in rows) else "test_error"
    return min(range(len(rows)), key=lambda i: rows[i][key]), key


def ensemble_summary(probs: torch.Tensor, labels: torch.Tensor, val_probs: torch.Tensor | None = None,
                     y_val: torch.Tensor | None = None, names: list[str] | None = None,
                     kinds: list[str] | None = None, ood_probs: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, Any]:
    """Error, NLL, ECE and Brier of the ensemble of members' probabilities `probs` [K, N, C] and of
    each member; temperatures fitted on the validation probabilities when given; mean pairwise
    disagreement; paired bootstrap intervals of ensemble - best member and ensemble - first member;
    `selective`: AURC and E-AURC, and the AUROC of telling each OOD set of `ood_probs`
    (name -> [K, N_set, C]) from the test inputs, of the ensemble with bootstrap intervals
    (training/ensembles/selective.py) and of each member in its row.
    `modeconn ensemble-eval` and the Python API's `evaluate_ensemble` both report this."""
    names = names or [f"member {i}" for i in range(len(probs))]
    kinds = kinds or ["network"] * len(probs)
    combined = ensemble_probs(probs)
    growing = with_validation(growing_ensemble(probs, labels), val_probs, y_val, grow=True)
    ensemble = {k: v for k, v in growing[-1].items() if k != "members"}
    own = with_validation(member_metrics(probs, labels), val_probs, y_val, grow=False)
    rows = [{"checkpoint": name, "kind": kind, **metrics} for name, kind, metrics in zip(names, kinds, own, strict=True)]
    ood_probs = ood_probs or {}
    for i, row in enumerate(rows):
        row.update(selective_columns(probs[i], labels, {name: p[i] for name, p in ood_probs.items()}))
    calibration = None
    if val_probs is not None and y_val is not None and len(y_val):  # T fitted on validation, applied to test
        calibration = {
            "split": "val", "val_examples": len(y_val),
            "ensemble": calibration_report(ensemble_probs(val_probs), y_val, combined, labels),
            "members": [calibration_report(v, y_val, p, labels) for v, p in zip(val_probs, probs, strict=True)],
        }
        for row, report in zip(rows, calibration["members"], strict=True):
            row.update(calibrated_columns(report))
    best, chosen_on = _best_member(rows)
    differences = {
        name: {"member": names[i], **statistics.intervals_json(statistics.compare_probs(combined, probs[i], labels))}
        for name, i in (("ensemble - best member", best), ("ensemble - first member", 0))
    }
    differences["ensemble - best member"]["chosen_on"] = chosen_on
    selective = selective_report(combined.cpu().numpy(), labels.cpu().numpy(),
                                 {name: ensemble_probs(p).cpu().numpy() for name, p in ood_probs.items()})
    return {
        "members": len(probs),
        "ensemble": ensemble,
        "calibration": calibration,
        "selective": selective,
        "disagreement": disagreement(probs),
        "member_metrics": rows,
        "growing": growing,
        "differences": differences,
        "test_size": len(labels),
        "best_member": best,
    }


def selective_columns(probs: torch.Tensor, labels: torch.Tensor, ood_probs: dict[str, torch.Tensor]) -> dict[str, float]:
    """test_aurc, test_eaurc and auroc_SCORE:SET of one model's [N, C] test and OOD probabilities."""
    p = probs.double().cpu().numpy()
    columns = split_prefixed(selective_metrics(p, labels.cpu().numpy()))
    for name, out in ood_probs.items():
        columns.update({f"{k}:{name}": v for k, v in ood_metrics(p, out.double().cpu().numpy()).items()})
    return columns


def evaluate_checkpoints(paths: list[Path], device: str = "auto", out_dir: Path | None = None,
                         ood: Sequence[str] = (AUTO,), ood_seed: int = 0) -> dict[str, Any]:
    """`modeconn ensemble-eval`: `ensemble_summary` of checkpoints (run folders stand for their
    members), written as ensemble.json/.csv into `out_dir` when given. `ood`: the OOD sets to tell
    from the test inputs (data.ood_names: "auto" = the built-in ones for the data set, or paths)."""
    started = time.perf_counter()
    if out_dir is not None:
        check_report_folder(Path(out_dir), ("ensemble.json", "ensemble.csv"))  # never over a user's files
    files = expand_members(paths)
    members = predict_members(files, resolve_device(device), ood=ood, ood_seed=ood_seed)
    labels, y_val = members.data.y_test, members.data.y_val
    result = ensemble_summary(members.probs, labels, members.val_probs, y_val, [str(p) for p in files],
                              [state.get("kind", "train") for state in members.states], members.ood_probs)
    result["selective"]["ood_seed"] = ood_seed
    best = result.pop("best_member")
    result.update(architecture=members.states[0]["architecture"], dataset=members.states[0]["dataset"].get("name"))
    ensemble, calibration, rows = result["ensemble"], result["calibration"], result["member_metrics"]
    differences, chosen_on = result["differences"], result["differences"]["ensemble - best member"]["chosen_on"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        result["json"], result["csv"] = str(out_dir / "ensemble.json"), str(out_dir / "ensemble.csv")
        atomic_write_json(out_dir / "ensemble.json", result)
        atomic_write_text(out_dir / "ensemble.csv", csv_text(
            ["checkpoint", "kind", "test_error", "test_nll", "test_ece", "test_brier", "test_aurc", "test_eaurc",
             *(f"auroc_{s}:{name}" for name in members.ood_probs for s in SCORES), "temperature",
             "calibrated_test_nll", "calibrated_test_ece", "calibrated_test_brier"],
            [*rows, {"checkpoint": "ensemble", "kind": f"{len(files)} members", **ensemble,
                     **_selective_values(result["selective"]),
                     **calibrated_columns(calibration and calibration["ensemble"])}],
        ))
    progress.log(
        f"ensemble-eval: {len(files)} members, {len(labels)} test examples, ensemble test error "
        f"{ensemble['test_error']:.2f} % (best member {rows[best]['test_error']:.2f} %, lowest {chosen_on}), "
        f"NLL {ensemble['test_nll']:.4f}, ECE {ensemble['test_ece']:.4f}, Brier {ensemble['test_brier']:.4f}, "
        f"disagreement {result['disagreement']:.3f}  ({time.perf_counter() - started:.1f}s)"
    )
    if calibration is not None:
        cal = calibration["ensemble"]
        progress.log(
            f"  calibrated ensemble (T = {cal['temperature']:.3f}, fitted on {len(y_val)} validation examples): "
            f"validation NLL {cal['val_nll']:.4f} -> {cal['calibrated_val_nll']:.4f}; test NLL "
            f"{cal['calibrated_metrics']['nll']:.4f}, ECE {cal['calibrated_metrics']['ece']:.4f}, "
            f"Brier {cal['calibrated_metrics']['brier']:.4f}"
        )
    for name, cell in differences.items():
        intervals = {k: statistics.Interval(**cell[k]) for k in statistics.LOSSES}
        progress.log(f"  {name} (95 % interval): {statistics.differences_text(intervals)}")
    for line in selective_lines(result["selective"]):
        progress.log(line)
    return result


def _selective_values(selective: dict[str, Any]) -> dict[str, float]:
    """The ensemble's selective and OOD values as ensemble.csv's columns."""
    values = {f"test_{k}": selective[k]["value"] for k in ("aurc", "eaurc")}
    for name, cell in selective["ood"].items():
        values.update({f"auroc_{s}:{name}": cell[f"auroc_{s}"]["value"] for s in SCORES})
    return values


def _estimate_text(cell: dict[str, Any]) -> str:
    return f"{cell['value']:.4f} [{cell['low']:.4f}, {cell['high']:.4f}]"


def selective_lines(selective: dict[str, Any]) -> list[str]:
    """The ensemble's AURC, E-AURC and AUROCs as log lines, with their 95 % bootstrap intervals."""
    lines = [f"  selective prediction (confidence = largest probability; 95 % bootstrap over the "
             f"{selective['test_size']} test examples): AURC {_estimate_text(selective['aurc'])}, "
             f"E-AURC {_estimate_text(selective['eaurc'])}"]
    for name, cell in selective["ood"].items():
        lines.append(f"  OOD {name} ({cell['size']} inputs) vs test: AUROC by entropy "
                     f"{_estimate_text(cell['auroc_entropy'])}, by largest probability {_estimate_text(cell['auroc_max_prob'])}")
    return lines


# ---------------------------------------------------------------- the FGE / SSE report
def parameter_vector(path: Path) -> torch.Tensor:
    """A network checkpoint's parameters as one float64 vector (BN running statistics left out)."""
    model, _ = load_network(path)
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def weight_distances(snapshots: list[Path], start: Path | None) -> list[dict[str, float | None]]:
    """Per snapshot, the Euclidean distance in weight space from the starting weights and from the
    previous snapshot (None for the first). Parameters only, as in the paper's figure: BN
    buffers are statistics of the data, recomputed per snapshot, not weights."""
    origin = parameter_vector(start) if start is not None and start.is_file() else None
    rows: list[dict[str, float | None]] = []
    previous = None
    for path in snapshots:
        current = parameter_vector(path)
        rows.append({
            "distance_from_start": None if origin is None else float((current - origin).norm()),
            "distance_from_previous": None if previous is None else float((current - previous).norm()),
        })
        previous = current
    return rows


def snapshot_report(
    method: str,
    run_dir: Path,
    snapshots: list[Path],
    data: Dataset,
    lr_rows: dict[int, float],
    start: dict[str, Any] | None,
    settings: dict[str, Any],
    start_weights: Path | None = None,
) -> dict[str, Any]:
    """Evaluate the ensemble as snapshots are added; write METHOD.json/.csv/.png; return the summary.

    Each snapshot is evaluated twice: as saved (BN recomputed, unless the run kept the
    running averages) and with the running averages of the training model at collection
    time, which the snapshot keeps beside (see snapshots.save_snapshot). `start_weights` is the
    network the run started from (FGE: its --from network; SSE: the initialisation), for the
    distances in weight space.
    """
    members = predict_members(snapshots, data.device, data, running_bn=True)
    distances = weight_distances(snapshots, start_weights)
    assert members.running_probs is not None
    labels = data.y_test
    growing = with_validation(growing_ensemble(members.probs, labels), members.val_probs, data.y_val, grow=True)
    growing_running = growing_ensemble(members.running_probs, labels)
    own = with_validation(member_metrics(members.probs, labels), members.val_probs, data.y_val, grow=False)
    own_running = member_metrics(members.running_probs, labels)
    rows = []
    for k, (path, state) in enumerate(zip(snapshots, members.states, strict=True)):
        info = state.get("snapshot", {})
        rows.append({
            "members": k + 1,
            "checkpoint": str(path),
            "iteration": info.get("iteration"),
            "epoch": info.get("epoch"),
            "lr": info.get("lr"),
            **{f"member_{key}": v for key, v in own[k].items()},
            **{f"ensemble_{key}": v for key, v in growing[k].items() if key != "members"},
            **{f"running_bn_member_{key}": v for key, v in own_running[k].items()},
            **{f"running_bn_ensemble_{key}": v for key, v in growing_running[k].items() if key != "members"},
            **distances[k],
        })
    final = {k: v for k, v in growing[-1].items() if k != "members"}
    final_running = {k: v for k, v in growing_running[-1].items() if k != "members"}
    bn_recomputed = any(s.get("bn_recomputed") for s in members.states)
    paths = {name: run_dir / f"{method}.{name}" for name in ("json", "csv", "png")}
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        **{name: str(p) for name, p in paths.items()},
        "lr_csv": str(run_dir / "lr.csv"),
        "snapshots": len(snapshots),
        "start": {k: v for k, v in start.items() if k.startswith(("val_", "test_"))} if start else None,
        "ensemble": final,
        "ensemble_running_bn": final_running,
        # recomputed minus running averages: negative = recomputing BN helps
        "bn_recompute_effect": {k: final[k] - final_running[k] for k in final_running} if bn_recomputed else None,
        "disagreement": disagreement(members.probs),
        "start_weights": str(start_weights) if start_weights is not None else None,
    }
    report = {
        "method": method,
        "summary": summary,
        "settings": settings,
        "start": start,
        "bn_recomputed": bn_recomputed,
        "members": rows,
    }
    header = [k for k in rows[0] if k != "checkpoint"]
    atomic_write_text(paths["csv"], csv_text(header, rows))
    atomic_write_bytes(paths["png"], _plot(method, rows, lr_rows, start))
    atomic_write_json(paths["json"], report)  # last: its presence marks a finished run
    start_text = f"start {start['test_error']:.2f} % / NLL {start['test_nll']:.4f} -> " if start else ""
    progress.log(
        f"{method}: {start_text}ensemble of {len(snapshots)}: {final['test_error']:.2f} % / NLL {final['test_nll']:.4f}"
        f" / ECE {final['test_ece']:.4f} (BN running averages: {final_running['test_error']:.2f} % / "
        f"NLL {final_running['test_nll']:.4f})"
    )
    return summary


def _plot(method: str, rows: list[dict[str, Any]], lr_rows: dict[int, float], start: dict[str, Any] | None) -> bytes:
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()

    name = method.upper()
    k = [r["members"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    iterations = sorted(lr_rows)
    axes[0].plot(iterations, [lr_rows[i] for i in iterations], lw=1.5)
    axes[0].plot([r["iteration"] for r in rows], [r["lr"] for r in rows], "o", color="C3", label="snapshot collected")
    axes[0].set(xlabel=f"{name} iteration", ylabel="learning rate", title="learning rate")
    _legend_below(axes[0])
    for ax, key, title in ((axes[1], "test_error", "test error (%)"), (axes[2], "test_nll", "test NLL")):
        ax.plot(k, [r[f"member_{key}"] for r in rows], "o", color="C0", alpha=0.6, label="each member")
        ax.plot(k, [r[f"ensemble_{key}"] for r in rows], "-", color="C1", lw=2, label="ensemble")
        ax.plot(k, [r[f"running_bn_ensemble_{key}"] for r in rows], "--", color="C2",
                label="ensemble, BN running averages")
        if start:
            ax.axhline(start[key], color="k", ls=":", label="starting network")
        ax.set(xlabel="number of members", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _legend_below(ax)
    # the paper's third panel: how far apart the snapshots are in weight space
    for key, label, style in (("distance_from_start", "from the starting weights", "o-"),
                              ("distance_from_previous", "from the previous snapshot", "s--")):
        points = [(r["members"], r[key]) for r in rows if r[key] is not None]
        if points:
            axes[3].plot(*zip(*points, strict=True), style, label=label)
    axes[3].set(xlabel="snapshot", ylabel="‖Δw‖ (parameters)", title="distance in weight space")
    axes[3].xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_below(axes[3])
    fig.suptitle(f"{name}: members and ensemble")
    fig.tight_layout()
    return png_bytes(fig)


def _legend_below(ax: Any) -> None:
    """The legend under the panel, where it cannot cover the points."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, fontsize=8, frameon=False)
