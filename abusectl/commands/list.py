"""Print every disk's /dev/abuseN, one per line."""

from __future__ import annotations

import argparse
import json

from abusectl.devices import disk_indexes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl list``."""
    parser.add_argument("--json", action="store_true", help='one JSON object: {"disks": [{"index", "path"}]}')


def run(args: argparse.Namespace) -> int:
    """List the disks, from sysfs: needs no privileges."""
    indexes = disk_indexes()
    if args.json:
        print(json.dumps({"disks": [{"index": index, "path": f"/dev/abuse{index}"} for index in indexes]}))
    else:
        for index in indexes:
            print(f"/dev/abuse{index}")
    return 0
