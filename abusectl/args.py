"""argparse ``type=`` converters: ValueError becomes a one-line usage error."""

from __future__ import annotations

import argparse
import math
import re
from typing import Callable, TypeVar

from abuse.backends import check_spec
from abuse.sizes import parse_size
from abusectl.devices import parse_dev

__all__ = ["backend_spec", "count", "dev", "non_negative", "seconds", "size"]

T = TypeVar("T")


def _converter(parse: Callable[[str], T], name: str) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = name  # argparse shows it in some messages
    return convert


def _count(text: str) -> int:
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or int(text) < 1:
        raise ValueError(f"invalid count {text!r}: expected a whole number >= 1")
    return int(text)


def _non_negative(text: str) -> int:
    if not re.fullmatch(r"\s*[0-9]+\s*", text):
        raise ValueError(f"invalid number {text!r}: expected a whole number >= 0")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"invalid time {text!r}: expected seconds >= 0 (0 = forever)")
    return value


size = _converter(parse_size, "size")
dev = _converter(parse_dev, "dev")
backend_spec = _converter(check_spec, "backend")
count = _converter(_count, "count")
non_negative = _converter(_non_negative, "number")
seconds = _converter(_seconds, "seconds")
