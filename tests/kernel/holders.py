"""Who holds which request, as the driver tells it outside the uapi.

An attached file's /proc/PID/fdinfo/FD names its disk, its worker id and
how many requests it holds; blk-mq's debugfs lists every request the
disk has, and the driver adds its state, handle and holder to each line.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

DEBUGFS = Path("/sys/kernel/debug")
_FIELD = re.compile(r"\.(abuse_\w+|tag)=([^,}]+)")


def fdinfo(fd: int) -> dict[str, int]:
    """The ``abuse-*`` lines of this process's fdinfo for ``fd``, as numbers."""
    fields = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.startswith("abuse-"):
            fields[name] = int(value.strip())
    return fields


def _mount_debugfs() -> None:
    if not (DEBUGFS / "block").is_dir():
        subprocess.run(["mount", "-t", "debugfs", "debugfs", str(DEBUGFS)], check=True)


def busy_requests(disk: str) -> list[dict[str, str]]:
    """Each request blk-mq has handed disk ``disk`` (``abuse0``): its tag and the driver's fields.

    Fields are strings as printed (``abuse_state``, ``abuse_handle``,
    ``abuse_holder``, ``abuse_holder_pid``, ``abuse_held_ms``); a queued
    request has no holder.
    """
    _mount_debugfs()
    text = (DEBUGFS / "block" / disk / "hctx0" / "busy").read_text()
    return [dict(_FIELD.findall(line)) for line in text.splitlines() if line.strip()]


def describe_tags(disk: str, tags: set[int]) -> str:
    """The busy lines of ``tags``, for a failure's report; never raises."""
    try:
        found = [r for r in busy_requests(disk) if int(r.get("tag", "-1")) in tags]
    except (OSError, subprocess.CalledProcessError, ValueError) as err:
        return f"(debugfs unreadable: {err})"
    return "; ".join(str(r) for r in found) or f"(no busy request on tags {sorted(tags)})"


def describe_file(fd: int) -> str:
    """``fd``'s fdinfo fields, for a failure's report; never raises."""
    try:
        return str(fdinfo(fd))
    except (OSError, ValueError) as err:
        return f"(fdinfo unreadable: {err})"
