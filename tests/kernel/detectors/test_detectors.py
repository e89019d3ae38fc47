"""Each detector of the debug kernel sees this driver's bugs.

The selftest build (-DABUSE_SELFTEST_BUGS) has a ``selftest_bug``
parameter that makes the driver commit one deliberate bug; each test
commits one and expects the detector's report in the kernel log, and
that the debug tier's judge (tests/kernel/bad-log.txt) would fail a run
on it.  Lockdep goes first: a KASAN report taints the kernel, which
turns lockdep off for the rest of the boot.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from tests.kernel.conftest import Disks, MiB
from tests.kernel.detectors.conftest import PARAM
from tests.kernel.kmsg import KernelLog, bad_lines

USE_AFTER_END = 1  # ABUSE_BUG_USE_AFTER_END in kernel/abuse.c
LOCK_ORDER = 2  # ABUSE_BUG_LOCK_ORDER


def report(kmsg: KernelLog, headline: str, timeout: float = 60.0) -> list[str]:
    """The kernel log from ``headline`` on, once the report's trace is in."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        lines += kmsg.read()
        start = next((i for i, line in enumerate(lines) if headline in line), None)
        # A report ends with its trace; wait until a line names the driver.
        if start is not None and any("abuse" in line for line in lines[start:]):
            return lines[start:]
        assert time.monotonic() < deadline, f"no {headline!r} in the kernel log:\n" + "\n".join(lines)
        time.sleep(0.1)


def lockdep_on() -> bool:
    stats = Path("/proc/lockdep_stats").read_text()
    return re.search(r"debug_locks:\s*1", stats) is not None


def test_lockdep_reports_the_inverted_lock_order(disks: Disks, kmsg: KernelLog) -> None:
    assert lockdep_on(), "lockdep was already off before the test (an earlier report?)"
    config = disks.create(16 * MiB)
    disks.serve(config)
    PARAM.write_text(f"{LOCK_ORDER}\n")
    # Opening takes open_mutex, then (the bug) abuse_ctl_mutex ...
    os.close(os.open(config.path, os.O_RDONLY))
    PARAM.write_text("0\n")
    # ... and destroying takes them the documented way round.
    disks.control.destroy(config.index, force=True)
    disks.indexes.remove(config.index)
    lines = report(kmsg, "possible circular locking dependency detected")
    text = "\n".join(lines)
    assert "abuse_ctl_mutex" in text and "open_mutex" in text, text
    # The inverted acquisition's trace (the helpers may be inlined).
    assert re.search(r"abuse_(selftest_open|disk_open|bdev_open)", text), text
    assert bad_lines(lines), "bad-log.txt would not catch the lockdep report"


def test_kasan_reports_a_request_used_after_its_end(disks: Disks, kmsg: KernelLog) -> None:
    config = disks.create(16 * MiB)
    disks.serve(config)
    PARAM.write_text(f"{USE_AFTER_END}\n")
    # Any request will do: with the bug on, ending it frees the driver's
    # record of it and reads the record afterwards.
    fd = os.open(config.path, os.O_RDONLY)
    try:
        assert len(os.pread(fd, 4096, 8 * MiB)) == 4096
    finally:
        os.close(fd)
    PARAM.write_text("0\n")
    lines = report(kmsg, "BUG: KASAN:")
    text = "\n".join(lines)
    assert "use-after-free" in lines[0], text  # "slab-use-after-free" since 6.4
    assert "abuse_end_request" in text or "abuse_put" in text, text
    assert bad_lines(lines), "bad-log.txt would not catch the KASAN report"
