"""Human units in configuration: durations, sizes and rates."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    None: 1,
}
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*")
_RATE_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Rate:
    count: float
    per: float  # seconds

    def __post_init__(self) -> None:
        if self.count <= 0 or self.per <= 0:
            raise ValueError("a rate must be positive")

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.per)
        return f"{self.count:g}/{unit}" if unit else f"{self.per_second:g}/s"


def parse_duration(text: str | int | float) -> float:
    """``250ms``, ``30s``, ``10m``, ``1h``, ``7d`` or a bare number of seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text!r} is negative")
        return float(text)
    match = _DURATION.fullmatch(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a duration (like 250ms, 30s, 10m, 1h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(text: str | int) -> int:
    """``512KiB``, ``1MiB``, ``10KB`` (powers of 1000), ``100B`` or a bare number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"{text!r} is negative")
        return text
    match = _SIZE.fullmatch(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a size (like 512KiB, 1MiB, 100B)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_rate(text: str) -> Rate:
    """``200/s``, ``5000/m``, ``100/h``."""
    match = _RATE.fullmatch(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a rate (like 200/s, 5000/m, 100/h)")
    count = float(match.group(1))
    if count <= 0:
        raise ValueError(f"{text!r}: a rate must be positive")
    return Rate(count, _RATE_PERIODS[match.group(2)])


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


def format_size(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
