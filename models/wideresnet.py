"""Wide ResNet (Zagoruyko & Komodakis 2016) for CIFAR, as in the mode-connectivity paper.

Follows timgaripov/dnn-mode-connectivity `models/wide_resnet.py` (itself from
meliketoy/wide-resnet.pytorch): pre-activation wide basic blocks, convs with
bias, stride on the second conv of a block, a 1x1 conv shortcut on shape change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modeconn.models.registry import ModelSpecError, register_model


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3, dropout, BN-ReLU-conv3x3 (strided), plus shortcut."""

    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int = 1) -> None:
        super().__init__()
        # Convs keep their bias, as in the reference, so parameter counts match it.
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-`depth`-`widen_factor` for 32x32 inputs; stages of 16k, 32k, 64k channels."""

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ModelSpecError(
                f"WideResNet depth {depth} is invalid: it must be 6n+4 with n >= 1 "
                "(e.g. 10, 16, 28, 40)"
            )
        if widen_factor < 1:
            raise ModelSpecError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        k = widen_factor
        stages = [16, 16 * k, 32 * k, 64 * k]

        self.in_planes = stages[0]
        self.conv1 = nn.Conv2d(3, stages[0], kernel_size=3, padding=1, bias=True)
        self.layer1 = self._wide_layer(stages[1], n, dropout, stride=1)
        self.layer2 = self._wide_layer(stages[2], n, dropout, stride=2)
        self.layer3 = self._wide_layer(stages[3], n, dropout, stride=2)
        # The reference passes momentum=0.9 here, a Torch7-convention slip that in PyTorch
        # makes the running statistics track only the last batch; we keep the default 0.1.
        self.bn1 = nn.BatchNorm2d(stages[3])
        self.linear = nn.Linear(stages[3], num_classes)
        # Weights keep PyTorch's default init, as the reference does.

    def _wide_layer(
        self, planes: int, num_blocks: int, dropout: float, stride: int
    ) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(WideBasic(self.in_planes, planes, dropout, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer1(out)  # 32x32
        out = self.layer2(out)  # 16x16
        out = self.layer3(out)  # 8x8
        out = F.relu(self.bn1(out))
        # Global average pool: the reference's avg_pool2d(8) on 32x32 inputs.
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(torch.flatten(out, 1))


@register_model("wideresnet")
def wideresnet(
    num_classes: int = 10, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0
) -> nn.Module:
    """Wide ResNet; WRN-28-10 has 36,479,194 parameters for 10 classes."""
    return WideResNet(
        num_classes=num_classes, depth=depth, widen_factor=widen_factor, dropout=dropout
    )
