"""``memory`` — a sparse memfd shared by every worker process.

The memfd is mapped, and the worker serves the disk in place
(ABUSE_XFER_MAPPED): the kernel copies a write's payload straight into
the mapping and a read's data straight out of it, one copy each way,
none in Python.  Once the disk outgrows the mapping (grown online) the
worker serves by copy: a write is a slice copy from its buffer, a read
is answered with the mapping's address, and past the mapping's end both
go through the memfd.  A 10G disk costs only the pages touched (reading
a range never written allocates its pages too: shmem has no shared zero
page), and discard punches pages out.  Forked workers inherit the same
memfd and mapping, so they all see one disk.
"""

from __future__ import annotations

import mmap
import os

import cffi

from abuse.backends.file import FdBackend

_ffi = cffi.FFI()

__all__ = ["MemoryBackend"]


class MemoryBackend(FdBackend):
    """A disk held in RAM (shmem), sized but unpopulated at start."""

    def __init__(self, size: int, name: str = "abuse-memory") -> None:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._disk = memoryview(self._map)
        self._pointer = _ffi.from_buffer(self._map)
        self._address = int(_ffi.cast("uintptr_t", self._pointer))
        # A subclass that overrides read() (to fail some ranges, say) must
        # see every read: only plain memory disks are read by address, and
        # only those that see writes plainly too are served in place.
        self._by_address = type(self).read is MemoryBackend.read
        self._in_place = self._by_address and type(self).write is MemoryBackend.write
        super().__init__(fd, size)

    def mapped_address(self, offset: int, length: int) -> int:
        if not self._by_address or offset + length > self.size:
            return 0
        return self._address + offset

    def mapping(self) -> tuple[int, int] | None:
        return (self._address, self.size) if self._in_place else None

    def read(self, offset: int, buf: memoryview) -> None:
        end = offset + len(buf)
        if end > self.size:  # past the end (a disk grown online): zeroes
            super().read(offset, buf)
            return
        buf[:] = self._disk[offset:end]

    def write(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if end > self.size:
            super().write(offset, data)
            return
        self._disk[offset:end] = data

    def flush(self) -> None:
        """Nothing to do: the memfd is the disk, and it is not durable."""

    def close(self) -> None:
        if self.fd >= 0:
            _ffi.release(self._pointer)
            self._disk.release()
            self._map.close()
        super().close()
