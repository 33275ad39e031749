"""Simplexes in weight space (Benton et al., ICML 2021, "Loss Surface Simplexes"), for any architecture.

The vertices θ_1..θ_k are flattened parameter vectors stacked in one [k, P] matrix, as a curve's
control points are (training/curves/model.py, whose flattening this reuses); the point at barycentric
weights w (w_i >= 0, Σ w_i = 1) is θ(w) = Σ_i w_i θ_i = w @ vertices, and the forward pass there is the
ordinary model run with those weights (`torch.func.functional_call`), so any nn.Module works.

A complex is a list of simplexes over the vertices (each a list of vertex indices): one simplex of
all of them, or the paper's mode-connecting complex, one simplex per trained network joined with every
trained connector (`structure`). A point is drawn as the paper's code draws it: a simplex of the
complex uniformly, then w ~ Dirichlet(1, ..., 1) on its vertices (normalised exponentials): uniform
on that simplex.

Volume (Cayley–Menger): for n points with squared distances d²_ij, the (n−1)-dimensional volume is
V² = (−1)^n det(CM) / (2^(n−1) ((n−1)!)²), CM = [[0, 1ᵀ], [1, D]] with D_ij = d²_ij; the regulariser
−λ log(V² + ε) (the reference code's, with its ε = 1e-4) pushes a trained vertex away from the
others' span.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.func import functional_call

from modeconn.training.curves.model import flatten_parameters

VOLUME_EPS = 1e-4  # the reference code's ε in log(V² + ε): a new vertex starts at the centroid (V = 0)


def structure(runs: int, trained: int, connecting: bool) -> list[list[int]]:
    """The simplexes over `runs` fixed vertices (indices 0..runs−1) and `trained` vertices after them:
    one simplex of all, or (`connecting`) one per run with every trained vertex (the paper's
    mode-connecting complex)."""
    free = list(range(runs, runs + trained))
    return [[r, *free] for r in range(runs)] if connecting else [list(range(runs + trained))]


def volume_squared(points: torch.Tensor) -> torch.Tensor:
    """V² of the simplex spanned by the rows of `points` [n, P] (n >= 2), by the Cayley–Menger
    determinant, in float64. Squared distances from differences (not from a Gram matrix): vertices
    close together far from the origin keep their precision."""
    n = points.shape[0]
    if n < 2:
        raise ValueError(f"a simplex volume needs at least 2 points, got {n}")
    rows = points.double()
    d2 = torch.zeros(n, n, dtype=torch.float64, device=points.device)
    for i in range(n):
        for j in range(i + 1, n):
            d2[i, j] = d2[j, i] = ((rows[i] - rows[j]) ** 2).sum()
    cm = torch.ones(n + 1, n + 1, dtype=torch.float64, device=points.device)
    cm[0, 0] = 0.0
    cm[1:, 1:] = d2
    scale = 2.0 ** (n - 1) * math.factorial(n - 1) ** 2
    # (−1)^n det(CM) >= 0 up to rounding; abs as the reference code (a degenerate simplex rounds either way)
    return ((-1) ** n * torch.linalg.det(cm)).abs() / scale


def volume_penalty(vertices: torch.Tensor, simplexes: list[list[int]]) -> torch.Tensor:
    """The mean over the complex's simplexes of −log(V² + ε) (times λ in the loss)."""
    return torch.stack([-torch.log(volume_squared(vertices[s]) + VOLUME_EPS) for s in simplexes]).mean()


def sample_weights(vertices: int, simplexes: list[list[int]], generator: torch.Generator) -> torch.Tensor:
    """Barycentric weights [vertices] of a point uniform on a simplex drawn uniformly from the complex:
    Dirichlet(1) on its vertices as normalised Exp(1) draws, zero elsewhere."""
    pick = simplexes[int(torch.randint(len(simplexes), (), generator=generator))]
    exponentials = -torch.log1p(-torch.rand(len(pick), generator=generator, dtype=torch.float64))
    w = torch.zeros(vertices, dtype=torch.float64)
    w[pick] = exponentials / exponentials.sum()
    return w


def centre(vertices: int, simplex: list[int]) -> torch.Tensor:
    """The barycentre of one simplex, as weights over all the vertices."""
    w = torch.zeros(vertices, dtype=torch.float64)
    w[simplex] = 1.0 / len(simplex)
    return w


class SimplexModel(nn.Module):
    """θ(w) over the parameters of `base`: fixed vertices (buffers) and at most one trained vertex
    (a parameter, last), as the simplex grows one vertex at a time with the earlier ones frozen.

    `forward(x, w)` records ‖θ(w)‖² in `last_l2` for the weight-decay term, as a curve does."""

    def __init__(self, base: nn.Module, fixed: torch.Tensor, simplexes: list[list[int]],
                 free: torch.Tensor | None = None) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)  # the vertices are the copies that count
        self.names = [n for n, _ in base.named_parameters()]
        self.shapes = [p.shape for _, p in base.named_parameters()]
        self.sizes = [p.numel() for _, p in base.named_parameters()]
        self.register_buffer("fixed_vertices", fixed.detach().float().clone())
        rows = free.detach().float().reshape(1, -1).clone() if free is not None else fixed.new_zeros(0, fixed.shape[1])
        self.free_vertices = nn.Parameter(rows, requires_grad=free is not None)
        self.simplexes = [list(s) for s in simplexes]
        if any(not s or max(s) >= self.num_vertices for s in self.simplexes):
            raise ValueError(f"simplexes {self.simplexes} name vertices beyond the {self.num_vertices} there are")
        self.last_l2: torch.Tensor | None = None

    @property
    def num_vertices(self) -> int:
        return self.fixed_vertices.shape[0] + self.free_vertices.shape[0]

    def vertices(self) -> torch.Tensor:
        """[k, P], the trained vertex last (with its gradient)."""
        return torch.cat([self.fixed_vertices, self.free_vertices])

    def flat_weights(self, w: torch.Tensor) -> torch.Tensor:
        """θ(w) = Σ_i w_i θ_i as one vector of all parameters."""
        w = torch.as_tensor(w, device=self.fixed_vertices.device).to(self.fixed_vertices.dtype)
        if w.shape != (self.num_vertices,):
            raise ValueError(f"barycentric weights need {self.num_vertices} entries, got shape {tuple(w.shape)}")
        return w @ self.vertices()

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: chunk.view(shape) for n, chunk, shape in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # θ(w) stays fp32 under mixed precision (as a curve's w(t): autocast would round the combination)
        with torch.autocast(x.device.type, enabled=False):
            flat = self.flat_weights(w)
            self.last_l2 = (flat * flat).sum()
        return functional_call(self.base, self.unflatten(flat), (x,))

    def frozen(self) -> SimplexModel:
        """The same simplex with every vertex fixed."""
        return SimplexModel(self.base, self.vertices().detach(), self.simplexes)

    def grown(self, simplexes: list[list[int]]) -> SimplexModel:
        """This simplex frozen plus a new trained vertex at the centroid of all the vertices (as the
        reference code starts each new vertex), over `simplexes`."""
        vertices = self.vertices().detach()
        return SimplexModel(self.base, vertices, simplexes, free=vertices.mean(0))


def vertex_matrix(states: list[dict[str, torch.Tensor]], base: nn.Module) -> torch.Tensor:
    """[n, P]: each state's parameters flattened in `base`'s parameter order."""
    names = [n for n, _ in base.named_parameters()]
    return torch.stack([flatten_parameters(s, names) for s in states])


@torch.no_grad()
def network_at(simplex: SimplexModel, w: torch.Tensor) -> nn.Module:
    """An ordinary network with the weights θ(w) (BN statistics still to be recomputed)."""
    net = copy.deepcopy(simplex.base)
    for name, value in simplex.unflatten(simplex.flat_weights(w)).items():
        net.get_parameter(name).copy_(value)
        net.get_parameter(name).requires_grad_(True)
    return net.eval()
