"""The worker loop: GET a batch, run it against a backend, PUT it back.

One worker is one attached Control, one preallocated buffer and one
thread.  Each system call both answers the previous batch and fetches
the next (PUT carrying GET); when nothing is queued the worker sleeps in
poll().  Requests are served through memoryviews into the buffer, so the
only copies are the kernel's own and the backend's.
"""

from __future__ import annotations

import errno
import logging
import mmap
import select
from typing import Any, Callable

from abuse import uapi
from abuse.backends.base import Backend
from abuse.control import Control, Xfer

__all__ = ["Worker"]

log = logging.getLogger(__name__)

_READ = uapi.ABUSE_OP_READ
_WRITE = uapi.ABUSE_OP_WRITE
_FLUSH = uapi.ABUSE_OP_FLUSH
_DISCARD = uapi.ABUSE_OP_DISCARD
_WRITE_ZEROES = uapi.ABUSE_OP_WRITE_ZEROES
_FUA = uapi.ABUSE_REQ_FUA

DEFAULT_BATCH = 64
DEFAULT_BUFFER_BYTES = 8 << 20


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
        self.backend = backend
        self.served = 0
        size = max(buffer_bytes, config.max_request_bytes)
        self._mmap = mmap.mmap(-1, size)
        self._view = memoryview(self._mmap)
        self._pointer = uapi.ffi.from_buffer(self._mmap)
        self._base = int(uapi.ffi.cast("uintptr_t", self._pointer))
        self._xfer = Xfer(control, batch, self._pointer, size)

    def serve(self, should_stop: Callable[[], bool] = lambda: False, idle_ms: int = 200) -> None:
        """Serve until ``should_stop()`` is true, then answer what is held.

        ``should_stop`` is checked whenever the queue is found empty and
        at least every ``idle_ms``.  Returns when the disk is destroyed.
        """
        poller = select.poll()
        poller.register(self.control.fileno(), select.POLLIN)
        answered = 0
        while True:
            stopping = should_stop()
            try:
                got = self._xfer.exchange(answered, wait=False, fetch=not stopping)
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                if err.errno == errno.ENODEV:
                    log.info("disk destroyed, worker exits")
                    return
                raise
            self.served += self._xfer.arg.nr_accepted
            if stopping:
                return
            if got:
                self._run_batch(got)
                answered = got
                continue
            answered = 0
            poller.poll(idle_ms)

    def _run_batch(self, count: int) -> None:
        requests = self._xfer.requests
        replies = self._xfer.replies
        for i in range(count):
            self._run_one(requests[i], replies[i])

    def _run_one(self, request: Any, reply: Any) -> None:
        op = request.op
        offset = request.offset
        length = request.length
        reply.handle = request.handle
        reply.length = length
        reply.data = request.data
        reply.result = 0
        backend = self.backend
        try:
            if op == _READ or op == _WRITE:
                start = request.data - self._base
                view = self._view[start : start + length]
                if op == _READ:
                    backend.read(offset, view)
                else:
                    backend.write(offset, view)
                    if request.flags & _FUA:
                        backend.flush()
            elif op == _FLUSH:
                backend.flush()
            elif op == _DISCARD:
                backend.discard(offset, length)
            elif op == _WRITE_ZEROES:
                backend.write_zeroes(offset, length)
            else:
                reply.result = -errno.EOPNOTSUPP
        except OSError as err:
            reply.result = -(err.errno or errno.EIO)
        except Exception:
            log.exception("backend failed on op %d at %d+%d", op, offset, length)
            reply.result = -errno.EIO

    def close(self) -> None:
        """Release the buffer (the Control stays open)."""
        self._view.release()
        uapi.ffi.release(self._pointer)
        self._mmap.close()
