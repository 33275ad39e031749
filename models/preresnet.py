"""Pre-activation ResNet for CIFAR (He et al. 2016), as in the mode-connectivity paper.

Follows timgaripov/dnn-mode-connectivity `models/preresnet.py` (itself from
bearpaw/pytorch-classification): three stages of 16/32/64 planes, bottleneck
blocks (expansion 4) for depth >= 44, basic blocks below.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modeconn.models.registry import ModelSpecError, register_model


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv here is followed (eventually) by a BatchNorm.
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, plus the identity (or a 1x1 projection)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The projection takes the raw input, not the pre-activated one, as the reference does.
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 (x4 channels), plus shortcut."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


def _block_and_count(depth: int) -> tuple[type[BasicBlock] | type[Bottleneck], int]:
    """Block type and blocks per stage for a given total depth."""
    if depth >= 44:
        if (depth - 2) % 9 != 0:
            raise ModelSpecError(
                f"PreResNet depth {depth} is invalid: depth >= 44 uses bottleneck blocks "
                "and must be 9n+2 (e.g. 56, 110, 164)"
            )
        return Bottleneck, (depth - 2) // 9
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ModelSpecError(
            f"PreResNet depth {depth} is invalid: depth < 44 uses basic blocks "
            "and must be 6n+2 with n >= 1 (e.g. 8, 20, 32)"
        )
    return BasicBlock, (depth - 2) // 6


class PreResNet(nn.Module):
    """PreResNet-`depth` for 32x32 inputs: conv, 3 stages, final BN-ReLU, pool, linear."""

    def __init__(self, num_classes: int = 10, depth: int = 164) -> None:
        super().__init__()
        block, n = _block_and_count(depth)
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, 16, n)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        # Pre-activation blocks end on a conv, so the net needs one last BN-ReLU.
        self.bn = nn.BatchNorm2d(64 * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        # Equals the reference's AvgPool2d(8) on 32x32 inputs, and stays correct otherwise.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He init with fan-out, as in the reference.
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # A 1x1 projection when the shape changes (stride or channel count).
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes,
                    planes * block.expansion,
                    kernel_size=1,
                    stride=stride,
                    bias=False,
                )
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer1(x)  # 32x32
        x = self.layer2(x)  # 16x16
        x = self.layer3(x)  # 8x8
        x = self.relu(self.bn(x))
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


@register_model("preresnet")
def preresnet(num_classes: int = 10, depth: int = 164) -> nn.Module:
    """PreResNet; depth 164 (1,704,154 params for 10 classes) and 110 as in the paper."""
    return PreResNet(num_classes=num_classes, depth=depth)
