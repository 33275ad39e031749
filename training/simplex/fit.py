"""`modeconn simplex`: grow a simplex of low loss from trained networks, one trained vertex at a time.

The networks given are fixed vertices. Each new vertex starts at the centroid of the vertices so far
and is trained with them frozen (as the reference code grows its simplexes) on

    E_w [ L(θ(w)) + 0.5·wd·‖θ(w)‖² ] − λ · mean over the complex's simplexes of log(V² + ε),

w drawn per step (`samples_per_step` draws, their losses averaged) uniformly on a simplex of the
complex (training/simplex/model.py); the L2 term acts on the sampled point, as the curve's does.
One network given is ESPRO's simplex grown from one solution; several are the fixed vertices of
one simplex through them, or (`connecting`) of the paper's mode-connecting complex. The learning
rate is cosine-annealed over each vertex's epochs (the reference code's schedule).

Files: each vertex's training is a run of the one loop (training/core/loop.py) in RUN/vertex-NN/
(its checkpoints and metrics), finished when RUN/vertex-NN/vertex.pt loads, so `--resume`
continues an interrupted vertex and reuses finished ones; RUN/final.pt holds every vertex.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.training.core import distributed, progress
from modeconn.training.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_finished,
    save_checkpoint,
)
from modeconn.training.core.config import Config, ConfigError, SimplexSettings
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import FitPlan, StageRun, fit, resolve_device
from modeconn.training.core.networks import build_network, load_data, network_state, stage_run
from modeconn.training.core.runs import RunDirError, prepare_run_dir
from modeconn.training.core.schedules import cosine_restart_learning_rate
from modeconn.training.core.sources import check_same_network
from modeconn.training.simplex.model import (
    SimplexModel,
    sample_weights,
    structure,
    vertex_matrix,
    volume_penalty,
)


def check_shape(runs: int, settings: SimplexSettings) -> None:
    """Refuse a simplex of fewer than 3 vertices, and a connecting complex of fewer than 2 networks."""
    if runs < 1:
        raise ConfigError("simplex needs at least one trained network (--runs)")
    if settings.connecting and runs < 2:
        raise ConfigError(f"simplex.connecting joins two or more networks; got {runs} (--runs)")
    k = 1 + settings.vertices if settings.connecting else runs + settings.vertices
    if k < 3:
        raise ConfigError(f"simplex.vertices: a simplex needs at least 3 vertices; {runs} network(s) and "
                          f"{settings.vertices} trained vertex(es) give {k}")


def train_vertex(simplex: SimplexModel, data: Dataset, settings: SimplexSettings, run: StageRun, stage: int,
                 checkpoint_fields: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Fit the simplex's one trained vertex (the loop, training/core/loop.py); the per-epoch rows."""
    optimizer = torch.optim.SGD([simplex.free_vertices], lr=settings.lr, momentum=settings.momentum, weight_decay=0.0)
    w_generator = torch.Generator().manual_seed(run.seed + 3 + 1000 * stage)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = distributed.unwrap(model)
        loss = torch.zeros((), device=x.device)
        for _ in range(settings.samples_per_step):
            w = sample_weights(inner.num_vertices, inner.simplexes, w_generator).to(x.device)
            logits = model(x, w)
            loss = loss + F.cross_entropy(logits, y) + 0.5 * settings.weight_decay * inner.last_l2
        loss = loss / settings.samples_per_step
        if settings.volume_weight > 0:
            loss = loss + settings.volume_weight * volume_penalty(inner.vertices(), inner.simplexes).to(loss.dtype)
        return loss, logits

    epochs = settings.epochs_of(stage)
    plan = FitPlan(
        epochs=epochs,
        batch_size=settings.batch_size,
        learning_rate=lambda epoch, _: cosine_restart_learning_rate(epoch + 1, epochs, settings.lr),
        seed=run.seed + 1 + 1000 * stage,
        description=f"simplex-vertex-{stage}",
        batch_setting="simplex.batch_size",
        loss_fn=loss_fn,
        shared_generators={"simplex_w": w_generator},
        **run.loop_options(),
    )
    torch.manual_seed(run.seed + stage)  # dropout draws: the same whether or not earlier vertices were reused
    rows = fit(plan, run_dir=run.run_dir, model=simplex, optimizer=optimizer, data=data,
               checkpoint_fields=checkpoint_fields or {}, resume=run.resume)
    simplex.last_l2 = None  # the last step's term holds its autograd graph
    return rows


def grow_simplex(base: nn.Module, runs: torch.Tensor, data: Dataset, settings: SimplexSettings, run: StageRun,
                 fields: dict[str, Any] | None = None) -> tuple[SimplexModel, list[dict[str, Any]]]:
    """The simplex with `runs` [R, P] as fixed vertices and `settings.vertices` trained ones, grown one
    at a time; every vertex frozen at the end. With `run.run_dir` each vertex trains in RUN/vertex-NN
    and a finished one (vertex.pt) is reused. The CLI and the Python API both grow simplexes here."""
    count = runs.shape[0]
    simplex = SimplexModel(base, runs, structure(count, 0, settings.connecting))
    history: list[dict[str, Any]] = []
    for stage in range(1, settings.vertices + 1):
        simplex = simplex.grown(structure(count, stage, settings.connecting))
        folder = run.run_dir / f"vertex-{stage:02d}" if run.run_dir is not None else None
        done = read_finished(folder / "vertex.pt") if folder is not None else None
        if done is None:
            rows = train_vertex(simplex, data, settings, dataclasses.replace(run, run_dir=folder), stage,
                                {**(fields or {}), "kind": "simplex-training", "stage": stage})
            rows = [{"vertex": stage, **r} for r in rows]
            if folder is not None and distributed.is_main():
                save_checkpoint(folder / "vertex.pt", {**(fields or {}), "kind": "simplex-vertex", "stage": stage,
                                                       "model": {"vertex": simplex.free_vertices.detach().cpu()},
                                                       "history": rows})
        else:
            simplex = SimplexModel(base, simplex.fixed_vertices, simplex.simplexes, free=done["model"]["vertex"].to(runs.device))
            rows = done["history"]
            progress.log(f"[dim]simplex: vertex {stage} already trained ({folder / 'vertex.pt'})[/dim]")
        history.extend(rows)
    return simplex.frozen().eval(), history


def fit_simplex(config: Config, runs: list[Path], run_dir: Path, resume: bool = False,
                force: bool = False) -> dict[str, Any]:
    """`modeconn simplex`: the simplex grown from `runs` (RUN/final.pt), then `simplex_evaluation`'s
    report (simplex.json/.csv) and its sampled ensemble (RUN/snapshots/, ensemble.json/.csv)."""
    from modeconn.training.simplex.evaluate import write_evaluation

    started = time.perf_counter()
    simplex, data, fields, final_path = grown_simplex(config, runs, run_dir, resume=resume, force=force)
    result = write_evaluation(simplex, data, config.simplex, run_dir, final_path, fields, config.seed, config.device)
    return {"run_dir": str(run_dir), "checkpoint": str(final_path), **result,
            "seconds": time.perf_counter() - started}


def grown_simplex(config: Config, runs: list[Path], run_dir: Path, resume: bool = False, force: bool = False
                  ) -> tuple[SimplexModel, Dataset, dict[str, Any], Path]:
    """The simplex grown from `runs` into `run_dir` (RUN/final.pt; with `resume`, a finished one is
    loaded and an interrupted one continued), the data, the checkpoint fields and RUN/final.pt;
    nothing evaluated (the validation sweep grows simplexes without reading the test split)."""
    started = time.perf_counter()
    settings = config.simplex
    check_shape(len(runs), settings)
    final_path = run_dir / "final.pt"
    states = [network_state(path, config.model, config.data, "cpu", "simplex vertex")[0] for path in runs]
    check_same_network(list(zip(runs, states, strict=True)), CheckpointError)
    prepare_run_dir(run_dir, config, resume=resume, force=force, final=final_path)  # after the networks load
    if not resume and any(run_dir.glob("vertex-*")):
        raise RunDirError(f"{run_dir} already holds a simplex run; pass --resume to continue it or --force to start over")
    device = resolve_device(config.device)
    data = load_data(states[0]["dataset"], device)
    torch.manual_seed(config.seed)
    base = build_network(states[0]["architecture"], data.num_classes, device)
    base.load_state_dict(states[0]["model"])  # its BN buffers are recomputed at every point
    fields = {"architecture": states[0]["architecture"], "dataset": states[0]["dataset"],
              "simplex": {**settings.model_dump(), "runs": [str(p) for p in runs]}, "config": config.model_dump()}
    finished = read_finished(final_path) if resume else None
    if finished is not None and finished.get("kind") == "simplex":
        simplex, _ = simplex_from_state(finished, device)
    else:
        vertices = vertex_matrix([s["model"] for s in states], base).to(device)
        simplex, history = grow_simplex(base, vertices, data, settings,
                                        stage_run(config, run_dir, resume=resume, save_every=settings.save_every), fields)
        save_checkpoint(final_path, {**fields, "kind": "simplex", "model": {"vertices": simplex.vertices().cpu()},
                                     "base": {k: v.cpu() for k, v in base.state_dict().items()},
                                     "simplexes": simplex.simplexes, "history": history})
        progress.log(f"simplex: {simplex.num_vertices} vertices ({len(runs)} given, {settings.vertices} trained) "
                     f"in {time.perf_counter() - started:.1f}s -> {final_path}")
    return simplex, data, fields, final_path


def simplex_from_state(state: dict[str, Any], device: torch.device | str = "cpu") -> tuple[SimplexModel, dict[str, Any]]:
    base = build_network(state["architecture"], state["dataset"]["num_classes"], device)
    base.load_state_dict(state["base"])
    vertices = state["model"]["vertices"].to(device)
    if vertices.shape[1] != sum(p.numel() for p in base.parameters()):
        raise CheckpointError(f"simplex vertices of {vertices.shape[1]} parameters do not fit {state['architecture']}")
    return SimplexModel(base, vertices, state["simplexes"]).eval(), state


def load_simplex(path: Path, device: torch.device | str = "cpu") -> tuple[SimplexModel, dict[str, Any]]:
    """A simplex run directory or its final.pt."""
    path = Path(path)
    path = path / "final.pt" if path.is_dir() else path
    state = load_checkpoint(path, map_location=device)
    if state.get("kind") != "simplex":
        raise CheckpointError(f"{path} is not a simplex checkpoint (kind {state.get('kind')!r})")
    return simplex_from_state(state, device)
