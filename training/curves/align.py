"""`modeconn align`: permute the hidden units of network B to match network A (weight matching).

Weight matching (Ainsworth, Hayase & Srinivasa 2022, "Git Re-Basin", Algorithm 1): maximise
Σ_w <W_A, P(W_B)> over the permutations P of the groups training/curves/permutations.py derives,
by coordinate descent: visit the groups in a random order; for one group, with every other
group's permutation held, the objective is linear in that group's permutation, a linear
assignment problem (scipy.optimize.linear_sum_assignment) on the summed similarity of every
weight that touches the group; repeat until a whole sweep improves nothing. Each step picks the
best permutation for its group given the others, so the objective never decreases.

The objective sums the learnable parameters (conv/linear weights and biases, BN weight and
bias); BN running statistics are permuted with their channels but not matched (they are
recomputed along any path anyway). B's aligned copy computes the same function as B.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from modeconn.training.core import progress
from modeconn.training.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from modeconn.training.core.networks import build_network, weights_mismatch
from modeconn.training.curves.permutations import PermutationSpec, derive_spec, example_input

TRAINING_STATE = ("optimizer", "rng", "rng_ranks", "epoch", "iteration")
Permutation = dict[str, torch.Tensor]  # group -> index tensor: aligned[i] = original[perm[i]]


@dataclass
class Matching:
    """The permutations found, and how the search went."""

    perms: Permutation
    iterations: int
    objective_before: float
    objective_after: float
    seconds: float

    def record(self, spec: PermutationSpec) -> dict[str, Any]:
        """What an aligned checkpoint stores (plain values: it loads with weights_only=True)."""
        return {"groups": spec.describe(), "permutations": {g: p.tolist() for g, p in self.perms.items()},
                "iterations": self.iterations, "objective_before": self.objective_before,
                "objective_after": self.objective_after, "seconds": self.seconds}


def _expand(perm: torch.Tensor, block: int) -> torch.Tensor:
    """A permutation of units as one of entries, each unit spanning `block` consecutive entries."""
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block)).reshape(-1)


def permute_tensor(spec_axes: list[tuple[str, Any]], tensor: torch.Tensor, perms: Permutation,
                   skip: str | None = None) -> torch.Tensor:
    """`tensor` with every axis of `spec_axes` ([(group, Axis)]) permuted, except group `skip`."""
    for group, axis in spec_axes:
        if group != skip:
            tensor = tensor.index_select(axis.dim, _expand(perms[group], axis.block).to(tensor.device))
    return tensor


def apply_permutation(spec: PermutationSpec, state: dict[str, torch.Tensor], perms: Permutation) -> dict[str, torch.Tensor]:
    """A copy of a state_dict with every group's units permuted (entries no group touches are kept)."""
    by_key = spec.key_axes()
    return {k: permute_tensor(by_key[k], v, perms) if k in by_key else v.clone() for k, v in state.items()}


def inverse(perms: Permutation) -> Permutation:
    return {g: torch.argsort(p) for g, p in perms.items()}


def _matched_keys(spec: PermutationSpec, state: dict[str, torch.Tensor], learnable: set[str]) -> dict[str, list]:
    by_key = spec.key_axes()
    return {k: axes for k, axes in by_key.items() if k in learnable and state[k].is_floating_point()}


def objective(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    """Σ <A_w, B_w> over the matched weights (B already permuted)."""
    return float(sum((a[k].double() * b[k].double()).sum() for k in keys))


def weight_matching(
    spec: PermutationSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], learnable: set[str],
    max_iterations: int = 100, seed: int = 0,
) -> Matching:
    """Permutations of B's groups maximising Σ <W_A, P(W_B)> over the learnable weights."""
    threads = torch.get_num_threads()
    # One thread: the per-group products are small, and on a busy machine OpenMP's spinning
    # threads made them 30x slower (PreResNet-47, 2 cores at load 11: 8.4 s vs 0.3 s per 3 sweeps).
    torch.set_num_threads(1)
    try:
        return _weight_matching(spec, a, b, learnable, max_iterations, seed)
    finally:
        torch.set_num_threads(threads)


def _weight_matching(
    spec: PermutationSpec, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], learnable: set[str],
    max_iterations: int, seed: int,
) -> Matching:
    started = time.perf_counter()
    matched = _matched_keys(spec, a, learnable)
    a64 = {k: a[k].double() for k in matched}
    b64 = {k: b[k].double() for k in matched}
    perms: Permutation = {g: torch.arange(n) for g, n in spec.sizes.items()}
    groups = list(spec.sizes)
    generator = torch.Generator().manual_seed(seed)
    # reported over every learnable weight (those no group touches add the same constant to both)
    fixed = [k for k in learnable if k not in matched and k in a and a[k].is_floating_point()]
    constant = objective(a, b, fixed)
    before = constant + objective(a64, b64, list(matched))
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (reported after the loop)
        improved = False
        for index in torch.randperm(len(groups), generator=generator).tolist():
            group, n = groups[index], spec.sizes[groups[index]]
            similarity = torch.zeros(n, n, dtype=torch.float64)
            for axis in spec.axes[group]:
                if axis.key not in matched:
                    continue
                w_a = a64[axis.key].movedim(axis.dim, 0).reshape(n, -1)
                w_b = permute_tensor(matched[axis.key], b64[axis.key], perms, skip=group)
                similarity += w_a @ w_b.movedim(axis.dim, 0).reshape(n, -1).T
            _, columns = linear_sum_assignment(similarity.numpy(), maximize=True)
            new = torch.from_numpy(columns).long()
            old_value = float(similarity[torch.arange(n), perms[group]].sum())
            new_value = float(similarity[torch.arange(n), new].sum())
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                improved = True
                perms[group] = new
        if not improved:
            break
    aligned = {k: permute_tensor(matched[k], b64[k], perms) for k in matched}
    after = constant + objective(a64, aligned, list(matched))
    return Matching(perms, iterations, before, after, time.perf_counter() - started)


def network_checkpoint(path: Path) -> dict[str, Any]:
    """A network checkpoint's dict; a curve's is a CheckpointError (these commands take networks)."""
    state = load_checkpoint(path)
    if state.get("kind") == "curve":
        raise CheckpointError(f"{path} is a curve, not a network; pick a point with `modeconn curve-point` first")
    return state


def align_states(a: dict[str, Any], b: dict[str, Any], a_path: str | Path = "A", b_path: str | Path = "B",
                 seed: int = 0, max_iterations: int = 100) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """B's weights permuted to match A's (both modeconn checkpoint dicts), and the alignment record.
    Checkpoints of different architectures, widths or data, or missing layers, are CheckpointErrors."""
    if a["architecture"] != b["architecture"]:
        raise CheckpointError(f"{a_path} and {b_path} differ in architecture: {a['architecture']} vs {b['architecture']}")
    if a["dataset"].get("name") != b["dataset"].get("name"):
        raise CheckpointError(f"{a_path} and {b_path} were trained on different data: "
                              f"{a['dataset'].get('name')} vs {b['dataset'].get('name')}")
    model = build_network(a["architecture"], a["dataset"]["num_classes"], "cpu")
    for path, state in ((a_path, a), (b_path, b)):
        if (problem := weights_mismatch(model, state["model"])) is not None:
            raise CheckpointError(f"{path}: weights do not fit architecture {a['architecture']}: {problem}")
    shape = a["dataset"].get("input_shape")
    if not shape:
        raise CheckpointError(f"{a_path}: its dataset record has no input_shape, needed to trace the network")
    aligned, record = align_weights(model, a["model"], b["model"], example_input(shape), seed=seed,
                                    max_iterations=max_iterations)
    return aligned, {"start": str(a_path), "end": str(b_path), **record}


def align_weights(model: nn.Module, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], example: torch.Tensor,
                  seed: int = 0, max_iterations: int = 100) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """B's state_dict permuted to match A's (both of `model`'s architecture), on the CPU, and the
    alignment record. `model` is traced on `example` (a batch of inputs) to find the permutation
    groups. `modeconn align`, `curve --align` and the Python API's `align` all align here."""
    spec = derive_spec(model, example)
    learnable = {name for name, _ in model.named_parameters()}
    a_weights = {k: v.detach().cpu() for k, v in a.items()}
    b_weights = {k: v.detach().cpu() for k, v in b.items()}
    matching = weight_matching(spec, a_weights, b_weights, learnable, max_iterations=max_iterations, seed=seed)
    aligned = apply_permutation(spec, b_weights, matching.perms)
    return aligned, {"method": "weight matching", "seed": seed, **matching.record(spec)}


def align_checkpoints(start: Path, end: Path, out: Path, seed: int = 0) -> dict[str, Any]:
    """`modeconn align`: write `end` permuted to match `start` as an ordinary checkpoint at `out`
    (B's fields, its weights permuted, plus an `alignment` record)."""
    from modeconn.training.core.runs import check_replaceable_checkpoint

    check_replaceable_checkpoint(out, "aligned")  # never over a user's file or a run's own checkpoint
    started = time.perf_counter()
    a, b = network_checkpoint(start), network_checkpoint(end)
    aligned, record = align_states(a, b, start, end, seed=seed)
    # B's training state (optimizer momentum, RNG, epoch) would not match the permuted weights: dropped,
    # so the file is a plain network (FGE from it starts with fresh momentum, as from any final.pt)
    kept = {k: v for k, v in b.items() if k not in TRAINING_STATE}
    save_checkpoint(out, {**kept, "kind": "aligned", "model": aligned,
                          "alignment": {**record, "end_kind": b.get("kind")}})
    seconds = time.perf_counter() - started
    progress.log(f"align: {len(record['groups'])} permutation groups, {record['iterations']} sweeps, objective "
                 f"{record['objective_before']:.4g} -> {record['objective_after']:.4g} ({seconds:.1f}s) -> {out}")
    return {"checkpoint": str(out), "groups": len(record["groups"]), "iterations": record["iterations"],
            "objective_before": record["objective_before"], "objective_after": record["objective_after"],
            "seconds": seconds}
