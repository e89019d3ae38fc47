"""Print every disk's /dev/abuseN, one per line."""

from __future__ import annotations

import argparse
import json

from abusectl.devices import open_control


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl list``."""
    parser.add_argument("--json", action="store_true", help="a JSON list of paths")


def run(args: argparse.Namespace) -> int:
    """List the disks."""
    with open_control() as control:
        paths = [f"/dev/abuse{index}" for index in control.list()]
    if args.json:
        print(json.dumps(paths))
    else:
        for path in paths:
            print(path)
    return 0
