"""Byte counts as people write them: 4096, 512K, 64M, 10G, 1T.

Units are binary (K = 1024) and case-insensitive; a trailing ``B`` or
``iB`` is allowed (``512KiB``, ``10gb``).  There are no fractions.
"""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_size"]

_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE = re.compile(r"([0-9]+)\s*(?:([KMGTPE])(?:I?B)?|B)?")
_U64_MAX = (1 << 64) - 1


def parse_size(text: str) -> int:
    """Bytes in ``text`` such as ``"10G"``; a positive integer.

    Raises ValueError naming ``text`` for anything else: garbage, a
    fraction, zero, a negative number, or more than 2**64 - 1.
    """
    stripped = text.strip().upper()
    if stripped.startswith("-") and _SIZE.fullmatch(stripped[1:]):
        raise ValueError(f"invalid size {text!r}: must be greater than zero")
    match = _SIZE.fullmatch(stripped)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected bytes or a number with K, M, G, T (e.g. 4096, 512K, 10G)"
        )
    number, unit = match.groups()
    size = int(number) << _SHIFTS[unit or ""]
    if size == 0:
        raise ValueError(f"invalid size {text!r}: must be greater than zero")
    if size > _U64_MAX:
        raise ValueError(f"invalid size {text!r}: larger than 2^64 - 1 bytes")
    return size


def format_size(n: int) -> str:
    """``n`` bytes in the largest unit that keeps at least 1: ``"10G"``, ``"1.5K"``, ``"512B"``.

    Exact multiples print without a fraction and parse back with
    :func:`parse_size`; others are rounded to one decimal.
    """
    for unit in "EPTGMK":
        scale = 1 << _SHIFTS[unit]
        if n % scale == 0 and n >= scale:
            return f"{n // scale}{unit}"
        if round(n / scale, 1) >= 1:
            return f"{n / scale:.1f}{unit}"
    return f"{n}B"
