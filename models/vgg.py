"""VGG-16 for CIFAR (32x32 inputs), as in the mode-connectivity paper's code.

Layout follows timgaripov/dnn-mode-connectivity `models/vgg.py`: the torchvision
conv stack, then a small 512-512 classifier (the 4096-wide ImageNet head would
be pointless on the 1x1x512 map a 32x32 image leaves after five poolings).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from modeconn.models.registry import register_model

# 'M' is a 2x2 max-pool; integers are 3x3 conv output channels.
VGG16_CONFIG: list[int | str] = [
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
]  # fmt: skip


def _make_features(config: list[int | str], batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        channels = int(item)
        # Conv keeps its bias even with BN, as the reference does, so the parameter
        # counts match the published models (the bias is redundant but harmless).
        layers.append(nn.Conv2d(in_channels, channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels))
        layers.append(nn.ReLU(inplace=True))
        in_channels = channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG conv stack plus a Dropout/512/512 classifier; inputs [N, 3, 32, 32].

    With `batch_norm=True` each conv is followed by BN then ReLU. (The reference
    code zips its conv/BN list against a shorter ReLU list, which silently skips
    half the layers of VGG16BN; we apply every layer, with identical parameters.)
    """

    def __init__(
        self,
        num_classes: int = 10,
        config: list[int | str] | None = None,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        self.features = _make_features(config or VGG16_CONFIG, batch_norm)
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # He init with fan-out (n = k*k*out_channels), as in the reference; BN and
        # Linear keep PyTorch's defaults there too.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


@register_model("vgg16")
def vgg16(num_classes: int = 10) -> nn.Module:
    """VGG-16 without BatchNorm (15,245,130 parameters for 10 classes)."""
    return VGG(num_classes=num_classes, batch_norm=False)


@register_model("vgg16bn")
def vgg16bn(num_classes: int = 10) -> nn.Module:
    """VGG-16 with BatchNorm after every conv (15,253,578 parameters for 10 classes)."""
    return VGG(num_classes=num_classes, batch_norm=True)
