"""The worker's batch loop against a fake transfer: no kernel, no ioctl.

Requests are written into the Worker's own descriptor array, as GET
would leave them, ``_run_batch`` runs them against a recording backend,
and the replies are read back from the reply array PUT would send.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from abuse import DiskConfig, DiskInfo, ModuleFeatures, Worker, uapi
from abuse.backends.base import Backend, overlaps
from abuse.control import COUNTER_FIELDS

SIZE = 1 << 20
READ, WRITE, FLUSH = uapi.ABUSE_OP_READ, uapi.ABUSE_OP_WRITE, uapi.ABUSE_OP_FLUSH
DISCARD, WRITE_ZEROES, FUA = uapi.ABUSE_OP_DISCARD, uapi.ABUSE_OP_WRITE_ZEROES, uapi.ABUSE_REQ_FUA


class FakeControl:
    """Just what Worker() asks of a Control before any GET."""

    def __init__(self, xfer_features: int = uapi.ABUSE_XFER_ALL) -> None:
        self._r, self._w = os.pipe()
        self.attached: list[int] = []
        self.module = ModuleFeatures(uapi.ABUSE_VERSION, 1024, uapi.ABUSE_F_ALL, xfer_features)

    def info(self, index: int) -> DiskInfo:
        config = DiskConfig(index, 4096, SIZE, uapi.ABUSE_F_FLUSH, 128, 1 << 20, 30000, 3)
        return DiskInfo(config, dict.fromkeys(COUNTER_FIELDS, 0))

    def attach(self, index: int) -> None:
        self.attached.append(index)

    def fileno(self) -> int:
        return self._r

    def features(self) -> ModuleFeatures:
        return self.module

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


class Recorder(Backend):
    """Stores in a bytearray and records every call; ``fail`` maps a method to what it raises."""

    def __init__(self) -> None:
        self.size = SIZE
        self.data = bytearray(SIZE)
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, BaseException] = {}

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] in self.fail:
            # A fresh exception each time: a reused one would keep its
            # last traceback, and with it the buffer views of that frame.
            model = self.fail[call[0]]
            raise type(model)(*model.args)

    def read(self, offset: int, buf: memoryview) -> None:
        self._call("read", offset, len(buf))
        buf[:] = self.data[offset : offset + len(buf)]

    def write(self, offset: int, data: memoryview) -> None:
        self._call("write", offset, bytes(data))
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self._call("flush")

    def discard(self, offset: int, length: int) -> None:
        self._call("discard", offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._call("write_zeroes", offset, length)


class Mapped(Recorder):
    """A whole-disk mapping, as ``memory`` has: served in place."""

    def __init__(self) -> None:
        super().__init__()
        self.map = mmap.mmap(-1, SIZE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def mapping(self) -> tuple[int, int] | None:
        return self.address, SIZE


@pytest.fixture(autouse=True)
def no_log_records() -> Iterator[None]:
    """pytest keeps log records, whose exc_info holds the frames' buffer views."""
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture
def control() -> Iterator[FakeControl]:
    ctl = FakeControl()
    yield ctl
    ctl.close()


def make(control: FakeControl, backend: Backend) -> Worker:
    return Worker(control, 3, backend, batch=8)  # type: ignore[arg-type]


def batch(worker: Worker, *requests: tuple[int, int, int, int]) -> list[tuple[int, int, int, int]]:
    """Run (op, flags, offset, length) requests; their (handle, data, length, result) replies.

    Each request's data sits at a 4 KiB slot of the worker's buffer, as
    GET places it; request i has handle 100 + i.
    """
    xfer = worker._xfer
    base = worker._base
    for i, (op, flags, offset, length) in enumerate(requests):
        req = xfer.requests[i]
        req.handle, req.op, req.flags, req.offset, req.length = 100 + i, op, flags, offset, length
        req.data = base + i * 4096 if op in (READ, WRITE) else 0
    assert worker._run_batch(len(requests)) == len(requests)
    return [
        (int(r.handle), int(r.data), int(r.length), int(r.result))
        for r in list(xfer.replies)[: len(requests)]
    ]


def put_payload(worker: Worker, slot: int, payload: bytes) -> None:
    worker._view[slot * 4096 : slot * 4096 + len(payload)] = payload


def test_read_and_write_by_copy(control: FakeControl) -> None:
    backend = Recorder()
    backend.data[8192:12288] = b"r" * 4096
    worker = make(control, backend)
    try:
        assert control.attached == [3] and not worker.in_place
        put_payload(worker, 1, b"w" * 4096)
        replies = batch(worker, (READ, 0, 8192, 4096), (WRITE, 0, 0, 4096))
        assert replies == [(100, worker._base, 4096, 0), (101, worker._base + 4096, 4096, 0)]
        assert bytes(worker._view[:4096]) == b"r" * 4096
        assert backend.calls == [("read", 8192, 4096), ("write", 0, b"w" * 4096)]
    finally:
        worker.close()


def test_fua_write_is_a_write_then_a_flush(control: FakeControl) -> None:
    backend = Recorder()
    worker = make(control, backend)
    try:
        put_payload(worker, 0, b"x" * 4096)
        assert batch(worker, (WRITE, FUA, 4096, 4096))[0][3] == 0
        assert backend.calls == [("write", 4096, b"x" * 4096), ("flush",)]
        backend.calls.clear()
        backend.fail["flush"] = OSError(errno.ENOSPC, "full")
        assert batch(worker, (WRITE, FUA, 4096, 4096))[0][3] == -errno.ENOSPC
        backend.calls.clear()
        backend.fail = {"write": OSError(errno.EIO, "bad")}
        assert batch(worker, (WRITE, FUA, 4096, 4096))[0][3] == -errno.EIO
        assert backend.calls == [("write", 4096, b"x" * 4096)], "no flush after a failed write"
    finally:
        worker.close()


def test_flush_discard_write_zeroes_dispatch(control: FakeControl) -> None:
    backend = Recorder()
    worker = make(control, backend)
    try:
        replies = batch(worker, (FLUSH, 0, 0, 0), (DISCARD, 0, 4096, 8192), (WRITE_ZEROES, 0, 0, 4096))
        assert [reply[3] for reply in replies] == [0, 0, 0]
        assert backend.calls == [("flush",), ("discard", 4096, 8192), ("write_zeroes", 0, 4096)]
        assert batch(worker, (99, 0, 0, 4096))[0][3] == -errno.EOPNOTSUPP
    finally:
        worker.close()


@pytest.mark.parametrize(
    ("raised", "result"),
    [
        (OSError(errno.EROFS, "read-only"), -errno.EROFS),
        (OSError("no errno"), -errno.EIO),
        (RuntimeError("a bug"), -errno.EIO),
        (ValueError("bad"), -errno.EIO),
    ],
)
@pytest.mark.parametrize("method", ["read", "write", "flush", "discard", "write_zeroes"])
def test_failures_become_negative_errnos(
    control: FakeControl, raised: BaseException, result: int, method: str
) -> None:
    backend = Recorder()
    backend.fail[method] = raised
    worker = make(control, backend)
    op = {"read": READ, "write": WRITE, "flush": FLUSH, "discard": DISCARD, "write_zeroes": WRITE_ZEROES}[
        method
    ]
    try:
        assert batch(worker, (op, 0, 0, 4096), (READ, 0, 0, 4096))[0][3] == result
        if method != "read":
            assert batch(worker, (READ, 0, 0, 4096))[0][3] == 0, "one failure does not spill to the next"
    finally:
        worker.close()


def test_in_place_answers_without_reading_or_writing(control: FakeControl) -> None:
    backend = Mapped()
    worker = make(control, backend)
    try:
        assert worker.in_place
        at = backend.address + 8192
        xfer = worker._xfer
        for i, (op, flags) in enumerate([(READ, 0), (WRITE, FUA), (WRITE, 0)]):
            req = xfer.requests[i]
            req.handle, req.op, req.flags, req.offset, req.length, req.data = (
                100 + i,
                op,
                flags,
                8192,
                4096,
                at,
            )
        worker._run_batch(3)
        assert [(int(r.data), int(r.result)) for r in list(xfer.replies)[:3]] == [(at, 0)] * 3
        assert backend.calls == [("flush",)], "in place: only the FUA write's flush calls the backend"
    finally:
        worker.close()
        backend.map.close()


def assert_writes_by_copy(worker: Worker, backend: Recorder) -> None:
    """A write goes to the backend's ``write``, from the worker's buffer."""
    assert not worker.in_place
    put_payload(worker, 0, b"c" * 4096)
    batch(worker, (WRITE, 0, 0, 4096))
    assert backend.calls == [("write", 0, b"c" * 4096)]


def test_without_mapped_in_the_module_a_mapped_backend_is_served_by_copy() -> None:
    control = FakeControl(xfer_features=uapi.V1_XFER_FEATURES)
    backend = Mapped()
    worker = make(control, backend)
    try:
        assert_writes_by_copy(worker, backend)
    finally:
        worker.close()
        backend.map.close()
        control.close()


class Addressed(Mapped):
    """Reads by address (``mapped_address``), as ``file:`` served by copy does; writes by copy."""

    def mapping(self) -> tuple[int, int] | None:
        return None

    def mapped_address(self, offset: int, length: int) -> int:
        self._call("mapped_address", offset, length)
        return self.address + offset


def test_reads_ask_for_an_address_only_a_backend_that_has_one(
    control: FakeControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    addressed, plain = Addressed(), Recorder()
    with_address, without = make(control, addressed), make(control, plain)
    try:
        # The default mapped_address (always 0) is not even called.
        monkeypatch.setattr(Backend, "mapped_address", lambda *args: pytest.fail("asked for an address"))
        assert batch(with_address, (READ, 0, 4096, 4096)) == [(100, addressed.address + 4096, 4096, 0)]
        assert addressed.calls == [("mapped_address", 4096, 4096)]
        assert batch(without, (READ, 0, 4096, 4096)) == [(100, without._base, 4096, 0)]
        assert plain.calls == [("read", 4096, 4096)]
    finally:
        with_address.close()
        without.close()
        addressed.map.close()


def test_serving_by_copy_after_in_place_leaves_the_plain_path(control: FakeControl) -> None:
    backend = Mapped()
    worker = make(control, backend)
    try:
        assert worker.in_place and worker._plain
        worker._serve_by_copy()
        assert not worker._plain
        assert_writes_by_copy(worker, backend)
    finally:
        worker.close()
        backend.map.close()


class Null(Backend):
    """Stores nothing: what is left to measure is the worker's own loop."""

    def __init__(self) -> None:
        self.size = SIZE

    def read(self, offset: int, buf: memoryview) -> None:
        pass

    def write(self, offset: int, data: memoryview) -> None:
        pass

    def flush(self) -> None:
        pass


def test_in_place_plain_batch_is_answered_by_columns(control: FakeControl) -> None:
    """Plain reads and writes served in place: every reply field as the loop writes it."""
    backend = Mapped()
    worker = make(control, backend)
    try:
        xfer = worker._xfer
        for reply in list(xfer.replies):  # what a previous batch may have left
            reply.handle, reply.data, reply.length, reply.result, reply.status = 1, 2, 3, -5, -6
            reply.__reserved = 7
        plain = [(READ, 0, 4096, 4096), (WRITE, 0, 0, 8192), (READ, 0, 12288, 512)]
        replies = batch(worker, *plain)
        expected = [(100 + i, worker._base + i * 4096, size, 0) for i, (_, _, _, size) in enumerate(plain)]
        assert replies == expected
        for reply in list(xfer.replies)[: len(plain)]:
            assert (int(reply.status), int(reply.__reserved)) == (0, 0)
        assert backend.calls == []
        assert worker._answer_plain(len(plain)), "a plain batch is answered by columns"
        # Anything else (here a FUA write) takes the loop, which calls the backend for it.
        batch(worker, (READ, 0, 0, 4096), (WRITE, FUA, 0, 4096))
        assert backend.calls == [("flush",)]
    finally:
        worker.close()
        backend.map.close()


def test_serve_answers_plain_batches_by_columns_and_grows_them(control: FakeControl) -> None:
    """serve(): plain batches in place are answered by columns, untimed, and the batch limit grows."""
    backend = Mapped()
    worker = make(control, backend)
    xfer = worker._xfer
    calls: list[int] = []

    def exchange(nr_replies: int, wait: bool, fetch: bool = True, wait_ms: int | None = None) -> int:
        calls.append(nr_replies)
        if len(calls) > 60:
            raise OSError(errno.ENODEV, "destroyed")
        for i in range(xfer.limit):
            req = xfer.requests[i]
            req.handle, req.op, req.flags, req.offset, req.length = 100 + i, READ, 0, 4096 * i, 4096
            req.data = worker._base + 4096 * i
        xfer.arg.nr_accepted = nr_replies
        return xfer.limit

    try:
        xfer.exchange = exchange  # type: ignore[method-assign]
        worker.serve()
        # Each call answers the batch the one before got: one request at first, then --batch.
        assert calls[:3] == [0, 1, 8] and calls == sorted(calls)
        assert xfer.limit == 8 and calls[-1] == 8 and worker.served == sum(calls[:-1])
        replies = [(int(r.handle), int(r.data), int(r.length), int(r.result)) for r in list(xfer.replies)]
        assert replies == [(100 + i, worker._base + 4096 * i, 4096, 0) for i in range(8)]
        assert backend.calls == []
    finally:
        worker.close()
        backend.map.close()


def test_hot_path_keeps_nothing_and_copies_no_data(control: FakeControl) -> None:
    """Batches of 64 KiB requests: no buffer per request, nothing kept.

    The data moves through views of the one GET buffer, so the loop's
    peak memory stays far below one request's data, and after thousands
    of requests nothing more is allocated than after the first batch.
    """
    import tracemalloc

    worker = Worker(control, 3, Null(), batch=8)  # type: ignore[arg-type]
    length = 64 << 10
    requests = [(READ if i % 2 else WRITE, 0, i * length, length) for i in range(8)]
    xfer, base = worker._xfer, worker._base
    for i, (op, flags, offset, size) in enumerate(requests):
        req = xfer.requests[i]
        req.handle, req.op, req.flags, req.offset, req.length = 100 + i, op, flags, offset, size
        req.data = base + i * length
    try:
        worker._run_batch(8)  # warm: first-use caches, lazily bound methods
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            for _ in range(500):
                assert worker._run_batch(8) == 8
            after, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - before < length // 4, f"peak grew by {peak - before} bytes over 4000 requests"
        assert after - before < 1024, f"{after - before} bytes kept after 4000 requests"
    finally:
        worker.close()


# --- overlapped backends (start_read/start_write) --------------------------------


class Overlapped(Recorder):
    """Starts reads and writes and finishes them only when the worker waits.

    ``calls`` records each start and each finish in order; a read's data
    lands at its finish, as librbd's aio_read delivers it.
    """

    queue_depth = 4

    def start_read(self, offset: int, buf: memoryview) -> Callable[[], None]:
        self._call("start_read", offset, len(buf))

        def finish() -> None:
            self._call("finish_read", offset)
            buf[:] = self.data[offset : offset + len(buf)]

        return finish

    def start_write(self, offset: int, data: memoryview) -> Callable[[], None]:
        self._call("start_write", offset, bytes(data))

        def finish() -> None:
            self._call("finish_write", offset)
            self.data[offset : offset + len(data)] = data

        return finish


def test_a_new_worker_takes_one_request_until_it_measured_its_backend(control: FakeControl) -> None:
    """A slow backend's first GET must not take a burst that idle workers could start."""
    worker = make(control, Recorder())
    try:
        assert worker._xfer.limit == 1
        worker._adapt_batch(1, 0)  # a request that took less than a clock tick
        assert worker._xfer.limit == 8, "a fast backend goes to --batch at once"
        for _ in range(100):
            worker._adapt_batch(1, 5_000_000)  # 5 ms per request
        assert worker._xfer.limit == 1
        slow = make(control, Recorder())
        slow._adapt_batch(1, 5_000_000)
        assert slow._xfer.limit == 1, "one slow request is enough to stay at one"
        slow.close()
    finally:
        worker.close()


def test_overlaps_needs_both_start_methods() -> None:
    class ReadsOnly(Recorder):
        def start_read(self, offset: int, buf: memoryview) -> Callable[[], None]:
            return super().start_read(offset, buf)

    assert overlaps(Overlapped()) and not overlaps(Recorder()) and not overlaps(ReadsOnly())


def test_overlapped_batch_starts_every_read_and_write_before_waiting(control: FakeControl) -> None:
    backend = Overlapped()
    backend.data[8192:12288] = b"r" * 4096
    worker = make(control, backend)
    try:
        put_payload(worker, 1, b"w" * 4096)
        replies = batch(worker, (READ, 0, 8192, 4096), (WRITE, 0, 0, 4096), (READ, 0, 16384, 4096))
        assert [reply[3] for reply in replies] == [0, 0, 0]
        assert [call[0] for call in backend.calls] == [
            "start_read", "start_write", "start_read", "finish_read", "finish_write", "finish_read",
        ]  # fmt: skip
        assert bytes(worker._view[:4096]) == b"r" * 4096 and backend.data[:4096] == b"w" * 4096
        assert worker._xfer.limit == 4, "the backend's queue_depth, not a time budget, bounds the batch"
        assert worker._xfer.arg.buffer_size == 2 << 20, "queue_bytes bounds the payload in flight"
    finally:
        worker.close()


def test_overlapped_flush_and_fua_wait_for_what_was_started_before(control: FakeControl) -> None:
    backend = Overlapped()
    worker = make(control, backend)
    try:
        put_payload(worker, 0, b"a" * 4096)
        put_payload(worker, 2, b"b" * 4096)
        replies = batch(
            worker, (WRITE, 0, 0, 4096), (FLUSH, 0, 0, 0), (WRITE, FUA, 8192, 4096), (DISCARD, 0, 0, 4096)
        )
        assert [reply[3] for reply in replies] == [0, 0, 0, 0]
        assert [call[0] for call in backend.calls] == [
            "start_write", "finish_write", "flush",
            "start_write", "finish_write", "flush",
            "discard",
        ]  # fmt: skip
    finally:
        worker.close()


@pytest.mark.parametrize("where", ["start_write", "finish_write", "start_read", "finish_read"])
def test_overlapped_failures_answer_only_their_request(control: FakeControl, where: str) -> None:
    backend = Overlapped()
    backend.fail[where] = OSError(errno.EROFS, "read-only")
    worker = make(control, backend)
    try:
        op = WRITE if where.endswith("write") else READ
        replies = batch(worker, (READ if op == WRITE else WRITE, 0, 0, 4096), (op, FUA, 4096, 4096))
        assert [reply[3] for reply in replies] == [0, -errno.EROFS]
        assert ("flush",) not in backend.calls or op == READ, "no flush after a failed write"
    finally:
        worker.close()


def test_tokens_or_in_place_take_the_plain_path(control: FakeControl) -> None:
    class MappedOverlapped(Overlapped, Mapped):
        pass

    class TokensOverlapped(Overlapped):
        wants_tokens = True

    backend = MappedOverlapped()
    worker = make(control, backend)
    try:
        assert worker.in_place and not worker._overlapped
    finally:
        worker.close()
        backend.map.close()
    worker = make(control, TokensOverlapped())
    try:
        assert worker._tokens is not None and not worker._overlapped
    finally:
        worker.close()
