"""Show disks: size, flags, live counters and the pids serving them."""

from __future__ import annotations

import argparse
import json

from abuse._exceptions import DiskNotFound
from abuse.control import DiskInfo, sysfs_workers
from abusectl import args as types
from abusectl.devices import disk_indexes, read_disk
from abusectl.output import TABLE_COLUMNS, disk_record, table, table_row


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl status``."""
    parser.add_argument("dev", type=types.dev, nargs="?", metavar="DEV", help="one disk (default: all)")
    parser.add_argument("--json", action="store_true", help='one JSON object: {"disks": [...]}')


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON) of one disk or all.

    Read from sysfs where the module exports the config there, so no
    privileges are needed; else by INFO on /dev/abuse (root).
    """
    infos: list[DiskInfo] = []
    if args.dev is not None:
        infos.append(read_disk(args.dev))
    else:
        for index in disk_indexes():
            try:
                infos.append(read_disk(index))
            except DiskNotFound:
                pass  # destroyed since it was listed
    workers = [sysfs_workers(info.config.index) for info in infos]
    if args.json:
        record = {"disks": [disk_record(info, pids) for info, pids in zip(infos, workers)]}
        print(json.dumps(record, indent=2))
    else:
        for line in table(TABLE_COLUMNS, [table_row(info, pids) for info, pids in zip(infos, workers)]):
            print(line)
    return 0
