"""Calibrator options as they arrive from Python or from the CLI's ``--calibrator-option key=value``.

Strings are parsed, ranges checked, and a bad value is a :class:`ortq.ConfigError` naming the option, so the
CLI shows one line instead of a traceback.
"""

from __future__ import annotations

from ortq.core.errors import ConfigError

__all__ = ["option_bool", "option_float", "option_int"]


def option_bool(name: str, value: object) -> bool:
    """Options may arrive from the CLI as strings."""
    if isinstance(value, str):
        key = value.strip().lower()
        if key in {"1", "true", "yes", "on"}:
            return True
        if key in {"0", "false", "no", "off", ""}:
            return False
        raise ConfigError(f"option {name!r} must be true or false, got {value!r}")
    return bool(value)


def option_float(name: str, value: object, lo: float, hi: float, *, lo_open: bool = False) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} must be a number, got {value!r}") from None
    if not (lo < number if lo_open else lo <= number) or not number <= hi:
        bracket = "(" if lo_open else "["
        raise ConfigError(f"option {name!r} must be in {bracket}{lo:g}, {hi:g}], got {value!r}")
    return number


def option_int(name: str, value: object, lo: int, hi: int) -> int:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"option {name!r} must be an integer, got {value!r}") from None
    if not number.is_integer() or not lo <= number <= hi:
        raise ConfigError(f"option {name!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(number)
