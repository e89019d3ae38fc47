"""Backends whose worker wedges once, for `--backend python:...`.

The test arms a wedge by creating ``$WEDGE_DIR/armed``.  The next worker
to write (or, served in place, to flush a FUA write) takes it by renaming
it to ``wedged-<pid>``, sleeps ``$WEDGE_SECONDS`` (past the disk's
timeout), and then does what a stale worker does: stores its write, and
says so in ``landed-<pid>``.  The request meanwhile timed out; unless
the worker was fenced, another worker completed it and the test wrote
newer data over it, which the stale store would then overwrite.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from abuse.backends.base import Backend
from abuse.backends.file import FileBackend
from abuse.backends.memory import MemoryBackend


def _wedge() -> bool:
    """Take the armed wedge if there is one, and sleep; True if taken."""
    folder = Path(os.environ["WEDGE_DIR"])
    try:
        os.rename(folder / "armed", folder / f"wedged-{os.getpid()}")
    except FileNotFoundError:
        return False
    time.sleep(float(os.environ.get("WEDGE_SECONDS", "8")))
    return True


def _landed() -> None:
    Path(os.environ["WEDGE_DIR"], f"landed-{os.getpid()}").touch()


class WedgingStore(Backend):
    """A python: backend of its own: an image file written with pwrite."""

    can_flush = True
    shared_state = True  # the file is shared by every worker

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.open(os.environ["WEDGE_STORE"], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)

    def read(self, offset: int, buf: memoryview) -> None:
        done = os.preadv(self.fd, [buf], offset)
        buf[done:] = bytes(len(buf) - done)

    def write(self, offset: int, data: memoryview) -> None:
        wedged = _wedge()
        os.pwritev(self.fd, [data], offset)
        if wedged:
            _landed()

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


class WedgingFile(FileBackend):
    """The file: backend; wedges in write (by copy) or in flush (in place)."""

    def __init__(self, size: int) -> None:
        super().__init__(os.environ["WEDGE_STORE"], size)

    def write(self, offset: int, data: memoryview) -> None:
        wedged = _wedge()
        super().write(offset, data)
        if wedged:
            _landed()

    def flush(self) -> None:
        if _wedge():
            _landed()
        super().flush()


class WedgingMemory(MemoryBackend):
    """The memory backend, served in place: it wedges in a FUA write's flush."""

    def flush(self) -> None:
        if _wedge():
            _landed()
        super().flush()
