"""``memory`` — a sparse memfd shared by every worker process.

Reads of never-written ranges come from the kernel's zero page, so a
10G disk costs only the pages written; discard punches the pages out.
Forked workers inherit the same memfd, so they all see one disk.
"""

from __future__ import annotations

import os

from abuse.backends.file import FdBackend

__all__ = ["MemoryBackend"]


class MemoryBackend(FdBackend):
    """A disk held in RAM (shmem), sized but unpopulated at start."""

    def __init__(self, size: int, name: str = "abuse-memory") -> None:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        super().__init__(fd, size)
