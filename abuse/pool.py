"""The pool: N forked worker processes, kept alive by a supervisor.

The supervisor has the shape of gunicorn's arbiter.  Signal handlers do
nothing but wake the main loop (``signal.set_wakeup_fd`` on a self-pipe);
the loop reaps dead children, respawns empty slots back to the target
count and calls the caller's ``on_tick``.  Children are forked, so they
inherit the already-open backend (a ``memory`` disk is one memfd that
every worker must share), and each is tracked as a ``psutil.Process``,
whose pid plus create time names it even if the pid is reused.

A slot whose child dies within a second of its start is respawned with
an exponential back-off (0.1 s doubling to 5 s), so a crash loop cannot
spin; a child that lived longer is replaced after the minimum delay,
since its own life already bounds how often that slot forks.  (A longer
reset window would let an operator or the OOM killer, killing a worker
every few seconds, hold every slot at 5 s gaps and leave the disk with
no worker at all.)  When every slot has failed at start several times
in a row the pool gives up and :meth:`Pool.run` returns 1.

A worker exits 0 without being asked only when its disk was destroyed
(``Worker.serve`` returns on ENODEV).  Then the pool respawns nothing,
since a new disk may soon take the same index, stops the other workers
and returns 0.

Stopping is SIGTERM to every child, ``psutil.wait_procs`` for
``stop_timeout`` seconds, then SIGKILL for the survivors.  A second stop
request while waiting (Ctrl-C twice) skips straight to SIGKILL.

Readiness: a child calls :func:`worker_ready` once it has attached to
the disk (the default target does); it writes its slot and pid into a
pipe that the supervisor's loop polls, so the pool knows at once, and
calls ``on_ready`` when every slot's current child has attached.

Liveness (gunicorn's heartbeat): each slot has a CLOCK_MONOTONIC stamp
in a shared mapping made before any fork.  A ready child stamps it after
every batch and every idle wake-up (:func:`worker_alive`, the Worker's
``on_alive`` hook).  A ready child whose stamp is older than
``alive_timeout`` seconds -- by default half the disk's request timeout,
so that it dies before the kernel would requeue what it holds -- is
SIGKILLed and respawned like any dead child; a SIGSTOPped or wedged
worker is found so.  Its idle wait is then at most a sixteenth of the
disk's timeout (an eighth of ``alive_timeout``), and at most 5 s.  A
child that has not attached yet holds nothing and is not judged so;
but one that has not attached within ``start_timeout`` (by default
four times ``alive_timeout``, at least a minute) is hung at start -- in
its backend's open, say, a store that does not answer -- and is
SIGKILLed and counted as a failed start, so that the slot gets a fresh
child with back-off and a pool whose every child hangs at start gives
up like one whose every child crashes.

Fencing by the store: a backend whose :meth:`~abuse.Backend.open_worker`
returns an identity for the worker (``rbd:``, its RADOS client address)
has it sent with the ready message; before the liveness check kills
that worker, the supervisor stops it (SIGSTOP, so that it cannot answer
the failures the fence causes) and calls ``backend.fence(identity)`` (for
``rbd:``, an OSD blocklist entry), so that nothing of the old worker's
still on its way to the store can land after its requests go to another
worker.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import select
import signal
import struct
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Literal, NoReturn

import cffi
import psutil

from abuse._exceptions import AbuseError
from abuse.backends.base import Backend
from abuse.clock import coarse_seconds
from abuse.control import Control
from abuse.credentials import Credentials
from abuse.worker import DEFAULT_BATCH, Worker

__all__ = ["Credentials", "Pool", "WorkerStat", "idle_ms_for", "serve_worker", "worker_alive", "worker_ready"]

log = logging.getLogger(__name__)

_ffi = cffi.FFI()
_ffi.cdef(
    """
    int prctl(int, unsigned long, unsigned long, unsigned long, unsigned long);
    int mlockall(int);
    """
)
_libc = _ffi.dlopen(None)
_PR_SET_IO_FLUSHER = 57  # <linux/prctl.h>, Linux 5.6
_MCL_CURRENT = 1
_MCL_FUTURE = 2
_MCL_ONFAULT = 4  # Linux 4.4

# Set in the supervisor once it has said that hardening fails, so the
# workers it forks (which inherit this) do not repeat it on every respawn.
_hardening_reported = False

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
_WAKE_CAP = 1.0  # longest sleep of the loop when signals wake it
_WAKE_CAP_NO_SIGNALS = 0.1  # ... when run() is off the main thread and must poll
_KILL_WAIT = 5.0  # how long to wait for SIGKILLed children to be reaped

Target = Callable[[int, Backend, int], None]

_READY = struct.Struct("=iiH")  # slot, pid, identity length; then the identity: one atomic pipe write
_IDENTITY_MAX = 1024
# A worker's longest idle wait (the disk has no timeout, or a long one).
# Every idle wake-up runs a worker on a CPU that the busy one and the
# submitters use, and may take the lead's work: with waits of 5 s
# instead of 200 ms, 4 workers at 1M served 1.05x in one probe
# (bench/results/2026-12-05-1048-idle-wait-probe-6.1.0-57-amd64.txt)
# and their GETs slept as rarely as one worker's in the bench after it.
# A SIGTERM that comes just before the wait is seen at its end, well
# within the pool's stop_timeout.
_IDLE_MS = 5000


@dataclass
class _ChildLink:
    """What a forked child knows of its pool: its slot's stamp and the ready pipe."""

    stamps: Any  # cffi double[], one per slot, in the shared mapping
    number: int
    ready_w: int
    credentials: Credentials | None
    alive_timeout: float


# Set in a child by Pool._child; None in the supervisor and outside a pool.
_link: _ChildLink | None = None


def worker_alive() -> None:
    """Stamp this child's liveness slot now (no-op outside a pool's child)."""
    link = _link
    if link is not None:
        link.stamps[link.number] = coarse_seconds()


def worker_ready(identity: str | None = None) -> None:
    """Tell the supervisor that this child has attached (no-op outside a pool's child).

    ``identity`` is what the backend's ``open_worker`` returned, for the
    supervisor's ``backend.fence``.
    """
    link = _link
    if link is None or link.ready_w < 0:
        return
    link.stamps[link.number] = time.monotonic()
    name = (identity or "").encode()
    if len(name) > _IDENTITY_MAX:
        raise ValueError(f"a worker's identity takes at most {_IDENTITY_MAX} bytes, not {len(name)}")
    os.write(link.ready_w, _READY.pack(link.number, os.getpid(), len(name)) + name)
    os.close(link.ready_w)
    link.ready_w = -1


def _alive_hook() -> Callable[[], None] | None:
    """A closure stamping this child's slot, cheap enough for every batch."""
    link = _link
    if link is None:
        return None
    stamps, number, clock = link.stamps, link.number, coarse_seconds

    def alive() -> None:
        stamps[number] = clock()

    return alive


def idle_ms_for(timeout_ms: int) -> int:
    """A worker's idle wait for a disk timeout: 1/16 of it, at most 5 s (5 s without one).

    The pool's default liveness limit is half the timeout, so an idle
    worker stamps its slot 8 times within it.
    """
    if timeout_ms <= 0:
        return _IDLE_MS
    return max(1, min(_IDLE_MS, timeout_ms // 16))


@dataclass(frozen=True)
class WorkerStat:
    """One slot of the pool as psutil sees it.

    ``pid`` is the slot's current child (or the last one, or 0 if none
    was started); ``restarts`` counts how many times the slot was
    respawned; ``cpu_percent`` and ``rss`` (bytes) are 0 when ``alive``
    is false.
    """

    pid: int
    cpu_percent: float
    rss: int
    restarts: int
    alive: bool
    ready: bool = False  # the current child has attached
    hung_kills: int = 0  # children of this slot killed for a stale liveness stamp or a hung start


@dataclass
class _Slot:
    """Supervisor-side state of one worker slot."""

    number: int
    proc: Any = None  # psutil.Process of the running child, or None
    pid: int = 0  # current or last child
    started: float = 0.0  # time.monotonic() of the last spawn
    spawns: int = 0
    restarts: int = 0
    delay: float = 0.0  # current back-off
    due: float = 0.0  # time.monotonic() before which no respawn
    failures: int = 0  # consecutive deaths within quick_death of spawning
    ready: bool = False  # the current child has attached
    hung_kills: int = 0
    # Why the supervisor killed the current child: "stale" (its stamp), "start" (never attached).
    killed: str = ""
    identity: str = ""  # the current child's, from its ready message ("" none)


def _harden(mlock_flags: int = _MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) -> list[str]:
    """Make this process fit to serve writeback; return what failed.

    PR_SET_IO_FLUSHER lets the worker's own allocations dip into reserves
    and skip I/O reclaim; mlockall keeps its pages from being paged out
    to, possibly, the disk it serves.  Both need privileges
    (CAP_SYS_RESOURCE, CAP_IPC_LOCK or a large RLIMIT_MEMLOCK).
    MCL_ONFAULT locks pages as they are touched instead of populating
    every mapping at once: a ``memory`` backend maps the whole disk.
    """
    problems = []
    if _libc.prctl(_PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0:
        problems.append(f"prctl(PR_SET_IO_FLUSHER): {os.strerror(_ffi.errno)}")
    if _libc.mlockall(mlock_flags) < 0:
        problems.append(f"mlockall: {os.strerror(_ffi.errno)}")
    return problems


def _probe_hardening() -> list[str]:
    """Try :func:`_harden` in a throwaway child; return what failed.

    The supervisor itself must stay unlocked and unflagged, and the same
    calls in the same credentials are the only exact test.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            report = "\n".join(_harden())
            os.write(write_end, report.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    try:
        while chunk := os.read(read_end, 4096):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return [f"hardening probe {_describe(os.waitstatus_to_exitcode(status))}"]
    return [line for line in b"".join(chunks).decode().splitlines() if line]


def _report_hardening(index: int, problems: list[str], level: int) -> None:
    log.log(
        level,
        "workers of abuse%d are not protected from memory-pressure deadlocks (%s); "
        "run as root or grant CAP_SYS_RESOURCE and CAP_IPC_LOCK",
        index,
        "; ".join(problems),
    )


def serve_worker(index: int, backend: Backend, batch: int = DEFAULT_BATCH) -> None:
    """Serve disk ``index`` from ``backend`` in this process until told to stop.

    The default target of :class:`Pool`, run in each forked child.  Sets
    PR_SET_IO_FLUSHER and mlockall (warning once per process if that is
    not permitted, or not at all when the supervisor already has), makes
    SIGTERM a request to stop, then runs a :class:`~abuse.worker.Worker`
    on a fresh :class:`~abuse.control.Control`.  Once attached it drops
    to the pool's credentials (if any), tells the supervisor it is ready
    (:func:`worker_ready`) and stamps its liveness slot after every batch
    and idle wake-up; its idle wait is a sixteenth of the disk's timeout
    (:func:`idle_ms_for`; at most an eighth of the pool's
    ``alive_timeout``), at most 5 s.  Returns when SIGTERM
    arrives (after answering what it holds) or when the disk is
    destroyed; raises :class:`~abuse.AbuseError` if the control device
    or the disk cannot be used.
    """
    global _hardening_reported
    problems = _harden()
    if problems:
        _report_hardening(index, problems, logging.DEBUG if _hardening_reported else logging.WARNING)
        _hardening_reported = True

    stopping = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    identity = backend.open_worker()
    try:
        _serve_attached(index, backend, batch, identity, lambda: stopping)
    finally:
        backend.close_worker()
    log.debug(
        "worker for abuse%d (pid %d) stops: %s", index, os.getpid(), "asked" if stopping else "disk gone"
    )


def _serve_attached(
    index: int, backend: Backend, batch: int, identity: str | None, should_stop: Callable[[], bool]
) -> None:
    with Control() as control:
        worker = Worker(control, index, backend, batch)
        try:
            idle_ms = idle_ms_for(control.info(index).config.timeout_ms)
            link = _link
            if link is not None and link.credentials is not None:
                link.credentials.apply()  # attached as root; serve as the user
            if link is not None and link.alive_timeout > 0:
                idle_ms = min(idle_ms, max(1, int(link.alive_timeout * 1000 / 8)))
            worker_ready(identity)
            worker.serve(should_stop=should_stop, idle_ms=idle_ms, on_alive=_alive_hook())
        finally:
            worker.close()


def _wait_stopped(pid: int, timeout: float = 5.0) -> bool:
    """Wait until ``pid`` is stopped (or gone); False if it is still running at the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                state = stat.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            return True
        if state in (b"T", b"t", b"Z", b"X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)


def _describe(code: int | None) -> str:
    """An exit code as waitstatus_to_exitcode gives it, in words."""
    if code is None:
        return "exited with an unknown status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


class Pool:
    """Run ``workers`` processes serving disk ``index`` and keep them running.

    Each child runs ``target(index, backend, batch)``, by default
    :func:`serve_worker`.  ``alive_timeout`` (seconds) kills a ready
    child whose liveness stamp is older: None takes half the disk's
    timeout (read by INFO) with the default target and turns liveness
    off with any other; 0 turns it off.  ``start_timeout`` (seconds)
    kills a child that has not attached (:func:`worker_ready`) that long
    after its start: None takes four times ``alive_timeout``, at least
    ``start_timeout_min``, or 0 (off) when liveness is off; 0 turns it
    off.  ``credentials``: the default
    target drops to them after it has attached.  A child that dies is respawned with back-off;
    see the module docstring for when the pool gives up or ends on its
    own.  The backend must be open before the pool starts: children are
    forked and inherit it.  Raises ``ValueError`` for a bad argument.

    A pool runs once.  The tuning attributes below are class attributes
    so that a subclass or an instance may change them.
    """

    backoff_min = 0.1  # seconds before the first respawn of a slot
    backoff_max = 5.0  # ... doubling per quick death up to this
    quick_death = 1.0  # a child dead sooner than this failed at start: back off
    start_failures = 5  # every slot failing at start this many times in a row: give up
    start_timeout_min = 60.0  # the default start_timeout's floor: a store may take long to open

    def __init__(
        self,
        index: int,
        backend: Backend,
        workers: int,
        batch: int = DEFAULT_BATCH,
        *,
        target: Target | None = None,
        stop_timeout: float = 10.0,
        alive_timeout: float | None = None,
        start_timeout: float | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        if index < 0:
            raise ValueError(f"disk index must be >= 0, not {index}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, not {batch}")
        if stop_timeout < 0:
            raise ValueError(f"stop_timeout must be >= 0, not {stop_timeout}")
        if alive_timeout is not None and not (math.isfinite(alive_timeout) and alive_timeout >= 0):
            raise ValueError(f"alive_timeout must be >= 0, not {alive_timeout}")
        if start_timeout is not None and not (math.isfinite(start_timeout) and start_timeout >= 0):
            raise ValueError(f"start_timeout must be >= 0, not {start_timeout}")
        self.index = index
        self.backend = backend
        self.workers = workers
        self.batch = batch
        self.stop_timeout = stop_timeout
        self._target: Target = target if target is not None else serve_worker
        self._slots = [_Slot(number) for number in range(workers)]
        self._lock = threading.RLock()  # guards _wake_w against close; re-entrant for signal handlers
        self._wake_r = -1
        self._wake_w = -1
        self._stop_requests = 0
        self._result: int | None = None  # set when the pool ends on its own
        self._ran = False
        self.alive_timeout = alive_timeout
        self.start_timeout = start_timeout
        self.credentials = credentials
        self._stamps_map = mmap.mmap(-1, 8 * workers)  # shared: forked children write their slot
        self._stamps = _ffi.from_buffer("double[]", self._stamps_map)
        self._ready_r = -1
        self._ready_w = -1
        self._on_ready: Callable[[Pool], None] | None = None
        self._was_ready = False
        self._planned_wake = 0.0  # when the loop meant to wake up last

    # --- public ------------------------------------------------------------

    def run(
        self,
        on_tick: Callable[[Pool], None] | None = None,
        tick: float = 1.0,
        on_ready: Callable[[Pool], None] | None = None,
    ) -> int:
        """Supervise the workers in the foreground until stopped.

        Calls ``on_tick(self)`` every ``tick`` seconds, and
        ``on_ready(self)`` once, the first time every slot's child has
        attached (:func:`worker_ready`).  Returns 0 after
        :meth:`stop`, SIGINT or SIGTERM, or when the disk was destroyed;
        returns 1 when every worker keeps failing at start.  Signal
        handlers are installed (and restored on return) only when called
        on the main thread; elsewhere children are reaped by polling.
        Whatever ends the loop, including an exception from ``on_tick``,
        the children are stopped before this returns.  Raises
        ``RuntimeError`` if the pool has already run.
        """
        if tick <= 0:
            raise ValueError(f"tick must be > 0, not {tick}")
        if self._ran:
            raise RuntimeError("a Pool runs only once")
        self._ran = True
        self._on_ready = on_ready
        if self._target is serve_worker:
            self._check_hardening()
            if self.alive_timeout is None:
                self.alive_timeout = self._disk_alive_timeout()
        elif self.alive_timeout is None:
            self.alive_timeout = 0.0
        if self.start_timeout is None:
            alive = self.alive_timeout
            self.start_timeout = max(4 * alive, self.start_timeout_min) if alive else 0.0
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with self._lock:
            self._wake_r, self._wake_w = read_end, write_end
        saved = self._install_signals()
        try:
            return self._loop(on_tick, tick, _WAKE_CAP if saved is not None else _WAKE_CAP_NO_SIGNALS)
        finally:
            try:
                self._stop_children()
            finally:
                if saved is not None:
                    self._restore_signals(saved)
                with self._lock:
                    self._wake_r = self._wake_w = -1
                    os.close(read_end)
                    os.close(write_end)
                os.close(self._ready_r)
                os.close(self._ready_w)
                self._ready_r = self._ready_w = -1

    def stop(self) -> None:
        """Ask :meth:`run` to stop the workers and return.

        Safe from any thread and from a signal handler; may be called
        before :meth:`run`, which then returns at once.  A second call
        while the workers are being stopped kills them without waiting.
        """
        with self._lock:
            self._stop_requests += 1
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:
                    pass  # the pipe is full: the loop is awake already

    def stats(self) -> list[WorkerStat]:
        """One :class:`WorkerStat` per slot, in slot order.

        ``cpu_percent`` is measured since the previous call (or since the
        child started).  Safe to call from ``on_tick`` or another thread.
        """
        result = []
        for slot in self._slots:
            proc, pid, restarts = slot.proc, slot.pid, slot.restarts
            ready, kills = slot.ready, slot.hung_kills
            if proc is not None:
                try:
                    with proc.oneshot():
                        if proc.status() != psutil.STATUS_ZOMBIE:
                            cpu = float(proc.cpu_percent(interval=None))
                            rss = int(proc.memory_info().rss)
                            result.append(WorkerStat(pid, cpu, rss, restarts, True, ready, kills))
                            continue
                except psutil.Error:
                    pass
            result.append(WorkerStat(pid, 0.0, 0, restarts, False, False, kills))
        return result

    @property
    def restarts(self) -> int:
        """How many times any slot was respawned."""
        return sum(slot.restarts for slot in self._slots)

    @property
    def hung_kills(self) -> int:
        """How many children were killed because their liveness stamp went stale."""
        return sum(slot.hung_kills for slot in self._slots)

    @property
    def ready(self) -> bool:
        """Whether every slot's current child has attached."""
        return all(slot.proc is not None and slot.ready for slot in self._slots)

    def pids(self) -> list[int]:
        """The pids of the running children, in slot order."""
        return [slot.pid for slot in self._slots if slot.proc is not None]

    # --- the loop ----------------------------------------------------------

    def _loop(self, on_tick: Callable[[Pool], None] | None, tick: float, cap: float) -> int:
        next_tick = time.monotonic() + tick
        while True:
            self._reap()
            if self._result is not None:
                return self._result
            if self._stop_requests:
                return 0
            self._spawn_due()
            now = time.monotonic()
            wake_liveness = self._check_liveness(now)
            if on_tick is not None and now >= next_tick:
                on_tick(self)
                next_tick += tick
                if next_tick <= now:
                    next_tick = now + tick
            wake = min(now + cap, wake_liveness)
            if on_tick is not None:
                wake = min(wake, next_tick)
            for slot in self._slots:
                if slot.proc is None:
                    wake = min(wake, slot.due)
            self._planned_wake = wake
            self._sleep(wake - time.monotonic())

    def _sleep(self, timeout: float) -> None:
        """Wait for a signal, a stop(), a ready child or the timeout; drain the pipes."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        poller.register(self._ready_r, select.POLLIN)
        if poller.poll(max(0, int(timeout * 1000) + 1)):
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            self._read_ready()

    def _read_ready(self) -> None:
        """Mark the slots whose current child said it attached; call on_ready once."""
        try:
            data = os.read(self._ready_r, _READY.size * 256)
        except BlockingIOError:
            return
        at = 0
        while at + _READY.size <= len(data):
            number, pid, length = _READY.unpack_from(data, at)
            identity = data[at + _READY.size : at + _READY.size + length].decode(errors="replace")
            at += _READY.size + length
            slot = self._slots[number] if 0 <= number < len(self._slots) else None
            if slot is not None and slot.proc is not None and slot.pid == pid:
                slot.ready = True
                slot.identity = identity
                log.debug("worker %d (pid %d) attached%s", number, pid, f" as {identity}" if identity else "")
        if not self._was_ready and self.ready:
            self._was_ready = True
            log.info("abuse%d: all %d workers attached", self.index, self.workers)
            if self._on_ready is not None:
                self._on_ready(self)

    def _disk_alive_timeout(self) -> float:
        """Half the disk's request timeout (INFO), 0 if it has none or cannot be read."""
        try:
            with Control() as control:
                timeout_ms = control.info(self.index).config.timeout_ms
        except AbuseError as err:
            log.debug("no liveness for abuse%d: %s", self.index, err)
            return 0.0
        return timeout_ms / 2000

    def _check_liveness(self, now: float) -> float:
        """SIGKILL every child hung at start or ready with a stale stamp; when to look again."""
        next_check = self._check_starts(now)
        limit = self.alive_timeout or 0.0
        if limit <= 0:
            return next_check
        late = self._planned_wake and now - self._planned_wake > limit / 2
        for slot in self._slots:
            if slot.proc is None or not slot.ready or slot.killed:
                continue
            stamp = self._stamps[slot.number]
            if late:
                # The supervisor itself was stopped or starved: it cannot
                # tell a silent worker from its own absence.  Judge afresh.
                stamp = self._stamps[slot.number] = max(stamp, now)
            age = now - stamp
            if age < limit:
                next_check = min(next_check, stamp + limit)
                continue
            self._fence(slot)
            if self._kill_hung(slot, "stale"):
                log.warning(
                    "worker %d (pid %d) stopped answering for %.1f s; killed",
                    slot.number,
                    slot.pid,
                    age,
                )
        return next_check

    def _check_starts(self, now: float) -> float:
        """SIGKILL every child not attached start_timeout after its start; when to look again."""
        limit = self.start_timeout or 0.0
        next_check = math.inf
        if limit <= 0:
            return next_check
        for slot in self._slots:
            if slot.proc is None or slot.ready or slot.killed:
                continue
            if now - slot.started < limit:
                next_check = min(next_check, slot.started + limit)
                continue
            self._read_ready()  # it may have said so while the loop was busy
            if not slot.ready and self._kill_hung(slot, "start"):
                log.warning(
                    "worker %d (pid %d) did not attach within %.1f s; killed", slot.number, slot.pid, limit
                )
        return next_check

    def _kill_hung(self, slot: _Slot, why: Literal["stale", "start"]) -> bool:
        """SIGKILL the slot's child for ``why`` (_Slot.killed); False if it was dead already."""
        try:
            os.kill(slot.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False  # the reap will see it
        slot.killed = why
        slot.hung_kills += 1
        return True

    def _fence(self, slot: _Slot) -> None:
        """Have the backend's store refuse the slot's child before it is killed.

        The child is stopped first (SIGSTOP, and waited for): once the
        store refuses its client, an operation it was waiting on fails at
        once, and a running worker would answer that failure to the
        kernel; a stopped one answers nothing before SIGKILL.
        """
        if not slot.identity:
            return
        try:
            os.kill(slot.pid, signal.SIGSTOP)
        except ProcessLookupError:
            return  # already dead: nothing of it can be answered
        _wait_stopped(slot.pid)
        try:
            self.backend.fence(slot.identity)
        except Exception as err:  # the kill still stops the process; say the store may not know
            log.error("worker %d (pid %d): fencing %s failed: %s", slot.number, slot.pid, slot.identity, err)
            return
        log.warning("worker %d (pid %d): fenced %s in the store", slot.number, slot.pid, slot.identity)

    def _reap(self) -> None:
        """Collect every child that has exited, by its own pid only.

        ``waitpid(-1)`` would also steal the statuses of children that
        other code in this process started.
        """
        for slot in self._slots:
            if slot.proc is None:
                continue
            try:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
            except ChildProcessError:
                self._on_exit(slot, None)
                continue
            if pid:
                self._on_exit(slot, os.waitstatus_to_exitcode(status))

    def _on_exit(self, slot: _Slot, code: int | None) -> None:
        now = time.monotonic()
        lived = now - slot.started
        slot.proc = None
        slot.ready = False
        slot.identity = ""
        killed, slot.killed = slot.killed, ""
        failed_start = killed == "start"
        if self._stop_requests or self._result is not None:
            log.debug("worker %d (pid %d) %s while stopping", slot.number, slot.pid, _describe(code))
            return
        if code == 0:
            log.info(
                "worker %d (pid %d) exited on its own: disk abuse%d is gone; stopping",
                slot.number,
                slot.pid,
                self.index,
            )
            self._result = 0
            return
        if lived < self.quick_death or failed_start:
            slot.failures += 1
            slot.delay = min(slot.delay * 2, self.backoff_max) if slot.delay else self.backoff_min
        else:
            slot.failures = 0
            slot.delay = self.backoff_min
        slot.due = now + slot.delay
        # A child killed at start lived exactly the start timeout: say it once.
        if failed_start:
            what = f"did not attach within {self.start_timeout:.1f} s"
        else:
            what = f"{_describe(code)} after {lived:.1f}s"
        if all(self._failing(other, now) for other in self._slots):
            log.error(
                "every worker of abuse%d failed %d times in a row at start (last: worker %d %s); giving up",
                self.index,
                self.start_failures,
                slot.number,
                what,
            )
            self._result = 1
            return
        log.log(
            logging.INFO if killed == "stale" else logging.WARNING,
            "worker %d (pid %d) %s; restarting in %.1fs",
            slot.number,
            slot.pid,
            what,
            slot.delay,
        )

    def _failing(self, slot: _Slot, now: float) -> bool:
        """Whether ``slot`` has failed at start often enough to give up on."""
        if slot.failures < self.start_failures:
            return False
        # A child not attached yet may be hanging where the last ones did.
        return slot.proc is None or not slot.ready or now - slot.started < self.quick_death

    def _spawn_due(self) -> None:
        now = time.monotonic()
        for slot in self._slots:
            if slot.proc is None and now >= slot.due:
                self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()  # or the child would print the parent's buffer again
            except (OSError, ValueError, AttributeError):
                pass
        # Until the child has reset its handlers, a signal to it would run
        # the supervisor's handler there and be lost: hold them pending.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        self._stamps[slot.number] = time.monotonic()
        slot.ready = False
        slot.killed = ""
        try:
            pid = os.fork()
            if pid == 0:
                self._child(slot.number, mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        proc = psutil.Process(pid)
        try:
            proc.cpu_percent(interval=None)  # start the first stats() interval here
        except psutil.Error:
            pass
        if slot.spawns:
            slot.restarts += 1
        slot.spawns += 1
        slot.proc, slot.pid, slot.started = proc, pid, time.monotonic()
        log.debug("worker %d started as pid %d", slot.number, pid)

    def _child(self, number: int, mask: set[int | signal.Signals]) -> NoReturn:
        """Run the target in a freshly forked child; never returns.

        The child must never unwind into the supervisor's stack (or a
        test runner's), so it leaves through ``os._exit``: 0 when the
        target returns, its code on SystemExit, 1 on any exception.
        ``mask`` is the signal mask to restore once the supervisor's
        handlers are gone.
        """
        global _link
        code = 1
        try:
            os.close(self._wake_r)
            os.close(self._wake_w)
            os.close(self._ready_r)
            _link = _ChildLink(
                self._stamps, number, self._ready_w, self.credentials, self.alive_timeout or 0.0
            )
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to forward
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self._target(self.index, self.backend, self.batch)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except AbuseError as exc:
            log.error("worker %d: %s: %s", number, type(exc).__name__, exc)
        except BaseException:
            log.exception("worker %d failed", number)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError, AttributeError):
                    pass
            os._exit(code)

    def _stop_children(self) -> None:
        """SIGTERM every child, wait up to stop_timeout, SIGKILL the rest."""
        procs = [slot.proc for slot in self._slots if slot.proc is not None]
        if not procs:
            return
        log.debug("stopping %d worker(s)", len(procs))
        for proc in procs:
            try:
                proc.terminate()
                proc.resume()  # a stopped (SIGSTOP) child could not act on SIGTERM
            except psutil.Error:
                pass
        alive = procs
        deadline = time.monotonic() + self.stop_timeout
        while alive and self._stop_requests < 2:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            _, alive = psutil.wait_procs(alive, timeout=min(remaining, 0.25))
        if alive:
            log.warning("%d worker(s) still running after SIGTERM; sending SIGKILL", len(alive))
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(alive, timeout=_KILL_WAIT)
            for proc in alive:
                log.error("worker pid %d survived SIGKILL for %.0fs", proc.pid, _KILL_WAIT)
        for slot in self._slots:
            slot.proc = None
            slot.ready = False
            slot.identity = ""

    # --- hardening and signals -----------------------------------------------

    def _check_hardening(self) -> None:
        global _hardening_reported
        if _hardening_reported:
            return
        problems = _probe_hardening()
        if problems:
            _report_hardening(self.index, problems, logging.WARNING)
            _hardening_reported = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in _STOP_SIGNALS:
            self.stop()
        # SIGCHLD needs nothing here: the wakeup fd has woken the loop.

    def _install_signals(self) -> tuple[dict[int, Any], int] | None:
        """Route SIGINT, SIGTERM and SIGCHLD to the loop; return what was there.

        Returns None off the main thread, where Python allows neither.
        """
        if threading.current_thread() is not threading.main_thread():
            log.debug("not on the main thread: no signal handlers, reaping by polling")
            return None
        handlers = {int(sig): signal.getsignal(sig) for sig in _HANDLED_SIGNALS}
        wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in _HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        return handlers, wakeup

    def _restore_signals(self, saved: tuple[dict[int, Any], int]) -> None:
        handlers, wakeup = saved
        for sig, handler in handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        signal.set_wakeup_fd(wakeup)
