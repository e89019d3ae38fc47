"""The disk of ``abusectl serve --create SIZE --record FILE``.

This is what the systemd unit abuse-serve@.service runs.  When it
restarts after a failure, its disk still exists (maybe mounted, with
requests queued for the next worker): the record file, kept in /run
across restarts, names that disk so the new run serves it again instead
of creating a second one.
"""

from __future__ import annotations

import os
from pathlib import Path

from abuse import uapi
from abuse._exceptions import AbuseError, DiskNotFound
from abuse.control import Control, DiskConfig
from abuse.sizes import format_size
from abusectl.devices import parse_dev

__all__ = ["CREATE_RETRIES", "CREATE_TIMEOUT_MS", "reuse_or_create"]

#: The defaults of ``abusectl create``.
CREATE_TIMEOUT_MS = 30_000
CREATE_RETRIES = 3


def _recorded(control: Control, record: Path, size: int) -> DiskConfig | None:
    """The recorded disk, if it still exists; None if there is none."""
    try:
        text = record.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        info = control.info(parse_dev(text))
    except (ValueError, DiskNotFound):
        return None  # an old record (the module was reloaded): start afresh
    config = info.config
    if config.size != size:
        raise AbuseError(
            f"{config.path} (recorded in {record}) is {format_size(config.size)}, "
            f"not {format_size(size)}: resize or destroy it first"
        )
    if info.counters["attached"]:
        raise AbuseError(f"{config.path} (recorded in {record}) is already served by another process")
    return config


def _write_record(record: Path, path: str) -> None:
    """Replace ``record`` in one step: a crash leaves the old or the new."""
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(path + "\n")
    tmp.replace(record)


def reuse_or_create(
    control: Control,
    size: int,
    record: Path | None,
    flags: int = uapi.ABUSE_F_FLUSH | uapi.ABUSE_F_FENCE,
) -> DiskConfig:
    """The disk named in ``record`` if it exists unserved, else a new disk.

    A new disk has ``size``, ``flags`` (ABUSE_F_*) and the defaults of
    ``abusectl create``; its path goes into ``record``.  A recorded disk of another size, or one
    that another process serves, is an AbuseError rather than a second
    disk.
    """
    if record is not None:
        config = _recorded(control, record, size)
        if config is not None:
            return config
    config = control.create(size, flags=flags, timeout_ms=CREATE_TIMEOUT_MS, retries=CREATE_RETRIES)
    if record is not None:
        _write_record(record, config.path)
    return config
