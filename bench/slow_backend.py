"""A backend that waits: every read and write sleeps 5 ms, then is done.

It stands for a backend that blocks on a network or a slow disk; served
by N workers at queue depth Q it can at best answer min(N, Q) requests
per 5 ms.  It stores nothing: reads return zeroes, writes are dropped.
Used by bench.guest as ``python:bench/slow_backend.py:SlowBackend``.
"""

from __future__ import annotations

import time

from abuse.backends.base import Backend

__all__ = ["SlowBackend"]

_ZEROES = memoryview(bytes(1 << 20))


class SlowBackend(Backend):
    """Sleeps ``delay`` seconds per read or write."""

    delay = 0.005  # bench.jobs.SLOW_DELAY_S (loaded as a file, this module imports no bench)
    shared_state = True  # it stores nothing, so any number of workers may serve it

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, buf: memoryview) -> None:
        time.sleep(self.delay)
        length = len(buf)
        buf[:] = _ZEROES[:length] if length <= len(_ZEROES) else bytes(length)

    def write(self, offset: int, data: memoryview) -> None:
        time.sleep(self.delay)
