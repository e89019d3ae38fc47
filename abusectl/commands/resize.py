"""Change a disk's size online."""

from __future__ import annotations

import argparse

from abuse.sizes import format_size
from abusectl import args as types
from abusectl.devices import disk_info, open_control


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl resize``."""
    parser.add_argument("dev", type=types.dev, metavar="DEV", help="/dev/abuseN, abuseN or N")
    parser.add_argument("-s", "--size", type=types.size, required=True, help="new capacity: 512M, 20G, ...")


def run(args: argparse.Namespace) -> int:
    """Resize; ValueError if the size is not a multiple of the block size."""
    with open_control() as control:
        block_size = disk_info(control, args.dev).config.block_size
        if args.size % block_size:
            raise ValueError(
                f"size {format_size(args.size)} is not a multiple of the block size {block_size}"
            )
        control.resize(args.dev, args.size)
    return 0
