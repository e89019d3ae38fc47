"""O_DIRECT I/O on a disk, in the foreground or in a background thread."""

from __future__ import annotations

import mmap
import os
import random
import threading
from collections.abc import Callable
from typing import Any


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def _aligned(length: int) -> mmap.mmap:
    return mmap.mmap(-1, max(length, mmap.PAGESIZE))


def direct_write(path: str, offset: int, data: bytes) -> None:
    buf = _aligned(len(data))
    buf[: len(data)] = data
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        done = os.pwritev(fd, [memoryview(buf)[: len(data)]], offset)
        assert done == len(data)
    finally:
        os.close(fd)
        buf.close()


def direct_read(path: str, offset: int, length: int) -> bytes:
    buf = _aligned(length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    view = memoryview(buf)[:length]
    try:
        done = os.preadv(fd, [view], offset)
        assert done == length
        return bytes(view)
    finally:
        view.release()
        os.close(fd)
        buf.close()


class Background:
    """Run ``fn`` in a thread; keep its result or the exception it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as err:  # reported to the test
            self.error = err

    def join(self, timeout: float = 60.0) -> Background:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background I/O did not finish"
        return self

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def tid(self) -> int | None:
        """The thread's kernel task id (for /proc/self/task/TID)."""
        return self._thread.native_id
