"""Create a disk and print its /dev/abuseN."""

from __future__ import annotations

import argparse
import errno

from abuse import uapi
from abuse._exceptions import AbuseError
from abuse.sizes import format_size
from abusectl import args as types
from abusectl.devices import open_control
from abusectl.service import CREATE_RETRIES, CREATE_TIMEOUT_MS

_BLOCK_SIZES = (512, 1024, 2048, 4096)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl create``."""
    parser.add_argument("-s", "--size", type=types.size, required=True, help="capacity: 4096, 512M, 10G, ...")
    parser.add_argument(
        "-i",
        "--index",
        type=types.index,
        metavar="N",
        help=f"make /dev/abuseN, N at most {uapi.ABUSE_MAX_INDEX} (default: the lowest free N)",
    )
    parser.add_argument(
        "--block-size",
        type=types.size,
        default=4096,
        metavar="SIZE",
        help="logical block size (default 4096)",
    )
    parser.add_argument("--read-only", action="store_true", help="the disk rejects writes")
    parser.add_argument(
        "-t",
        "--timeout",
        type=types.seconds,
        default=CREATE_TIMEOUT_MS / 1000,
        metavar="S",
        help="seconds before an unanswered request is retried; 0 = wait forever (default 30)",
    )
    parser.add_argument(
        "-r",
        "--retries",
        type=types.non_negative,
        default=CREATE_RETRIES,
        metavar="N",
        help="retries after a timeout (default 3)",
    )
    parser.add_argument(
        "--flush",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="volatile write cache: pass FLUSH and FUA to the workers (default on)",
    )
    parser.add_argument(
        "--fence",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kill a worker that holds a request past the timeout or a reset, and requeue "
        "its requests only once it is dead, so it can never store a stale write (default on)",
    )
    parser.add_argument("--discard", action="store_true", help="pass DISCARD requests to the workers")
    parser.add_argument(
        "--write-zeroes", action="store_true", help="pass WRITE_ZEROES requests to the workers"
    )
    parser.add_argument("--rotational", action="store_true", help="report a rotational disk")
    parser.add_argument(
        "--queue-depth",
        type=types.count,
        default=0,
        metavar="N",
        help="requests in flight (default: the module's)",
    )
    parser.add_argument(
        "--max-request",
        type=types.size,
        default=0,
        metavar="SIZE",
        help="largest request (default: the module's)",
    )


def flags_of(args: argparse.Namespace) -> int:
    """The ABUSE_F_* bits chosen by the options."""
    chosen = (
        (args.read_only, uapi.ABUSE_F_READ_ONLY),
        (args.flush, uapi.ABUSE_F_FLUSH),
        (args.discard, uapi.ABUSE_F_DISCARD),
        (args.write_zeroes, uapi.ABUSE_F_WRITE_ZEROES),
        (args.rotational, uapi.ABUSE_F_ROTATIONAL),
        (args.fence, uapi.ABUSE_F_FENCE),
    )
    flags = 0
    for on, bit in chosen:
        if on:
            flags |= bit
    return flags


def run(args: argparse.Namespace) -> int:
    """Create the disk; ValueError for a size the kernel would refuse."""
    if args.block_size not in _BLOCK_SIZES:
        raise ValueError(
            f"block size must be one of {', '.join(map(str, _BLOCK_SIZES))}, not {args.block_size}"
        )
    if args.size % args.block_size:
        raise ValueError(
            f"size {format_size(args.size)} is not a multiple of the block size {args.block_size}"
        )
    if args.index is not None and args.index > uapi.ABUSE_MAX_INDEX:
        raise ValueError(f"index {args.index} is above the module's limit, {uapi.ABUSE_MAX_INDEX}")
    with open_control() as control:
        try:
            config = control.create(
                args.size,
                block_size=args.block_size,
                flags=flags_of(args),
                queue_depth=args.queue_depth,
                max_request_bytes=args.max_request,
                timeout_ms=round(args.timeout * 1000),
                retries=args.retries,
                index=args.index,
            )
        except AbuseError as err:
            if err.errno == errno.EEXIST:
                raise AbuseError(f"/dev/abuse{args.index} exists; nothing created", err.errno) from None
            raise
    print(config.path)
    return 0
