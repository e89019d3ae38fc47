"""``file:PATH`` — an image file or a block device, and the fd-backed base
that ``memory`` shares.

A file backend maps the whole image shared (MAP_SHARED over the fd) and
is served in place, as ``memory`` is (ABUSE_XFER_MAPPED): the kernel
copies each write's payload into the image's page cache at GET and
answers each read from it at PUT, so a worker never stores anything
itself and a stale worker cannot overwrite newer data.  The mapping
only reserves address space: an image larger than RAM is paged by the
page cache like any mapped file.  FLUSH (and a FUA write) is an
fdatasync of the fd, which writes back the pages dirtied through the
mapping; discard and write zeroes stay fallocate calls on the fd, which
drop or zero the same page-cache pages that the mapping shows.

``file:PATH?mapped=0`` serves by copy instead (preadv/pwritev between
the image and the worker's buffer), as before; so does a file system
that cannot map the image shared.  A path that holds a ``?`` ends with
one (``file:a?b?``): the text after the last ``?`` is the options.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat

import cffi

from abuse.backends.base import Backend

__all__ = ["FdBackend", "FileBackend", "split_file_argument"]

log = logging.getLogger(__name__)

_ffi = cffi.FFI()
_ffi.cdef(
    """
    int fallocate(int fd, int mode, int64_t offset, int64_t len);
    int munlock(const void *addr, size_t len);
    """
)
_libc = _ffi.dlopen(None)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10


def split_file_argument(argument: str) -> tuple[str, bool]:
    """``(path, mapped)`` of a ``file:`` spec's argument, ``PATH[?mapped=0|1]``.

    Raises ValueError for an unknown option or value, or an empty path.
    """
    path, question, options = argument.rpartition("?")
    if not question:
        path, options = argument, ""
    mapped = True
    for option in filter(None, options.split("&")):
        name, _, value = option.partition("=")
        if name != "mapped" or value not in ("0", "1"):
            raise ValueError(f"unknown option {option!r} (file:PATH?mapped=0 or 1)")
        mapped = value == "1"
    if not path:
        raise ValueError("empty path")
    return path, mapped


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
    """An image file (created sparse at ``size`` if missing) or a device.

    With ``mapped`` (the default) the image is mapped shared and served
    in place; see the module docstring.  A subclass that overrides
    :meth:`read` or :meth:`write` is called for every request (served by
    copy), as it would expect; one that overrides only :meth:`flush`,
    say, is still served in place.
    """

    def __init__(self, path: str, size: int, mapped: bool = True) -> None:
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
        self._map: mmap.mmap | None = None
        self._address = 0
        if mapped:
            self._map_image()
        plain = type(self).read is FdBackend.read
        self._by_address = plain and self._map is not None
        self._in_place = self._by_address and type(self).write is FdBackend.write

    def _map_image(self) -> None:
        try:
            self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:  # a file system without shared writable maps
            log.warning("%s cannot be mapped (%s): serving it by copy", self.path, err.strerror)
            return
        self._pointer = _ffi.from_buffer(self._map)
        self._address = int(_ffi.cast("uintptr_t", self._pointer))

    @property
    def mapped(self) -> bool:
        """Whether the image is served in place (see the module docstring)."""
        return self._in_place

    def mapping(self) -> tuple[int, int] | None:
        """The mapped image, ``(address, size)``, when served in place.

        The worker asks for it in its own process, after the pool's
        mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT), which marked
        this mapping too: every page the kernel touched through it would
        stay locked in RAM, and an image larger than RAM would lock all
        of it.  The image's pages are page cache, written back to the
        image, not the worker's own memory, so the mapping is unlocked
        here first.
        """
        if not self._in_place:
            return None
        if _libc.munlock(_ffi.cast("void *", self._address), self.size) < 0:
            err = _ffi.errno
            raise OSError(err, f"munlock of the image mapping: {os.strerror(err)}")
        return (self._address, self.size)

    def mapped_address(self, offset: int, length: int) -> int:
        if not self._by_address or offset + length > self.size:
            return 0
        return self._address + offset

    def close(self) -> None:
        if self._map is not None:
            _ffi.release(self._pointer)
            self._map.close()
            self._map = None
            self._address = 0
        super().close()


def _is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)
