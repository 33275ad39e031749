"""Where a network comes from, in one place: an architecture record (the config's `model`
section as a checkpoint's `architecture` field records it) turned into an nn.Module.

Three sources:
- `{"name": "cnn1d", "kwargs": {...}}`: an architecture of the registry (modeconn.models);
- `{"name": "torchvision:resnet18"}` or `{"name": "timm:resnet18"}`: from those packages, where
  they are installed (optional: modeconn never requires or installs them);
- `{"factory": "my_package.nets:build", "kwargs": {...}}`: any callable named by import path,
  resolved as uvicorn resolves its app ("module:attribute", the attribute may be dotted; the
  current working directory is importable), called with `num_classes` when its signature
  takes it (or **kwargs) and the kwargs; it must return an nn.Module.

Every command builds its networks here (training/core/networks.py build_network), so a
checkpoint rebuilds the same network in every later command without a config.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from modeconn.contract.errors import ModeconnError
from modeconn.models import ModelSpecError, build_model

# name prefixes: packages that build a network by name with a number of classes
EXTERNAL_PACKAGES = ("torchvision", "timm")


class ModelSourceError(ModeconnError):
    """A model that cannot be built: an unknown name, an import path that does not resolve, a
    factory that raises or returns something other than an nn.Module, a package not installed."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def import_path_problem(path: str) -> str | None:
    """Why `path` is not a "module:callable" import path (None when its form is right)."""
    module, sep, attribute = path.partition(":")
    parts = [*module.split("."), *attribute.split(".")]
    if not sep or not all(part.isidentifier() for part in parts):
        return f"{path!r} is not an import path of the form 'package.module:callable' (e.g. my_package.nets:build)"
    return None


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a model (None when it may: a registry name or PACKAGE:NAME)."""
    prefix, sep, rest = name.partition(":")
    if sep and (prefix not in EXTERNAL_PACKAGES or not rest):
        return (f"{name!r}: a model name with a colon is torchvision:NAME or timm:NAME; "
                "a callable named by import path goes in model.factory")
    return None


def architecture_label(architecture: Mapping[str, Any]) -> str:
    """The short name of an architecture record: its registry/package name or its factory path."""
    return str(architecture.get("name") or architecture.get("factory"))


def import_object(path: str) -> Any:
    """The object an import path "module:attr[.attr...]" names, as uvicorn resolves its app
    (the current working directory first on sys.path); a ModelSourceError naming the path."""
    if (problem := import_path_problem(path)) is not None:
        raise ModelSourceError(f"model factory {problem}")
    module_name, _, attribute = path.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name + ".").startswith(err.name + "."):
            raise ModelSourceError(f"model factory {path!r}: no module named {err.name!r} (neither installed nor "
                                   f"under the current directory {cwd})") from err
        raise ModelSourceError(f"model factory {path!r}: importing {module_name} failed: {_one_line(err)}") from err
    except Exception as err:  # the user's module itself fails to import: their code, one line
        raise ModelSourceError(f"model factory {path!r}: importing {module_name} failed: {_one_line(err)}") from err
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ModelSourceError(f"model factory {path!r}: {module_name} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj


def _takes_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: pass only the kwargs
        return False
    return any(p.kind is p.VAR_KEYWORD or (p.name == "num_classes" and p.kind is not p.POSITIONAL_ONLY)
               for p in params)


def _from_factory(path: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    factory = import_object(path)
    if not callable(factory):
        raise ModelSourceError(f"model factory {path!r} is not callable (a {type(factory).__name__})")
    if "num_classes" in kwargs:
        raise ModelSourceError(f"model factory {path!r}: model.kwargs sets num_classes; it comes from the data "
                               f"({num_classes} classes)")
    call = {**({"num_classes": num_classes} if _takes_num_classes(factory) else {}), **kwargs}
    try:
        model = factory(**call)
    except Exception as err:  # the user's code: its message, on one line
        raise ModelSourceError(f"model factory {path!r} raised {_one_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise ModelSourceError(f"model factory {path!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_package(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    package, _, model_name = name.partition(":")
    try:
        module = importlib.import_module("torchvision.models" if package == "torchvision" else package)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] == package:
            raise ModelSourceError(f"model {name!r}: {package} is not installed (it is optional: "
                                   f"pip install {package})") from err
        raise ModelSourceError(f"model {name!r}: importing {package} failed: {_one_line(err)}") from err
    except Exception as err:  # e.g. a torchvision built for another torch
        raise ModelSourceError(f"model {name!r}: importing {package} failed: {_one_line(err)}") from err
    build = module.get_model if package == "torchvision" else module.create_model
    try:
        return build(model_name, num_classes=num_classes, **kwargs)
    except Exception as err:
        raise ModelSourceError(f"model {name!r}: {package} raised {_one_line(err)}") from err


def build_from_record(architecture: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The network an architecture record describes (see the module docstring), on the CPU."""
    kwargs = dict(architecture.get("kwargs") or {})
    if architecture.get("factory"):
        return _from_factory(architecture["factory"], num_classes, kwargs)
    name = architecture.get("name")
    if not name:
        raise ModelSourceError(f"architecture {dict(architecture)} names neither a model nor a factory")
    if (problem := name_problem(name)) is not None:
        raise ModelSourceError(f"model {problem}")
    if ":" in name:
        return _from_package(name, num_classes, kwargs)
    try:
        return build_model(name, num_classes=num_classes, **kwargs)
    except ModelSpecError as err:
        raise ModelSourceError(f"model: {err}") from err
