"""A hand-driven worker: GET and PUT exactly what a test says."""

from __future__ import annotations

import errno
import mmap
from dataclasses import dataclass
from typing import Any

from abuse import uapi
from abuse.control import Control, Xfer

ffi = uapi.ffi


@dataclass
class Request:
    handle: int
    offset: int
    data: int
    length: int
    op: int
    flags: int


class RawWorker:
    """An attached Control with a buffer; nothing automatic."""

    def __init__(self, index: int, batch: int = 32, buffer_bytes: int = 4 << 20) -> None:
        self.control = Control()
        self.control.attach(index)
        self.buffer = mmap.mmap(-1, buffer_bytes)
        self._pointer = ffi.from_buffer(self.buffer)
        self.base = int(ffi.cast("uintptr_t", self._pointer))
        self.xfer = Xfer(self.control, batch, self._pointer, buffer_bytes)
        self.fetched: list[Request] = []

    def get(self, wait: bool = False, wait_ms: int | None = None) -> list[Request]:
        count = self.xfer.exchange(0, wait=wait, wait_ms=wait_ms)
        return [self._request(i) for i in range(count)]

    def _request(self, i: int) -> Request:
        r = self.xfer.requests[i]
        return Request(int(r.handle), int(r.offset), int(r.data), int(r.length), int(r.op), int(r.flags))

    def put(self, replies: list[dict[str, int]], fetch: bool = False) -> list[int]:
        """PUT ``replies`` (dicts of abuse_reply fields); return statuses.

        With ``fetch``, the same call GETs (without waiting): its requests
        are in ``fetched``.
        """
        self.stage(replies)
        got = self.xfer.exchange(len(replies), wait=False, fetch=fetch)
        self.fetched = [self._request(i) for i in range(got)]
        return [int(self.xfer.replies[i].status) for i in range(len(replies))]

    def stage(self, replies: list[dict[str, int]]) -> None:
        """Write ``replies`` into the reply array, each entry zeroed first."""
        for i, fields in enumerate(replies):
            entry = self.xfer.replies[i]
            ffi.memmove(ffi.addressof(entry), bytes(ffi.sizeof(entry)), ffi.sizeof(entry))
            for name, value in fields.items():
                setattr(entry, name, value)

    def served(self, request: Request, payload: bytes) -> dict[str, int]:
        """The correct reply to ``request``, a read's data set to ``payload`` first."""
        if request.op == uapi.ABUSE_OP_READ:
            self.data(request)[:] = payload
        return self.answer(request)

    def answer(self, request: Request, result: int = 0) -> dict[str, int]:
        """The correct reply to ``request``."""
        return {"handle": request.handle, "length": request.length, "data": request.data, "result": result}

    def data(self, request: Request) -> memoryview:
        start = request.data - self.base
        return memoryview(self.buffer)[start : start + request.length]

    def close(self) -> None:
        ffi.release(self._pointer)
        self.buffer.close()
        self.control.close()


def raw_errno(fd: int, number: int, arg: Any) -> int:
    """errno of one raw ioctl on ``fd`` (0 on success)."""
    if uapi.lib.ioctl(fd, number, arg) < 0:
        return int(ffi.errno)
    return 0


def expect_errno(err: int, *allowed: int) -> None:
    assert err in allowed, (
        f"got {errno.errorcode.get(err, err)}, want {[errno.errorcode.get(a, a) for a in allowed]}"
    )


def unmapped_address() -> int:
    """An address with nothing mapped at it."""
    m = mmap.mmap(-1, mmap.PAGESIZE)
    pointer = ffi.from_buffer(m)
    address = int(ffi.cast("uintptr_t", pointer))
    ffi.release(pointer)
    m.close()
    return address
