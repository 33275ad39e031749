"""How the training step runs: mixed precision, memory layout and torch.compile (`step` settings).

`fit` (training/core/loop.py) builds its step model with `step_model` and scales the loss with
the GradScaler of `grad_scaler`. Only the step's forward pass runs under autocast: the model's
outputs come back as fp32, so every stage's loss (cross-entropy, the curve's L2 term) is computed
in fp32, and the weights and optimizer state stay fp32 (autocast casts copies per op). BN
re-estimation, evaluation and snapshots use the unwrapped model outside autocast: fp32.

fp16 needs a GradScaler (its exponent range underflows small gradients); bf16 has fp32's
range and needs none. With the defaults (fp32, no channels_last, no compile) the step model
is the given module itself, so a default run is bit-for-bit what it was before these options.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from modeconn.training.core import progress
from modeconn.training.core.config import ConfigError, StepSettings

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `step.precision` on `device` (None for fp32); a ConfigError naming the
    setting when this torch cannot autocast to it on this device."""
    dtype = DTYPES[precision]
    if dtype is None:
        return None
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"step.precision: bf16 needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} "
                          "has none; use step.precision=fp16 or fp32")
    if not _autocasts(device, dtype):
        raise ConfigError(f"step.precision: {precision} is not supported by torch {torch.__version__}'s autocast on "
                          f"{device.type}; use " + ("bf16 or fp32" if precision == "fp16" else "fp32"))
    return dtype


def _autocasts(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a matmul under autocast(device, dtype) really runs in dtype: torch warns and
    disables autocast (instead of raising) for a dtype the device does not support."""
    if not torch.amp.is_autocast_available(device.type):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = torch.ones(2, 2, device=device)
        with torch.autocast(device.type, dtype=dtype):
            return (a @ a).dtype == dtype


def grad_scaler(settings: StepSettings, device: torch.device) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaling; a disabled scaler (scale, step and update pass through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")


class AutocastStep(nn.Module):
    """Runs `inner` with its first input in the channels_last layout (4-D inputs) and under
    autocast, and returns fp32 outputs, so the loss computed from them is fp32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype | None, channels_last: bool) -> None:
        super().__init__()
        self.inner, self.dtype, self.channels_last = inner, dtype, channels_last

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return self.inner(x, *args, **kwargs)
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.inner(x, *args, **kwargs)
        return out.float()


def prepare_model(model: nn.Module, settings: StepSettings, input_dims: int) -> None:
    """channels_last on the model's own 4-D parameters (in place: the optimizer keeps its tensors);
    a ConfigError naming the setting when the data are not images."""
    if not settings.channels_last:
        return
    if input_dims != 4:
        raise ConfigError(f"step.channels_last: needs image inputs (4-D batches: N, C, H, W); this data set's "
                          f"batches are {input_dims}-D; set step.channels_last=false")
    model.to(memory_format=torch.channels_last)


def step_model(model: nn.Module, settings: StepSettings, device: torch.device, description: str) -> nn.Module:
    """The module the step calls: `model` (the network, its curve, or DDP around either) itself
    with the defaults, else wrapped for autocast / channels_last, then compiled if asked."""
    dtype = autocast_dtype(settings.precision, device)
    out = model if dtype is None and not settings.channels_last else AutocastStep(model, dtype, settings.channels_last)
    if settings.compile:
        out = compiled(out, device, description)
    return out


def compiled(model: nn.Module, device: torch.device, description: str) -> nn.Module:
    """torch.compile(model). Compilation happens at the first step (its time counts in the first
    epoch's seconds); a tiny function is compiled first, so a machine where torch cannot compile
    (no C++ compiler for inductor's CPU code, no Triton for CUDA) fails now with a ConfigError
    naming the setting, not at the first step with a compiler traceback."""
    try:
        torch.compile(_probe)(torch.ones(4, device=device))
    except Exception as err:  # noqa: BLE001  (whatever the backend raises means: cannot compile here)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"step.compile: torch.compile does not work on this machine ({type(err).__name__}: "
                          f"{first}); set step.compile=false") from err
    progress.log(f"[dim]{description}: torch.compile; the first step compiles (its time counts in epoch 1)[/dim]")
    return torch.compile(model)


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x * 2 - 1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module below the compile and autocast wrappers (DDP, if any, stays)."""
    while True:
        if isinstance(model, AutocastStep):
            model = model.inner
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        else:
            return model
