"""Fused-ensemble designs compared in benchmarks/ensemble_inference.py with the one
training/export/graphs.py's EnsembleGraph ships (the members in turn in one graph, 1D convolutions
run as 2D): the members stacked into one K-times-wide network of grouped convolutions (the
design shipped before it), and the members in turn with 1D convolutions left 1D (the first
design)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from modeconn.training.export import Normalize


class PlainInTurnEnsembleGraph(nn.Module):
    """The first EnsembleGraph: the K members one after another in one graph, layers as they are."""

    def __init__(self, nets: list[nn.Module], normalize: Normalize) -> None:
        super().__init__()
        self.nets, self.normalize = nn.ModuleList(nets), normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.normalize(x)
        member_probs = torch.stack([torch.softmax(net(z), dim=1) for net in self.nets])
        return member_probs.mean(dim=0), member_probs


class StackedEnsembleGraph(nn.Module):
    """The K members as ONE network K times as wide ("member-stacked" channels [N, K*C, ...],
    member k's channels at k*C..(k+1)*C): every convolution one grouped convolution (groups =
    K x its own), every linear layer one batched matmul, every eval-mode BatchNorm one over
    K*C channels; 1D convolutions as 2D ones of height 1. Falls back to the members in turn
    when a stateful layer has no stacked form.
    """

    def __init__(self, nets: list[nn.Module], normalize: Normalize) -> None:
        super().__init__()
        self.num_members, self.normalize = len(nets), normalize
        self.stacked = stack_members(nets)
        self.nets = nn.ModuleList(nets) if self.stacked is None else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.normalize(x)
        if self.stacked is None:
            member_probs = torch.stack([torch.softmax(net(z), dim=1) for net in self.nets])
        else:
            logits = self.stacked(z).unflatten(1, (self.num_members, -1))  # [N, K, C]
            member_probs = torch.softmax(logits, dim=2).transpose(0, 1)  # [K, N, C]
        return member_probs.mean(dim=0), member_probs


def stack_members(nets: list[nn.Module]) -> nn.Module | None:
    """One eval-mode network computing all `nets` side by side on member-stacked channels
    (StackedEnsembleGraph), or None when a stateful layer has no stacked form here."""
    modules = [dict(net.named_modules()) for net in nets]
    if any(m.keys() != modules[0].keys() for m in modules):
        return None
    wide = copy.deepcopy(nets[0]).eval()
    for name, module in list(wide.named_modules()):
        layers = [m[name] for m in modules]
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.padding_mode == "zeros":
            replacement: nn.Module = _StackedConv(layers)
        elif isinstance(module, nn.Linear):
            replacement = _StackedLinear(layers)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            replacement = _StackedBatchNorm(layers)
        elif [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            return None  # a layer with state that has no stacked form here
        else:
            continue
        if not name:
            return replacement.eval()  # the whole network is one layer
        parent, _, attr = name.rpartition(".")
        setattr(wide.get_submodule(parent), attr, replacement)
    return wide.eval()


def _tile(x: torch.Tensor, k: int) -> torch.Tensor:
    """A shared [N, C, ...] input as member-stacked [N, K*C, ...]."""
    return x.repeat(1, k, *([1] * (x.dim() - 2)))


def _frozen(tensors: list[torch.Tensor | None], stack: bool = False) -> nn.Parameter | None:
    if tensors[0] is None:
        return None
    joined = torch.stack if stack else torch.cat
    return nn.Parameter(joined([t.detach() for t in tensors]), requires_grad=False)


class _StackedConv(nn.Module):
    """K convolutions as one with groups = K x groups on member-stacked channels. A 1D
    convolution runs as a 2D one of height 1: onnxruntime has its fast blocked-layout
    (NCHWc) CPU kernels for 2D convolutions only."""

    def __init__(self, convs: list[nn.Module]) -> None:
        super().__init__()
        c = convs[0]
        self.members, self.in_channels, self.groups = len(convs), c.in_channels, c.groups
        self.lift = len(c.kernel_size) == 1
        weight = _frozen([m.weight for m in convs])  # [K*O, C/groups, *kernel]
        if self.lift:
            weight = nn.Parameter(weight.unsqueeze(2), requires_grad=False)
            self.stride, self.dilation = (1, *c.stride), (1, *c.dilation)
            self.padding = c.padding if isinstance(c.padding, str) else (0, *c.padding)
        else:
            self.stride, self.padding, self.dilation = c.stride, c.padding, c.dilation
        self.conv = torch.conv3d if len(c.kernel_size) == 3 else torch.conv2d
        self.weight, self.bias = weight, _frozen([m.bias for m in convs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = self.members * self.groups
        if x.shape[1] == self.in_channels:  # the shared input: read it once
            if self.groups == 1:
                groups = 1
            else:
                x = _tile(x, self.members)
        if self.lift:
            return self.conv(x.unsqueeze(2), self.weight, self.bias, self.stride, self.padding, self.dilation,
                             groups).squeeze(2)
        return self.conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, groups)


class _StackedLinear(nn.Module):
    """K linear layers as one batched matmul; [N, K*F] -> [N, K*O]."""

    def __init__(self, linears: list[nn.Module]) -> None:
        super().__init__()
        self.members, self.in_features = len(linears), linears[0].in_features
        self.weight = _frozen([m.weight.t() for m in linears], stack=True)  # [K, F, O]
        bias = _frozen([m.bias for m in linears], stack=True)
        self.bias = None if bias is None else nn.Parameter(bias.unsqueeze(1), requires_grad=False)  # [K, 1, O]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise NotImplementedError("the stacked ensemble supports linear layers on [N, features] inputs only")
        n = x.shape[0]
        if x.shape[1] == self.in_features:
            h = x.unsqueeze(0)  # the shared input, broadcast over the members
        else:
            h = x.reshape(n, self.members, self.in_features).transpose(0, 1)  # [K, N, F]
        y = torch.matmul(h, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.transpose(0, 1).reshape(n, -1)


class _StackedBatchNorm(nn.Module):
    """K eval-mode BatchNorms as one over K*C channels."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        b = layers[0]
        self.members, self.num_features = len(layers), b.num_features
        self.bn = type(b)(len(layers) * b.num_features, eps=b.eps, affine=b.affine).eval()
        with torch.no_grad():
            for name in ("running_mean", "running_var", *(("weight", "bias") if b.affine else ())):
                getattr(self.bn, name).copy_(torch.cat([getattr(m, name) for m in layers]))
        self.bn.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(_tile(x, self.members) if x.shape[1] == self.num_features else x)
