"""Show disks: size, flags and live counters."""

from __future__ import annotations

import argparse
import json

from abuse._exceptions import DiskNotFound
from abuse.control import DiskInfo
from abusectl import args as types
from abusectl.devices import disk_info, open_control
from abusectl.output import TABLE_COLUMNS, disk_record, table, table_row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl status``."""
    parser.add_argument("dev", type=types.dev, nargs="?", metavar="DEV", help="one disk (default: all)")
    parser.add_argument("--json", action="store_true", help="a JSON list of objects, one per disk")


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON) of one disk or all."""
    infos: list[DiskInfo] = []
    with open_control() as control:
        if args.dev is not None:
            infos.append(disk_info(control, args.dev))
        else:
            for index in control.list():
                try:
                    infos.append(control.info(index))
                except DiskNotFound:
                    pass  # destroyed since it was listed
    if args.json:
        print(json.dumps([disk_record(info) for info in infos], indent=2))
    else:
        for line in table(TABLE_COLUMNS, [table_row(info) for info in infos]):
            print(line)
    return 0
