"""Backends: where a disk's bytes live.

A backend is a small class with a ``size`` and five operations; the
worker calls them with memoryviews into its GET buffer, so a backend
that reads with ``os.preadv`` copies straight into the kernel's view.
Failures raise ``OSError(errno, ...)``; the worker sends ``-errno`` to
the application, and any other exception becomes ``-EIO``.

A backend is named by a spec string, as ``abusectl serve --backend``
takes it:

    memory                   MemoryBackend: sparse shared memory
    file:PATH                FileBackend: image file (created sparse) or block device,
                             served in place; file:PATH?mapped=0 serves it by copy
    null                     NullBackend: reads zeroes, drops writes
    zero                     ZeroBackend: reads zeroes, refuses writes (EROFS)
    python:MODULE:CLASS      the user's Backend subclass, built as CLASS(size);
    python:FILE.py:CLASS     MODULE may be the path of a .py file
    rbd:POOL/IMAGE           RbdBackend: an existing Ceph RBD image (librbd), with
                             ?conf=PATH&id=NAME&keyring=PATH&timeout=SEC
"""

from __future__ import annotations

import errno
import os
from typing import Callable, NamedTuple

from abuse.backends.base import Backend
from abuse.backends.file import FileBackend, split_file_argument
from abuse.backends.memory import MemoryBackend
from abuse.backends.null import NullBackend, ZeroBackend
from abuse.backends.rbd import RbdBackend, split_rbd_argument
from abuse.backends.user import open_user_backend

__all__ = [
    "Backend",
    "FileBackend",
    "MemoryBackend",
    "NullBackend",
    "RbdBackend",
    "SPEC_CHOICES",
    "ZeroBackend",
    "check_spec",
    "open_backend",
]


class _Kind(NamedTuple):
    usage: str
    takes_argument: bool
    open: Callable[[str, str, int], Backend]  # (argument, whole spec, size)


def _open_file(argument: str, spec: str, size: int) -> Backend:
    path, mapped = split_file_argument(argument)
    path = os.path.expanduser(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, f"backend {spec!r}: directory {parent} does not exist")
    return FileBackend(path, size, mapped)


def _open_python(argument: str, spec: str, size: int) -> Backend:
    target, _, class_name = argument.rpartition(":")
    return open_user_backend(target, class_name, size, spec)


def _open_rbd(argument: str, spec: str, size: int) -> Backend:
    return RbdBackend(split_rbd_argument(argument), size)


_KINDS: dict[str, _Kind] = {
    "memory": _Kind("memory", False, lambda _arg, _spec, size: MemoryBackend(size)),
    "file": _Kind("file:PATH", True, _open_file),
    "null": _Kind("null", False, lambda _arg, _spec, size: NullBackend(size)),
    "zero": _Kind("zero", False, lambda _arg, _spec, size: ZeroBackend(size)),
    "python": _Kind("python:MODULE:CLASS", True, _open_python),
    "rbd": _Kind("rbd:POOL/IMAGE", True, _open_rbd),
}

#: The accepted spec shapes, for help texts and messages.
SPEC_CHOICES = tuple(kind.usage for kind in _KINDS.values())


def _bad(spec: str, why: str) -> ValueError:
    return ValueError(f"bad backend {spec!r} ({why}): expected one of {', '.join(SPEC_CHOICES)}")


def _split(spec: str) -> tuple[_Kind, str]:
    name, colon, argument = spec.partition(":")
    kind = _KINDS.get(name)
    if kind is None:
        raise _bad(spec, f"unknown kind {name!r}" if name else "empty")
    if kind.takes_argument and not argument:
        raise _bad(spec, f"{name} needs {kind.usage}")
    if not kind.takes_argument and colon:
        raise _bad(spec, f"{name} takes no argument")
    if name == "file":
        try:
            split_file_argument(argument)
        except ValueError as err:
            raise _bad(spec, str(err)) from None
    if name == "rbd":
        try:
            split_rbd_argument(argument)
        except ValueError as err:
            raise _bad(spec, str(err)) from None
    if name == "python":
        target, _, class_name = argument.rpartition(":")
        if not target or not all(part.isidentifier() for part in class_name.split(".")):
            raise _bad(spec, f"needs {kind.usage}")
    return kind, argument


def check_spec(spec: str) -> str:
    """Return ``spec`` if it is well formed; nothing is opened or imported.

    Raises ValueError naming the spec and the valid choices otherwise.
    """
    _split(spec)
    return spec


def open_backend(spec: str, size: int) -> Backend:
    """Open the backend named by ``spec`` for a disk of ``size`` bytes.

    Raises ValueError for a malformed spec, a non-positive size, or a
    ``python:`` module or class that does not exist; OSError when the
    storage cannot be opened (for ``file:``, a missing parent directory
    is FileNotFoundError naming it).
    """
    kind, argument = _split(spec)
    if size <= 0:
        raise ValueError(f"backend {spec!r}: size must be positive, not {size}")
    return kind.open(argument, spec, size)
