"""Naming disks on the command line and opening the control device."""

from __future__ import annotations

import os
import re

from abuse import control as _control
from abuse._exceptions import DiskNotFound
from abuse.control import Control, DiskInfo, list_disks, sysfs_info

__all__ = ["disk_info", "disk_indexes", "open_control", "parse_dev", "read_disk"]

_DEV = re.compile(r"(?:(?:/dev/)?abuse)?(0|[1-9][0-9]*)")
_INDEX_MAX = (1 << 32) - 1


def parse_dev(text: str) -> int:
    """The index N of ``/dev/abuseN``, ``abuseN`` or ``N``.

    A symlink to /dev/abuseN (``/dev/disk/by-*``) is followed.  Raises
    ValueError "not an abuse disk: TEXT" for anything else, including a
    partition (``/dev/abuse0p1``) or another disk (``/dev/sda``).
    """
    name = os.path.realpath(text) if os.path.islink(text) else text
    match = _DEV.fullmatch(name)
    if match is None or int(match.group(1)) > _INDEX_MAX:
        raise ValueError(f"not an abuse disk: {text}")
    return int(match.group(1))


def open_control() -> Control:
    """Open the control device.

    The path is read from ``abuse.control.CONTROL_PATH`` at each call, so
    tests can point it elsewhere.  Raises ControlDeviceMissing or
    AbusePermissionError with a one-line message.
    """
    return Control(_control.CONTROL_PATH)


def disk_info(control: Control, index: int) -> DiskInfo:
    """INFO of disk ``index``; DiskNotFound names ``/dev/abuseN`` if it is gone."""
    try:
        return control.info(index)
    except DiskNotFound as err:
        raise DiskNotFound(f"/dev/abuse{index}: no such abuse disk", err.errno) from None


def disk_indexes() -> list[int]:
    """Indexes of the existing disks, from sysfs: needs no privileges."""
    return list_disks()


def read_disk(index: int) -> DiskInfo:
    """Config and counters of disk ``index``: from sysfs, readable by anyone,
    or, where the module exports no config there, by INFO on /dev/abuse.

    Raises DiskNotFound naming ``/dev/abuseN``.
    """
    info = sysfs_info(index)
    if info is not None:
        return info
    with open_control() as control:
        return disk_info(control, index)
