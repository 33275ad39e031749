"""Fused-ensemble designs compared in benchmarks/ensemble_inference.py with the one
training/export.py's EnsembleGraph ships (the members stacked into one K-times-wide network
of grouped convolutions): the previous EnsembleGraph, and the previous one with 1D
convolutions run as 2D (the other candidate, measured and not taken)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from training.export import Normalize


class PreviousEnsembleGraph(nn.Module):
    """EnsembleGraph before this change: the K members one after another in one graph."""

    def __init__(self, nets: list[nn.Module], normalize: Normalize) -> None:
        super().__init__()
        self.nets, self.normalize = nn.ModuleList(nets), normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.normalize(x)
        member_probs = torch.stack([torch.softmax(net(z), dim=1) for net in self.nets])
        return member_probs.mean(dim=0), member_probs


class InTurnConv2dEnsembleGraph(nn.Module):
    """The previous design with each member's 1D convolutions run as 2D ones of height 1
    (onnxruntime's NCHWc kernels are 2D only): the K members one after another in one graph."""

    def __init__(self, nets: list[nn.Module], normalize: Normalize) -> None:
        super().__init__()
        self.nets, self.normalize = nn.ModuleList(conv1d_as_2d(net) for net in nets), normalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.normalize(x)
        member_probs = torch.stack([torch.softmax(net(z), dim=1) for net in self.nets])
        return member_probs.mean(dim=0), member_probs


class Conv2dOfHeight1(nn.Module):
    """A Conv1d computed as a Conv2d over [N, C, 1, L]: the same numbers, the 2D kernels."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().unsqueeze(2), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.stride, self.dilation, self.groups = (1, *conv.stride), (1, *conv.dilation), conv.groups
        self.padding = conv.padding if isinstance(conv.padding, str) else (0, *conv.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.conv2d(x.unsqueeze(2), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y.squeeze(2)


def conv1d_as_2d(net: nn.Module) -> nn.Module:
    """`net` itself when it has no Conv1d, else a copy whose Conv1d layers run as 2D ones."""
    convs = [name for name, m in net.named_modules() if isinstance(m, nn.Conv1d) and m.padding_mode == "zeros"]
    if not convs:
        return net
    net = copy.deepcopy(net)
    for name in convs:
        if not name:
            return Conv2dOfHeight1(net)
        parent, _, attr = name.rpartition(".")
        setattr(net.get_submodule(parent), attr, Conv2dOfHeight1(net.get_submodule(name)))
    return net
