"""The parity gate: every graph run with onnxruntime on real test inputs and compared with
PyTorch, and the curve graph's interpolated BN statistics checked between grid points."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeconn.contract.errors import ModeconnError
from modeconn.training.core.bn import recompute_bn
from modeconn.training.core.data import Dataset, input_batches
from modeconn.training.core.metrics import classification_metrics
from modeconn.training.core.networks import predict_probs
from modeconn.training.curves.model import CurveModel, network_at
from modeconn.training.export.graphs import CurveGraph


class ExportError(ModeconnError):
    """Nothing was stored: bad inputs, or a graph that failed the parity gate."""


def ort_session(path: Path):  # noqa: ANN202
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_parity(name: str, got: np.ndarray, expected: torch.Tensor, atol: float) -> float:
    diff = float(np.abs(got - expected.cpu().numpy()).max())
    if not diff <= atol:  # also catches NaN
        raise ExportError(f"parity gate failed for {name}: onnxruntime differs from PyTorch by {diff:.3g} (> {atol:g})")
    return diff


@torch.no_grad()
def interpolation_check(graph: CurveGraph, curve: CurveModel, data: Dataset, grid_points: int) -> dict[str, Any]:
    """Test error at off-grid t with interpolated BN statistics vs exactly recomputed ones."""
    step = 1.0 / (grid_points - 1)
    rows = []
    for t in (0.5 * step, 0.25 + 0.5 * step, 0.5 + 0.5 * step, 0.75 + 0.3 * step):
        interp = torch.cat([graph(x, torch.tensor([t])) for x, _ in input_batches(data, "test", 1024)])
        exact_net = recompute_bn(network_at(curve, t), data).eval()
        exact = predict_probs(exact_net, data, "test")
        rows.append({"t": t, "interpolated_error": classification_metrics(interp, data.y_test)["error"],
                     "exact_error": classification_metrics(exact, data.y_test)["error"]})
    worst = max(abs(r["interpolated_error"] - r["exact_error"]) for r in rows)
    return {"points": rows, "max_abs_error_difference_pp": worst}
