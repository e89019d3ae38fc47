"""The driver's contract, against the real module (issue: The driver)."""

from __future__ import annotations

import errno
import os
import select
import subprocess
import time
from functools import partial
from typing import Any, Callable

import pytest

from abuse import AbuseError, DiskBusy, InvalidRequest, uapi
from abuse.control import Control
from tests.kernel.blockio import Background, direct_read, direct_write, pattern
from tests.kernel.conftest import Disks, MiB, asleep_in_driver, run, wait_for
from tests.kernel.faults.hostile import PAGE, Arena
from tests.kernel.holders import busy_requests, fdinfo
from tests.kernel.raw import RawWorker, Request, expect_errno, raw_errno, unmapped_address

ffi = uapi.ffi
KiB = 1 << 10


def test_pattern_round_trip_and_counters(disks: Disks) -> None:
    config = disks.create(64 * MiB)
    spare = disks.attach(config.index)  # a second attached file, idle
    served = disks.serve(config)
    chunk = 64 * KiB
    chunks = 64
    for i in range(chunks):
        direct_write(config.path, i * chunk * 7 % (64 * MiB), pattern(i, chunk))
    for i in range(chunks):
        assert direct_read(config.path, i * chunk * 7 % (64 * MiB), chunk) == pattern(i, chunk)

    info = disks.control.info(config.index)
    assert info.counters["attached"] == 2
    served.halt()
    info = disks.control.info(config.index)
    counters = info.counters
    assert counters["completed"] == served.worker.served >= 2 * chunks
    assert counters["errors"] == 0
    assert counters["queued"] == 0
    assert counters["in_flight"] == 0
    assert counters["rejected"] == 0
    assert counters["attached"] == 2
    assert counters["bytes_written"] == counters["bytes_read"] == chunks * chunk
    sysfs = f"/sys/block/{config.name}/abuse"
    for name in ("completed", "errors", "queued", "in_flight", "requeued", "attached", "bytes_written"):
        with open(f"{sysfs}/{name}") as f:
            assert int(f.read()) == counters[name], name
    spare.close()
    assert disks.control.info(config.index).counters["attached"] == 1


def test_info_reports_config(disks: Disks) -> None:
    config = disks.create(
        64 * MiB,
        block_size=512,
        flags=uapi.ABUSE_F_FLUSH | uapi.ABUSE_F_DISCARD,
        queue_depth=64,
        max_request_bytes=256 * KiB,
        timeout_ms=5000,
        retries=3,
    )
    got = disks.control.info(config.index).config
    assert got == config
    assert (got.block_size, got.queue_depth, got.max_request_bytes) == (512, 64, 256 * KiB)
    queue = f"/sys/block/{config.name}/queue"
    with open(f"{queue}/logical_block_size") as f:
        assert int(f.read()) == 512
    with open(f"{queue}/max_hw_sectors_kb") as f:
        assert int(f.read()) == 256
    with open(f"{queue}/write_cache") as f:
        assert f.read().strip() == "write back"
    with open(f"{queue}/discard_max_hw_bytes") as f:
        assert int(f.read()) > 0
    version, features = disks.control.version()
    assert version == uapi.ABUSE_VERSION
    assert features == uapi.ABUSE_F_ALL


def test_get_nowait_blocking_and_poll(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    raw = RawWorker(config.index)
    try:
        poller = select.poll()
        poller.register(raw.control.fileno(), select.POLLIN)
        started = time.monotonic()
        assert raw.get(wait=False) == []
        assert time.monotonic() - started < 2
        assert poller.poll(0) == []

        # A blocking GET sleeps until I/O arrives.
        getter = Background(lambda: raw.get(wait=True))
        wait_for(lambda: asleep_in_driver(f"/proc/self/task/{getter.tid}"))
        assert not getter.done
        writer = Background(lambda: direct_write(config.path, 0, pattern(1, 4096)))
        requests = getter.join().result
        assert len(requests) == 1 and requests[0].op == uapi.ABUSE_OP_WRITE
        assert bytes(raw.data(requests[0])) == pattern(1, 4096)
        assert poller.poll(0) == []  # nothing queued: it is in flight
        assert raw.put([raw.answer(requests[0])]) == [0]
        writer.join()
        assert writer.error is None

        # POLLIN while queued, gone once taken.
        writer = Background(lambda: direct_write(config.path, 4096, pattern(2, 4096)))
        assert poller.poll(10_000) == [(raw.control.fileno(), select.POLLIN)]
        requests = raw.get()
        assert len(requests) == 1
        assert poller.poll(0) == []
        assert raw.put([raw.answer(requests[0])]) == [0]
        writer.join()
        assert writer.error is None
    finally:
        raw.close()


def test_get_timeout_returns_empty_or_the_request_that_came(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    raw = RawWorker(config.index)
    try:
        # Nothing queued: the timed GET gives up and returns no request.
        assert raw.get(wait=True, wait_ms=50) == []
        assert raw.get(wait=True, wait_ms=0) == []

        # A request that arrives during the wait ends it.
        getter = Background(lambda: raw.get(wait=True, wait_ms=600_000))
        writer = Background(lambda: direct_write(config.path, 0, pattern(3, 4096)))
        requests = getter.join().result
        assert len(requests) == 1 and requests[0].op == uapi.ABUSE_OP_WRITE
        assert bytes(raw.data(requests[0])) == pattern(3, 4096)
        assert raw.put([raw.answer(requests[0])]) == [0]
        writer.join()
        assert writer.error is None
    finally:
        raw.close()


def test_closed_worker_requests_are_requeued(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    holder = RawWorker(config.index)
    writers = [
        Background(lambda i=i: direct_write(config.path, i * 8192, pattern(10 + i, 8192))) for i in range(4)
    ]
    held = []
    wait_for(lambda: disks.control.info(config.index).counters["queued"] == 4)
    held = holder.get()
    assert len(held) == 4
    holder.close()  # dies without answering
    assert disks.control.info(config.index).counters["requeued"] >= 4
    disks.serve(config)
    for w in writers:
        w.join()
        assert w.error is None
    for i in range(4):
        assert direct_read(config.path, i * 8192, 8192) == pattern(10 + i, 8192)


def test_put_entries_fail_on_their_own(disks: Disks) -> None:
    config = disks.create(16 * MiB, queue_depth=32)
    direct_write_bg = Background(lambda: direct_write(config.path, 0, pattern(3, 8192)))
    raw = RawWorker(config.index)
    try:
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        (write,) = raw.get()
        good = raw.answer(write)
        stale = {**good, "handle": good["handle"] + (1 << 32)}
        unknown_tag = {**good, "handle": 999}
        idle_tag = {**good, "handle": (good["handle"] & ~0xFFFFFFFF) | ((good["handle"] + 1) & 31)}
        wrong_length = {**good, "length": write.length + 512}
        reserved = {**good, "__reserved": 1}
        positive = {**good, "result": 5}
        statuses = raw.put([stale, unknown_tag, idle_tag, wrong_length, reserved, positive])
        assert statuses == [-errno.ESTALE] * 3 + [-errno.EINVAL] * 3

        # Oversized batch: the whole call is refused, nothing is touched.
        raw.xfer.arg.nr_replies = uapi.ABUSE_MAX_BATCH + 1
        expect_errno(raw_errno(raw.control.fileno(), uapi.ABUSE_IOC_PUT, raw.xfer.arg), errno.E2BIG)

        assert raw.put([good]) == [0]
        assert raw.put([good]) == [-errno.ESTALE]  # completed exactly once
        direct_write_bg.join()
        assert direct_write_bg.error is None

        # Reads: a NULL or unmapped data address fails the entry, not the disk.
        reader = Background(lambda: direct_read(config.path, 0, 8192))
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        (read,) = raw.get()
        assert read.op == uapi.ABUSE_OP_READ
        raw.data(read)[:] = pattern(3, 8192)
        answer = raw.answer(read)
        assert raw.put([{**answer, "data": 0}]) == [-errno.EFAULT]
        assert raw.put([{**answer, "data": unmapped_address()}]) == [-errno.EFAULT]
        assert not reader.done
        assert raw.put([answer]) == [0]
        assert reader.join().result == pattern(3, 8192)

        counters = disks.control.info(config.index).counters
        assert counters["rejected"] == 9
        assert counters["errors"] == 0
    finally:
        raw.close()
    # The disk still works.
    disks.serve(config)
    direct_write(config.path, 1 * MiB, pattern(4, 4096))
    assert direct_read(config.path, 1 * MiB, 4096) == pattern(4, 4096)


def _config(**fields: int) -> Any:
    """A valid CREATE argument with ``fields`` changed."""
    cfg = ffi.new("struct abuse_config *", {"size": MiB, "block_size": 4096})
    for name, value in fields.items():
        setattr(cfg, name, value)
    return cfg


def _with_reserved(struct: str, slot: int, value: int, **fields: int) -> Any:
    arg = ffi.new(f"struct {struct} *", fields)
    arg.__reserved[slot] = value
    return arg


def _xfer(**fields: int) -> Any:
    return ffi.new("struct abuse_xfer *", {"flags": uapi.ABUSE_XFER_NOWAIT, **fields})


_TOP = {"buffer": 2**64 - 4096, "buffer_size": 2**64 - 1, "max_requests": 1}
# One error path per case: (attached first?, command, argument from the disk's index, errno).
BAD_CALLS: dict[str, tuple[bool, str, Callable[[int], Any], int]] = {
    "get-before-attach": (False, "GET", lambda i: ffi.new("struct abuse_xfer *"), errno.EBADFD),
    "unknown-command": (False, "", lambda i: ffi.NULL, errno.ENOTTY),
    "wrong-size": (False, "GET+size", lambda i: ffi.new("struct abuse_xfer *"), errno.ENOTTY),
    "info-null": (False, "INFO", lambda i: ffi.NULL, errno.EFAULT),
    "create-unmapped": (False, "CREATE", lambda i: ffi.cast("void *", unmapped_address()), errno.EFAULT),
    "create-block-size-1000": (False, "CREATE", lambda i: _config(block_size=1000), errno.EINVAL),
    "create-block-size-8192": (False, "CREATE", lambda i: _config(block_size=8192), errno.EINVAL),
    "create-size-0": (False, "CREATE", lambda i: _config(size=0), errno.EINVAL),
    "create-size-partial-block": (False, "CREATE", lambda i: _config(size=4097), errno.EINVAL),
    "create-unknown-flag": (False, "CREATE", lambda i: _config(flags=1 << 40), errno.EINVAL),
    "create-queue-depth": (False, "CREATE", lambda i: _config(queue_depth=5000), errno.EINVAL),
    "create-max-request": (False, "CREATE", lambda i: _config(max_request_bytes=100), errno.EINVAL),
    "create-timeout": (False, "CREATE", lambda i: _config(timeout_ms=1 << 31), errno.EINVAL),
    "create-retries": (False, "CREATE", lambda i: _config(retries=1 << 20), errno.EINVAL),
    "create-reserved": (
        False,
        "CREATE",
        lambda i: _with_reserved("abuse_config", 3, 1, size=MiB, block_size=4096),
        errno.EINVAL,
    ),
    "attach-missing-disk": (
        False,
        "ATTACH",
        lambda i: ffi.new("struct abuse_target *", {"index": 4242}),
        errno.ENODEV,
    ),
    "destroy-missing-disk": (
        False,
        "DESTROY",
        lambda i: ffi.new("struct abuse_target *", {"index": 4242}),
        errno.ENODEV,
    ),
    "reset-unknown-flag": (
        False,
        "RESET",
        lambda i: ffi.new("struct abuse_target *", {"index": i, "flags": 2}),
        errno.EINVAL,
    ),
    "attach-reserved": (
        False,
        "ATTACH",
        lambda i: _with_reserved("abuse_target", 1, 7, index=i),
        errno.EINVAL,
    ),
    "get-unknown-flag": (True, "GET", lambda i: _xfer(flags=uapi.ABUSE_XFER_ALL + 1), errno.EINVAL),
    "get-timeout-without-flag": (True, "GET", lambda i: _xfer(timeout_ms=1), errno.EINVAL),
    "get-nowait-and-timeout": (
        True,
        "GET",
        lambda i: _xfer(flags=uapi.ABUSE_XFER_NOWAIT | uapi.ABUSE_XFER_TIMEOUT),
        errno.EINVAL,
    ),
    "get-with-replies": (True, "GET", lambda i: _xfer(nr_replies=1), errno.EINVAL),
    "get-batch-too-big": (True, "GET", lambda i: _xfer(max_requests=uapi.ABUSE_MAX_BATCH + 1), errno.E2BIG),
    # A buffer that wraps past 2^64 would place payloads at low addresses
    # the caller never named (the fuzzer found this).
    "get-buffer-wraps": (True, "GET", lambda i: _xfer(**_TOP), errno.EINVAL),
    "get-buffer-ends-at-2^64": (True, "GET", lambda i: _xfer(**{**_TOP, "buffer_size": 4096}), errno.EINVAL),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_ioctl(disks: Disks, case: str) -> None:
    attached, command, make, want = BAD_CALLS[case]
    config = disks.create(16 * MiB)
    with Control() as ctl:
        if attached:
            ctl.attach(config.index)
        if command == "":
            number = 0xE4FF
        elif command == "GET+size":
            number = uapi.ABUSE_IOC_GET + (1 << 16)
        else:
            number = uapi.ioctls[f"ABUSE_IOC_{command}"]
        expect_errno(raw_errno(ctl.fileno(), number, make(config.index)), want)
    assert disks.control.info(config.index).config.size == 16 * MiB, "the disk is untouched"


def test_get_buffer_ending_below_2_64_is_accepted(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    with Control() as ctl:
        ctl.attach(config.index)
        expect_errno(raw_errno(ctl.fileno(), uapi.ABUSE_IOC_GET, _xfer(**{**_TOP, "buffer_size": 4095})), 0)


def test_second_attach_of_a_file_is_refused(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    with Control() as ctl:
        ctl.attach(config.index)
        with pytest.raises(DiskBusy):
            ctl.attach(config.index)


def test_resize_to_a_partial_block_is_refused(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    with pytest.raises(InvalidRequest):
        disks.control.resize(config.index, 12345)


def test_create_with_an_index(disks: Disks) -> None:
    """ABUSE_F_INDEX makes /dev/abuseN for the N asked; taken or too large is refused."""
    config = disks.create(16 * MiB, index=7)
    assert config.index == 7 and config.path == "/dev/abuse7"
    assert os.path.exists("/dev/abuse7")
    assert not disks.control.info(7).config.flags & uapi.ABUSE_F_INDEX  # how it was made, not what it is
    with pytest.raises(AbuseError) as taken:
        disks.create(16 * MiB, index=7)
    assert taken.value.errno == errno.EEXIST
    with pytest.raises(InvalidRequest):
        disks.create(16 * MiB, index=uapi.ABUSE_MAX_INDEX + 1)
    # Without the flag the index field is ignored: the lowest free N.
    cfg = ffi.new("struct abuse_config *", {"size": 16 * MiB, "block_size": 4096, "index": 7})
    expect_errno(raw_errno(disks.control.fileno(), uapi.ABUSE_IOC_CREATE, cfg), 0)
    disks.indexes.append(cfg.index)
    assert cfg.index != 7
    # Not a property a disk can be given later.
    current = disks.control.info(7).config
    cfg = ffi.new("struct abuse_config *", current.__dict__)
    cfg.flags |= uapi.ABUSE_F_INDEX
    expect_errno(raw_errno(disks.control.fileno(), uapi.ABUSE_IOC_SET_INFO, cfg), errno.EINVAL)


SET_INFO_CHANGES = [
    ("block_size", 512),
    ("queue_depth", 7),
    ("timeout_ms", 1),
    ("size", 0),
    ("__reserved", 1),
]


@pytest.mark.parametrize(("field", "value"), SET_INFO_CHANGES, ids=[f for f, _ in SET_INFO_CHANGES])
def test_set_info_changes_only_size_and_read_only(disks: Disks, field: str, value: int) -> None:
    config = disks.create(16 * MiB)
    current = disks.control.info(config.index).config
    cfg = ffi.new("struct abuse_config *", current.__dict__)
    if field == "__reserved":
        cfg.__reserved[0] = value
    else:
        setattr(cfg, field, value)
    expect_errno(raw_errno(disks.control.fileno(), uapi.ABUSE_IOC_SET_INFO, cfg), errno.EINVAL)
    assert disks.control.info(config.index).config == current


def test_get_faults_and_small_buffers_lose_nothing(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    writer = Background(lambda: direct_write(config.path, 0, pattern(5, 64 * KiB)))
    with Control() as ctl:
        ctl.attach(config.index)
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        fd = ctl.fileno()
        requests = ffi.new("struct abuse_request[]", 4)
        xfer = ffi.new(
            "struct abuse_xfer *",
            {
                "requests": int(ffi.cast("uintptr_t", requests)),
                "max_requests": 4,
                "flags": uapi.ABUSE_XFER_NOWAIT,
                "buffer": unmapped_address(),
                "buffer_size": MiB,
            },
        )
        expect_errno(raw_errno(fd, uapi.ABUSE_IOC_GET, xfer), errno.EFAULT)
        xfer.buffer_size = 4096  # smaller than the 64 KiB request
        expect_errno(raw_errno(fd, uapi.ABUSE_IOC_GET, xfer), errno.ENOBUFS)
        xfer.requests = 0
        xfer.buffer_size = MiB
        expect_errno(raw_errno(fd, uapi.ABUSE_IOC_GET, xfer), errno.EFAULT)
    assert disks.control.info(config.index).counters["queued"] == 1
    disks.serve(config)
    writer.join()
    assert writer.error is None
    assert direct_read(config.path, 0, 64 * KiB) == pattern(5, 64 * KiB)


def test_copies_cross_pinned_windows_at_any_alignment(disks: Disks) -> None:
    """The driver copies through the worker's pages, pinned 32 at a time.

    A 256 KiB request spans several windows; a buffer at an odd address
    splits every page.  Memory the copy cannot pin for its direction (a
    guard page, a read-only page for a write's payload, a kernel address)
    fails that call or entry with EFAULT, and the request is kept.
    """
    size = 256 * KiB
    config = disks.create(16 * MiB, max_request_bytes=size)
    raw = RawWorker(config.index, buffer_bytes=2 * size)
    arena = Arena(pages=2 * size // PAGE)
    try:
        writer = Background(lambda: direct_write(config.path, 0, pattern(11, size)))
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        ends_in_guard = arena.guard + PAGE - size
        for unpinnable in (ends_in_guard, arena.readonly):
            raw.xfer.use_buffer(unpinnable, size)
            with pytest.raises(OSError) as fault:
                raw.get()
            assert fault.value.errno == errno.EFAULT
            assert disks.control.info(config.index).counters["queued"] == 1
        raw.xfer.use_buffer(raw.base + 100, 2 * size - 100)
        (write,) = raw.get()
        assert (write.op, write.length, write.data) == (uapi.ABUSE_OP_WRITE, size, raw.base + 100)
        assert raw.buffer[100 : 100 + size] == pattern(11, size)
        assert raw.put([raw.answer(write)]) == [0]
        writer.join()
        assert writer.error is None

        reader = Background(lambda: direct_read(config.path, 0, size))
        (read,) = raw.get(wait=True, wait_ms=10_000)
        assert (read.op, read.length) == (uapi.ABUSE_OP_READ, size)
        answer = raw.answer(read)
        kernel_address = 0xFFFF_8880_0000_0000
        assert raw.put([{**answer, "data": ends_in_guard}]) == [-errno.EFAULT]
        assert raw.put([{**answer, "data": kernel_address}]) == [-errno.EFAULT]
        arena.write(arena.base + 100, pattern(12, size))
        assert raw.put([{**answer, "data": arena.base + 100}]) == [0]
        assert reader.join().result == pattern(12, size)

        # A read's data may come from read-only memory.
        reader = Background(lambda: direct_read(config.path, 0, PAGE))
        (read,) = raw.get(wait=True, wait_ms=10_000)
        source = arena.fill_readonly(pattern(13, PAGE))
        assert raw.put([{**raw.answer(read), "data": source}]) == [0]
        assert reader.join().result == pattern(13, PAGE)
    finally:
        raw.close()
        arena.close()
    counters = disks.control.info(config.index).counters
    assert counters["errors"] == 0 and counters["in_flight"] == counters["queued"] == 0


def test_an_xfer_that_cannot_be_written_back_answers_and_takes_nothing(disks: Disks) -> None:
    """A read-only struct abuse_xfer: -EFAULT before the PUT half answers or the GET half takes."""
    config = disks.create(16 * MiB)
    reader = Background(lambda: direct_read(config.path, 0, PAGE))
    writer = Background(lambda: direct_write(config.path, 8 * PAGE, pattern(14, PAGE)))
    raw = RawWorker(config.index)
    arena = Arena(1)
    try:
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 2)
        raw.xfer.limit = 1
        (held,) = raw.get()
        answer = raw.served(held, pattern(14, PAGE))
        raw.stage([answer])
        arg = raw.xfer.arg
        arg.nr_replies, arg.max_requests, arg.flags, arg.timeout_ms = 1, 1, uapi.ABUSE_XFER_NOWAIT, 0
        readonly = arena.fill_readonly(bytes(ffi.buffer(arg)))
        put = uapi.ioctls["ABUSE_IOC_PUT"]
        expect_errno(raw_errno(raw.control.fileno(), put, ffi.cast("void *", readonly)), errno.EFAULT)
        counters = disks.control.info(config.index).counters
        assert (counters["in_flight"], counters["queued"], counters["completed"]) == (1, 1, 0)
        # The same answer from writable memory: the request was still held, and the other still queued.
        assert raw.put([answer], fetch=True) == [0]
        (rest,) = raw.fetched
        assert raw.put([raw.served(rest, pattern(14, PAGE))]) == [0]
        assert reader.join().result == pattern(14, PAGE)
        assert writer.join().error is None
    finally:
        raw.close()
        arena.close()


def test_a_put_whose_replies_cannot_all_be_read_and_written_answers_nothing(disks: Disks) -> None:
    """-EFAULT before any answer: replies in a read-only page, or running into an unmapped one.

    The second array's first 16-entry chunk is whole, with the right
    answer first: a PUT that answered chunk by chunk would end the
    request there, then fail, and not say which it took.
    """
    config = disks.create(16 * MiB)
    writer = Background(lambda: direct_write(config.path, 0, pattern(16, PAGE)))
    raw = RawWorker(config.index)
    arena = Arena(1)
    put = uapi.ioctls["ABUSE_IOC_PUT"]
    entry_size = ffi.sizeof("struct abuse_reply")
    untouched = 0x5A5A5A5A  # every status before the call: unchanged by a refused PUT
    try:
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        (held,) = raw.get()
        assert held.op == uapi.ABUSE_OP_WRITE  # nothing to copy: only the array can refuse it
        replies = ffi.new("struct abuse_reply[17]")
        for i, entry in enumerate(replies):
            entry.handle = held.handle if i == 0 else (0x80000000 | i) << 32 | i
            entry.length = held.length
            entry.status = untouched
        blob = bytes(ffi.buffer(replies))
        readonly = arena.fill_readonly(blob[:entry_size])
        into_guard = arena.guard - 16 * entry_size  # entry 16 lies in the guard page
        arena.write(into_guard, blob[: 16 * entry_size])
        arg = raw.xfer.arg
        for address, count in ((readonly, 1), (into_guard, 17)):
            arg.replies, arg.nr_replies, arg.max_requests = address, count, 0
            arg.flags, arg.timeout_ms = uapi.ABUSE_XFER_NOWAIT, 0
            expect_errno(raw_errno(raw.control.fileno(), put, arg), errno.EFAULT)
            counters = disks.control.info(config.index).counters
            assert (counters["in_flight"], counters["completed"], counters["rejected"]) == (1, 0, 0)
        statuses = memoryview(arena.read(into_guard, 16 * entry_size)).cast("i")[6::8]
        assert list(statuses) == [untouched] * 16
        # Still held by this file: the same answer from a whole array is taken.
        arg.replies = int(ffi.cast("uintptr_t", raw.xfer.replies))
        assert raw.put([raw.answer(held)]) == [0]
        assert writer.join().error is None
    finally:
        raw.close()
        arena.close()


def _asleep_in_get(task: Background) -> bool:
    return asleep_in_driver(f"/proc/self/task/{task.tid}")


def test_the_worker_that_slept_last_takes_the_next_request(disks: Disks) -> None:
    """GET sleepers are woken one per request, LIFO: the warm worker first."""
    config = disks.create(16 * MiB)
    first, last = RawWorker(config.index), RawWorker(config.index)
    try:
        first_get = Background(lambda: first.get(wait=True, wait_ms=60_000))
        wait_for(lambda: _asleep_in_get(first_get))
        last_get = Background(lambda: last.get(wait=True, wait_ms=60_000))
        wait_for(lambda: _asleep_in_get(last_get))

        writer = Background(lambda: direct_write(config.path, 0, pattern(14, 4096)))
        (write,) = last_get.join().result
        assert not first_get.done  # still asleep: one wake-up per request
        assert last.put([last.answer(write)]) == [0]
        writer.join()
        assert writer.error is None

        writer = Background(lambda: direct_write(config.path, 4096, pattern(15, 4096)))
        (write,) = first_get.join().result
        assert write.offset == 4096
        assert first.put([first.answer(write)]) == [0]
        writer.join()
        assert writer.error is None
    finally:
        first.close()
        last.close()


def test_timeout_fails_with_eio_when_no_worker(disks: Disks) -> None:
    config = disks.create(16 * MiB, timeout_ms=2000, retries=1)
    started = time.monotonic()
    writer = Background(lambda: direct_write(config.path, 0, pattern(6, 4096))).join(30)
    elapsed = time.monotonic() - started
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.EIO
    assert elapsed < 20, f"took {elapsed:.1f}s"
    counters = disks.control.info(config.index).counters
    assert counters["timeouts"] == 2 and counters["errors"] == 1
    assert counters["queued"] == counters["in_flight"] == 0


def test_timeout_zero_waits_for_a_worker(disks: Disks) -> None:
    config = disks.create(16 * MiB, timeout_ms=0)
    writer = Background(lambda: direct_write(config.path, 0, pattern(7, 4096)))
    time.sleep(4)
    assert not writer.done
    disks.serve(config)
    writer.join()
    assert writer.error is None
    assert direct_read(config.path, 0, 4096) == pattern(7, 4096)


def test_in_flight_timeout_moves_request_to_another_worker(disks: Disks) -> None:
    config = disks.create(16 * MiB, timeout_ms=1000, retries=3)
    writer = Background(lambda: direct_write(config.path, 0, pattern(8, 4096)))
    hung = RawWorker(config.index)
    try:
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        (request,) = hung.get()
        wait_for(lambda: disks.control.info(config.index).counters["requeued"] >= 1)
        disks.serve(config)
        writer.join()
        assert writer.error is None
        assert hung.put([hung.answer(request)]) == [-errno.ESTALE]
    finally:
        hung.close()


def test_reset_requeues_with_new_generation(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    writer = Background(lambda: direct_write(config.path, 0, pattern(9, 4096)))
    old, new = RawWorker(config.index), RawWorker(config.index)
    try:
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        (before,) = old.get()
        disks.control.reset(config.index)
        (after,) = new.get()
        assert after.handle != before.handle
        assert bytes(new.data(after)) == pattern(9, 4096)
        assert old.put([old.answer(before)]) == [-errno.ESTALE]
        assert new.put([new.answer(after)]) == [0]
        writer.join()
        assert writer.error is None
    finally:
        old.close()
        new.close()


def test_only_the_file_that_took_a_request_answers_it(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    reader = Background(lambda: direct_read(config.path, 0, 4096))
    writer = Background(lambda: direct_write(config.path, 8192, pattern(5, 4096)))
    holder, other = RawWorker(config.index), RawWorker(config.index)
    try:
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 2)
        taken = holder.get()
        assert sorted(r.op for r in taken) == sorted([uapi.ABUSE_OP_READ, uapi.ABUSE_OP_WRITE])
        answers = [holder.served(r, pattern(4, 4096)) for r in taken]
        # A live handle answered from another file ends nothing, and a
        # read whose data faults there does not make that file its holder.
        assert other.put(answers) == [-errno.ESTALE] * 2
        assert other.put([{**a, "data": 0} for a in answers]) == [-errno.ESTALE] * 2
        other.close()  # closing it gives back nothing it did not take
        counters = disks.control.info(config.index).counters
        assert (counters["requeued"], counters["in_flight"]) == (0, 2)
        assert holder.put(answers) == [0, 0]
        assert reader.join().result == pattern(4, 4096)
        assert writer.join().error is None
    finally:
        holder.close()


def test_fdinfo_and_debugfs_say_who_holds_which_request(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    name = os.path.basename(config.path)
    reader = Background(lambda: direct_read(config.path, 0, 4096))
    writer = Background(lambda: direct_write(config.path, 8192, pattern(6, 4096)))
    holder, idle = RawWorker(config.index), RawWorker(config.index)
    try:
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 2)
        holder.xfer.limit = 1
        (taken,) = holder.get()
        mine, theirs = fdinfo(holder.control.fileno()), fdinfo(idle.control.fileno())
        assert mine["abuse-disk"] == theirs["abuse-disk"] == config.index
        assert mine["abuse-worker"] != theirs["abuse-worker"]
        assert (mine["abuse-held"], theirs["abuse-held"], mine["abuse-fenced"]) == (1, 0, 0)
        by_state = {r["abuse_state"]: r for r in busy_requests(name)}
        assert sorted(by_state) == ["held", "queued"], by_state
        held, queued = by_state["held"], by_state["queued"]
        assert int(held["abuse_handle"], 16) == taken.handle
        assert int(held["tag"]) == taken.handle & 0xFFFFFFFF
        assert int(held["abuse_holder"]) == mine["abuse-worker"]
        assert int(held["abuse_holder_pid"]) == os.getpid()
        assert "abuse_holder" not in queued
        assert holder.put([holder.served(taken, pattern(6, 4096))]) == [0]
        (rest,) = holder.get()
        assert holder.put([holder.served(rest, pattern(6, 4096))]) == [0]
        assert reader.join().result == pattern(6, 4096)
        assert writer.join().error is None
        assert busy_requests(name) == [] and fdinfo(holder.control.fileno())["abuse-held"] == 0
    finally:
        holder.close()
        idle.close()


def _flush_device(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)  # an empty PREFLUSH: blk-mq's flush request carries it
    finally:
        os.close(fd)


@pytest.mark.parametrize("scheduler", ["none", "mq-deadline"])
def test_a_handle_names_one_request_even_when_a_tag_carries_many(disks: Disks, scheduler: str) -> None:
    # One tag carries several requests in turn, each with its own driver
    # data: blk-mq's flush request borrows the tag of the request it
    # flushes for, and a scheduler hands its own requests a tag as they
    # go.  A stale handle must never name the next request on its tag.
    config = disks.create(16 * MiB, queue_depth=1, flags=uapi.ABUSE_F_FLUSH)
    path = f"/sys/block/{os.path.basename(config.path)}/queue/scheduler"
    with open(path, "w") as f:
        f.write(scheduler)
    with open(path) as f:
        assert f"[{scheduler}]" in f.read()
    raw = RawWorker(config.index)
    handles: list[int] = []
    try:
        for i in range(8):
            flushing = i % 2 == 1
            io = Background(
                partial(_flush_device, config.path)
                if flushing
                else partial(direct_write, config.path, i * 4096, pattern(20 + i, 4096))
            )
            wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
            (request,) = raw.get()
            assert request.op == (uapi.ABUSE_OP_FLUSH if flushing else uapi.ABUSE_OP_WRITE)
            for handle in handles:  # late answers to the earlier ones
                assert raw.put([{**raw.answer(request), "handle": handle}]) == [-errno.ESTALE]
            handles.append(request.handle)
            assert raw.put([raw.answer(request)]) == [0]
            assert io.join().error is None
    finally:
        raw.close()
    assert len(set(handles)) == len(handles)


def test_reset_fail_ends_queued_and_in_flight_with_eio(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    raw = RawWorker(config.index)
    try:
        first = Background(lambda: direct_write(config.path, 0, pattern(1, 4096)))
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        (held,) = raw.get()
        second = Background(lambda: direct_write(config.path, 8192, pattern(2, 4096)))
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        disks.control.reset(config.index, fail=True)
        for w in (first, second):
            w.join()
            assert isinstance(w.error, OSError) and w.error.errno == errno.EIO
        assert raw.put([raw.answer(held)]) == [-errno.ESTALE]
    finally:
        raw.close()
    disks.serve(config)
    direct_write(config.path, 0, pattern(3, 4096))
    assert direct_read(config.path, 0, 4096) == pattern(3, 4096)


def test_partitions(disks: Disks) -> None:
    config = disks.create(64 * MiB)
    disks.serve(config)
    run("sfdisk", "--quiet", config.path, input="label: dos\n,16M\n,16M\n")
    parts = [f"{config.path}p1", f"{config.path}p2"]
    wait_for(lambda: all(os.path.exists(p) for p in parts))
    direct_write(parts[0], 0, pattern(21, 64 * KiB))
    direct_write(parts[1], 0, pattern(22, 64 * KiB))
    assert direct_read(parts[0], 0, 64 * KiB) == pattern(21, 64 * KiB)
    assert direct_read(parts[1], 0, 64 * KiB) == pattern(22, 64 * KiB)
    with open(f"/sys/block/{config.name}/{config.name}p2/start") as f:
        start = int(f.read()) * 512
    assert direct_read(config.path, start, 64 * KiB) == pattern(22, 64 * KiB)


def test_mapped_get_stores_writes_in_place_and_points_reads_there(disks: Disks) -> None:
    """ABUSE_XFER_MAPPED: the buffer is the disk; data sits at its own offset."""
    config = disks.create(16 * MiB)
    raw = RawWorker(config.index, buffer_bytes=config.size)
    try:
        raw.xfer.use_buffer(raw.base, config.size - 4096, mapped=True)
        raw.xfer.arg.flags = uapi.ABUSE_XFER_NOWAIT | uapi.ABUSE_XFER_MAPPED  # never blocks
        expect_errno(raw_errno(raw.control.fileno(), uapi.ABUSE_IOC_GET, raw.xfer.arg), errno.EINVAL)
        with pytest.raises(OSError) as refused:
            raw.get()  # the same through Xfer, which sets the flag itself
        assert refused.value.errno == errno.EINVAL
        raw.xfer.use_buffer(raw.base, config.size, mapped=True)
        payload = pattern(50, 8192)
        writer = Background(lambda: direct_write(config.path, 5 * MiB, payload))
        (write,) = _take(raw)
        assert (write.op, write.offset, write.data) == (uapi.ABUSE_OP_WRITE, 5 * MiB, raw.base + 5 * MiB)
        assert bytes(raw.buffer[5 * MiB : 5 * MiB + 8192]) == payload  # stored before the PUT
        assert raw.put([raw.answer(write)]) == [0]
        writer.join()
        assert writer.error is None
        raw.buffer[MiB : MiB + 4096] = pattern(51, 4096)
        reader = Background(lambda: direct_read(config.path, MiB, 4096))
        (read,) = _take(raw)
        assert (read.op, read.data) == (uapi.ABUSE_OP_READ, raw.base + MiB)
        assert raw.put([raw.answer(read)]) == [0]
        reader.join()
        assert reader.result == pattern(51, 4096)
    finally:
        raw.close()


def _take(raw: RawWorker) -> list[Request]:
    got: list[Request] = []
    wait_for(lambda: bool(got.extend(raw.get()) or got))
    return got


def test_resize_while_open(disks: Disks) -> None:
    config = disks.create(64 * MiB)
    served = disks.serve(config)
    assert served.worker.in_place
    fd = os.open(config.path, os.O_RDONLY)
    try:
        disks.control.resize(config.index, 128 * MiB)
        with open(f"/sys/block/{config.name}/size") as f:
            assert int(f.read()) * 512 == 128 * MiB
        assert os.lseek(fd, 0, os.SEEK_END) == 128 * MiB
        assert disks.control.info(config.index).config.size == 128 * MiB
    finally:
        os.close(fd)
    direct_write(config.path, 100 * MiB, pattern(30, 4096))
    assert direct_read(config.path, 100 * MiB, 4096) == pattern(30, 4096)
    # The disk outgrew the memory backend's mapping: served by copy now.
    assert not served.worker.in_place
    direct_write(config.path, 4096, pattern(31, 4096))
    assert direct_read(config.path, 4096, 4096) == pattern(31, 4096)


def test_destroy_open_disk_is_busy_and_force_fails_io(disks: Disks) -> None:
    config = disks.create(16 * MiB)
    fd = os.open(config.path, os.O_RDONLY)
    try:
        with pytest.raises(DiskBusy):
            disks.control.destroy(config.index)
    finally:
        os.close(fd)
    writer = Background(lambda: direct_write(config.path, 0, pattern(40, 4096)))
    raw = RawWorker(config.index)
    try:
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        (held,) = raw.get()
        queued = Background(lambda: direct_write(config.path, 8192, pattern(41, 4096)))
        wait_for(lambda: disks.control.info(config.index).counters["queued"] == 1)
        disks.control.destroy(config.index, force=True)
        for w in (writer, queued):
            w.join()
            assert isinstance(w.error, OSError) and w.error.errno == errno.EIO
        assert not os.path.exists(config.path)
        expect_errno(raw_errno(raw.control.fileno(), uapi.ABUSE_IOC_GET, raw.xfer.arg), errno.ENODEV)
        poller = select.poll()
        poller.register(raw.control.fileno(), select.POLLIN)
        assert poller.poll(0)[0][1] & select.POLLHUP
        del held
    finally:
        raw.close()


def test_unload_refused_while_disks_exist(request: pytest.FixtureRequest) -> None:
    ko = os.environ.get("ABUSE_KO")
    if not ko:
        if request.config.getoption("--require-kernel"):
            pytest.fail("ABUSE_KO not set: cannot reload the module")
        pytest.skip("ABUSE_KO not set: the runner did not load the module")
    with Control() as ctl:
        index = ctl.create(16 * MiB).index
    rmmod = subprocess.run(["rmmod", "abuse"], capture_output=True, text=True)
    assert rmmod.returncode != 0 and "in use" in rmmod.stderr
    with Control() as ctl:
        ctl.destroy(index)
    run("rmmod", "abuse")
    assert not os.path.exists("/dev/abuse")
    run("insmod", ko)
    wait_for(lambda: os.path.exists("/dev/abuse"))
