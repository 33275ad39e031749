"""A small 1D CNN with BatchNorm for MNIST-1D (inputs [N, 1, 40] or [N, 40]).

`batchnorm=False` gives the same network without BatchNorm (biased convolutions instead),
whose training step does not depend on how a batch is split across processes.
"""

from __future__ import annotations

import torch
from torch import nn

from modeconn.models.registry import register_model


def _conv_block(c_in: int, c_out: int, batchnorm: bool = True) -> nn.Sequential:
    if not batchnorm:
        return nn.Sequential(nn.Conv1d(c_in, c_out, kernel_size=5, padding=2), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, kernel_size=5, padding=2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    )


class CNN1D(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 32, length: int = 40, batchnorm: bool = True) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(1, width, batchnorm),
            _conv_block(width, width, batchnorm),
            nn.MaxPool1d(2),
            _conv_block(width, 2 * width, batchnorm),
            _conv_block(2 * width, 2 * width, batchnorm),
            nn.MaxPool1d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * (length // 4), 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # MNIST-1D signals come as [N, L]; the convs want one channel
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


@register_model("cnn1d")
def cnn1d(num_classes: int = 10, width: int = 32, length: int = 40, batchnorm: bool = True) -> nn.Module:
    return CNN1D(num_classes=num_classes, width=width, length=length, batchnorm=batchnorm)
