"""``null`` and ``zero`` — disks with no storage behind them.

Both read as zeroes.  ``null`` accepts and drops every write (nullb's
shape: a sink for measuring the path itself); ``zero`` refuses writes
with EROFS, like a read-only /dev/zero.
"""

from __future__ import annotations

import errno

from abuse.backends.base import Backend

__all__ = ["NullBackend", "ZeroBackend"]

_ZEROES = memoryview(bytes(1 << 20))


def _fill_zeroes(buf: memoryview) -> None:
    """Zero ``buf`` in place without allocating per call."""
    step = len(_ZEROES)
    length = len(buf)
    for start in range(0, length, step):
        end = min(start + step, length)
        buf[start:end] = _ZEROES[: end - start]


class _ZeroReads(Backend):
    """Reads return zeroes; ``size`` is only recorded."""

    shared_state = True  # there is no state

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, buf: memoryview) -> None:
        _fill_zeroes(buf)


class NullBackend(_ZeroReads):
    """Reads zeroes, drops writes; flush, discard and write-zeroes succeed."""

    can_flush = True
    can_discard = True
    can_write_zeroes = True

    def write(self, offset: int, data: memoryview) -> None:
        pass

    def write_zeroes(self, offset: int, length: int) -> None:
        pass


class ZeroBackend(_ZeroReads):
    """Reads zeroes; every write, discard or write-zeroes fails with EROFS."""

    can_discard = False  # the methods below only refuse
    can_write_zeroes = False

    def write(self, offset: int, data: memoryview) -> None:
        raise OSError(errno.EROFS, "zero backend is read-only")

    def discard(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, "zero backend is read-only")

    def write_zeroes(self, offset: int, length: int) -> None:
        raise OSError(errno.EROFS, "zero backend is read-only")
