"""Human units in configuration: durations, sizes and rates, and their canonical short forms.

Numbers are read as exact decimals (``0.3s`` is the float nearest to 0.3, not 0.3 * 1.0 with
a rounding step in between), so ``parse_duration(format_duration(x)) == x``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"

DURATION_FORMS = "a number of seconds, or a number with ms, s, m, h or d (250ms, 30s, 10m, 1h, 7d)"
SIZE_FORMS = (
    "a number of bytes, or a number with B, KiB, MiB, GiB, TiB (powers of 1024)"
    " or KB, MB, GB, TB (powers of 1000), like 512KiB or 1MiB"
)
RATE_FORMS = "a count per s, m or h (200/s, 5000/m, 100/h)"

_DURATION = re.compile(_NUMBER + r"\s*(ms|s|m|h|d)?")
_DURATION_UNITS: dict[str, Fraction] = {
    "d": Fraction(86400),
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_SIZE = re.compile(_NUMBER + r"\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?")
_SIZE_UNITS: dict[str, int] = {
    "TiB": 1024**4,
    "GiB": 1024**3,
    "MiB": 1024**2,
    "KiB": 1024,
    "TB": 1000**4,
    "GB": 1000**3,
    "MB": 1000**2,
    "KB": 1000,
    "B": 1,
}
_RATE = re.compile(_NUMBER + r"\s*/\s*(s|m|h)")
_RATE_PERIODS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events every ``per`` seconds (``200/s`` is ``Rate(200, 1)``)."""

    count: float
    per: float

    def __post_init__(self) -> None:
        for name, value in (("count", self.count), ("per", self.per)):
            if isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"a rate's {name} must be a positive number, not {value!r}")

    @property
    def per_second(self) -> float:
        return self.count / self.per

    def __str__(self) -> str:
        return format_rate(self)


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``250ms``, ``30s``, ``10m``, ``1h``, ``7d`` or a bare number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value!r} is not a duration; write {DURATION_FORMS}")
        return float(value)
    text = value.strip() if isinstance(value, str) else None
    match = None if text is None else _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{value!r} is not a duration; write {DURATION_FORMS}")
    return float(Fraction(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"])


def parse_size(value: str | int) -> int:
    """Bytes from ``512KiB``, ``1MiB``, ``10KB`` (= 10 * 1000), ``100B`` or a bare number."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value!r} is not a size; write {SIZE_FORMS}")
        return value
    text = value.strip() if isinstance(value, str) else None
    match = None if text is None else _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"{value!r} is not a size; write {SIZE_FORMS}")
    size = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"]
    if size.denominator != 1:
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(size)


def parse_rate(value: str) -> Rate:
    """A rate from ``200/s``, ``5000/m`` or ``100/h``."""
    text = value.strip() if isinstance(value, str) else None
    match = None if text is None else _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"{value!r} is not a rate; write {RATE_FORMS}")
    count = float(Fraction(match.group(1)))
    if count <= 0:
        raise ValueError(f"{value!r} is not a rate: the count must be positive")
    return Rate(count, _RATE_PERIODS[match.group(2)])


def format_duration(seconds: float) -> str:
    """The shortest exact form: ``250ms``, ``90s``, ``10m``, ``1h``, ``7d``; ``1.25s`` otherwise."""
    if isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{seconds!r} is not a duration")
    if seconds == 0:
        return "0s"
    for unit, factor in _DURATION_UNITS.items():
        count = round(Fraction(seconds) / factor)
        if count >= 1 and float(count * factor) == seconds:
            return f"{count}{unit}"
    return f"{_plain(seconds)}s"


def format_size(size: int) -> str:
    """The shortest exact form: ``1MiB``, ``512KiB``, ``10KB``, ``100B``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{size!r} is not a size")
    for unit, factor in _SIZE_UNITS.items():
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def format_rate(rate: Rate) -> str:
    """``200/s``, ``5000/m``, ``100/h``; other periods as a count per second."""
    for unit, period in _RATE_PERIODS.items():
        if rate.per == period:
            return f"{_plain(rate.count)}/{unit}"
    return f"{_plain(rate.per_second)}/s"


def _plain(number: float) -> str:
    """The shortest decimal that reads back as ``number``, never in exponent notation."""
    number = float(number)
    if number.is_integer():
        return str(int(number))
    text = repr(number)
    if "e" in text:
        text = format(Decimal(text), "f")
    return text
