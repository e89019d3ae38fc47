"""The file backend served in place: a shared mapping of the image.

The kernel stores a write into the mapping at GET and reads a read's
answer from it at PUT; here ``ctypes.memmove`` at the mapped address
plays the kernel's part, and the image is read and written through a
second, independent file descriptor.  Discard and write zeroes go
through the backend's fd (fallocate) and must show in the mapping at
once: both are the same page cache.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from abuse.backends import FileBackend, check_spec, open_backend
from abuse.backends.file import split_file_argument

K, M, G = 1 << 10, 1 << 20, 1 << 30
SIZE = 4 * M


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed * 7 + i) & 0xFF for i in range(length))


def kernel_stores(backend: FileBackend, offset: int, data: bytes) -> None:
    """What GET does for a write served in place: copy into the mapping."""
    mapping = backend.mapping()
    assert mapping is not None
    address, size = mapping
    assert offset + len(data) <= size
    ctypes.memmove(address + offset, data, len(data))


def kernel_loads(backend: FileBackend, offset: int, length: int) -> bytes:
    """What PUT does for a read served in place: copy from the mapping."""
    mapping = backend.mapping()
    assert mapping is not None
    return ctypes.string_at(mapping[0] + offset, length)


def image_bytes(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return tmp_path / "disk.img"


@pytest.fixture
def mapped(image: Path) -> Iterator[FileBackend]:
    with open_backend(f"file:{image}", SIZE) as backend:
        assert isinstance(backend, FileBackend)
        yield backend


def test_file_is_served_in_place_by_default(mapped: FileBackend) -> None:
    assert mapped.mapped
    mapping = mapped.mapping()
    assert mapping is not None
    assert mapping[1] == SIZE
    assert mapped.mapped_address(4 * K, 4 * K) == mapping[0] + 4 * K
    assert mapped.mapped_address(SIZE - 4 * K, 8 * K) == 0  # past the mapping


def test_mapped_0_serves_by_copy(image: Path) -> None:
    with open_backend(f"file:{image}?mapped=0", SIZE) as backend:
        assert isinstance(backend, FileBackend)
        assert not backend.mapped
        assert backend.mapping() is None
        assert backend.mapped_address(0, 4 * K) == 0
        backend.write(8 * K, memoryview(pattern(3, 4 * K)))
        buf = bytearray(4 * K)
        backend.read(8 * K, memoryview(buf))
    assert bytes(buf) == pattern(3, 4 * K)
    assert image_bytes(image, 8 * K, 4 * K) == pattern(3, 4 * K)


def test_writes_into_the_mapping_are_in_the_image(mapped: FileBackend, image: Path) -> None:
    kernel_stores(mapped, 12 * K, pattern(1, 8 * K))
    assert image_bytes(image, 12 * K, 8 * K) == pattern(1, 8 * K)
    mapped.flush()
    assert image_bytes(image, 12 * K, 8 * K) == pattern(1, 8 * K)


def test_writes_to_the_image_show_in_the_mapping(mapped: FileBackend, image: Path) -> None:
    fd = os.open(image, os.O_WRONLY)
    try:
        os.pwrite(fd, pattern(2, 4 * K), 20 * K)
    finally:
        os.close(fd)
    assert kernel_loads(mapped, 20 * K, 4 * K) == pattern(2, 4 * K)


def test_copy_path_and_mapping_see_each_other(mapped: FileBackend) -> None:
    """A worker that fell back to copies (a grown disk) beside in-place ones."""
    mapped.write(0, memoryview(pattern(4, 4 * K)))
    assert kernel_loads(mapped, 0, 4 * K) == pattern(4, 4 * K)
    kernel_stores(mapped, 4 * K, pattern(5, 4 * K))
    buf = bytearray(4 * K)
    mapped.read(4 * K, memoryview(buf))
    assert bytes(buf) == pattern(5, 4 * K)


@pytest.mark.parametrize("op", ["discard", "write_zeroes"])
def test_fallocate_is_coherent_with_the_mapping(mapped: FileBackend, image: Path, op: str) -> None:
    kernel_stores(mapped, 0, pattern(6, 64 * K))
    getattr(mapped, op)(16 * K, 32 * K)
    expected = pattern(6, 16 * K) + bytes(32 * K) + pattern(6, 64 * K)[48 * K :]
    assert kernel_loads(mapped, 0, 64 * K) == expected
    assert image_bytes(image, 0, 64 * K) == expected
    # The punched range maps afresh, and takes new writes.
    kernel_stores(mapped, 20 * K, pattern(7, 4 * K))
    assert image_bytes(image, 20 * K, 4 * K) == pattern(7, 4 * K)


def test_discard_frees_the_image_blocks(mapped: FileBackend, image: Path) -> None:
    kernel_stores(mapped, 0, pattern(8, 1 * M))
    mapped.flush()
    before = os.stat(image).st_blocks
    mapped.discard(0, 1 * M)
    assert os.stat(image).st_blocks <= before - (1 * M) // 512 + 8


def test_flush_is_fdatasync_of_the_image(mapped: FileBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    kernel_stores(mapped, 0, pattern(9, 4 * K))
    mapped.flush()
    assert synced == [mapped.fd]


def test_a_mapping_larger_than_ram_touches_only_what_is_used(tmp_path: Path) -> None:
    """An image larger than the machine's RAM maps (address space only)
    and costs only the blocks written."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    size = max(4 * ram, 64 * G)
    image = tmp_path / "huge.img"
    try:
        backend = FileBackend(str(image), size)
    except OSError as err:
        if err.errno in (errno.EFBIG, errno.ENOSPC):
            pytest.skip(f"{tmp_path} cannot hold a sparse {size >> 30} GiB file: {err}")
        raise
    with backend:
        mapping = backend.mapping()
        assert mapping is not None
        assert mapping[1] == size
        for offset in (0, size // 2, size - 4 * K):
            kernel_stores(backend, offset, pattern(offset % 251, 4 * K))
        backend.flush()
        for offset in (0, size // 2, size - 4 * K):
            assert kernel_loads(backend, offset, 4 * K) == pattern(offset % 251, 4 * K)
            assert image_bytes(image, offset, 4 * K) == pattern(offset % 251, 4 * K)
    assert os.stat(image).st_blocks * 512 < 16 * M


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that starts at ``address``."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{address:x}-"))
    return next(line for line in lines[at + 1 :] if line.startswith("VmFlags:")).split()[1:]


def test_mapping_unlocks_the_image_after_mlockall(mapped: FileBackend) -> None:
    """A pool's worker calls mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT)
    before it asks for the mapping (abuse.pool._harden): the image's pages
    must not stay locked in RAM, or an image larger than RAM locks it all."""
    libc = ctypes.CDLL(None, use_errno=True)
    pid = os.fork()
    if pid == 0:  # the worker's side
        code = 3
        try:
            if libc.mlockall(1 | 2 | 4) < 0:
                code = 2
            else:
                locked_before = "lo" in _vm_flags(mapped._address)
                mapping = mapped.mapping()
                assert mapping is not None
                flags = _vm_flags(mapping[0])
                code = 0 if locked_before and "lo" not in flags and "sh" in flags else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 2 and os.geteuid() != 0:
        pytest.skip("mlockall is not permitted here")
    assert code == 0


def test_subclass_that_overrides_read_or_write_is_served_by_copy(image: Path) -> None:
    class Counting(FileBackend):
        def write(self, offset: int, data: memoryview) -> None:
            super().write(offset, data)

    class Flushing(FileBackend):
        def flush(self) -> None:
            super().flush()

    with Counting(str(image), SIZE) as counting:
        assert counting.mapping() is None
        assert counting.mapped_address(0, 4 * K) != 0  # reads still by address
    with Flushing(str(image), SIZE) as flushing:
        assert flushing.mapping() is not None


def test_a_file_system_that_cannot_map_serves_by_copy(
    image: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    monkeypatch.setattr(mmap, "mmap", refuse)
    with FileBackend(str(image), SIZE) as backend:
        assert backend.mapping() is None
        backend.write(0, memoryview(pattern(10, 4 * K)))
    assert "serving it by copy" in caplog.text
    assert image_bytes(image, 0, 4 * K) == pattern(10, 4 * K)


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("/a/b.img", ("/a/b.img", True)),
        ("/a/b.img?mapped=0", ("/a/b.img", False)),
        ("/a/b.img?mapped=1", ("/a/b.img", True)),
        ("/a/b?c.img?", ("/a/b?c.img", True)),
    ],
)
def test_file_argument(argument: str, expected: tuple[str, bool]) -> None:
    assert split_file_argument(argument) == expected
    assert check_spec(f"file:{argument}") == f"file:{argument}"


@pytest.mark.parametrize("spec", ["file:/a?mapped=2", "file:/a?copy=1", "file:?mapped=0", "file:/a?mapped"])
def test_bad_file_options(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        check_spec(spec)
    assert repr(spec) in str(info.value)
