"""An in-memory nbdkit Python plugin: the Python peer of the benchmark.

The same job as abuse's ``memory`` backend, written the way nbdkit's
Python plugins are: one bytearray, slices copied in and out.

    nbdkit python bench/nbdkit_memory.py size=1073741824
"""

from __future__ import annotations

import nbdkit  # provided by nbdkit itself, inside its embedded Python

API_VERSION = 2

_disk = bytearray()
_view = memoryview(_disk)


def config(key: str, value: str) -> None:
    global _disk, _view
    if key != "size":
        raise RuntimeError(f"unknown parameter {key!r}")
    _disk = bytearray(int(value))
    _view = memoryview(_disk)


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


def open(readonly: bool) -> int:  # noqa: A001  # the plugin API's name
    return 0


def get_size(handle: int) -> int:
    return len(_disk)


def can_multi_conn(handle: int) -> bool:
    return True


def pread(handle: int, buf: bytearray, offset: int, flags: int) -> None:
    buf[:] = _view[offset : offset + len(buf)]


def pwrite(handle: int, buf: bytes, offset: int, flags: int) -> None:
    _view[offset : offset + len(buf)] = buf
