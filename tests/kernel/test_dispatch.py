"""Dispatch and fencing in the driver, driven by hand.

Lazy wake-ups: while one worker holds a batch, new requests are left to
it for a bounded time; a holder that never comes back (stopped, or slow)
must not strand them until the request timeout.  Fencing
(ABUSE_F_FENCE): a holder that times out or is reset is killed, and its
requests move on only once it is dead.  Fencing tokens grow with every
hand-out.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from abuse import uapi
from abuse.control import Control
from tests.kernel.blockio import Background, direct_read, direct_write, pattern
from tests.kernel.conftest import Disks, asleep_in_driver, task_state, wait_for
from tests.kernel.kmsg import KernelLog
from tests.kernel.raw import RawWorker, Request, expect_errno, raw_errno

ffi = uapi.ffi
PAGE = 4096
LONG_TIMEOUT_MS = 120_000  # far longer than any wake bound: a timeout here means a stranded request


def _counters(index: int) -> dict[str, int]:
    root = Path(f"/sys/block/abuse{index}/abuse")
    return {
        name: int(root.joinpath(name).read_text()) for name in ("timeouts", "requeued", "fenced", "rejected")
    }


def _blocking_get(worker: RawWorker) -> Background:
    """A GET with no timeout in a thread; returns its requests."""
    return Background(lambda: worker.get(wait=True))


def _asleep(job: Background) -> bool:
    return asleep_in_driver(f"/proc/self/task/{job.tid}")


def _hold_and_sleep(holder: RawWorker, other: RawWorker, dev: str) -> tuple[Background, Request, Background]:
    """``holder`` takes a batch of one read and keeps it; ``other`` then sleeps in a blocking GET.

    Returns the read (in the background), the held request and the GET.
    """
    first = Background(lambda: direct_read(dev, 0, PAGE))
    held = holder.get(wait=True)
    assert len(held) == 1
    get = _blocking_get(other)
    wait_for(lambda: _asleep(get))
    return first, held[0], get


def test_a_holder_that_never_returns_does_not_strand_new_requests(disks: Disks) -> None:
    """One worker holds a batch and stops; the next request reaches the other one.

    While a worker holds a batch the driver does not wake a sleeper for a
    new request at once (the holder will take it with its next PUT+GET);
    the wake timer wakes one once the request has waited the bound.  The
    request completes with no timeout counted: the bound, not the 120 s
    timeout, got it served.
    """
    config = disks.create(16 * PAGE, timeout_ms=LONG_TIMEOUT_MS)
    dev = f"/dev/abuse{config.index}"
    holder, other = RawWorker(config.index), RawWorker(config.index)
    try:
        # The holder "stops": it keeps its batch and never calls again.
        first, held, get = _hold_and_sleep(holder, other, dev)
        second = Background(lambda: direct_write(dev, PAGE, pattern(1, PAGE)))
        got = get.join(timeout=LONG_TIMEOUT_MS / 1000).result
        assert [(r.offset, r.op) for r in got] == [(PAGE, uapi.ABUSE_OP_WRITE)]
        assert other.put([other.answer(got[0])]) == [0]
        second.join()
        assert _counters(config.index)["timeouts"] == 0
        assert holder.put([holder.answer(held)]) == [0]
        first.join()
    finally:
        holder.close()
        other.close()


def _serve_in_thread(worker: RawWorker, stop: threading.Event) -> threading.Thread:
    """Answer every request at once (reads with zeroes) until ``stop``."""

    def loop() -> None:
        while not stop.is_set():
            for request in worker.get(wait=True, wait_ms=50):
                worker.put([worker.answer(request)])

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_stopped_holder_and_a_second_process_io(disks: Disks) -> None:
    """The acceptance case: one of two workers holds a batch and stops; I/O goes on.

    The second worker serves in a thread (a blocking GET with a short idle
    wait); a second process's write completes with no request timeout.
    """
    config = disks.create(16 * PAGE, timeout_ms=LONG_TIMEOUT_MS)
    dev = f"/dev/abuse{config.index}"
    holder, other = RawWorker(config.index), RawWorker(config.index)
    stop = threading.Event()
    try:
        first = Background(lambda: direct_read(dev, 0, PAGE))
        held = holder.get(wait=True)
        assert len(held) == 1
        thread = _serve_in_thread(other, stop)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                direct_write(dev, 2 * PAGE, pattern(2, PAGE))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _counters(config.index)["timeouts"] == 0
        stop.set()
        thread.join(timeout=30)
        assert holder.put([holder.answer(held[0])]) == [0]
        first.join()
    finally:
        stop.set()
        holder.close()
        other.close()


def test_tokens_grow_with_every_hand_out_and_requeue(disks: Disks) -> None:
    """ABUSE_XFER_TOKENS: a requeued request comes back with a larger token."""
    config = disks.create(16 * PAGE)
    dev = f"/dev/abuse{config.index}"
    worker = RawWorker(config.index)
    try:
        worker.xfer.use_tokens()
        io = Background(lambda: direct_write(dev, 0, pattern(3, PAGE)))
        first = worker.get(wait=True)
        token1 = int(worker.xfer.tokens[0])
        disks.control.reset(config.index)  # not fenced: requeued now
        again = worker.get(wait=True)
        token2 = int(worker.xfer.tokens[0])
        assert again[0].offset == first[0].offset
        assert token2 > token1 > 0
        assert worker.put([worker.answer(again[0])]) == [0]
        io.join()
        io2 = Background(lambda: direct_write(dev, PAGE, pattern(4, PAGE)))
        later = worker.get(wait=True)
        assert int(worker.xfer.tokens[0]) > token2
        assert worker.put([worker.answer(later[0])]) == [0]
        io2.join()
    finally:
        worker.close()


def test_tokens_bad_input(disks: Disks) -> None:
    """A token address without the flag is EINVAL; an unwritable one EFAULT, nothing lost."""
    config = disks.create(16 * PAGE)
    dev = f"/dev/abuse{config.index}"
    worker = RawWorker(config.index)
    put = uapi.ioctls["ABUSE_IOC_PUT"]
    get = uapi.ioctls["ABUSE_IOC_GET"]
    try:
        arg = worker.xfer.arg
        arg.tokens = int(ffi.cast("uintptr_t", worker.xfer.requests))
        arg.flags = uapi.ABUSE_XFER_NOWAIT
        expect_errno(raw_errno(worker.control.fileno(), get, arg), errno.EINVAL)
        io = Background(lambda: direct_write(dev, 0, pattern(5, PAGE)))
        arg.flags = uapi.ABUSE_XFER_TOKENS
        arg.tokens = 8  # below mmap_min_addr: nothing is mapped there
        expect_errno(raw_errno(worker.control.fileno(), put, arg), errno.EFAULT)
        # The request went back to the queue: a correct GET takes it.
        arg.tokens = 0
        worker.xfer.use_tokens()
        got = worker.get(wait=True)
        assert len(got) == 1
        assert worker.put([worker.answer(got[0])]) == [0]
        io.join()
    finally:
        worker.close()


def test_version_reports_every_flag(control: Control) -> None:
    ver = ffi.new("struct abuse_version *")
    control.ioctl("VERSION", ver)
    assert ver.version >= 2
    assert ver.features == uapi.ABUSE_F_ALL
    assert ver.features & uapi.ABUSE_F_FENCE
    assert ver.xfer_features == uapi.ABUSE_XFER_ALL


def test_create_refuses_a_flag_past_fence(control: Control) -> None:
    with pytest.raises(Exception) as err:
        control.create(1 << 20, flags=uapi.ABUSE_F_ALL + 1)
    assert getattr(err.value, "errno", None) == errno.EINVAL


# --- fencing ---------------------------------------------------------------


def _holder_child(index: int, ready_w: int, spin: bool = False) -> int:
    """Fork a process that attaches, takes one request, says so and then hangs.

    It hangs asleep (wedged), or with ``spin`` on a CPU or waiting for
    one (a lead that computes); either way it never answers.
    """
    pid = os.fork()
    if pid:
        return pid
    try:
        worker = RawWorker(index)
        got = worker.get(wait=True)
        os.write(ready_w, bytes([len(got)]))
        while True:
            if not spin:
                signal.pause()
    finally:
        os._exit(1)


def _read_byte(fd: int, timeout: float = 180) -> int:
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, "the child did not take its request"
    return os.read(fd, 1)[0]


@pytest.mark.parametrize("how", ["timeout", "reset"])
def test_fence_kills_the_holder_before_its_request_moves_on(disks: Disks, how: str) -> None:
    """ABUSE_F_FENCE: a timed-out or reset request waits for its holder's death.

    The holder is another process, wedged after its GET.  The driver kills
    it (SIGKILL), and only its exit releases the request to the other
    worker, whose GET therefore returns after the holder is dead.
    """
    timeout_ms = 1000 if how == "timeout" else LONG_TIMEOUT_MS
    # Retries count the queued time too: generous, for a slow guest.
    config = disks.create(16 * PAGE, flags=uapi.ABUSE_F_FENCE, timeout_ms=timeout_ms, retries=100)
    dev = f"/dev/abuse{config.index}"
    read_fd, write_fd = os.pipe()
    child = _holder_child(config.index, write_fd)
    other = RawWorker(config.index)
    try:
        io = Background(lambda: direct_write(dev, 0, pattern(6, PAGE)))
        assert _read_byte(read_fd) == 1
        if how == "reset":
            disks.control.reset(config.index)
        _, status = os.waitpid(child, 0)  # the fence's SIGKILL
        child = 0
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        got = other.get(wait=True)
        assert len(got) == 1 and got[0].offset == 0
        assert other.put([other.answer(got[0])]) == [0]
        io.join()
        counters = _counters(config.index)
        assert counters["fenced"] == 1, counters
        assert counters["rejected"] == 0, counters
    finally:
        if child:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
        os.close(read_fd)
        os.close(write_fd)
        other.close()


def test_fenced_file_gets_no_more_requests(disks: Disks) -> None:
    """A fenced file shared with a survivor: its GETs answer ESHUTDOWN.

    The file outlives the killed holder here (the test keeps a copy of
    the descriptor), so its request stays held until the copy is closed.
    """
    config = disks.create(16 * PAGE, flags=uapi.ABUSE_F_FENCE, timeout_ms=LONG_TIMEOUT_MS)
    dev = f"/dev/abuse{config.index}"
    shared = RawWorker(config.index)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            got = shared.get(wait=True)
            os.write(write_fd, bytes([len(got)]))
            while True:
                signal.pause()
        finally:
            os._exit(code)
    other = RawWorker(config.index)
    try:
        io = Background(lambda: direct_write(dev, 0, pattern(7, PAGE)))
        assert _read_byte(read_fd) == 1
        disks.control.reset(config.index)
        os.waitpid(pid, 0)
        with pytest.raises(OSError) as err:
            shared.get(wait=False)
        assert err.value.errno == errno.ESHUTDOWN
        assert other.get(wait=False) == []  # still held by the shared file
        shared.close()  # the last user of the fenced file: now it moves on
        got = other.get(wait=True)
        assert other.put([other.answer(got[0])]) == [0]
        io.join()
    finally:
        os.close(read_fd)
        os.close(write_fd)
        other.close()


def test_sysfs_config_and_workers_readable(disks: Disks) -> None:
    config = disks.create(
        64 * PAGE, flags=uapi.ABUSE_F_FLUSH | uapi.ABUSE_F_FENCE, timeout_ms=5000, retries=2
    )
    root = Path(f"/sys/block/abuse{config.index}/abuse")
    assert int(root.joinpath("size").read_text()) == 64 * PAGE
    assert int(root.joinpath("block_size").read_text()) == 4096
    assert int(root.joinpath("flags").read_text(), 16) == uapi.ABUSE_F_FLUSH | uapi.ABUSE_F_FENCE
    assert int(root.joinpath("timeout_ms").read_text()) == 5000
    assert int(root.joinpath("retries").read_text()) == 2
    assert int(root.joinpath("queue_depth").read_text()) == config.queue_depth
    assert root.joinpath("workers").read_text() == "\n"
    worker = RawWorker(config.index)
    try:
        assert root.joinpath("workers").read_text().split() == [str(os.getpid())]
        for name in ("size", "flags", "workers", "fenced"):
            assert root.joinpath(name).stat().st_mode & 0o444 == 0o444
    finally:
        worker.close()


def _dispatch(index: int) -> dict[str, int]:
    text = Path(f"/sys/block/abuse{index}/abuse/dispatch").read_text()
    return {name: int(count) for name, count in (line.split() for line in text.splitlines())}


def test_dispatch_counts_a_sleeper_woken_for_a_request(disks: Disks) -> None:
    """/sys/block/abuseN/abuse/dispatch: a GET asleep on an idle disk is woken at once."""
    config = disks.create(16 * PAGE, timeout_ms=LONG_TIMEOUT_MS)
    names = {
        "wake_now",
        "wake_lazy",
        "wake_passed",
        "sleeps",
        "polls",
        "poll_hits",
        "batches",
        "deferred",
        "timer_runs",
    }
    assert _dispatch(config.index) == dict.fromkeys(names, 0)
    worker = RawWorker(config.index)
    try:
        get = _blocking_get(worker)
        wait_for(lambda: _asleep(get))
        read = Background(lambda: direct_read(f"/dev/abuse{config.index}", 0, PAGE))
        got = get.join().result
        assert len(got) == 1
        assert worker.put([worker.answer(got[0])]) == [0]
        read.join()
        counts = _dispatch(config.index)
        assert counts["wake_now"] == 1 and counts["batches"] == 1 and counts["sleeps"] >= 1
        assert counts["deferred"] == 0 and counts["wake_lazy"] == 0
    finally:
        worker.close()


def test_the_lead_is_woken_before_a_worker_that_slept_after_it(disks: Disks) -> None:
    """The last worker to take a batch (the lead) waits at the head of the GET sleepers.

    A worker that went to sleep after the lead, as an idle worker does
    whenever its GET's idle timeout returns it to user space, must not
    take the next request from it: the workers would take turns, each
    one cold (with LIFO sleepers, that one was woken).
    """
    config = disks.create(16 * PAGE, timeout_ms=LONG_TIMEOUT_MS)
    dev = f"/dev/abuse{config.index}"
    lead, other = RawWorker(config.index), RawWorker(config.index)
    try:
        first = Background(lambda: direct_read(dev, 0, PAGE))
        taken = lead.get(wait=True)
        assert len(taken) == 1
        assert lead.put([lead.answer(taken[0])]) == [0]
        first.join()
        lead_get = _blocking_get(lead)
        wait_for(lambda: _asleep(lead_get))
        other_get = _blocking_get(other)
        wait_for(lambda: _asleep(other_get))
        second = Background(lambda: direct_read(dev, PAGE, PAGE))
        got = lead_get.join(timeout=LONG_TIMEOUT_MS / 1000).result
        assert [request.offset for request in got] == [PAGE]
        assert _asleep(other_get), "the worker that slept last was woken too"
        assert lead.put([lead.answer(got[0])]) == [0]
        second.join()
        # Now the only sleeper, the other one takes the next request.
        third = Background(lambda: direct_read(dev, 2 * PAGE, PAGE))
        late = other_get.join(timeout=LONG_TIMEOUT_MS / 1000).result
        assert [request.offset for request in late] == [2 * PAGE]
        assert other.put([other.answer(late[0])]) == [0]
        third.join()
    finally:
        lead.close()
        other.close()


MIB = 1 << 20
PARAMETERS = Path("/sys/module/abuse/parameters")


@contextlib.contextmanager
def module_parameter(name: str, value: str) -> Iterator[None]:
    """abuse.ko's parameter ``name`` set to ``value`` for the block, then restored."""
    path = PARAMETERS / name
    old = path.read_text().strip()
    path.write_text(value)
    try:
        yield
    finally:
        path.write_text(old)


@pytest.fixture
def no_lazy_wakeups() -> Iterator[None]:
    """The lazy wake-up's bound at ten minutes: within a test, the timer wakes nobody."""
    with module_parameter("wake_min_us", str(600 * 1_000_000)):
        yield


@pytest.fixture
def sharing_no_lazy_wakeups(no_lazy_wakeups: None) -> Iterator[None]:
    """Big requests shared at 1 MiB (share_kib, off by default), and no lazy wake-ups."""
    with module_parameter("share_kib", "1024"):
        yield


# Batches in which a worker blocks before the driver takes it for one
# that waits in its backend (an average of 1/16 per batch past one half).
BLOCKING_BATCHES = 16


def test_a_lead_that_waits_in_its_backend_does_not_hold_back_a_new_request(
    disks: Disks, no_lazy_wakeups: None
) -> None:
    """While the lead blocks in its backend, a new request wakes an idle worker at once.

    A lead that computes comes back for a new request within its cycle,
    so the request waits for it (lazily); one that waits on a network or
    a slow disk would start it only after its wait, while an idle worker
    can start it now.  The lead blocks in a run of batches (the driver's
    measure), then holds one more; the next request must wake the other
    worker at once: with the lazy bound at ten minutes, nothing else can.
    """
    config = disks.create(16 * PAGE, timeout_ms=LONG_TIMEOUT_MS)
    dev = f"/dev/abuse{config.index}"
    lead, other = RawWorker(config.index), RawWorker(config.index)
    try:
        for _ in range(BLOCKING_BATCHES):
            read = Background(lambda: direct_read(dev, 0, PAGE))
            got = lead.get(wait=True)
            assert len(got) == 1
            time.sleep(0.001)  # the backend waits: any blocking call, a voluntary context switch
            assert lead.put([lead.answer(got[0])]) == [0]
            read.join()
        first, held, get = _hold_and_sleep(lead, other, dev)
        before = _dispatch(config.index)
        second = Background(lambda: direct_write(dev, PAGE, pattern(1, PAGE)))
        got = get.join(timeout=LONG_TIMEOUT_MS / 1000).result
        assert [(r.offset, r.op) for r in got] == [(PAGE, uapi.ABUSE_OP_WRITE)]
        after = _dispatch(config.index)
        assert after["wake_now"] == before["wake_now"] + 1
        assert after["wake_lazy"] == before["wake_lazy"] == 0
        assert other.put([other.answer(got[0])]) == [0]
        second.join()
        assert lead.put([lead.answer(held)]) == [0]
        first.join()
    finally:
        lead.close()
        other.close()


def test_a_get_whose_wait_runs_out_leaves_the_queue_to_a_lead_that_keeps_up(
    disks: Disks, no_lazy_wakeups: None
) -> None:
    """A GET whose wait ran out returns empty while the lead computes, runs and keeps up.

    An idle worker's GET times out every few seconds (the pool's idle
    wait, 200 ms until 2026-12-05); taking what was queued behind a busy
    lead made it the lead, and at 1M the work moved between workers that
    way up to 12 times per 1,000 requests (docs/SCALING.md).  Once the lead stops, the same GET takes
    the request at once.
    """
    config = disks.create(16 * PAGE, timeout_ms=LONG_TIMEOUT_MS)
    dev = f"/dev/abuse{config.index}"
    ready_r, ready_w = os.pipe()
    first = Background(lambda: direct_read(dev, 0, PAGE))
    pid = _holder_child(config.index, ready_w, spin=True)
    other = RawWorker(config.index)
    try:
        assert _read_byte(ready_r) == 1
        second = Background(lambda: direct_read(dev, PAGE, PAGE))
        wait_for(lambda: _waiting_for_io(second))
        before = _dispatch(config.index)["deferred"]
        assert other.get(wait=True, wait_ms=100) == [], "took a request from a lead that keeps up"
        assert _dispatch(config.index)["deferred"] > before
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: task_state(f"/proc/{pid}") == "T")
        got = other.get(wait=True, wait_ms=100)
        assert [request.offset for request in got] == [PAGE]
        assert other.put([other.answer(got[0])]) == [0]
        second.join()
        os.kill(pid, signal.SIGKILL)  # its held read goes back to the queue
        os.waitpid(pid, 0)
        got = other.get(wait=True)
        assert [request.offset for request in got] == [0]
        assert other.put([other.answer(got[0])]) == [0]
        first.join()
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        other.close()
        os.close(ready_r)
        os.close(ready_w)


def _waiting_for_io(job: Background) -> bool:
    """Whether ``job``'s thread sleeps uninterruptibly: an O_DIRECT call submitted its requests."""
    return task_state(f"/proc/self/task/{job.tid}") == "D"


def _three_writes_of_a_mib(dev: str) -> list[Background]:
    writes = [Background(lambda i=i: direct_write(dev, (1 + i) * MIB, pattern(i, MIB))) for i in range(3)]
    wait_for(lambda: all(_waiting_for_io(write) for write in writes))
    return writes


def _answer_writes(worker: RawWorker, got: list[Request]) -> None:
    """Check each write's data against what _three_writes_of_a_mib wrote, and answer it."""
    for request in got:
        seed, start = divmod(request.offset - MIB, MIB)
        assert request.op == uapi.ABUSE_OP_WRITE
        assert worker.data(request) == pattern(seed, MIB)[start : start + request.length]
    assert worker.put([worker.answer(request) for request in got]) == [0] * len(got)


def test_big_requests_are_shared_with_a_sleeper(disks: Disks, sharing_no_lazy_wakeups: None) -> None:
    """With share_kib 1024, a GET that holds 1 MiB of data leaves the rest to a sleeper and wakes it at once.

    Most of a big request's time is its copy, which two workers do on two
    CPUs.  Three 1 MiB writes queue while the lead holds a batch (lazily:
    with the wake timer ten minutes away, only the share can wake the
    other worker); the lead's next GET takes 1 MiB and the sleeper the rest.
    """
    config = disks.create(8 * MIB, timeout_ms=LONG_TIMEOUT_MS)
    dev = f"/dev/abuse{config.index}"
    lead, helper = RawWorker(config.index), RawWorker(config.index)
    try:
        first, held, get = _hold_and_sleep(lead, helper, dev)
        writes = _three_writes_of_a_mib(dev)
        # PUT+GET in one call: a PUT alone would pass the queue on.
        assert lead.put([lead.answer(held)], fetch=True) == [0]
        first.join()
        taken = lead.fetched
        shared = get.join(timeout=LONG_TIMEOUT_MS / 1000).result
        lead_bytes, helper_bytes = (sum(r.length for r in got) for got in (taken, shared))
        assert MIB <= lead_bytes < 3 * MIB and lead_bytes + helper_bytes == 3 * MIB
        assert _dispatch(config.index)["wake_passed"] >= 1
        _answer_writes(lead, taken)
        _answer_writes(helper, shared)
        for write in writes:
            write.join()
    finally:
        lead.close()
        helper.close()


def test_a_lone_worker_takes_every_big_request_at_once(disks: Disks, sharing_no_lazy_wakeups: None) -> None:
    """Even with sharing on, with nobody asleep to share with, one GET takes all the queued data."""
    config = disks.create(8 * MIB, timeout_ms=LONG_TIMEOUT_MS)
    worker = RawWorker(config.index)
    try:
        writes = _three_writes_of_a_mib(f"/dev/abuse{config.index}")
        taken = worker.get()
        assert sum(r.length for r in taken) == 3 * MIB
        _answer_writes(worker, taken)
        for write in writes:
            write.join()
    finally:
        worker.close()


# Reads served per case of the polling test: enough for the polling
# budget (twice the recent waits, folded over 8) to build up.
POLLED_READS = 256


def _polls_serving_reads(index: int, worker_cpu: int, reader_cpu: int) -> tuple[int, int]:
    """Serve ``POLLED_READS`` direct 4k reads at QD1 (dd on ``reader_cpu``) with
    this thread pinned to ``worker_cpu``; return the GETs' (polls, batches)."""
    before = _dispatch(index)
    worker = RawWorker(index)
    old_cpus = os.sched_getaffinity(0)
    reader = subprocess.Popen(
        [
            "taskset",
            "-c",
            str(reader_cpu),
            "dd",
            f"if=/dev/abuse{index}",
            "of=/dev/null",
            "bs=4096",
            f"count={POLLED_READS}",
            "iflag=direct",
            "status=none",
        ]
    )
    try:
        os.sched_setaffinity(0, {worker_cpu})
        while reader.poll() is None:
            got = worker.get(wait=True, wait_ms=100)
            if got:
                worker.put([worker.answer(r) for r in got])
        assert reader.returncode == 0
    finally:
        os.sched_setaffinity(0, old_cpus)
        reader.kill()
        reader.wait()
        worker.close()
    after = _dispatch(index)
    return after["polls"] - before["polls"], after["batches"] - before["batches"]


def test_get_polls_only_while_no_other_task_waits_for_its_cpu(disks: Disks) -> None:
    """A GET polls for the next request only while alone on its CPU.

    At QD1 the task woken onto a polling worker's CPU is often the
    submitter, which would wait out the poll.  With a busy loop runnable
    on the worker's CPU, no GET may poll; alone there, the same reads
    are polled for (spin_max_us raised to 20 ms, so that TCG's slow
    round trips fit in the budget).
    """
    assert len(os.sched_getaffinity(0)) >= 2, "the guest needs two CPUs"
    config = disks.create(POLLED_READS * PAGE, timeout_ms=LONG_TIMEOUT_MS)
    with module_parameter("spin_max_us", "20000"):
        polls, batches = _polls_serving_reads(config.index, worker_cpu=1, reader_cpu=0)
        assert batches >= POLLED_READS and polls > 0
        hog = subprocess.Popen(["sh", "-c", "while :; do :; done"])
        try:
            os.sched_setaffinity(hog.pid, {1})
            polls, batches = _polls_serving_reads(config.index, worker_cpu=1, reader_cpu=0)
        finally:
            hog.kill()
            hog.wait()
        assert batches >= POLLED_READS and polls == 0


# The late wake-up test: the polling bound (spin_max_us), how long a
# SCHED_FIFO task keeps a woken worker off its CPU (far longer than the
# bound), and how many such wake-ups: enough that, were each counted as
# a wait of that length, the average would stay over the bound.  The
# bound leaves room for the test's own handshake before each read: on the
# debug kernel, loaded by the tests before it, 50 ms was once too little
# (its waits then really were long, and polling rightly stayed off).
LATE_SPIN_MAX_US = 100_000
LATE_WAKE_S = 0.4
LATE_WAKES = 12
# The last look: GETs that find the queue empty, each waiting this long;
# one must poll.  Several, since a GET polls only while its CPU has no
# other task (a kernel thread may run there for a moment), and short, so
# that their own waits do not push the average over the bound.
LATE_LOOKS = 3
LATE_LOOK_MS = 200

# Holds CPU ``cpu`` at SCHED_FIFO for ``seconds`` per byte read from stdin,
# between writing "!" (it is on the CPU now) and "." (done).
_CPU_HOLDER = """
import os, sys, time
os.sched_setaffinity(0, {{{cpu}}})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
while sys.stdin.buffer.read(1):
    sys.stdout.buffer.write(b"!")
    sys.stdout.flush()
    end = time.monotonic() + {seconds}
    while time.monotonic() < end:
        pass
    sys.stdout.buffer.write(b".")
    sys.stdout.flush()
"""


def test_a_late_wake_up_does_not_turn_polling_off(disks: Disks) -> None:
    """A GET's polling budget counts each wait until the request came, not until the worker ran.

    LATE_WAKES times, a read comes a moment after the worker fell asleep
    in GET, while a SCHED_FIFO task holds the worker's CPU for
    LATE_WAKE_S: the worker takes each request that long after it came.
    Counted until the worker ran, those waits (each longer than
    spin_max_us) turned polling off, as slow wake-ups did on a slow
    machine; counted until the request came, they are short, and the
    next GET that finds the queue empty polls.
    """
    assert len(os.sched_getaffinity(0)) >= 2, "the guest needs two CPUs"
    config = disks.create(LATE_WAKES * PAGE, timeout_ms=LONG_TIMEOUT_MS)
    dev = f"/dev/abuse{config.index}"
    me = f"/proc/self/task/{threading.get_native_id()}"
    holder = subprocess.Popen(
        [sys.executable, "-c", _CPU_HOLDER.format(cpu=1, seconds=LATE_WAKE_S)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    hold_in, hold_out = holder.stdin, holder.stdout

    def late_reads() -> None:
        os.sched_setaffinity(0, {0})
        for block in range(LATE_WAKES):
            # The worker's own GET has found nothing and sleeps: from now on
            # its wait counts.  Looked at every millisecond, so that the
            # request comes well within the bound.
            while not asleep_in_driver(me):
                time.sleep(0.001)
            hold_in.write(b"x")
            hold_in.flush()
            assert hold_out.read(1) == b"!"
            direct_read(dev, block * PAGE, PAGE)
            # On 6.12 the fair server may run the worker inside the hold:
            # the next round, and the last GET, begin once it is over.
            assert hold_out.read(1) == b"."

    worker = RawWorker(config.index)
    old_cpus = os.sched_getaffinity(0)
    try:
        with module_parameter("spin_max_us", str(LATE_SPIN_MAX_US)):
            os.sched_setaffinity(0, {1})
            reads = Background(late_reads)
            for _ in range(LATE_WAKES):
                got = worker.get(wait=True, wait_ms=LONG_TIMEOUT_MS)
                assert len(got) == 1
                worker.put([worker.answer(got[0])])
                # A break before the next GET, so that the FIFO task holds
                # the CPU well under the kernel's RT limit (950 ms a second).
                time.sleep(LATE_WAKE_S / 2)
            assert reads.join().error is None
            # Polling needs the CPU to itself: the holder back asleep.
            wait_for(lambda: task_state(f"/proc/{holder.pid}") == "S")
            before = _dispatch(config.index)
            for _ in range(LATE_LOOKS):
                assert worker.get(wait=True, wait_ms=LATE_LOOK_MS) == []
                polls = _dispatch(config.index)["polls"] - before["polls"]
                if polls:
                    break
    finally:
        os.sched_setaffinity(0, old_cpus)
        holder.kill()
        holder.wait()
        worker.close()
    assert polls >= 1  # waits counted to the take (before 672faa3): 0


def test_interrupted_get_restarts_for_sa_restart_handlers(disks: Disks) -> None:
    """-ERESTARTSYS: a GET interrupted by a SA_RESTART handler goes on sleeping."""
    config = disks.create(16 * PAGE)
    dev = f"/dev/abuse{config.index}"
    worker = RawWorker(config.index)
    libc = ctypes.CDLL(None, use_errno=True)
    old = signal.getsignal(signal.SIGUSR1)
    try:
        # A C handler with SA_RESTART, as a C worker would install.
        class Sigaction(ctypes.Structure):
            _fields_ = [
                ("handler", ctypes.c_void_p),
                ("mask", ctypes.c_ulong * 16),
                ("flags", ctypes.c_int),
                ("restorer", ctypes.c_void_p),
            ]

        act = Sigaction()
        # A handler in C that does nothing harmful (a Python callback may not
        # run in signal context): srand(signum).
        act.handler = ctypes.cast(libc.srand, ctypes.c_void_p)
        act.flags = 0x10000000  # SA_RESTART
        assert libc.sigaction(signal.SIGUSR1, ctypes.byref(act), None) == 0
        get = _blocking_get(worker)
        wait_for(lambda: _asleep(get))
        assert get.tid is not None
        signal.pthread_kill(_thread_ident(get), signal.SIGUSR1)
        direct = Background(lambda: direct_write(dev, 0, pattern(8, PAGE)))
        got = get.join().result
        assert get.error is None and len(got) == 1
        assert worker.put([worker.answer(got[0])]) == [0]
        direct.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
        worker.close()


def _thread_ident(job: Background) -> int:
    return job._thread.ident or 0


def test_put_the_request_held_by_another(disks: Disks) -> None:
    """Handles stay per file: a stale or foreign handle is ESTALE (regression guard)."""
    config = disks.create(16 * PAGE)
    dev = f"/dev/abuse{config.index}"
    a, b = RawWorker(config.index), RawWorker(config.index)
    try:
        io = Background(lambda: direct_write(dev, 0, pattern(9, PAGE)))
        got: list[Request] = a.get(wait=True)
        disks.control.reset(config.index)
        assert a.put([a.answer(got[0])]) == [-errno.ESTALE]
        again = b.get(wait=True)
        assert b.put([b.answer(again[0])]) == [0]
        io.join()
    finally:
        a.close()
        b.close()


# --- poll and the kernel log ------------------------------------------------


def test_an_external_poller_never_misses_a_queued_request(disks: Disks) -> None:
    """poll() races with queue_rq: each of many requests must wake the poller.

    The poller waits with no timeout, so a missed wake-up (poll_wait and
    the queued count not paired by a barrier) leaves the writer's request
    unanswered and the join fails.
    """
    config = disks.create(16 * PAGE)
    dev = f"/dev/abuse{config.index}"
    worker = RawWorker(config.index)
    rounds = 400
    stop = threading.Event()

    def serve() -> None:
        poller = select.poll()
        poller.register(worker.control.fileno(), select.POLLIN)
        answered = 0
        while answered < rounds and not stop.is_set():
            poller.poll()
            for request in worker.get(wait=False):
                assert worker.put([worker.answer(request)]) == [0]
                answered += 1

    server = Background(serve)
    try:
        writer = Background(
            lambda: [direct_write(dev, (i % 16) * PAGE, pattern(i, PAGE)) for i in range(rounds)]
        )
        writer.join(timeout=600)
        assert writer.error is None
        server.join(timeout=60)
        assert server.error is None
    finally:
        stop.set()
        worker.close()


def test_the_kernel_log_says_why_requests_failed(disks: Disks) -> None:
    """Ratelimited device messages: a request failed after its retries, a
    forced destroy with requests pending, and a fenced worker."""
    log = KernelLog()
    try:
        config = disks.create(16 * PAGE, timeout_ms=500, retries=0)
        failed = Background(lambda: direct_write(f"/dev/abuse{config.index}", 0, pattern(10, PAGE))).join(60)
        assert isinstance(failed.error, OSError) and failed.error.errno == errno.EIO

        doomed = disks.create(16 * PAGE)
        pending = Background(lambda: direct_read(f"/dev/abuse{doomed.index}", 0, PAGE))
        wait_for(lambda: disks.control.info(doomed.index).counters["queued"] == 1)
        disks.control.destroy(doomed.index, force=True)
        pending.join()

        fenced = disks.create(16 * PAGE, flags=uapi.ABUSE_F_FENCE, timeout_ms=LONG_TIMEOUT_MS)
        read_fd, write_fd = os.pipe()
        child = _holder_child(fenced.index, write_fd)
        io = Background(lambda: direct_write(f"/dev/abuse{fenced.index}", 0, pattern(11, PAGE)))
        try:
            assert _read_byte(read_fd) == 1
            disks.control.reset(fenced.index)
            os.waitpid(child, 0)
            disks.control.destroy(fenced.index, force=True)
            io.join()
        finally:
            os.close(read_fd)
            os.close(write_fd)
        text = "\n".join(log.read())
    finally:
        log.close()
    assert f"abuse{config.index}: WRITE of 4096 bytes at 0 failed after 1 timeouts" in text, text
    assert f"abuse{doomed.index}: destroyed with 1 requests pending" in text, text
    assert f"abuse{fenced.index}: fencing worker pid {child}" in text, text
