"""Hostile memory for ioctl arguments, and the raw ioctl itself.

An :class:`Arena` is a run of read-write pages followed by a guard page
(no access), a read-only page and another guard page, so that a struct
can be placed to end exactly at the guard, to straddle it, or to be
readable but not writable.  :func:`pointer` picks one of those places,
or an address that was never user memory (NULL, low, kernel,
non-canonical), and says what the kernel should be able to do there.
"""

from __future__ import annotations

import ctypes
import mmap
import random
from dataclasses import dataclass

from abuse import uapi

PAGE = mmap.PAGESIZE
# Nothing can be mapped below vm.mmap_min_addr: "low" pointers stay under it.
with open("/proc/sys/vm/mmap_min_addr") as _f:
    LOW_LIMIT = max(int(_f.read()), PAGE)
PROT_NONE = 0  # not in the mmap module
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

_ffi = uapi.ffi
_ioctl = uapi.lib.ioctl


def ioctl(fd: int, cmd: int, arg: int) -> int:
    """One ioctl with a raw number and a raw address; its errno, 0 on success."""
    if _ioctl(fd, _ffi.cast("unsigned int", cmd), _ffi.cast("unsigned long", arg)) < 0:
        return int(_ffi.errno)
    return 0


def _protect(address: int, length: int, prot: int) -> None:
    if _libc.mprotect(address, length, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


@dataclass(frozen=True)
class Pointer:
    """An address and what the kernel can do with ``size`` bytes there."""

    address: int
    readable: bool
    writable: bool
    kind: str


class Arena:
    """``pages`` read-write pages, a guard, a read-only page, a guard.

    The last guard is ``tail`` bytes long (at least a page).  A GET's
    data buffer may be longer than the arena, and the driver places a
    write's payload wherever the buffer says; reads, which copy nothing
    at GET, move that place on without faulting.  A tail as long as the
    most a GET can hand out keeps every such payload inside this mapping,
    where it faults, and out of whatever the process has mapped next
    (the other arenas, Python's heap).
    """

    def __init__(self, pages: int = 64, tail: int = PAGE) -> None:
        self.pages = pages
        tail = max(PAGE, -(-tail // PAGE) * PAGE)
        self.map = mmap.mmap(-1, (pages + 2) * PAGE + tail)
        self._cdata = _ffi.from_buffer(self.map)
        self.base = int(_ffi.cast("uintptr_t", self._cdata))
        self.guard = self.base + pages * PAGE
        self.readonly = self.guard + PAGE
        _protect(self.guard, PAGE, PROT_NONE)
        _protect(self.readonly, PAGE, mmap.PROT_READ)
        _protect(self.readonly + PAGE, tail, PROT_NONE)
        self.tail = tail

    @property
    def size(self) -> int:
        return self.pages * PAGE

    def write(self, address: int, data: bytes) -> None:
        """Store ``data`` at ``address`` inside the read-write pages."""
        start = address - self.base
        assert 0 <= start and start + len(data) <= self.size, "outside the read-write pages"
        self.map[start : start + len(data)] = data

    def read(self, address: int, length: int) -> bytes:
        start = address - self.base
        assert 0 <= start and start + length <= self.size, "outside the read-write pages"
        return self.map[start : start + length]

    def fill_readonly(self, data: bytes) -> int:
        """Put ``data`` at the start of the read-only page; its address."""
        assert len(data) <= PAGE
        _protect(self.readonly, PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
        start = self.readonly - self.base
        self.map[start : start + len(data)] = data
        _protect(self.readonly, PAGE, mmap.PROT_READ)
        return self.readonly

    def close(self) -> None:
        _protect(self.guard, 2 * PAGE + self.tail, mmap.PROT_READ | mmap.PROT_WRITE)
        _ffi.release(self._cdata)
        self.map.close()


# Kinds of pointer and how often each is drawn.
_KINDS = (
    ("aligned", 30),
    ("odd", 10),
    ("at_guard", 10),
    ("straddle", 8),
    ("guard", 4),
    ("readonly", 6),
    ("null", 4),
    ("low", 3),
    ("kernel", 4),
    ("noncanonical", 4),
    ("top", 3),
)
_KIND_NAMES = [k for k, _ in _KINDS]
_KIND_WEIGHTS = [w for _, w in _KINDS]


def pointer(rng: random.Random, arena: Arena, size: int) -> Pointer:
    """A place for ``size`` bytes, valid or not."""
    kind = rng.choices(_KIND_NAMES, _KIND_WEIGHTS)[0]
    return pointer_of_kind(rng, arena, size, kind)


def pointer_of_kind(rng: random.Random, arena: Arena, size: int, kind: str) -> Pointer:
    size = max(size, 1)
    if kind in ("aligned", "odd") and size <= arena.size - 8:
        offset = rng.randrange(0, arena.size - size - 7) // 8 * 8
        if kind == "odd":
            offset += rng.randrange(1, 8)
        return Pointer(arena.base + offset, True, True, kind)
    if kind in ("aligned", "odd", "at_guard") and size <= arena.size:
        return Pointer(arena.guard - size, True, True, "at_guard")
    if kind == "straddle" or kind in ("aligned", "odd", "at_guard"):
        # Starts in the last read-write page, runs into the guard.
        inside = rng.randrange(0, min(size, PAGE)) if size > 1 else 0
        return Pointer(arena.guard - inside, False, False, "straddle")
    if kind == "guard":
        return Pointer(arena.guard + rng.randrange(0, PAGE), False, False, kind)
    if kind == "readonly":
        return Pointer(arena.readonly, size <= PAGE, False, kind)
    if kind == "null":
        return Pointer(0, False, False, kind)
    if kind == "low":
        return Pointer(rng.randrange(1, LOW_LIMIT), False, False, kind)
    if kind == "kernel":
        return Pointer(0xFFFF888000000000 + rng.randrange(0, 1 << 40), False, False, kind)
    if kind == "noncanonical":
        return Pointer(rng.randrange(1 << 47, (1 << 64) - (1 << 47)), False, False, kind)
    if kind == "top":
        return Pointer((1 << 64) - rng.randrange(1, 1 << 16), False, False, kind)
    raise ValueError(kind)


def place(rng: random.Random, arena: Arena, data: bytes) -> Pointer:
    """A hostile or valid pointer, with ``data`` stored there when it can be."""
    ptr = pointer(rng, arena, len(data))
    if ptr.kind == "readonly" and ptr.readable:
        arena.fill_readonly(data)
    elif ptr.kind == "straddle":
        inside = arena.guard - ptr.address
        if inside:
            arena.write(ptr.address, data[:inside])
    elif ptr.readable:
        arena.write(ptr.address, data)
    return ptr
