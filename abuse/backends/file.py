"""``file:PATH`` — an image file or a block device, and the fd-backed base
that ``memory`` shares."""

from __future__ import annotations

import errno
import os
import stat

import cffi

from abuse.backends.base import Backend

__all__ = ["FdBackend", "FileBackend"]

_ffi = cffi.FFI()
_ffi.cdef("int fallocate(int fd, int mode, int64_t offset, int64_t len);")
_libc = _ffi.dlopen(None)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


class FdBackend(Backend):
    """Storage behind one file descriptor: preadv/pwritev into the buffer."""

    can_flush = True
    can_discard = True
    can_write_zeroes = True
    shared_state = True  # the file is the state; every worker opens the same one

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size

    def read(self, offset: int, buf: memoryview) -> None:
        done = os.preadv(self.fd, [buf], offset)
        if done < len(buf):  # past the end of a short file: zeroes
            buf[done:] = bytes(len(buf) - done)

    def write(self, offset: int, data: memoryview) -> None:
        done = os.pwritev(self.fd, [data], offset)
        if done != len(data):
            raise OSError(errno.EIO, f"short write at {offset}")

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> None:
        if _libc.fallocate(self.fd, mode, offset, length) < 0:
            err = _ffi.errno
            raise OSError(err, os.strerror(err))

    def discard(self, offset: int, length: int) -> None:
        self._fallocate(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        try:
            self._fallocate(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.ENODEV):
                raise
            self.discard(offset, length)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileBackend(FdBackend):
    """An image file (created sparse at ``size`` if missing) or a device."""

    def __init__(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            current = os.lseek(fd, 0, os.SEEK_END)
            if current < size and not _is_block_device(fd):
                os.ftruncate(fd, size)
            elif current < size:
                raise OSError(errno.ENOSPC, f"{path} holds {current} bytes, need {size}")
        except BaseException:
            os.close(fd)
            raise
        super().__init__(fd, size)
        self.path = path


def _is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)
