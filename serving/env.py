"""On/off switches and counts from MODECONN_* environment variables, read the same way everywhere."""

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


def env_int(name: str, default: int, minimum: int) -> int:
    """`name` as an integer >= `minimum`; unset (or blank) means `default`; anything else is
    an error naming the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: not an integer") from None
    if number < minimum:
        raise ValueError(f"{name}={value!r}: must be at least {minimum}")
    return number
