"""The worker loop: GET a batch, run it against a backend, PUT it back.

One worker is one attached Control, one preallocated buffer and one
thread.  Each system call both answers the previous batch and fetches
the next (PUT carrying GET); when nothing is queued the worker sleeps
inside that same call, woken by the kernel for the next request (one
worker per request, the one that slept last first), or after ``idle_ms``
to look at ``should_stop``.
So a busy worker makes one system call per batch and an idle one none.

The hot path allocates no cffi objects: the batch's descriptors are
read with one ``struct.iter_unpack`` over the request array and each
reply is written with ``struct.pack_into``, in layouts derived from the
header by :func:`abuse.uapi.struct_format`.  Data is served through
memoryviews into the buffer, so the only copies are the kernel's own and
the backend's.  A backend that keeps the whole disk mapped (``memory``)
is served in place instead (ABUSE_XFER_MAPPED): the kernel copies each
write into the mapping at GET and each read out of it at PUT, and the
worker only answers; if the disk outgrows the mapping, it goes back to
the buffer.

How many requests a worker takes at once adapts to its backend: a
batch should take about ``BATCH_BUDGET_NS`` (2 ms) to serve, so a backend that
waits (a network, a slow disk) takes one request at a time and leaves
the rest to idle workers, which the kernel wakes when a queued request
has waited too long, while a fast one takes up to ``batch``.  A backend
that overlaps its I/O (``start_read``/``start_write``, as ``rbd:``) starts
a whole batch at once; its batch is bounded by the backend's
``queue_depth`` and ``queue_bytes`` instead.

A backend that sets ``wants_tokens`` gets each modifying request's
fencing token (ABUSE_XFER_TOKENS) as a third argument of ``write``,
``discard`` and ``write_zeroes``: see :class:`abuse.backends.base.Backend`.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import struct
import sys
from typing import Any, Callable

from abuse import uapi
from abuse.backends.base import Backend, Finish, overlaps
from abuse.clock import coarse_ns
from abuse.control import Control, Xfer

__all__ = ["Worker"]

log = logging.getLogger(__name__)

_READ = uapi.ABUSE_OP_READ
_WRITE = uapi.ABUSE_OP_WRITE
_FLUSH = uapi.ABUSE_OP_FLUSH
_DISCARD = uapi.ABUSE_OP_DISCARD
_WRITE_ZEROES = uapi.ABUSE_OP_WRITE_ZEROES
_FUA = uapi.ABUSE_REQ_FUA

_REQUEST = struct.Struct(uapi.struct_format("abuse_request"))  # handle offset data length op flags
_REPLY = struct.Struct(uapi.struct_format("abuse_reply"))  # handle data length result status reserved
# The plain batch's answer copies fields between these layouts whole
# columns at a time (Worker._answer_plain); another layout takes the loop.
# Little-endian: a request's op is the low half of its 8th int, flags the high.
_PLAIN_LAYOUTS = (
    (_REQUEST.format, _REPLY.format) == ("=QQQIHH", "=QQIiiI")
    and {_READ, _WRITE} == {0, 1}
    and sys.byteorder == "little"
)

DEFAULT_BATCH = 64
DEFAULT_BUFFER_BYTES = 8 << 20
# How long one batch may keep its requests from idle workers (0: no
# limit but --batch), well under the driver's longest lazy wake-up
# (wake_max_us, 10 ms).  ABUSE_BATCH_BUDGET_US overrides it, for benchmarks.
BATCH_BUDGET_NS = int(os.environ.get("ABUSE_BATCH_BUDGET_US", "2000")) * 1000


class Worker:
    """Serve disk ``index`` from ``backend`` through ``control``.

    ``control`` is attached here.  The worker owns neither: the caller
    closes them.
    """

    def __init__(
        self,
        control: Control,
        index: int,
        backend: Backend,
        batch: int = DEFAULT_BATCH,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        config = control.info(index).config
        control.attach(index)
        self.control = control
        self._index = index
        self.backend = backend
        self.served = 0
        size = max(buffer_bytes, config.max_request_bytes)
        self._mmap = mmap.mmap(-1, size)
        self._view = memoryview(self._mmap)
        self._pointer = uapi.ffi.from_buffer(self._mmap)
        self._base = int(uapi.ffi.cast("uintptr_t", self._pointer))
        self._xfer = Xfer(control, batch, self._pointer, size)
        self._requests = memoryview(uapi.ffi.buffer(self._xfer.requests))
        self._replies = memoryview(uapi.ffi.buffer(self._xfer.replies))
        # Column views of the same arrays, for _answer_plain.
        self._request_words = self._requests.cast("Q")
        self._request_ints = self._requests.cast("I")
        self._reply_words = self._replies.cast("Q")
        self._reply_ints = self._replies.cast("I")
        self._zeros = memoryview(bytes(len(self._replies))).cast("I")
        self._zero_words = self._zeros.cast("B").cast("Q")
        mapping = backend.mapping()
        self.in_place = mapping is not None and mapping[1] >= config.size and self._xfer.can_map
        if self.in_place:
            assert mapping is not None
            self._xfer.use_buffer(*mapping, mapped=True)
        self._tokens: memoryview | None = None
        if getattr(backend, "wants_tokens", False):
            self._xfer.use_tokens()
            self._tokens = memoryview(uapi.ffi.buffer(self._xfer.tokens)).cast("Q")
        # Whether batches may be answered by columns (_answer_plain): in place, no tokens.
        self._plain = _PLAIN_LAYOUTS and self.in_place and self._tokens is None
        # What a read asks for its address first; None if the backend keeps
        # Backend's (always 0): a Python call per read saved.
        address_of: Callable[[int, int], int] | None = backend.mapped_address
        if getattr(address_of, "__func__", None) is Backend.mapped_address:
            address_of = None
        self._mapped_address = address_of
        self._batch = batch
        self._per_request_ns = 0  # moving average of a request's service time
        self._measured = False  # the first batch sets the average outright
        # A new worker's first batch is one request, so that a slow
        # backend's worker does not take a whole burst that idle workers
        # could start before it has measured its backend; the next one is
        # sized by that measure (a fast backend's: --batch).
        if BATCH_BUDGET_NS:
            self._xfer.limit = 1
        # A backend with start_read/start_write keeps a whole batch in
        # flight: the batch is bounded by its queue_depth and queue_bytes
        # (the part of the buffer the kernel may fill), not by time.
        self._overlapped = overlaps(backend) and not self.in_place and self._tokens is None
        if self._overlapped:
            self._xfer.limit = max(1, min(batch, backend.queue_depth))
            self._xfer.use_buffer(self._base, min(size, max(config.max_request_bytes, backend.queue_bytes)))

    def serve(
        self,
        should_stop: Callable[[], bool] = lambda: False,
        idle_ms: int = 200,
        on_alive: Callable[[], None] | None = None,
    ) -> None:
        """Serve until ``should_stop()`` is true, then answer what is held.

        ``should_stop`` is checked after every batch and at least every
        ``idle_ms``; a signal also cuts the wait short.  ``on_alive()``,
        if given, is called at the same points (after every batch and
        every idle wake-up): the pool's liveness stamp.  Returns when the
        disk is destroyed.
        """
        xfer = self._xfer
        answered = 0
        alive = on_alive if on_alive is not None else _nothing
        while True:
            alive()
            stopping = should_stop()
            try:
                got = xfer.exchange(answered, wait=True, fetch=not stopping, wait_ms=idle_ms)
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                if err.errno == errno.EINVAL and self.in_place and self._outgrew_mapping():
                    # Nothing of this call was done: the same replies go
                    # again, by copy.
                    log.info("disk larger than the backend's mapping: serving by copy")
                    self._serve_by_copy()
                    continue
                if err.errno == errno.ENODEV:
                    log.info("disk destroyed, worker exits")
                    return
                raise
            self.served += xfer.arg.nr_accepted
            if stopping:
                return
            if not got:
                answered = 0
            elif self._plain and self._answer_plain(got):
                # No backend call: nothing to time, a tick's zero at most.
                answered = got
                if self._xfer.limit < self._batch:
                    self._adapt_batch(got, 0)
            else:
                started = coarse_ns()
                answered = self._run_backend(got)
                self._adapt_batch(got, coarse_ns() - started)

    def _adapt_batch(self, count: int, elapsed_ns: int) -> None:
        """Take as many requests next time as fit in BATCH_BUDGET_NS.

        The clock is the coarse one (a tick, some milliseconds): reading
        it costs nothing, where a precise clock can cost more than a
        request (an emulated HPET).  A batch measures 0 or a tick, in
        proportion to its length, so the slow moving average is right.
        """
        if not BATCH_BUDGET_NS or self._overlapped:
            return  # an overlapped batch starts every request at once: it holds none back
        average = self._per_request_ns
        if self._measured:
            average += (elapsed_ns // count - average) // 16
        else:
            average, self._measured = elapsed_ns // count, True
        self._per_request_ns = average
        self._xfer.limit = max(1, min(self._batch, BATCH_BUDGET_NS // max(average, 1)))

    def _outgrew_mapping(self) -> bool:
        """Whether the disk is now larger than the mapping served in place."""
        return self.control.info(self._index).config.size > int(self._xfer.arg.buffer_size)

    def _serve_by_copy(self) -> None:
        self.in_place = self._plain = False
        self._xfer.use_buffer(self._base, len(self._mmap))

    def _call_backend(self, op: int, offset: int, length: int) -> int:
        """FLUSH (also a FUA write's), DISCARD or WRITE_ZEROES; 0 or -errno."""
        backend = self.backend
        try:
            if op == _FLUSH:
                backend.flush()
            elif op == _DISCARD:
                backend.discard(offset, length)
            elif op == _WRITE_ZEROES:
                backend.write_zeroes(offset, length)
            else:
                return -errno.EOPNOTSUPP
        except Exception as err:
            return _failure(err, op, offset, length)
        return 0

    def _call_fenced(self, op: int, offset: int, at: int, length: int, token: int) -> int:
        """A modifying request of a ``wants_tokens`` backend, with its token; 0 or -errno."""
        backend: Any = self.backend
        try:
            if op == _WRITE:
                if not self.in_place:
                    backend.write(offset, self._view[at : at + length], token)
            elif op == _DISCARD:
                backend.discard(offset, length, token)
            elif op == _WRITE_ZEROES:
                backend.write_zeroes(offset, length, token)
            elif op == _FLUSH:
                backend.flush()
            else:
                return -errno.EOPNOTSUPP
        except Exception as err:
            return _failure(err, op, offset, length)
        return 0

    def _run_batch(self, count: int) -> int:
        """Run the first ``count`` requests and fill their replies.

        Served in place, the kernel has stored each write at GET and reads
        each answer from the descriptor's own address, so only FUA, flush,
        discard and write zeroes call the backend.
        """
        if self._plain and self._answer_plain(count):
            return count
        return self._run_backend(count)

    def _run_backend(self, count: int) -> int:
        """``_run_batch`` for a batch that is not plain: through the backend."""
        if self._overlapped:
            return self._run_overlapped(count)
        backend = self.backend
        mapped_address = self._mapped_address
        call_backend = self._call_backend
        in_place = self.in_place
        view = self._view
        base = self._base
        replies = self._replies
        pack_reply = _REPLY.pack_into
        tokens = self._tokens
        at = 0
        for slot, (handle, offset, data, length, op, flags) in enumerate(
            _REQUEST.iter_unpack(self._requests[: count * _REQUEST.size])
        ):
            result = 0
            if tokens is not None and op != _READ:
                result = self._call_fenced(op, offset, data - base, length, tokens[slot])
            elif op > _WRITE:
                result = call_backend(op, offset, length)
            elif not in_place:
                try:
                    if op == _READ:
                        address = mapped_address(offset, length) if mapped_address else 0
                        if address:
                            data = address  # the kernel copies from the backend itself
                        else:
                            backend.read(offset, view[data - base : data - base + length])
                    else:
                        backend.write(offset, view[data - base : data - base + length])
                except Exception as err:
                    result = _failure(err, op, offset, length)
            if flags & _FUA and op == _WRITE and not result:
                result = call_backend(_FLUSH, offset, length)
            pack_reply(replies, at, handle, data, length, result, 0, 0)
            at += _REPLY.size
        return count

    def _answer_plain(self, count: int) -> bool:
        """Answer a batch of plain reads and writes served in place, if it is one.

        Served in place, a read or write with no flags (no FUA) succeeds
        with its own handle, data and length: the replies are those
        columns of the requests, copied a column at a time (C loops, not
        a Python loop per request).  False, with nothing written, if any
        request is something else.  Only for _plain workers.
        """
        words = 4 * count
        ints = 2 * words
        # op (READ 0 or WRITE 1) and flags (none) share the request's 8th int.
        if max(self._request_ints[7:ints:8]) > 1:
            return False
        request_words, reply_words, reply_ints = self._request_words, self._reply_words, self._reply_ints
        reply_words[0:words:4] = request_words[0:words:4]  # handle
        reply_words[1:words:4] = request_words[2:words:4]  # data
        reply_ints[4:ints:8] = self._request_ints[6:ints:8]  # length
        reply_ints[5:ints:8] = self._zeros[5:ints:8]  # result
        reply_words[3:words:4] = self._zero_words[3:words:4]  # status and reserved
        return True

    def _run_overlapped(self, count: int) -> int:
        """``_run_batch`` for a backend with start_read/start_write.

        Every read and write is started before any is waited for.  A
        flush, discard or write zeroes, and a FUA write's flush, first
        waits for everything started before it: a flush covers the writes
        completed before it, and the others must not race a write to the
        same blocks that came first.
        """
        backend = self.backend
        view = self._view
        base = self._base
        requests = list(_REQUEST.iter_unpack(self._requests[: count * _REQUEST.size]))
        results = [0] * count
        started: list[tuple[int, Finish]] = []

        def finish_started() -> None:
            for slot, finish in started:
                try:
                    finish()
                except Exception as err:
                    _, offset, _, length, op, _ = requests[slot]
                    results[slot] = _failure(err, op, offset, length)
            started.clear()

        for slot, (_, offset, data, length, op, flags) in enumerate(requests):
            if op == _READ or op == _WRITE:
                piece = view[data - base : data - base + length]
                try:
                    if op == _READ:
                        started.append((slot, backend.start_read(offset, piece)))
                    else:
                        started.append((slot, backend.start_write(offset, piece)))
                except Exception as err:
                    results[slot] = _failure(err, op, offset, length)
                if not flags & _FUA or op != _WRITE:
                    continue
                finish_started()
                if results[slot]:
                    continue
                op = _FLUSH
            else:
                finish_started()
            results[slot] = self._call_backend(op, offset, length)
        finish_started()
        pack_reply = _REPLY.pack_into
        replies = self._replies
        for slot, (handle, _, data, length, _, _) in enumerate(requests):
            pack_reply(replies, slot * _REPLY.size, handle, data, length, results[slot], 0, 0)
        return count

    def close(self) -> None:
        """Release the buffer (the Control stays open)."""
        for view in (
            self._request_words,
            self._request_ints,
            self._reply_words,
            self._reply_ints,
        ):
            view.release()
        self._requests.release()
        self._replies.release()
        self._view.release()
        uapi.ffi.release(self._pointer)
        self._mmap.close()


def _nothing() -> None:
    pass


def _failure(err: Exception, op: int, offset: int, length: int) -> int:
    """The -errno a backend's exception answers: its own, else EIO (logged)."""
    if isinstance(err, OSError):
        return -(err.errno or errno.EIO)
    log.error("backend failed on op %d at %d+%d", op, offset, length, exc_info=err)
    return -errno.EIO
