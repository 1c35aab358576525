# -*- test-case-name: tests.test_units -*-
"""
The one syntax for durations and sizes in C{edge.ini}.

Every duration key (timeouts, C{expiry_warning}, ...) goes through
L{parseDuration} and every size key (C{max_body_size}, ...) through
L{parseSize}, so an operator learns the syntax once.

Durations
    One or more C{NUMBER UNIT} groups, largest unit first, such as C{250ms},
    C{5s}, C{2m}, C{1h30m}, C{14d}; units are C{ms}, C{s}, C{m}, C{h}, C{d}
    (lower case: C{M} could be read as months).  A bare number is seconds
    (C{30} is C{30s}), because that is what every timeout in this file is
    measured in.  Fractions are allowed (C{1.5s}); negative numbers, C{inf}
    and C{nan} are not.

Sizes
    A whole number of bytes (C{512}, C{512B}) or a number with an IEC binary
    unit: C{KiB}, C{MiB}, C{GiB}, C{TiB} (1024-based; case does not matter).
    C{KB}, C{MB}, C{k}, C{M} and friends are rejected rather than guessed:
    half of all operators mean 1000 and half mean 1024 by them, and a limit
    that is off by 5% is a silent surprise.  A fraction is allowed when the
    result is a whole number of bytes (C{1.5MiB}, not C{0.1KiB}).

Both functions raise L{ValueError} whose message says what was expected; the
parser adds the file, section, key and line.  Nothing here does I/O.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["parseDuration", "parseSize", "formatDuration", "formatSize"]

_DURATION_UNITS: dict[str, Decimal] = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
_DURATION_ORDER = ["d", "h", "m", "s", "ms"]

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

_AMBIGUOUS_SIZE_UNITS = {"k", "kb", "m", "mb", "g", "gb", "t", "tb"}

_NUMBER = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
_GROUP = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z]+)")
_BARE_NUMBER = re.compile(rf"{_NUMBER}\Z")

DURATION_EXPECTED = (
    "expected a duration such as 250ms, 5s, 2m, 1h30m or 14d "
    "(a bare number is seconds)"
)
SIZE_EXPECTED = (
    "expected a size such as 512 (bytes), 64KiB, 10MiB or 1GiB"
)


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex admits only digits
        raise ValueError(text)


def parseDuration(text: str) -> float:
    """
    Parse a duration into seconds.

    @param text: for example C{"250ms"}, C{"5s"}, C{"1h30m"} or C{"30"}.
    @return: the non-negative number of seconds.
    @raise ValueError: when C{text} is not a duration; the message says
        what a duration looks like.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{DURATION_EXPECTED}, got an empty value")
    if stripped.startswith("-"):
        raise ValueError(f"{DURATION_EXPECTED}, got {text!r} (it cannot be negative)")
    if _BARE_NUMBER.match(stripped):
        return float(_decimal(stripped))
    total = Decimal(0)
    position = 0
    lastRank = -1
    while position < len(stripped):
        match = _GROUP.match(stripped, position)
        if match is None:
            raise ValueError(f"{DURATION_EXPECTED}, got {text!r}")
        number, unit = match.groups()
        if unit not in _DURATION_UNITS:
            raise ValueError(
                f"{DURATION_EXPECTED}, got {text!r} "
                f"(unknown unit {unit!r}; units are ms, s, m, h, d)"
            )
        rank = _DURATION_ORDER.index(unit)
        if rank <= lastRank:
            # "5s1m" or "1m1m" is more likely a typo than a wish.
            raise ValueError(
                f"{DURATION_EXPECTED}, got {text!r} "
                "(give each unit once, largest first)"
            )
        lastRank = rank
        total += _decimal(number) * _DURATION_UNITS[unit]
        position = match.end()
    return float(total)


def parseSize(text: str) -> int:
    """
    Parse a size into bytes.

    @param text: for example C{"512"}, C{"64KiB"}, C{"10MiB"}, C{"1.5GiB"}.
    @return: the non-negative number of bytes.
    @raise ValueError: when C{text} is not a size (including the ambiguous
        C{KB}/C{MB} forms); the message says what a size looks like.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"{SIZE_EXPECTED}, got an empty value")
    if stripped.startswith("-"):
        raise ValueError(f"{SIZE_EXPECTED}, got {text!r} (it cannot be negative)")
    if _BARE_NUMBER.match(stripped):
        number, written = stripped, "B"
    else:
        match = _GROUP.fullmatch(stripped)
        if match is None:
            raise ValueError(f"{SIZE_EXPECTED}, got {text!r}")
        number, written = match.group(1), match.group(2)
    unit = written.lower()
    if unit in _AMBIGUOUS_SIZE_UNITS:
        raise ValueError(
            f"{SIZE_EXPECTED}, got {text!r} ({written!r} is ambiguous "
            "between 1000 and 1024; write KiB, MiB or GiB, which are 1024-based)"
        )
    if unit not in _SIZE_UNITS:
        raise ValueError(
            f"{SIZE_EXPECTED}, got {text!r} "
            f"(unknown unit {written!r}; units are B, KiB, MiB, GiB, TiB)"
        )
    value = _decimal(number) * _SIZE_UNITS[unit]
    if value != value.to_integral_value():
        raise ValueError(f"{SIZE_EXPECTED}, got {text!r} (not a whole number of bytes)")
    return int(value)


def formatDuration(seconds: float) -> str:
    """
    Write C{seconds} in the syntax L{parseDuration} reads, with the largest
    units that represent it exactly to the millisecond (C{90.0 -> "1m30s"}).
    Sub-millisecond remainders are written as fractional seconds.
    """
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {seconds!r}")
    remaining = Decimal(repr(float(seconds)))
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit in _DURATION_ORDER[:-1]:
        size = _DURATION_UNITS[unit]
        whole = remaining // size
        if whole:
            parts.append(f"{whole}{unit}")
            remaining -= whole * size
    if remaining:
        milliseconds = remaining * 1000
        if milliseconds == milliseconds.to_integral_value():
            parts.append(f"{int(milliseconds)}ms")
        elif parts:
            # Fold the leftover back into seconds so it stays exact.
            return _formatFractionalSeconds(Decimal(repr(float(seconds))))
        else:
            return _formatFractionalSeconds(remaining)
    return "".join(parts)


def _formatFractionalSeconds(seconds: Decimal) -> str:
    text = format(seconds.normalize(), "f")
    return f"{text}s"


def formatSize(size: int) -> str:
    """
    Write C{size} bytes in the syntax L{parseSize} reads, with the largest
    IEC unit that divides it exactly (C{65536 -> "64KiB"}, C{1000 -> "1000"}).
    """
    if size < 0:
        raise ValueError(f"a size cannot be negative: {size!r}")
    for name, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % factor == 0:
            return f"{size // factor}{name}"
    return str(size)
