"""Remove a disk, or every disk."""

from __future__ import annotations

import argparse

from abuse._exceptions import AbuseError, DiskBusy, DiskNotFound
from abuse.control import Control
from abusectl import args as types
from abusectl.devices import disk_info, open_control


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl destroy``."""
    parser.add_argument("dev", type=types.dev, nargs="?", metavar="DEV", help="/dev/abuseN, abuseN or N")
    parser.add_argument("-a", "--all", action="store_true", help="every abuse disk instead of DEV")
    parser.add_argument(
        "-f", "--force", action="store_true", help="even if open: fail its queued and in-flight I/O"
    )


def run(args: argparse.Namespace) -> int:
    """Destroy the disk (or all); DiskBusy says to use --force.

    With --all every disk is tried; the first failure is raised after
    the others were tried, so one busy disk does not keep the rest.
    """
    if (args.dev is None) == (not args.all):
        raise ValueError("destroy takes DEV or --all")
    with open_control() as control:
        if not args.all:
            _destroy(control, args.dev, args.force)
            return 0
        failure: Exception | None = None
        for index in control.list():
            try:
                _destroy(control, index, args.force)
            except DiskNotFound:
                pass  # gone meanwhile
            except AbuseError as err:
                failure = failure or err
        if failure is not None:
            raise failure
    return 0


def _destroy(control: Control, index: int, force: bool) -> None:
    path = disk_info(control, index).config.path
    try:
        control.destroy(index, force=force)
    except DiskBusy as err:
        raise DiskBusy(f"{path} is in use: close it, or --force to fail its I/O", err.errno) from None
