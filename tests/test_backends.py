"""One contract for every backend, opened by spec as ``abusectl serve`` does.

Each backend is driven the way the worker drives it: through memoryviews
into one shared mmap'd buffer.  Behaviours differ only where the spec says
so: ``null`` drops writes, ``zero`` refuses them with EROFS.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from abuse.backends import Backend, FileBackend, check_spec, open_backend
from abuse.backends.memory import MemoryBackend

K, M, G = 1 << 10, 1 << 20, 1 << 30
SIZE = 4 * M
CHOICES = "memory, file:PATH, null, zero, python:MODULE:CLASS"

USER_BACKEND = textwrap.dedent(
    """
    from abuse.backends.base import Backend

    class RamDisk(Backend):
        can_discard = True
        can_write_zeroes = True

        def __init__(self, size):
            self.size = size
            self.data = bytearray(size)

        def read(self, offset, buf):
            buf[:] = self.data[offset : offset + len(buf)]

        def write(self, offset, data):
            self.data[offset : offset + len(data)] = data

        def discard(self, offset, length):
            self.data[offset : offset + length] = bytes(length)

    class NotABackend:
        def __init__(self, size):
            self.size = size
    """
)


class Case(NamedTuple):
    spec: str
    writes: str  # "store", "drop" or "refuse"


@pytest.fixture(params=["memory", "file", "null", "zero", "python-file", "python-module"])
def case(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Case:
    kind = request.param
    if kind == "file":
        return Case(f"file:{tmp_path}/disk.img", "store")
    if kind == "null":
        return Case("null", "drop")
    if kind == "zero":
        return Case("zero", "refuse")
    if kind == "python-file":
        (tmp_path / "userdisk.py").write_text(USER_BACKEND)
        return Case(f"python:{tmp_path}/userdisk.py:RamDisk", "store")
    if kind == "python-module":
        (tmp_path / "userdisk_mod.py").write_text(USER_BACKEND)
        monkeypatch.syspath_prepend(str(tmp_path))
        return Case("python:userdisk_mod:RamDisk", "store")
    return Case(kind, "store")


@pytest.fixture
def backend(case: Case) -> Iterator[Backend]:
    with open_backend(case.spec, SIZE) as opened:
        yield opened


@pytest.fixture
def buffer() -> Iterator[memoryview]:
    """A worker-like buffer: an mmap, handed out as memoryview slices."""
    area = mmap.mmap(-1, 4 * M)
    view = memoryview(area)
    yield view
    view.release()
    area.close()


def pattern(seed: int, length: int) -> bytes:
    return bytes((seed + i * 7) % 251 + 1 for i in range(length))


def read(backend: Backend, buffer: memoryview, offset: int, length: int) -> bytes:
    """Read through a slice of ``buffer`` that holds garbage beforehand.

    Where the backend offers the bytes by address (the worker then hands
    that address to the kernel), they must be the same bytes.
    """
    with buffer[:length] as view:
        view[:] = b"\xaa" * length
        backend.read(offset, view)
        data = bytes(view)
    address = backend.mapped_address(offset, length)
    if address:
        assert ctypes.string_at(address, length) == data
    return data


def test_memory_backend_offers_reads_by_address() -> None:
    with open_backend("memory", SIZE) as backend:
        assert backend.mapped_address(SIZE - 4096, 4096) != 0
        assert backend.mapped_address(SIZE - 4096, 8192) == 0  # past the end


def test_memory_subclass_that_overrides_read_is_read_by_call() -> None:
    """A subclass's read() may refuse a range: the worker must call it."""

    class Picky(MemoryBackend):
        def read(self, offset: int, buf: memoryview) -> None:
            raise OSError(errno.EIO, "bad range")

    with Picky(SIZE) as backend:
        assert backend.mapped_address(0, 4096) == 0
        assert backend.mapping() is None


def test_memory_backend_is_served_in_place_only_when_plain() -> None:
    """In place, the kernel stores writes itself: a write() override would be bypassed."""

    class Counting(MemoryBackend):
        def write(self, offset: int, data: memoryview) -> None:
            super().write(offset, data)

    with open_backend("memory", SIZE) as backend:
        mapping = backend.mapping()
        assert mapping is not None
        address, size = mapping
        assert size == SIZE and address == backend.mapped_address(0, 4096)
    with Counting(SIZE) as counting:
        assert counting.mapping() is None
        assert counting.mapped_address(0, 4096) != 0  # reads may still go by address
    with open_backend("zero", SIZE) as zero:
        assert zero.mapping() is None


def write(backend: Backend, buffer: memoryview, offset: int, data: bytes) -> None:
    with buffer[len(buffer) - len(data) :] as view:
        view[:] = data
        backend.write(offset, view)


def test_size_and_capabilities(backend: Backend) -> None:
    assert backend.size == SIZE
    for flag in ("can_flush", "can_discard", "can_write_zeroes"):
        assert isinstance(getattr(backend, flag), bool)


@pytest.mark.parametrize(("offset", "length"), [(0, 4096), (SIZE - 4096, 4096), (512, 2 * M + 512)])
def test_fresh_disk_reads_zeroes(backend: Backend, buffer: memoryview, offset: int, length: int) -> None:
    assert read(backend, buffer, offset, length) == bytes(length)


def test_write_then_read(case: Case, backend: Backend, buffer: memoryview) -> None:
    data = pattern(1, 12 * K)
    if case.writes == "refuse":
        with pytest.raises(OSError) as info:
            write(backend, buffer, 8 * K, data)
        assert info.value.errno == errno.EROFS
        return
    write(backend, buffer, 8 * K, data)
    got = read(backend, buffer, 8 * K, len(data))
    assert got == (data if case.writes == "store" else bytes(len(data)))


def test_write_at_the_last_block(case: Case, backend: Backend, buffer: memoryview) -> None:
    if case.writes == "refuse":
        pytest.skip("zero refuses writes (test_write_then_read)")
    data = pattern(2, 4096)
    write(backend, buffer, SIZE - 4096, data)
    expected = data if case.writes == "store" else bytes(4096)
    assert read(backend, buffer, SIZE - 4096, 4096) == expected


def test_write_zeroes(case: Case, backend: Backend, buffer: memoryview) -> None:
    if case.writes == "refuse":
        with pytest.raises(OSError) as info:
            backend.write_zeroes(0, 8 * K)
        assert info.value.errno == errno.EROFS
        return
    data = pattern(3, 16 * K)
    write(backend, buffer, 0, data)
    backend.write_zeroes(4 * K, 8 * K)
    got = read(backend, buffer, 0, 16 * K)
    if case.writes == "store":
        assert got == data[: 4 * K] + bytes(8 * K) + data[12 * K :]
    else:
        assert got == bytes(16 * K)


def test_discard(case: Case, backend: Backend, buffer: memoryview) -> None:
    if case.writes == "refuse":
        with pytest.raises(OSError) as info:
            backend.discard(0, 8 * K)
        assert info.value.errno == errno.EROFS
        return
    data = pattern(4, 16 * K)
    write(backend, buffer, 0, data)
    backend.discard(4 * K, 8 * K)
    got = read(backend, buffer, 0, 16 * K)
    kept = data if case.writes == "store" else bytes(len(data))
    assert got[: 4 * K] == kept[: 4 * K]
    assert got[12 * K :] == kept[12 * K :]
    if backend.can_discard:  # every built-in discard punches a hole: zeroes
        assert got[4 * K : 12 * K] == bytes(8 * K)


def test_flush(backend: Backend) -> None:
    backend.flush()


def test_close_is_idempotent(case: Case) -> None:
    opened = open_backend(case.spec, SIZE)
    opened.close()
    opened.close()


def test_file_backend_is_created_sparse(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    with open_backend(f"file:{path}", 1 * G) as opened:
        assert isinstance(opened, FileBackend)
    st = os.stat(path)
    assert st.st_size == 1 * G
    assert st.st_blocks * 512 < 1 * M


def test_file_backend_keeps_existing_data(tmp_path: Path, buffer: memoryview) -> None:
    path = tmp_path / "old.img"
    path.write_bytes(pattern(5, 8 * K) + bytes(SIZE - 8 * K))
    with open_backend(f"file:{path}", SIZE) as opened:
        assert read(opened, buffer, 0, 8 * K) == pattern(5, 8 * K)
    assert path.stat().st_size == SIZE


def test_file_in_a_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError) as info:
        open_backend(f"file:{missing}/disk.img", SIZE)
    assert str(missing) in str(info.value.strerror)
    assert "does not exist" in str(info.value.strerror)
    assert not missing.exists()


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "bogus",
        "MEMORY",
        "file",
        "file:",
        "memory:4G",
        "null:",
        "zero:x",
        "python:",
        "python:userdisk",
        "python:userdisk:",
        "python:userdisk:1Bad",
        "python::RamDisk",
    ],
)
def test_bad_spec_names_spec_and_choices(spec: str) -> None:
    for call in (lambda: check_spec(spec), lambda: open_backend(spec, SIZE)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert repr(spec) in message
        assert CHOICES in message
        assert "\n" not in message


def test_good_specs_pass_the_check() -> None:
    for spec in (
        "memory",
        "file:/x/y.img",
        "null",
        "zero",
        "python:pkg.mod:Cls",
        "python:/a/b.py:Outer.Inner",
    ):
        assert check_spec(spec) == spec


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="size must be positive"):
        open_backend("null", 0)


def test_python_missing_module() -> None:
    with pytest.raises(ValueError, match="no module named 'no_such_module_abuse'"):
        open_backend("python:no_such_module_abuse:Disk", SIZE)


def test_python_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_backend(f"python:{tmp_path}/absent.py:Disk", SIZE)


def test_python_missing_class(tmp_path: Path) -> None:
    (tmp_path / "userdisk.py").write_text(USER_BACKEND)
    with pytest.raises(ValueError, match="has no 'Missing'"):
        open_backend(f"python:{tmp_path}/userdisk.py:Missing", SIZE)


def test_python_class_must_be_a_backend(tmp_path: Path) -> None:
    (tmp_path / "userdisk.py").write_text(USER_BACKEND)
    with pytest.raises(ValueError, match="not a subclass of abuse.Backend"):
        open_backend(f"python:{tmp_path}/userdisk.py:NotABackend", SIZE)


def test_python_errors_inside_the_user_module_propagate(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("import no_such_dependency_abuse\n")
    with pytest.raises(ModuleNotFoundError):
        open_backend(f"python:{tmp_path}/broken.py:Disk", SIZE)
