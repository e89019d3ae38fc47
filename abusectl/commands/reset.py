"""Requeue a disk's in-flight requests (after a crash or a hang), or fail them all."""

from __future__ import annotations

import argparse

from abusectl import args as types
from abusectl.devices import disk_info, open_control


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl reset``."""
    parser.add_argument("dev", type=types.dev, metavar="DEV", help="/dev/abuseN, abuseN or N")
    parser.add_argument(
        "--fail", action="store_true", help="fail every queued and in-flight request with EIO"
    )


def run(args: argparse.Namespace) -> int:
    """Reset the disk."""
    with open_control() as control:
        disk_info(control, args.dev)
        control.reset(args.dev, fail=args.fail)
    return 0
