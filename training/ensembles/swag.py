"""`modeconn swag`: SWAG (Maddox et al., NeurIPS 2019), a Gaussian over the weights from the
walk FGE or SWA already made, and an ensemble sampled from it.

From the n snapshots θ_1..θ_n (an FGE/SSE run's, or any checkpoints of one network):
- the mean θ_SWA = (1/n) Σ θ_i (the SWA weights) and the diagonal Σ_diag = (1/n) Σ θ_i² − θ_SWA²;
- the deviation matrix D̂ with one column per snapshot, D_i = θ_i − θ̄_i, where θ̄_i is the
  running mean after θ_i, of the last K snapshots (the paper's low-rank part).
A sample is θ = θ_SWA + √scale · (Σ_diag^{1/2} z₁ / √2 + D̂ z₂ / √(2(K − 1))), z₁ ~ N(0, I_d),
z₂ ~ N(0, I_K) (without the low-rank part when K = 1); only parameters are sampled, BN
statistics are recomputed for each sample on the training split. The samples are ordinary
checkpoints (kind "swag"), so `ensemble-eval`, `export` and every other command take them;
the sampled ensemble's metrics are written as `ensemble-eval` writes them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modeconn.contract.errors import ModeconnError
from modeconn.training.core import progress
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.checkpoint import atomic_write_json, model_checkpoint, save_checkpoint
from modeconn.training.core.data import Dataset
from modeconn.training.core.loop import resolve_device
from modeconn.training.core.networks import load_data, load_network
from modeconn.training.core.runs import RunDirError, check_report_folder
from modeconn.training.core.sources import check_same_network
from modeconn.training.ensembles.evaluate import evaluate_checkpoints, expand_members


class SWAGError(ModeconnError):
    """SWAG's sources or settings cannot give a posterior (too few snapshots, another network)."""


def swag_moments(snapshots: list[dict[str, torch.Tensor]], rank: int) -> dict[str, Any]:
    """The mean, the diagonal variance and the last `rank` deviation columns (running mean)
    of the snapshots' parameters, each a dict of tensors shaped like the parameters (float64)."""
    if not snapshots:
        raise SWAGError("no snapshots to fit SWAG to")
    mean = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in snapshots[0].items()}
    square = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in snapshots[0].items()}
    deviations: list[dict[str, torch.Tensor]] = []
    for n, state in enumerate(snapshots, start=1):
        for k, v in state.items():
            v = v.double()
            mean[k] += (v - mean[k]) / n
            square[k] += (v * v - square[k]) / n
        deviations.append({k: v.double() - mean[k] for k, v in state.items()})
    variance = {k: (square[k] - mean[k] ** 2).clamp_min(0.0) for k in mean}
    return {"mean": mean, "variance": variance, "deviations": deviations[-rank:] if rank > 0 else [], "count": len(snapshots)}


def swag_sample(moments: dict[str, Any], generator: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One draw θ_SWA + √scale · (Σ_diag^{1/2} z₁ / √2 + D̂ z₂ / √(2(K − 1)))."""
    mean, variance, deviations = moments["mean"], moments["variance"], moments["deviations"]
    k = len(deviations)
    z2 = torch.randn(k, generator=generator, dtype=torch.float64) if k > 1 else None
    out = {}
    for name, m in mean.items():
        z1 = torch.randn(m.shape, generator=generator, dtype=torch.float64)
        noise = variance[name].sqrt() * z1
        if z2 is not None:
            low_rank = sum(z2[i] * deviations[i][name] for i in range(k)) / (k - 1) ** 0.5
            noise = (noise + low_rank) / 2 ** 0.5
        else:
            noise = noise / 2 ** 0.5
        out[name] = m + scale ** 0.5 * noise
    return out


def parameters_of(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learnable parameters among a state_dict's entries (buffers such as BN statistics are not sampled)."""
    names = {name for name, _ in model.named_parameters()}
    return {k: v for k, v in state.items() if k in names}


def swag_from_checkpoints(paths: list[Path], device: torch.device | str = "cpu",
                          rank: int = 20) -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
    """SWAG's moments of the checkpoints' parameters (each checked against the first), a
    network of their architecture on `device` to load draws into, and the first checkpoint."""
    model, first = load_network(paths[0], device)
    snapshots = []
    for path in paths:
        net, state = load_network(path, "cpu")
        check_same_network([(paths[0], first), (path, state)], SWAGError)
        snapshots.append(parameters_of(net, net.state_dict()))
    return swag_moments(snapshots, rank), model, first


def swag_network(model: nn.Module, moments: dict[str, Any], generator: torch.Generator, scale: float,
                 data: Dataset) -> nn.Module:
    """`model` holding one draw, BN statistics recomputed on `data`'s training split (eval mode)."""
    drawn = swag_sample(moments, generator, scale)
    model.load_state_dict({k: drawn[k].to(v.dtype) if k in drawn else v for k, v in model.state_dict().items()})
    return recompute_bn(model, data).eval()


def run_swag(sources: list[Path], out_dir: Path, samples: int = 8, rank: int = 20, scale: float = 1.0,
             seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Fit SWAG to `sources` (checkpoints, or run folders standing for their snapshots), draw
    `samples` networks with BN recomputed into OUT/samples/, and evaluate them as an ensemble."""
    started = time.perf_counter()
    if samples < 1 or rank < 1 or scale <= 0:
        raise SWAGError(f"--samples and --rank must be at least 1 and --scale positive "
                        f"(got {samples}, {rank}, {scale})")
    out_dir = Path(out_dir)
    try:
        members = expand_members(sources)
    except ModeconnError as err:
        raise SWAGError(str(err)) from err
    if len(members) < 2:
        raise SWAGError(f"SWAG needs at least 2 snapshots to have a spread; got {len(members)} ({members[0]})")
    if (out_dir / "samples").exists() and any((out_dir / "samples").iterdir()):
        raise RunDirError(f"--out {out_dir} already holds samples/ from an earlier draw; choose another --out")
    check_report_folder(out_dir, ("swag.json", "samples", "ensemble.json", "ensemble.csv"))
    dev = resolve_device(device)
    moments, model, first = swag_from_checkpoints(members, dev, rank)
    data = load_data(first["dataset"], dev)
    generator = torch.Generator().manual_seed(seed)
    record = {"members": [str(p) for p in members], "rank": len(moments["deviations"]), "scale": scale,
              "seed": seed, "samples": samples, "method": "SWAG (diagonal + low-rank), Maddox et al. 2019"}
    paths = []
    (out_dir / "samples").mkdir(exist_ok=True)
    with progress.task("swag samples", samples) as advance:
        for i in range(samples):
            swag_network(model, moments, generator, scale, data)
            path = out_dir / "samples" / f"sample-{i + 1:03d}.pt"
            save_checkpoint(path, model_checkpoint(model, first["architecture"], first["dataset"], kind="swag",
                                                   swag={**record, "index": i + 1}))
            paths.append(path)
            advance()
    evaluation = evaluate_checkpoints(paths, device=device, out_dir=out_dir)
    seconds = time.perf_counter() - started
    result = {"samples": [str(p) for p in paths], "swag": record, "ensemble": evaluation.get("ensemble"),
              "seconds": seconds}
    atomic_write_json(out_dir / "swag.json", result)
    ens = evaluation.get("ensemble") or {}
    progress.log(f"swag: {samples} samples from {len(members)} snapshots (rank {record['rank']}, scale {scale:g}): "
                 f"ensemble test error {ens.get('test_error', float('nan')):.2f} %, NLL "
                 f"{ens.get('test_nll', float('nan')):.4f} ({seconds:.1f}s) -> {out_dir}")
    return result
