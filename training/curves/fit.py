"""`modeconn curve`: fit a Bezier or PolyChain curve between two trained networks.

Loss: E_{t~U[0,1]} L(φθ(t)), one t per minibatch; the L2 penalty 0.5·wd·‖w(t)‖² acts on
the weights at the sampled t (as in the paper), not on the control points.

t comes from a generator of its own, seeded alike on every rank (and saved in the
checkpoints): under torchrun every rank draws the same t for its part of the global batch,
without a broadcast.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.training.core import distributed, progress
from modeconn.training.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from modeconn.training.core.config import (
    Config,
    ConfigError,
    CurveSettings,
    DataSettings,
    ModelSettings,
)
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import FitPlan, StageRun, fit
from modeconn.training.core.networks import (
    build_network,
    load_data,
    network_state,
    stage_device,
    stage_run,
)
from modeconn.training.core.runs import prepare_run_dir
from modeconn.training.core.schedules import paper_learning_rate
from modeconn.training.core.sources import check_same_network
from modeconn.training.curves.model import CurveModel


def _endpoint(path: Path, model: ModelSettings, data: DataSettings) -> dict[str, Any]:
    """A curve end: a network checkpoint, or weights trained elsewhere of the `model` section (on
    the `data` section's data)."""
    return network_state(path, model, data, "cpu", "curve end")[0]


def _aligned_end(w0: dict[str, Any], w1: dict[str, Any], start: Path, end: Path, run_dir: Path) -> dict[str, Any]:
    """`curve --align`: w1 permuted to match w0, saved as RUN/aligned-end.pt. Every rank computes it
    (deterministic, seconds), so none waits on a file; rank 0 writes it."""
    from modeconn.training.curves.align import TRAINING_STATE, align_states

    aligned, record = align_states(w0, w1, start, end)
    state = {**{k: v for k, v in w1.items() if k not in TRAINING_STATE}, "kind": "aligned", "model": aligned,
             "alignment": {**record, "end_kind": w1.get("kind")}}
    if distributed.is_main():
        save_checkpoint(run_dir / "aligned-end.pt", state)
        progress.log(f"curve --align: {len(record['groups'])} groups, objective {record['objective_before']:.4g} -> "
                     f"{record['objective_after']:.4g} ({record['seconds']:.1f}s) -> {run_dir / 'aligned-end.pt'}")
    return state


def curve_model(base: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor],
                settings: CurveSettings) -> CurveModel:
    """The curve of `settings` between two weight sets of `base` (its BN buffers are kept as they are:
    they are recomputed per t later). A random init of the bends draws from the global RNG."""
    device = next(base.parameters()).device
    return CurveModel(base, {k: v.to(device) for k, v in start.items()}, {k: v.to(device) for k, v in end.items()},
                      curve=settings.curve, num_bends=settings.num_bends, fix_start=settings.fix_start,
                      fix_end=settings.fix_end, init=settings.init)


def train_curve(curve: CurveModel, data: Dataset, settings: CurveSettings, run: StageRun,
                checkpoint_fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Fit the curve's free bends on `data`'s training split (the one loop, training/core/loop.py);
    returns the per-epoch rows. The CLI and the Python API both train curves here."""
    optimizer = torch.optim.SGD([curve.free_points], lr=settings.lr, momentum=settings.momentum, weight_decay=0.0)
    t_generator = torch.Generator().manual_seed(run.seed + 3)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.rand((), generator=t_generator).to(x.device)
        logits = model(x, t)  # the curve itself, or DDP around it
        return F.cross_entropy(logits, y) + 0.5 * settings.weight_decay * distributed.unwrap(model).last_l2, logits

    plan = FitPlan(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=lambda epoch, _: paper_learning_rate(settings.lr, epoch, settings.epochs),
        seed=run.seed + 1,
        description=f"curve {settings.curve}",
        batch_setting="curve.batch_size",
        loss_fn=loss_fn,
        shared_generators={"curve_t": t_generator},
        **run.loop_options(),
    )
    rows = fit(plan, run_dir=run.run_dir, model=curve, optimizer=optimizer, data=data,
               checkpoint_fields=checkpoint_fields or {}, resume=run.resume)
    curve.last_l2 = None  # the last step's term holds its autograd graph (and stops a deepcopy)
    return rows


def fit_curve(
    config: Config, start: Path, end: Path, run_dir: Path, resume: bool = False, force: bool = False,
    align: bool = False,
) -> dict[str, Any]:
    """`modeconn curve`: the two checkpoints' curve trained by `train_curve`, saved as RUN/final.pt."""
    final_path = run_dir / "final.pt"
    device = stage_device(config.device, config.distributed.backend)
    started = time.perf_counter()
    w0, w1 = (_endpoint(path, config.model, config.data) for path in (start, end))
    check_same_network([(start, w0), (end, w1)], CheckpointError)
    prepare_run_dir(run_dir, config, resume=resume, force=force, final=final_path)  # after the ends load
    started_before = final_path.exists() or any((run_dir / "checkpoints").glob("epoch-*.pt"))
    if resume and started_before and (run_dir / "aligned-end.pt").exists() != align:
        raise ConfigError(f"{run_dir} holds a curve fitted {'without' if align else 'with'} --align; "
                          f"resume it {'without' if align else 'with'} --align, or start over with --force")
    alignment = None
    if align:
        w1 = _aligned_end(w0, w1, start, end, run_dir)
        alignment = w1["alignment"]
        end = run_dir / "aligned-end.pt"
    data = load_data(w0["dataset"], device)
    settings = config.curve
    torch.manual_seed(config.seed)
    base = build_network(w0["architecture"], data.num_classes, device)
    base.load_state_dict(w0["model"])  # BN buffers start from w0's; they are recomputed per t later
    curve = curve_model(base, w0["model"], w1["model"], settings)
    fields = {
        "kind": "curve",
        "architecture": w0["architecture"],
        "dataset": w0["dataset"],
        "curve": {**curve.settings(), "fix_start": settings.fix_start, "fix_end": settings.fix_end,
                  "start": str(start), "end": str(end), "weight_decay": settings.weight_decay,
                  **({"alignment": alignment} if alignment is not None else {})},
        "config": config.model_dump(),
    }
    run = stage_run(config, run_dir, resume=resume, save_every=settings.save_every)
    rows = train_curve(curve, data, settings, run, fields)
    if not distributed.is_main():
        return {"run_dir": str(run_dir), "rank": distributed.rank()}
    save_checkpoint(final_path, {**fields, "model": curve.state_dict(), "metrics": rows[-1]})
    seconds = time.perf_counter() - started
    progress.log(f"curve {settings.curve}: trained in {seconds:.1f}s -> {final_path}")
    return {"run_dir": str(run_dir), "checkpoint": str(final_path), "metrics": rows[-1], "seconds": seconds}


def curve_file(path: Path) -> Path:
    """A curve run directory or its final checkpoint."""
    return path / "final.pt" if path.is_dir() else path


def load_curve(path: Path, device: torch.device | str = "cpu") -> tuple[CurveModel, dict[str, Any]]:
    path = curve_file(Path(path))
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") != "curve":
        raise CheckpointError(f"{path} is not a curve checkpoint (kind {state.get('kind')!r})")
    spec = state["curve"]
    base = build_network(state["architecture"], state["dataset"]["num_classes"], device)
    params = dict(base.named_parameters())
    curve = CurveModel(base, params, params, curve=spec["curve"], num_bends=spec["num_bends"],
                       fix_start=spec["fix_start"], fix_end=spec["fix_end"])
    try:
        curve.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: curve weights do not fit {state['architecture']}: {err}") from err
    return curve.eval(), state
