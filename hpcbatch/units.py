"""Pure helpers for sizes: parse ``"12GB"``-style strings and format bytes."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int | float, *, what: str = "memory size") -> int:
    """``"12GB"`` -> 12_000_000_000; ``"1.5GiB"``; a bare number is bytes.

    SLURM's suffixes (``K``, ``M``, ``G``, ``T`` without ``B``) are decimal here, like
    Dask's ``parse_bytes``; use ``GiB`` for binary units.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size like '12GB', not {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(
                f"{what} {value!r} is not a size: write a number and a unit, e.g. '12GB' or '512MiB'"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _UNITS:
            raise ConfigError(
                f"{what} {value!r} has an unknown unit {match.group(2)!r}: "
                "use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            )
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return size


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``format_bytes(1536) == '1.50 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def gb(n: int | float) -> float:
    """Bytes -> decimal gigabytes (the unit of ``--mem-gb``)."""
    return n / 1e9
