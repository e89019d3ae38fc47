"""A backend that refuses stale writes by itself: fencing tokens.

The image is a plain file; beside it, PATH.tokens keeps, for every 4 KiB
block, the fencing token of the last change stored there.  The kernel
gives each request a token that grows with every hand-out, so a write
whose token is smaller than the block's came from a worker that lost the
request (it was timed out or reset and handed to another worker) or was
superseded by a later write: it is dropped, and answered as done, since
the block already holds newer data.  The compare and the store happen
under a lock on the block's token, so any number of worker processes
may share the store.

    FENCED_STORE=/var/lib/disk.img abusectl serve /dev/abuse0 --workers 4 \\
        --backend python:examples/fenced_store.py:FencedStore

The same scheme works on any store with conditional writes: an object
store's "if the stored version is older", a database row's compare and
set.  With the driver's fencing (ABUSE_F_FENCE, on by default) and the
pool's liveness check a stale worker is killed before its request moves
on; tokens also cover what neither can see, such as a write still
travelling in the network when its worker died.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

from abuse import Backend

BLOCK = 4096
_TOKEN = struct.Struct("<Q")


class FencedStore(Backend):
    wants_tokens = True
    can_flush = True

    def __init__(self, size: int, path: str = "") -> None:
        path = path or os.environ.get("FENCED_STORE", "fenced.img")
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size)
        blocks = (size + BLOCK - 1) // BLOCK
        self.tokens_fd = os.open(path + ".tokens", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.tokens_fd, blocks * _TOKEN.size)
        self.tokens = mmap.mmap(self.tokens_fd, blocks * _TOKEN.size)

    def read(self, offset: int, buf: memoryview) -> None:
        done = os.preadv(self.fd, [buf], offset)
        buf[done:] = bytes(len(buf) - done)

    def write(self, offset: int, data: memoryview, token: int = 0) -> None:
        self._store(offset, len(data), token, data)

    def write_zeroes(self, offset: int, length: int, token: int = 0) -> None:
        self._store(offset, length, token, None)

    def discard(self, offset: int, length: int, token: int = 0) -> None:
        self._store(offset, length, token, None)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def _store(self, offset: int, length: int, token: int, data: memoryview | None) -> None:
        """Store each block of the range whose token is not newer than ``token``."""
        end = offset + length
        while offset < end:
            block = offset // BLOCK
            stop = min(end, (block + 1) * BLOCK)
            at = block * _TOKEN.size
            fcntl.lockf(self.tokens_fd, fcntl.LOCK_EX, _TOKEN.size, at)
            try:
                (stored,) = _TOKEN.unpack_from(self.tokens, at)
                if token >= stored:
                    chunk = bytes(stop - offset) if data is None else data[: stop - offset]
                    os.pwrite(self.fd, chunk, offset)
                    _TOKEN.pack_into(self.tokens, at, token)
            finally:
                fcntl.lockf(self.tokens_fd, fcntl.LOCK_UN, _TOKEN.size, at)
            if data is not None:
                data = data[stop - offset :]
            offset = stop

    def close(self) -> None:
        self.tokens.close()
        os.close(self.tokens_fd)
        os.close(self.fd)
