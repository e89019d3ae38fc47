"""Errors raised by the abuse package.

    AbuseError                  every failure of a control operation
    ├── ControlDeviceMissing    /dev/abuse is absent: the module is not loaded
    ├── AbusePermissionError    the caller may not use /dev/abuse (needs root)
    ├── DiskNotFound            no disk has that index
    ├── DiskBusy                the disk is open (destroy) or the file is taken
    ├── InvalidRequest          the kernel refused an argument (EINVAL, E2BIG)
    └── FeatureMissing          the loaded module lacks a feature that was asked for

Each carries ``errno`` and ``strerror`` and pickles, so a worker process
can hand one to its supervisor.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "AbuseError",
    "AbusePermissionError",
    "ControlDeviceMissing",
    "DiskBusy",
    "DiskNotFound",
    "FeatureMissing",
    "InvalidRequest",
    "error_from_errno",
]


class AbuseError(Exception):
    """A control operation failed; ``errno`` says how."""

    __module__ = "abuse"

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno
        self.strerror = os.strerror(errno) if errno else None

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return (type(self), (str(self), self.errno))


class ControlDeviceMissing(AbuseError):
    """/dev/abuse does not exist: load the module (``make load``)."""

    __module__ = "abuse"


class AbusePermissionError(AbuseError):
    """The caller lacks the rights to use /dev/abuse."""

    __module__ = "abuse"


class DiskNotFound(AbuseError):
    """No abuse disk has the given index."""

    __module__ = "abuse"


class DiskBusy(AbuseError):
    """The disk is in use."""

    __module__ = "abuse"


class InvalidRequest(AbuseError):
    """The kernel refused an argument."""

    __module__ = "abuse"


class FeatureMissing(AbuseError):
    """The loaded module does not support a feature asked for (an older module)."""

    __module__ = "abuse"


_BY_ERRNO: dict[int, type[AbuseError]] = {
    _errno.ENOENT: ControlDeviceMissing,
    _errno.ENXIO: ControlDeviceMissing,
    _errno.EPERM: AbusePermissionError,
    _errno.EACCES: AbusePermissionError,
    _errno.ENODEV: DiskNotFound,
    _errno.EBUSY: DiskBusy,
    _errno.EINVAL: InvalidRequest,
    _errno.E2BIG: InvalidRequest,
}


def error_from_errno(err: int, what: str) -> AbuseError:
    """The AbuseError subclass for ``err``, with a message naming ``what``.

    The kernel returns ENOENT/ENXIO and EPERM/EACCES only when the
    control device is opened, so those messages say what to do about it.
    """
    cls = _BY_ERRNO.get(err, AbuseError)
    if cls is ControlDeviceMissing:
        return cls(f"{what} not found: is the abuse module loaded? (make load)", err)
    if cls is AbusePermissionError:
        return cls(f"{what}: {os.strerror(err)} (needs root: CAP_SYS_ADMIN)", err)
    return cls(f"{what}: {os.strerror(err)}", err)
