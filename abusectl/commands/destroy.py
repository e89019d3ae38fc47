"""Remove a disk."""

from __future__ import annotations

import argparse

from abuse._exceptions import DiskBusy
from abusectl import args as types
from abusectl.devices import disk_info, open_control


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl destroy``."""
    parser.add_argument("dev", type=types.dev, metavar="DEV", help="/dev/abuseN, abuseN or N")
    parser.add_argument(
        "--force", action="store_true", help="even if open: fail its queued and in-flight I/O"
    )


def run(args: argparse.Namespace) -> int:
    """Destroy the disk; DiskBusy says to use --force."""
    with open_control() as control:
        path = disk_info(control, args.dev).config.path
        try:
            control.destroy(args.dev, force=args.force)
        except DiskBusy as err:
            raise DiskBusy(f"{path} is in use: close it, or --force to fail its I/O", err.errno) from None
    return 0
