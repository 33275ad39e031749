"""Curves between trained networks, for any architecture.

The control points are stacked copies of the model's parameters, flattened to one
[num_bends, P] matrix; the weights at t are `coefficients(t) @ points`, and the forward
pass at t is the ordinary model run with those weights (`torch.func.functional_call`).
No layer needs a curve twin, so every registry architecture, and any user nn.Module, works.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call

CurveType = Literal["bezier", "polychain"]


def bezier_coefficients(t: torch.Tensor, num_bends: int) -> torch.Tensor:
    """Bernstein basis: c_k = C(n-1, k) t^k (1-t)^(n-1-k), k = 0..n-1."""
    k = torch.arange(num_bends, dtype=t.dtype, device=t.device)
    binom = torch.tensor([math.comb(num_bends - 1, i) for i in range(num_bends)], dtype=t.dtype, device=t.device)
    return binom * t**k * (1 - t) ** (num_bends - 1 - k)


def polychain_coefficients(t: torch.Tensor, num_bends: int) -> torch.Tensor:
    """Piecewise linear through bends at t = k/(n-1): hat functions max(0, 1 - |t(n-1) - k|)."""
    k = torch.arange(num_bends, dtype=t.dtype, device=t.device)
    return torch.relu(1 - (t * (num_bends - 1) - k).abs())


COEFFICIENTS = {"bezier": bezier_coefficients, "polychain": polychain_coefficients}


def even_ts(points: int) -> list[float]:
    """The exact grid i / (n - 1) in float64 (a float32 linspace gives 0.49999997 for 0.5)."""
    return [i / (points - 1) for i in range(points)]


def flatten_parameters(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].detach().reshape(-1).float() for n in names])


class CurveModel(nn.Module):
    """φθ(t) over the parameters of `base`; endpoints fixed unless freed.

    In train mode a forward without `t` draws t ~ U[0, 1] (one t per minibatch, as in
    the paper) and records ‖w(t)‖² in `last_l2` for the weight-decay term.
    """

    def __init__(
        self,
        base: nn.Module,
        start: dict[str, torch.Tensor],
        end: dict[str, torch.Tensor],
        curve: CurveType = "bezier",
        num_bends: int = 3,
        fix_start: bool = True,
        fix_end: bool = True,
        init: Literal["linear", "random"] = "linear",
    ) -> None:
        super().__init__()
        if curve not in COEFFICIENTS:
            raise ValueError(f"curve must be one of {sorted(COEFFICIENTS)}, got {curve!r}")
        if num_bends < 2:
            raise ValueError(f"num_bends must be at least 2, got {num_bends}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)  # the control points are the trainable copies
        self.curve, self.num_bends = curve, num_bends
        self.names = [n for n, _ in base.named_parameters()]
        self.shapes = [p.shape for _, p in base.named_parameters()]
        self.sizes = [p.numel() for _, p in base.named_parameters()]
        w0, w1 = flatten_parameters(start, self.names), flatten_parameters(end, self.names)
        rows = []
        for k in range(num_bends):
            alpha = k / (num_bends - 1)
            if 0 < k < num_bends - 1 and init == "random":
                rows.append(flatten_parameters(dict(_fresh_copy(base).named_parameters()), self.names))
            else:
                rows.append((1 - alpha) * w0 + alpha * w1 if 0 < k < num_bends - 1 else (w0 if k == 0 else w1))
        free = [k for k in range(num_bends) if (0 < k < num_bends - 1) or (k == 0 and not fix_start) or (k == num_bends - 1 and not fix_end)]
        fixed = [k for k in range(num_bends) if k not in free]
        self.register_buffer("free_index", torch.tensor(free, dtype=torch.long))
        self.register_buffer("fixed_index", torch.tensor(fixed, dtype=torch.long))
        self.free_points = nn.Parameter(_stack([rows[k] for k in free], w0))
        self.register_buffer("fixed_points", _stack([rows[k] for k in fixed], w0))
        self.last_l2: torch.Tensor | None = None

    def coefficients(self, t: torch.Tensor) -> torch.Tensor:
        return COEFFICIENTS[self.curve](t, self.num_bends)

    def flat_weights(self, t: torch.Tensor | float) -> torch.Tensor:
        """w(t) as one vector of all parameters."""
        t = torch.as_tensor(t, dtype=self.free_points.dtype, device=self.free_points.device)
        c = self.coefficients(t)
        return c[self.free_index] @ self.free_points + c[self.fixed_index] @ self.fixed_points

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: chunk.view(shape) for n, chunk, shape in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}

    def weights(self, t: torch.Tensor | float) -> dict[str, torch.Tensor]:
        return self.unflatten(self.flat_weights(t))

    def control_points(self) -> torch.Tensor:
        """All bends in order, [num_bends, P]."""
        points = torch.empty(self.num_bends, self.free_points.shape[1], device=self.free_points.device)
        points[self.free_index] = self.free_points.detach()
        points[self.fixed_index] = self.fixed_points
        return points

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        if t is None:
            if not self.training:
                raise ValueError("CurveModel needs t in eval mode")
            t = torch.rand((), device=x.device)
        flat = self.flat_weights(t)
        self.last_l2 = (flat * flat).sum()
        return functional_call(self.base, self.unflatten(flat), (x,))

    def settings(self) -> dict:
        return {
            "curve": self.curve,
            "num_bends": self.num_bends,
            "free_bends": self.free_index.tolist(),
        }


def _stack(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(rows) if rows else like.new_zeros(0, like.numel())


def _fresh_copy(base: nn.Module) -> nn.Module:
    fresh = copy.deepcopy(base)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters") and m is not fresh:
            m.reset_parameters()
    return fresh


@torch.no_grad()
def network_at(curve: CurveModel, t: float) -> nn.Module:
    """An ordinary network with the weights w(t) (BN statistics still to be recomputed)."""
    net = copy.deepcopy(curve.base)
    for name, value in curve.weights(t).items():
        net.get_parameter(name).copy_(value)
        net.get_parameter(name).requires_grad_(True)
    return net.eval()
