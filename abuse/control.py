"""Control: one open file on /dev/abuse and the ioctls on it.

This is the one place where an errno from the kernel becomes an
AbuseError.  GET and PUT, the hot path, go through :class:`Xfer`, which
owns its preallocated structs and raises OSError for the caller's loop.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from abuse import uapi
from abuse._exceptions import error_from_errno

__all__ = ["CONTROL_PATH", "COUNTER_FIELDS", "Control", "DiskConfig", "DiskInfo", "Xfer"]

CONTROL_PATH = "/dev/abuse"

_CONFIG_FIELDS = (
    "index",
    "block_size",
    "size",
    "flags",
    "queue_depth",
    "max_request_bytes",
    "timeout_ms",
    "retries",
)
COUNTER_FIELDS = (
    "queued",
    "in_flight",
    "completed",
    "errors",
    "requeued",
    "timeouts",
    "rejected",
    "attached",
    "bytes_read",
    "bytes_written",
    "fenced",
)


@dataclass(frozen=True)
class DiskConfig:
    """What a disk is (struct abuse_config)."""

    index: int
    block_size: int
    size: int
    flags: int
    queue_depth: int
    max_request_bytes: int
    timeout_ms: int
    retries: int

    @property
    def name(self) -> str:
        return f"abuse{self.index}"

    @property
    def path(self) -> str:
        return f"/dev/abuse{self.index}"


@dataclass(frozen=True)
class DiskInfo:
    """A disk's config and its live counters (struct abuse_info)."""

    config: DiskConfig
    counters: dict[str, int]


class Control:
    """An open /dev/abuse.  Closing it requeues what it still holds."""

    def __init__(self, path: str = CONTROL_PATH) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise error_from_errno(err.errno or errno.EIO, path) from err
        self.path = path

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ioctl(self, name: str, arg: Any) -> None:
        """Issue ioctl ``ABUSE_IOC_<name>``; raise AbuseError on failure."""
        if uapi.lib.ioctl(self._fd, uapi.ioctls[f"ABUSE_IOC_{name}"], arg) < 0:
            raise error_from_errno(uapi.ffi.errno, name.lower())

    def version(self) -> tuple[int, int]:
        """The module's uapi version and its feature bits."""
        ver = uapi.ffi.new("struct abuse_version *")
        self.ioctl("VERSION", ver)
        return int(ver.version), int(ver.features)

    def create(
        self,
        size: int,
        block_size: int = 4096,
        flags: int = 0,
        queue_depth: int = 0,
        max_request_bytes: int = 0,
        timeout_ms: int = 0,
        retries: int = 0,
    ) -> DiskConfig:
        """Create a disk; returns its config with the index filled in."""
        cfg = uapi.ffi.new("struct abuse_config *")
        cfg.size = size
        cfg.block_size = block_size
        cfg.flags = flags
        cfg.queue_depth = queue_depth
        cfg.max_request_bytes = max_request_bytes
        cfg.timeout_ms = timeout_ms
        cfg.retries = retries
        self.ioctl("CREATE", cfg)
        return _config(cfg)

    def destroy(self, index: int, force: bool = False) -> None:
        """Remove disk ``index``; DiskBusy if open and not ``force``."""
        self.ioctl("DESTROY", _target(index, uapi.ABUSE_DESTROY_FORCE if force else 0))

    def info(self, index: int) -> DiskInfo:
        """Config and counters of disk ``index``."""
        info = uapi.ffi.new("struct abuse_info *")
        info.config.index = index
        self.ioctl("INFO", info)
        counters = {name: int(getattr(info.counters, name)) for name in COUNTER_FIELDS}
        return DiskInfo(_config(info.config), counters)

    def set_info(self, config: DiskConfig) -> None:
        """Apply ``config`` online: size and ABUSE_F_READ_ONLY may change."""
        cfg = uapi.ffi.new("struct abuse_config *")
        for name in _CONFIG_FIELDS:
            setattr(cfg, name, getattr(config, name))
        self.ioctl("SET_INFO", cfg)

    def resize(self, index: int, size: int) -> None:
        """Change the size of disk ``index`` while it may be in use."""
        current = self.info(index).config
        self.set_info(DiskConfig(**{**current.__dict__, "size": size}))

    def attach(self, index: int) -> None:
        """Bind this file to disk ``index`` so that it can GET and PUT."""
        self.ioctl("ATTACH", _target(index, 0))

    def reset(self, index: int, fail: bool = False) -> None:
        """Requeue every in-flight request of ``index`` (or fail all: ``fail``)."""
        self.ioctl("RESET", _target(index, uapi.ABUSE_RESET_FAIL if fail else 0))

    def list(self) -> list[int]:
        """Indexes of the existing disks, from sysfs."""
        try:
            names = os.listdir("/sys/block")
        except OSError:
            return []
        found = []
        for name in names:
            if name.startswith("abuse") and name[5:].isdigit():
                found.append(int(name[5:]))
        return sorted(found)


def _target(index: int, flags: int) -> Any:
    if index < 0:
        raise ValueError(f"disk index must be >= 0, not {index}")
    target = uapi.ffi.new("struct abuse_target *")
    target.index = index
    target.flags = flags
    return target


def _config(cfg: Any) -> DiskConfig:
    return DiskConfig(**{name: int(getattr(cfg, name)) for name in _CONFIG_FIELDS})


class Xfer:
    """Preallocated GET/PUT arguments for one attached Control.

    ``requests`` and ``replies`` are cffi arrays of ``batch`` entries;
    ``buffer`` is the data area the kernel copies into and out of.  One
    :meth:`exchange` answers the first ``nr_replies`` replies and fetches
    up to ``batch`` new requests, in one system call.
    """

    def __init__(self, control: Control, batch: int, buffer: Any, buffer_size: int) -> None:
        ffi = uapi.ffi
        self._fd = control.fileno()
        self._put = uapi.ioctls["ABUSE_IOC_PUT"]
        self.batch = batch
        self.requests = ffi.new("struct abuse_request[]", batch)
        self.replies = ffi.new("struct abuse_reply[]", batch)
        self.arg = ffi.new("struct abuse_xfer *")
        self.arg.requests = int(ffi.cast("uintptr_t", self.requests))
        self.arg.replies = int(ffi.cast("uintptr_t", self.replies))
        self.arg.max_requests = batch
        self.limit = batch  # requests one exchange may fetch, 1..batch
        self.tokens: Any = None
        self._mapped = 0
        self._tokens = 0
        self.use_buffer(int(ffi.cast("uintptr_t", buffer)), buffer_size)

    def use_tokens(self) -> None:
        """Fetch each request's fencing token too, into ``tokens`` (ABUSE_XFER_TOKENS)."""
        ffi = uapi.ffi
        self.tokens = ffi.new("uint64_t[]", self.batch)
        self.arg.tokens = int(ffi.cast("uintptr_t", self.tokens))
        self._tokens = uapi.ABUSE_XFER_TOKENS

    def use_buffer(self, address: int, size: int, mapped: bool = False) -> None:
        """Take payloads in ``size`` bytes at ``address`` from the next call on.

        ``mapped``: the buffer is the whole disk, mapped, and each
        request's data sits at its own offset (ABUSE_XFER_MAPPED).
        """
        self.arg.buffer = address
        self.arg.buffer_size = size
        self._mapped = uapi.ABUSE_XFER_MAPPED if mapped else 0

    def exchange(self, nr_replies: int, wait: bool, fetch: bool = True, wait_ms: int | None = None) -> int:
        """PUT ``nr_replies`` replies, GET a batch; returns requests got.

        With nothing queued the GET returns 0 at once unless ``wait``; it
        then blocks until a request arrives, or ``wait_ms`` passes if not
        None.  With ``fetch`` false only the PUT half runs.  Raises OSError
        with the kernel's errno (EINTR, ENODEV, ...).
        """
        arg = self.arg
        arg.nr_replies = nr_replies
        arg.max_requests = self.limit if fetch else 0
        modes = self._mapped | self._tokens
        if not wait:
            arg.flags = uapi.ABUSE_XFER_NOWAIT | modes
            arg.timeout_ms = 0
        elif wait_ms is None:
            arg.flags = modes
            arg.timeout_ms = 0
        else:
            arg.flags = uapi.ABUSE_XFER_TIMEOUT | modes
            arg.timeout_ms = wait_ms
        if uapi.lib.ioctl(self._fd, self._put, arg) < 0:
            err = uapi.ffi.errno
            raise OSError(err, os.strerror(err))
        return int(arg.nr_requests)
