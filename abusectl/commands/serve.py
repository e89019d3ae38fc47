"""Serve a disk from a backend with a pool of worker processes.

Order, so that each mistake is reported before anything starts: the
backend spec's shape is checked while parsing (before /dev/abuse is
opened), then the disk is looked up (its size sizes the backend), then
the backend is opened, and only then are workers started.

Without DEV, ``--create SIZE`` serves a new disk, or with ``--record
FILE`` the one a previous run created (abusectl.service): that is how
the systemd unit abuse-serve@.service keeps one disk across restarts.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Protocol, TextIO

from abuse import uapi
from abuse._exceptions import AbuseError
from abuse.backends import SPEC_CHOICES, open_backend
from abuse.control import Control, DiskConfig
from abuse.sizes import format_size
from abusectl import args as types
from abusectl.devices import disk_info, open_control
from abusectl.service import reuse_or_create

log = logging.getLogger(__name__)


class _WorkerStat(Protocol):
    @property
    def alive(self) -> bool: ...


class _PoolView(Protocol):
    """What the status line reads from abuse.pool.Pool."""

    @property
    def restarts(self) -> int: ...

    def stats(self) -> Sequence[_WorkerStat]: ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl serve``."""
    parser.add_argument("dev", type=types.dev, nargs="?", metavar="DEV", help="/dev/abuseN, abuseN or N")
    parser.add_argument(
        "--create",
        type=types.size,
        metavar="SIZE",
        help="instead of DEV: create a disk of SIZE (or reuse the one in --record) and serve it",
    )
    parser.add_argument(
        "--record",
        type=Path,
        metavar="FILE",
        help="with --create: the file that names the created disk, reused when it still exists",
    )
    parser.add_argument(
        "--backend",
        type=types.backend_spec,
        required=True,
        metavar="SPEC",
        help=f"where the data lives: {', '.join(SPEC_CHOICES)}",
    )
    parser.add_argument("--workers", type=types.count, required=True, metavar="N", help="worker processes")
    parser.add_argument(
        "--batch",
        type=types.count,
        default=64,
        metavar="N",
        help=f"requests per GET, at most {uapi.ABUSE_MAX_BATCH} (default 64)",
    )


class StatusLine:
    """The live one-line status of a served disk, rewritten on each tick.

    Rates are the change of the ``completed``, ``bytes_read`` and
    ``bytes_written`` counters since the previous tick.
    """

    def __init__(
        self,
        control: Control,
        config: DiskConfig,
        out: TextIO,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._control = control
        self._config = config
        self._out = out
        self._clock = clock
        self._last: tuple[float, int, int] | None = None
        self._shown = False

    def __call__(self, pool: _PoolView) -> None:
        try:
            counters = self._control.info(self._config.index).counters
        except AbuseError:
            return  # the disk is going away; Pool.run notices and returns
        now, completed = self._clock(), counters["completed"]
        moved = counters["bytes_read"] + counters["bytes_written"]
        rate = mb_rate = 0.0
        if self._last is not None and now > self._last[0]:
            elapsed = now - self._last[0]
            rate = (completed - self._last[1]) / elapsed
            mb_rate = (moved - self._last[2]) / elapsed / 1e6
        self._last = (now, completed, moved)
        stats = pool.stats()
        alive = sum(1 for stat in stats if stat.alive)
        line = (
            f"{self._config.path} {format_size(self._config.size)}: {rate:,.0f} req/s, {mb_rate:,.1f} MB/s, "
            f"{counters['in_flight']} in flight, {counters['queued']} queued, "
            f"{alive}/{len(stats)} workers, {pool.restarts} restarts"
        )
        self._out.write("\r" + line + "\x1b[K")
        self._out.flush()
        self._shown = True

    def finish(self) -> None:
        """End the status line so that the shell prompt starts afresh."""
        if self._shown:
            self._out.write("\n")
            self._out.flush()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM or the disk is destroyed; the pool's exit code.

    On the way out one line on stderr gives the total of worker restarts.
    """
    if args.batch > uapi.ABUSE_MAX_BATCH:
        raise ValueError(f"--batch {args.batch} is more than the module's limit {uapi.ABUSE_MAX_BATCH}")
    if args.dev is not None and args.create is not None:
        raise ValueError("serve takes DEV or --create SIZE, not both")
    if args.dev is None and args.create is None:
        raise ValueError("serve needs DEV or --create SIZE")
    if args.record is not None and args.create is None:
        raise ValueError("--record needs --create")
    with open_control() as control:
        if args.dev is not None:
            config = disk_info(control, args.dev).config
        else:
            config = reuse_or_create(control, args.create, args.record)
        with open_backend(args.backend, config.size) as backend:
            # Imported here: only serving needs psutil and the process machinery.
            from abuse.pool import Pool

            pool = Pool(config.index, backend, workers=args.workers, batch=args.batch)
            status = StatusLine(control, config, sys.stdout) if sys.stdout.isatty() else None
            log.info("serving %s from %s with %d workers", config.path, args.backend, args.workers)
            try:
                code = int(pool.run(on_tick=status, tick=1.0))
            finally:
                if status is not None:
                    status.finish()
            summary = f"workers: {args.workers}, restarts: {pool.restarts}"
            print(f"abusectl: stopped serving {config.path}: {summary}", file=sys.stderr)
            return code
