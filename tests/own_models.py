"""Networks that are not in modeconn's registry, named by import path in the tests
(`tests.own_models:build`, importable from the repository root as the current directory),
and factories that go wrong in each way a user's factory can."""

from __future__ import annotations

import torch
from torch import nn


class SignalNet(nn.Module):
    """A small 1-D conv net with BatchNorm for MNIST-1D signals of shape (40,): two conv blocks,
    average pooling to 5 positions and a linear head (the registry's cnn1d max-pools twice and
    has two linear layers)."""

    def __init__(self, classes: int, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Unflatten(1, (1, 40)),  # [N, 40] -> [N, 1, 40]
            nn.Conv1d(1, width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Conv1d(width, 2 * width, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm1d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(5),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width * 5, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build(num_classes: int, width: int = 8) -> nn.Module:
    """The factory the tests name: takes num_classes, so modeconn passes it."""
    return SignalNet(num_classes, width=width)


def build_from_kwargs(**kwargs: int) -> nn.Module:
    """A factory that takes **kwargs: modeconn passes num_classes among them."""
    return SignalNet(kwargs.pop("num_classes"), **kwargs)


def build_ten() -> nn.Module:
    """A factory without num_classes: modeconn calls it with the config's kwargs only."""
    return SignalNet(10, width=4)


def build_raises(num_classes: int) -> nn.Module:
    raise RuntimeError(f"no GPU kernel for {num_classes} classes")


def build_not_a_module(num_classes: int) -> dict:
    return {"classes": num_classes}


NOT_CALLABLE = 42
