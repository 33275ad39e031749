"""modeconn: mode connectivity curves and Fast Geometric Ensembles, exported to ONNX and served.

The public Python API is re-exported here and loaded on first use, so `import modeconn`
(and the serving side, which imports `modeconn.contract`) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_CORE = "modeconn.training.api"
_CONFIG = "modeconn.training.core.config"
# public name -> module that defines it (docs/python-api.md)
_API: dict[str, str] = {
    "fit_curve": _CORE, "Curve": _CORE, "CurveEvaluation": _CORE, "fit_simplex": _CORE, "Simplex": _CORE,
    "fge": _CORE, "sse": _CORE, "swa": _CORE, "align": _CORE,
    "evaluate_ensemble": _CORE, "EnsembleEvaluation": _CORE, "fit_temperature": _CORE, "export": _CORE,
    "NetworkMismatchError": _CORE,
    "CurveSettings": _CONFIG, "FGESettings": _CONFIG, "SSESettings": _CONFIG, "SimplexSettings": _CONFIG, "ExportSettings": _CONFIG,
    "dataset_from_torch": "modeconn.training.core.data",
    "Interval": "modeconn.training.core.statistics",
    "ModeconnError": "modeconn.contract.errors",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on first use
    from modeconn.contract.errors import ModeconnError as ModeconnError
    from modeconn.training.api import Curve as Curve
    from modeconn.training.api import CurveEvaluation as CurveEvaluation
    from modeconn.training.api import EnsembleEvaluation as EnsembleEvaluation
    from modeconn.training.api import NetworkMismatchError as NetworkMismatchError
    from modeconn.training.api import Simplex as Simplex
    from modeconn.training.api import align as align
    from modeconn.training.api import evaluate_ensemble as evaluate_ensemble
    from modeconn.training.api import export as export
    from modeconn.training.api import fge as fge
    from modeconn.training.api import fit_curve as fit_curve
    from modeconn.training.api import fit_simplex as fit_simplex
    from modeconn.training.api import fit_temperature as fit_temperature
    from modeconn.training.api import sse as sse
    from modeconn.training.api import swa as swa
    from modeconn.training.core.config import CurveSettings as CurveSettings
    from modeconn.training.core.config import ExportSettings as ExportSettings
    from modeconn.training.core.config import FGESettings as FGESettings
    from modeconn.training.core.config import SimplexSettings as SimplexSettings
    from modeconn.training.core.config import SSESettings as SSESettings
    from modeconn.training.core.data import dataset_from_torch as dataset_from_torch
    from modeconn.training.core.statistics import Interval as Interval

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'modeconn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
