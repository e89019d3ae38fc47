"""argparse ``type=`` converters: ValueError becomes a one-line usage error."""

from __future__ import annotations

import argparse
import grp
import math
import pwd
import re
from typing import Callable, TypeVar

from abuse.backends import check_spec
from abuse.sizes import parse_size
from abusectl.devices import parse_dev

__all__ = ["backend_spec", "count", "dev", "group", "index", "non_negative", "seconds", "size", "user"]

T = TypeVar("T")

_INDEX_MAX = (1 << 32) - 1  # abuse_config.index is a __u32


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


def _index(text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text) or int(text) > _INDEX_MAX:
        raise ValueError(f"invalid disk index {text!r}: expected a whole number 0..{_INDEX_MAX}")
    return int(text)


def _user(text: str) -> int:
    """A user name or uid, as a uid that exists."""
    try:
        return (pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)).pw_uid
    except (KeyError, OverflowError):
        raise ValueError(f"no such user: {text!r}") from None


def _group(text: str) -> int:
    """A group name or gid, as a gid that exists."""
    try:
        return (grp.getgrgid(int(text)) if text.isdigit() else grp.getgrnam(text)).gr_gid
    except (KeyError, OverflowError):
        raise ValueError(f"no such group: {text!r}") from None


size = _converter(parse_size, "size")
dev = _converter(parse_dev, "dev")
backend_spec = _converter(check_spec, "backend")
count = _converter(_count, "count")
non_negative = _converter(_non_negative, "number")
seconds = _converter(_seconds, "seconds")
index = _converter(_index, "index")
user = _converter(_user, "user")
group = _converter(_group, "group")
