"""Control: one open file on /dev/abuse and the ioctls on it.

This is the one place where an errno from the kernel becomes an
AbuseError.  GET and PUT, the hot path, go through :class:`Xfer`, which
owns its preallocated structs and raises OSError for the caller's loop.
"""

from __future__ import annotations

import errno
import logging
import os
import select
from dataclasses import dataclass
from typing import Any

from abuse import uapi
from abuse._exceptions import FeatureMissing, error_from_errno

__all__ = [
    "CONTROL_PATH",
    "COUNTER_FIELDS",
    "Control",
    "DiskConfig",
    "DiskInfo",
    "ModuleFeatures",
    "SYSFS_BLOCK",
    "Xfer",
    "sysfs_info",
    "sysfs_workers",
]

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ModuleFeatures:
    """What the loaded module speaks: its answer to ABUSE_IOC_VERSION.

    ``features`` are ABUSE_F_* disk flags, ``xfer_features`` ABUSE_XFER_*
    GET/PUT flags.  A version-1 module reports no xfer_features; it is
    taken to know ABUSE_XFER_NOWAIT only (:data:`abuse.uapi.V1_XFER_FEATURES`).
    """

    version: int
    max_batch: int
    features: int
    xfer_features: int

    @classmethod
    def from_answer(cls, version: int, max_batch: int, features: int, xfer_features: int) -> ModuleFeatures:
        """The features of a VERSION answer, a version-1 module's included."""
        if version < 2:
            xfer_features = uapi.V1_XFER_FEATURES
        return cls(version, max_batch, features, xfer_features)

    def has_xfer(self, bit: int) -> bool:
        """Whether GET and PUT accept ABUSE_XFER_* ``bit``."""
        return bool(self.xfer_features & bit)

    def describe(self) -> str:
        return f"the loaded abuse module (uapi version {self.version})"

    def missing(self, table: dict[str, int], bits: int) -> list[str]:
        """Names (``ABUSE_F_FENCE``, ...) of the header's bits in ``bits`` this module lacks."""
        have = self.features if table is uapi.DISK_FEATURES else self.xfer_features
        return [name for name, bit in table.items() if bits & bit and not have & bit]

    def require(self, disk_flags: int = 0, xfer_flags: int = 0) -> None:
        """Raise FeatureMissing naming each known bit asked for that the module lacks.

        Bits the header does not know are left for the kernel to refuse.
        """
        names = self.missing(uapi.DISK_FEATURES, disk_flags) + self.missing(uapi.XFER_FEATURES, xfer_flags)
        if names:
            words = ", ".join(f"{uapi.feature_name(name)} ({name})" for name in names)
            raise FeatureMissing(f"{self.describe()} does not support {words}: load a newer abuse.ko")


class Control:
    """An open /dev/abuse.  Closing it requeues what it still holds."""

    def __init__(self, path: str = CONTROL_PATH) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise error_from_errno(err.errno or errno.EIO, path) from err
        self.path = path
        self._features: ModuleFeatures | None = None

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

    def features(self) -> ModuleFeatures:
        """What the loaded module supports (VERSION, asked once per Control)."""
        if self._features is None:
            ver = uapi.ffi.new("struct abuse_version *")
            self.ioctl("VERSION", ver)
            self._features = ModuleFeatures.from_answer(
                int(ver.version), int(ver.max_batch), int(ver.features), int(ver.xfer_features)
            )
        return self._features

    def create(
        self,
        size: int,
        block_size: int = 4096,
        flags: int = 0,
        queue_depth: int = 0,
        max_request_bytes: int = 0,
        timeout_ms: int = 0,
        retries: int = 0,
        index: int | None = None,
    ) -> DiskConfig:
        """Create a disk; returns its config with the index filled in.

        ``index`` asks for /dev/abuse<index> (DiskExists if taken) instead
        of the lowest free one.  Raises FeatureMissing, before the kernel
        is asked, for a flag of the header that the loaded module does
        not support.
        """
        if index is not None:
            flags |= uapi.ABUSE_F_INDEX
        self.features().require(disk_flags=flags & uapi.ABUSE_F_ALL)
        cfg = uapi.ffi.new("struct abuse_config *")
        if index is not None:
            cfg.index = index
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
        return list_disks()


SYSFS_BLOCK = "/sys/block"


def list_disks() -> list[int]:
    """Indexes of the existing disks, from sysfs (no privileges needed)."""
    try:
        names = os.listdir(SYSFS_BLOCK)
    except OSError:
        return []
    found = []
    for name in names:
        if name.startswith("abuse") and name[5:].isdigit():
            found.append(int(name[5:]))
    return sorted(found)


def _sysfs_dir(index: int) -> str:
    return f"{SYSFS_BLOCK}/abuse{index}/abuse"


def sysfs_info(index: int) -> DiskInfo | None:
    """Config and counters of disk ``index`` from sysfs, readable by anyone.

    None if this module exports no config there (an older module) or
    the disk is gone.  ``flags`` is read as hex, the rest as decimal;
    a counter the module does not export reads 0.
    """
    base = _sysfs_dir(index)
    values: dict[str, int] = {"index": index}
    try:
        for name in _CONFIG_FIELDS[1:]:
            with open(f"{base}/{name}") as f:
                values[name] = int(f.read().strip(), 16 if name == "flags" else 10)
        counters = {}
        for name in COUNTER_FIELDS:
            try:
                with open(f"{base}/{name}") as f:
                    counters[name] = int(f.read().strip())
            except FileNotFoundError:
                counters[name] = 0
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return DiskInfo(DiskConfig(**values), counters)


def sysfs_workers(index: int) -> list[int] | None:
    """Pids serving disk ``index`` (one per attached file), or None if not exported."""
    try:
        with open(f"{_sysfs_dir(index)}/workers") as f:
            return [int(word) for word in f.read().split()]
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


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
    up to ``limit`` (at most ``batch``) new requests, in one system call.
    """

    def __init__(self, control: Control, batch: int, buffer: Any, buffer_size: int) -> None:
        ffi = uapi.ffi
        self._fd = control.fileno()
        module = control.features()
        #: Whether GET may serve in place (ABUSE_XFER_MAPPED); else use_buffer refuses mapped.
        self.can_map = module.has_xfer(uapi.ABUSE_XFER_MAPPED)
        self._timed = module.has_xfer(uapi.ABUSE_XFER_TIMEOUT)
        self._module = module
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        for bit, fallback in (
            (uapi.ABUSE_XFER_TIMEOUT, "idle waits poll"),
            (uapi.ABUSE_XFER_MAPPED, "serving by copy"),
        ):
            if not module.has_xfer(bit):
                name = module.missing(uapi.XFER_FEATURES, bit)[0]
                log.info("%s has no %s: %s", module.describe(), name, fallback)
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
        """Fetch each request's fencing token too, into ``tokens`` (ABUSE_XFER_TOKENS).

        FeatureMissing if the module has no tokens: a backend that relies
        on them must not be served without.
        """
        if not self._module.has_xfer(uapi.ABUSE_XFER_TOKENS):
            name = self._module.missing(uapi.XFER_FEATURES, uapi.ABUSE_XFER_TOKENS)[0]
            raise FeatureMissing(
                f"{self._module.describe()} has no {name}: a backend with fencing tokens needs it"
            )
        ffi = uapi.ffi
        self.tokens = ffi.new("uint64_t[]", self.batch)
        self.arg.tokens = int(ffi.cast("uintptr_t", self.tokens))
        self._tokens = uapi.ABUSE_XFER_TOKENS

    def use_buffer(self, address: int, size: int, mapped: bool = False) -> None:
        """Take payloads in ``size`` bytes at ``address`` from the next call on.

        ``mapped``: the buffer is the whole disk, mapped, and each
        request's data sits at its own offset (ABUSE_XFER_MAPPED).
        """
        if mapped and not self.can_map:
            raise ValueError("the loaded module cannot serve in place (no ABUSE_XFER_MAPPED)")
        self.arg.buffer = address
        self.arg.buffer_size = size
        self._mapped = uapi.ABUSE_XFER_MAPPED if mapped else 0

    def exchange(self, nr_replies: int, wait: bool, fetch: bool = True, wait_ms: int | None = None) -> int:
        """PUT ``nr_replies`` replies, GET a batch; returns requests got.

        With nothing queued the GET returns 0 at once unless ``wait``; it
        then blocks until a request arrives, or ``wait_ms`` passes if not
        None.  With ``fetch`` false only the PUT half runs.  Raises OSError
        with the kernel's errno (EINTR, ENODEV, ...).

        On a module without ABUSE_XFER_TIMEOUT a timed wait is a NOWAIT
        call and, if it got nothing, a poll() of ``wait_ms``; it then
        returns 0 and the caller calls again.
        """
        arg = self.arg
        arg.nr_replies = nr_replies
        arg.max_requests = self.limit if fetch else 0
        modes = self._mapped | self._tokens
        if wait and wait_ms is not None and not self._timed:
            arg.flags = uapi.ABUSE_XFER_NOWAIT | modes
            arg.timeout_ms = 0
            if uapi.lib.ioctl(self._fd, self._put, arg) < 0:
                err = uapi.ffi.errno
                raise OSError(err, os.strerror(err))
            got = int(arg.nr_requests)
            if not got and fetch:
                self._poller.poll(wait_ms)
            return got
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
