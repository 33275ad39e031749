"""The one architecture registry: `build_model(name, num_classes, **kwargs)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModelFactory = Callable[..., nn.Module]
class ModelSpecError(ValueError):
    """An unknown architecture or arguments it does not take (models/ imports nothing of the
    rest, so the training side turns this into its ConfigError)."""


_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: make `factory(num_classes, **kwargs)` buildable by name."""

    def wrap(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """Build a registered architecture; unknown names and arguments are clear errors."""
    if name not in _REGISTRY:
        raise ModelSpecError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    try:
        return _REGISTRY[name](num_classes=num_classes, **kwargs)
    except TypeError as err:  # an unknown keyword for this architecture
        raise ModelSpecError(f"bad arguments for model {name!r}: {err}") from err
