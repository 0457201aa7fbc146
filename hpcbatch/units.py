"""Pure helpers for sizes: parse ``"12GB"``-style strings, ``--mem`` as sbatch reads it,
and format bytes."""

from __future__ import annotations

import math
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


MiB = 1024**2

#: ``--mem`` units: sbatch's K/M/G/T (an optional B changes nothing: ``64GB`` is ``64G``),
#: all powers of 1024, and the explicit KiB/MiB/GiB/TiB the planner prints.
_MEM_UNITS = {"k": 1024, "m": MiB, "g": 1024**3, "t": 1024**4}
_MEM = re.compile(r"^\s*([+-]?[0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")
MEM_FORMS = "a whole number of MiB, or K, M, G or T (powers of 1024, as sbatch --mem), e.g. 64G"


def parse_mem(value: str | int, *, what: str = "--mem") -> int:
    """``--mem`` exactly as ``sbatch --mem`` reads it, in bytes: ``"64G"`` is 64 GiB,
    ``"1000"`` is 1000 MiB, ``"512K"`` is rounded up to 1 MiB; K/M/G/T are powers of 1024
    and may be followed by ``B`` (``64GB`` is ``64G``, as in sbatch).

    Beyond sbatch: ``KiB``/``MiB``/``GiB``/``TiB`` (the planner's output) and decimals
    (``1.5G``); the result is always whole MiB, rounded up, like sbatch's.  Zero (sbatch's
    "all of the node's memory") cannot be planned for and is refused.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size like 64G, not {value!r}")
    text = str(value)
    match = _MEM.match(text)
    if not match:
        raise ConfigError(f"{what} {text!r} is not a memory size: use {MEM_FORMS}")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit in ("kib", "mib", "gib", "tib") or len(unit) == 2 and unit[1] == "b":
        unit = unit[0]
    if unit and unit not in _MEM_UNITS:
        raise ConfigError(f"{what} {text!r} has an unknown unit {match.group(2)!r}: use {MEM_FORMS}")
    if number < 0:
        raise ConfigError(f"{what} must be positive, got {text!r}: e.g. {what} 64G")
    if number == 0:
        raise ConfigError(
            f"{what} {text!r} is zero (sbatch's 'all of the node's memory' cannot be planned "
            f"for): give a size, e.g. {what} 64G"
        )
    size = number * (_MEM_UNITS[unit] if unit else MiB)
    return math.ceil(size / MiB - 1e-9) * MiB


def format_mem(n_bytes: int) -> str:
    """Bytes as an sbatch ``--mem`` value that reads back as at least ``n_bytes``:
    ``NT``/``NG`` when exact, else ``NM`` (whole MiB, rounded up)."""
    mib = math.ceil(n_bytes / MiB)
    for unit, per in (("T", 1024**2), ("G", 1024)):
        if mib % per == 0:
            return f"{mib // per}{unit}"
    return f"{mib}M"


def format_bytes(n: int | float) -> str:
    """Human-readable binary size: ``format_bytes(1536) == '1.50 KiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def gb(n: int | float) -> float:
    """Bytes -> decimal gigabytes (the unit of the deprecated ``--mem-gb``)."""
    return n / 1e9
