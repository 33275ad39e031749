"""On/off switches from MODECONN_* environment variables, read the same way everywhere."""

from __future__ import annotations

import os

_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """`name` as a boolean; unset means `default`; a value that is neither on nor off is an
    error naming the variable, rather than a silent guess."""
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value not in _ON + _OFF:
        raise ValueError(f"{name}={value!r}: use one of {', '.join(_ON)} or {', '.join(_OFF)}")
    return value in _ON
