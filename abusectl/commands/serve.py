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
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol, TextIO

from abuse import systemd, uapi
from abuse._exceptions import AbuseError
from abuse.backends import SPEC_CHOICES, open_backend
from abuse.backends.base import API_VERSION, Backend, capabilities
from abuse.control import Control, DiskConfig
from abuse.credentials import Credentials
from abuse.sizes import format_size
from abusectl import args as types
from abusectl.devices import disk_info, open_control
from abusectl.service import reuse_or_create

if TYPE_CHECKING:
    from abuse.pool import Pool

log = logging.getLogger(__name__)

_CAPABILITY_FLAGS = {
    "can_flush": uapi.ABUSE_F_FLUSH,
    "can_discard": uapi.ABUSE_F_DISCARD,
    "can_write_zeroes": uapi.ABUSE_F_WRITE_ZEROES,
}
_FLAG_NAMES = {bit: name for name, bit in uapi.DISK_FEATURES.items()}


class _WorkerStat(Protocol):
    @property
    def alive(self) -> bool: ...


class _PoolView(Protocol):
    """What the status line reads from abuse.pool.Pool."""

    @property
    def restarts(self) -> int: ...

    @property
    def hung_kills(self) -> int: ...

    def stats(self) -> Sequence[_WorkerStat]: ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``abusectl serve``."""
    parser.add_argument("dev", type=types.dev, nargs="?", metavar="DEV", help="/dev/abuseN, abuseN or N")
    parser.add_argument(
        "-c",
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
        "-b",
        "--backend",
        type=types.backend_spec,
        required=True,
        metavar="SPEC",
        help=f"where the data lives: {', '.join(SPEC_CHOICES)}",
    )
    parser.add_argument(
        "-w", "--workers", type=types.count, required=True, metavar="N", help="worker processes"
    )
    parser.add_argument(
        "--batch",
        type=types.count,
        default=64,
        metavar="N",
        help=f"requests per GET, at most {uapi.ABUSE_MAX_BATCH} (default 64)",
    )
    parser.add_argument(
        "--start-timeout",
        type=types.seconds,
        metavar="SECONDS",
        help="restart a worker that has not attached this long after its start, as one that hangs "
        "(default: twice the disk's timeout, at least 60, none on a disk without one; 0 = wait forever)",
    )
    parser.add_argument(
        "-p", "--pidfile", type=Path, metavar="FILE", help="write the supervisor's pid to FILE while serving"
    )
    parser.add_argument(
        "--run",
        dest="run_command",
        metavar="CMD",
        help="once every worker has attached, run CMD (sh -c) with ABUSE_DEVICE set to the disk; "
        "stop serving when it exits and exit with its status",
    )
    parser.add_argument(
        "-u",
        "--user",
        type=types.user,
        metavar="USER",
        help="workers drop to USER after attaching (needs root)",
    )
    parser.add_argument(
        "-g",
        "--group",
        type=types.group,
        metavar="GROUP",
        help="workers drop to GROUP after attaching (default: USER's group)",
    )


def _credentials(args: argparse.Namespace) -> Credentials | None:
    """Whom the workers become after attaching, from --user and --group."""
    if args.user is None and args.group is None:
        return None
    uid = os.getuid() if args.user is None else args.user
    if args.group is not None:
        gid = args.group
    elif args.user is not None:
        gid = pwd.getpwuid(uid).pw_gid
    else:
        gid = os.getgid()
    groups: tuple[int, ...] = (gid,)
    if args.user is not None and args.group is None:
        groups = tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    if os.geteuid() != 0 and (uid != os.getuid() or gid != os.getgid()):
        raise ValueError("--user and --group need root (the workers attach as root, then drop)")
    return Credentials(uid, gid, groups)


def _disk_flags(backend: Backend) -> int:
    """The ABUSE_F_* flags a new disk gets from what ``backend`` can do.

    Fenced always (as ``abusectl create``): see RELIABILITY.md.
    """
    caps = capabilities(backend)
    flags = uapi.ABUSE_F_FENCE
    for cap, bit in _CAPABILITY_FLAGS.items():
        if caps[cap]:
            flags |= bit
    return flags


def check_backend(backend: Backend, spec: str, config: DiskConfig | None, workers: int) -> None:
    """Refuse a backend that cannot serve this disk this way; ValueError says why.

    A process-local backend (``shared_state`` false) takes one worker.  A
    disk advertising discard or write zeroes needs a backend that can do
    them (a flush is always honoured: a backend without ``flush()``
    stores every write durably).  An ``api_version`` newer than this
    library's is refused.
    """
    if backend.api_version > API_VERSION:
        raise ValueError(
            f"backend {spec!r} is written for Backend API {backend.api_version}; "
            f"this abuse speaks {API_VERSION}"
        )
    if workers > 1 and not backend.shared_state:
        raise ValueError(
            f"backend {spec!r} keeps its data in each process (shared_state is false): "
            f"serve it with --workers 1, not {workers}"
        )
    backend.check_workers(workers)
    if config is None:
        return
    caps = capabilities(backend)
    lacking = [
        uapi.feature_name(_FLAG_NAMES[bit])
        for cap, bit in _CAPABILITY_FLAGS.items()
        if bit != uapi.ABUSE_F_FLUSH and config.flags & bit and not caps[cap]
    ]
    if lacking:
        raise ValueError(
            f"{config.path} advertises {' and '.join(lacking)}, which backend {spec!r} cannot do: "
            f"recreate the disk without --{' --'.join(lacking)}"
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
        if pool.hung_kills:
            line += f" ({pool.hung_kills} killed for not answering)"
        self._out.write("\r" + line + "\x1b[K")
        self._out.flush()
        self._shown = True

    def finish(self) -> None:
        """End the status line so that the shell prompt starts afresh."""
        if self._shown:
            self._out.write("\n")
            self._out.flush()


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM, the disk is destroyed or --run's CMD exits.

    Returns the pool's exit code, or CMD's status with --run.  On the way
    out one line on stderr gives the total of worker restarts.
    """
    if args.batch > uapi.ABUSE_MAX_BATCH:
        raise ValueError(f"--batch {args.batch} is more than the module's limit {uapi.ABUSE_MAX_BATCH}")
    if args.dev is not None and args.create is not None:
        raise ValueError("serve takes DEV or --create SIZE, not both")
    if args.dev is None and args.create is None:
        raise ValueError("serve needs DEV or --create SIZE")
    if args.record is not None and args.create is None:
        raise ValueError("--record needs --create")
    if args.run_command is not None and not args.run_command.strip():
        raise ValueError("--run needs a command")
    credentials = _credentials(args)
    with open_control() as control:
        _warn_missing_xfer(control)
        config = disk_info(control, args.dev).config if args.dev is not None else None
        size = config.size if config is not None else args.create
        with open_backend(args.backend, size) as backend:
            check_backend(backend, args.backend, config, args.workers)
            if config is None:
                config = reuse_or_create(control, args.create, args.record, _disk_flags(backend))
                check_backend(backend, args.backend, config, args.workers)  # a recorded disk
            return _serve(args, control, config, backend, credentials)


def _warn_missing_xfer(control: Control) -> None:
    """Say once, in the supervisor, what an older module makes the workers do instead."""
    module = control.features()
    for bit, instead in (
        (uapi.ABUSE_XFER_TIMEOUT, "idle workers poll"),
        (uapi.ABUSE_XFER_MAPPED, "memory disks are served by copy, not in place"),
    ):
        for name in module.missing(uapi.XFER_FEATURES, bit):
            log.warning("%s has no %s: %s", module.describe(), name, instead)


def _serve(
    args: argparse.Namespace,
    control: Control,
    config: DiskConfig,
    backend: Backend,
    credentials: Credentials | None,
) -> int:
    # Imported here: only serving needs psutil and the process machinery.
    from abuse.pool import Pool

    pool = Pool(
        config.index,
        backend,
        workers=args.workers,
        batch=args.batch,
        start_timeout=args.start_timeout,
        credentials=credentials,
    )
    status = (
        StatusLine(control, config, sys.stdout) if sys.stdout.isatty() and args.run_command is None else None
    )
    command = _Command(args.run_command, config.path, pool) if args.run_command is not None else None
    watchdog = systemd.watchdog_interval()
    tick = min(1.0, watchdog) if watchdog else 1.0

    def on_ready(pool: Pool) -> None:
        log.info("%s: every worker attached (pids %s)", config.path, " ".join(map(str, pool.pids())))
        _notify(f"READY=1\nSTATUS=serving {config.path} with {args.workers} workers\nMAINPID={os.getpid()}")
        if command is not None:
            command.start()

    def on_tick(pool: Pool) -> None:
        if watchdog and any(stat.alive and stat.ready for stat in pool.stats()):
            _notify("WATCHDOG=1")
        if status is not None:
            status(pool)

    log.info("serving %s from %s with %d workers", config.path, args.backend, args.workers)
    pidfile = _PidFile(args.pidfile) if args.pidfile is not None else None
    try:
        code = int(pool.run(on_tick=on_tick, tick=tick, on_ready=on_ready))
    finally:
        if status is not None:
            status.finish()
        if command is not None:
            command.stop()
        if pidfile is not None:
            pidfile.remove()
    summary = f"workers: {args.workers}, restarts: {pool.restarts}"
    if pool.hung_kills:
        summary += f", killed for not answering: {pool.hung_kills}"
    print(f"abusectl: stopped serving {config.path}: {summary}", file=sys.stderr)
    if command is not None and command.status is not None:
        return command.status
    return code


def _notify(state: str) -> None:
    try:
        systemd.notify(state)
    except OSError as err:
        log.warning("sd_notify %s: %s", state.split("\n", 1)[0], err)


class _PidFile:
    """The supervisor's pid in a file, replaced in one step, removed at the end if still ours."""

    def __init__(self, path: Path) -> None:
        self.path = path
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.write_text(f"{os.getpid()}\n")
            tmp.replace(path)
        except OSError as err:
            raise OSError(err.errno, f"--pidfile: {err.strerror}", str(path)) from None

    def remove(self) -> None:
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass


class _Command:
    """``serve --run CMD``: the command, started once the disk is served.

    Its exit stops the pool (from a thread that waits for it alone, so
    that the pool's reaping of its own children is untouched).
    """

    def __init__(self, command: str, device: str, pool: Pool) -> None:
        self.command = command
        self.device = device
        self.pool = pool
        self.proc: subprocess.Popen[bytes] | None = None
        self.status: int | None = None
        self._waiter: threading.Thread | None = None

    def start(self) -> None:
        env = {
            k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        }
        env["ABUSE_DEVICE"] = self.device
        log.info("running %s with ABUSE_DEVICE=%s", self.command, self.device)
        self.proc = subprocess.Popen(["/bin/sh", "-c", self.command], env=env)
        self._waiter = threading.Thread(target=self._wait, name="serve --run", daemon=True)
        self._waiter.start()

    def _wait(self) -> None:
        assert self.proc is not None
        code = self.proc.wait()
        self.status = 128 - code if code < 0 else code
        log.info("--run command exited with status %d; stopping", self.status)
        self.pool.stop()

    def stop(self) -> None:
        """End the command if the pool ended first; wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._waiter is not None:
            self._waiter.join()
