"""Architecture registry: parameter counts against the paper's code, forward shapes, errors.

The expected counts come from closed-form formulas that mirror the reference
implementation (timgaripov/dnn-mode-connectivity, models/*.py) layer by layer,
so they check the modules independently of how the modules are written.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modeconn import models
from modeconn.models import build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- closed-form counts of the reference architectures --------------------------------------


def ref_vgg16(num_classes: int, batch_norm: bool) -> int:
    channels = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    total, c_in = 0, 3
    for c in channels:
        total += 9 * c_in * c + c  # conv3x3 with bias (kept even with BN)
        total += 2 * c if batch_norm else 0
        c_in = c
    total += 2 * (512 * 512 + 512) + 512 * num_classes + num_classes
    return total


def ref_preresnet(num_classes: int, depth: int) -> int:
    bottleneck = depth >= 44
    n = (depth - 2) // 9 if bottleneck else (depth - 2) // 6
    expansion = 4 if bottleneck else 1
    total, inplanes = 9 * 3 * 16, 16  # stem conv, no bias
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            if bottleneck:
                total += 2 * inplanes + inplanes * planes  # bn1, conv1x1
                total += 2 * planes + 9 * planes * planes  # bn2, conv3x3
                total += 2 * planes + planes * 4 * planes  # bn3, conv1x1 (x4)
            else:
                total += 2 * inplanes + 9 * inplanes * planes
                total += 2 * planes + 9 * planes * planes
            out = planes * expansion
            if i == 0 and (stride != 1 or inplanes != out):
                total += inplanes * out  # 1x1 projection conv, no bias, no BN
            inplanes = out
    total += 2 * inplanes + inplanes * num_classes + num_classes  # final BN, fc
    return total


def ref_wideresnet(num_classes: int, depth: int, k: int) -> int:
    n = (depth - 4) // 6
    total, in_planes = 9 * 3 * 16 + 16, 16  # stem conv with bias
    for planes, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
        for i in range(n):
            s = stride if i == 0 else 1
            total += 2 * in_planes + 9 * in_planes * planes + planes  # bn1, conv1 (bias)
            total += 2 * planes + 9 * planes * planes + planes  # bn2, conv2 (bias)
            if s != 1 or in_planes != planes:
                total += in_planes * planes + planes  # 1x1 shortcut with bias
            in_planes = planes
    total += 2 * in_planes + in_planes * num_classes + num_classes
    return total


# (name, kwargs, exact count of the reference code, published/quoted size or None)
COUNTS = [
    ("vgg16", {}, 15_245_130, 15_245_130),
    ("vgg16bn", {}, 15_253_578, 15_245_130),
    # The quoted 1,704,154 has a BN in each projection shortcut (+896); the paper's code has none.
    ("preresnet", {"depth": 164}, 1_703_258, 1_704_154),
    # The paper's code builds depth 110 from bottleneck blocks (depth >= 44), 12 per stage,
    # so it is ~1.15 M, not the ~1.73 M of the basic-block ResNet-110 of He et al.
    ("preresnet", {"depth": 110}, 1_146_842, None),
    # The quoted 36,479,194 is the bias-free WRN; the paper's code has conv biases (+10,096).
    ("wideresnet", {"depth": 28, "widen_factor": 10}, 36_489_290, 36_479_194),
]


def test_closed_forms_reproduce_the_exact_counts() -> None:
    assert ref_vgg16(10, batch_norm=False) == 15_245_130
    assert ref_vgg16(10, batch_norm=True) == 15_253_578
    assert ref_preresnet(10, 164) == 1_703_258
    assert ref_preresnet(10, 110) == 1_146_842
    assert ref_wideresnet(10, 28, 10) == 36_489_290


@pytest.mark.parametrize(("name", "kwargs", "exact", "published"), COUNTS)
def test_parameter_counts(
    name: str, kwargs: dict[str, int], exact: int, published: int | None
) -> None:
    got = n_params(build_model(name, num_classes=10, **kwargs))
    assert got == exact
    if published is not None:
        assert abs(got - published) <= 0.01 * published


@pytest.mark.parametrize(
    ("name", "kwargs", "formula"),
    [
        ("vgg16", {}, lambda c: ref_vgg16(c, False)),
        ("preresnet", {"depth": 20}, lambda c: ref_preresnet(c, 20)),
        ("preresnet", {"depth": 56}, lambda c: ref_preresnet(c, 56)),
        ("wideresnet", {"depth": 10, "widen_factor": 2}, lambda c: ref_wideresnet(c, 10, 2)),
    ],
)
def test_counts_follow_the_reference_for_other_sizes(name, kwargs, formula) -> None:
    # Another class count and depths that exercise both block types.
    assert n_params(build_model(name, num_classes=100, **kwargs)) == formula(100)


SMALL_KWARGS: dict[str, dict[str, int]] = {
    "preresnet": {"depth": 20},
    "wideresnet": {"depth": 10, "widen_factor": 2},
}


def _input_for(name: str) -> torch.Tensor:
    return torch.randn(4, 40) if name == "cnn1d" else torch.randn(4, 3, 32, 32)


@pytest.mark.parametrize("name", models.list_models())
def test_every_model_forward_train_and_eval(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **SMALL_KWARGS.get(name, {}))
    x = _input_for(name)
    for train in (True, False):
        model.train(train)
        logits = model(x)
        assert logits.shape == (4, 10)
        assert torch.isfinite(logits).all()
        if train:  # in-place ops (ReLU, residual adds) must not break autograd
            logits.sum().backward()
            assert all(p.grad is not None for p in model.parameters())


def test_expected_models_are_registered() -> None:
    assert {"vgg16", "vgg16bn", "preresnet", "wideresnet", "cnn1d"} <= set(models.list_models())


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model") as err:
        build_model("resnet9000", num_classes=10)
    for choice in models.list_models():
        assert choice in str(err.value)


def test_unknown_kwarg_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="vgg16"):
        build_model("vgg16", num_classes=10, depth=19)


@pytest.mark.parametrize("depth", [21, 50, 2])
def test_preresnet_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        build_model("preresnet", num_classes=10, depth=depth)


@pytest.mark.parametrize("depth", [27, 4])
def test_wideresnet_bad_depth(depth: int) -> None:
    with pytest.raises(ValueError, match="depth"):
        build_model("wideresnet", num_classes=10, depth=depth)
