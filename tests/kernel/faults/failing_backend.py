"""A memory backend with bad ranges, for `--backend python:...`.

Reads and writes touching [EIO_START, EIO_END) fail with EIO; writes
touching [NOSPC_START, NOSPC_END) fail with ENOSPC (reads there work).
"""

from __future__ import annotations

import errno
import os

from abuse.backends.memory import MemoryBackend

MiB = 1 << 20
EIO_START, EIO_END = 8 * MiB, 9 * MiB
NOSPC_START, NOSPC_END = 16 * MiB, 17 * MiB


def _touches(offset: int, length: int, start: int, end: int) -> bool:
    return offset < end and start < offset + length


class FailingBackend(MemoryBackend):
    def read(self, offset: int, buf: memoryview) -> None:
        if _touches(offset, len(buf), EIO_START, EIO_END):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().read(offset, buf)

    def write(self, offset: int, data: memoryview) -> None:
        if _touches(offset, len(data), EIO_START, EIO_END):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if _touches(offset, len(data), NOSPC_START, NOSPC_END):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(offset, data)
