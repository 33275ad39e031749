"""modeconn: mode connectivity curves and Fast Geometric Ensembles, exported to ONNX and served.

The public Python API is re-exported here and loaded on first use, so `import modeconn`
(and the serving side, which imports `modeconn.contract`) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> module that defines it
_API: dict[str, str] = {}

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
