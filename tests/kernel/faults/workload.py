"""The loads fault tests run under, and the checks after every case.

A case runs a real fio verify job (or ext4 with a checksum manifest)
while it hurts the workers; afterwards :func:`assert_settled` proves
that every request the block layer issued was completed exactly once.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.kernel.conftest import run, wait_for
from tests.kernel.faults import tally

# /sys/block/<disk>/stat fields (Documentation/block/stat.rst).
_READ_IOS, _READ_SECTORS, _WRITE_IOS, _WRITE_SECTORS = 0, 2, 4, 6
_IN_FLIGHT, _DISCARD_IOS, _FLUSH_IOS = 8, 11, 15


def start_fio_verify(
    dev: str,
    runtime: int,
    *,
    size: str = "64M",
    bs: str = "4k",
    rw: str = "randwrite",
    iodepth: int = 16,
    extra: tuple[str, ...] = (),
) -> subprocess.Popen[str]:
    """A time-based fio job that writes, and checks as it goes, crc32c blocks."""
    return subprocess.Popen(
        [
            "fio",
            "--name=faults",
            f"--filename={dev}",
            "--direct=1",
            "--ioengine=libaio",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--size={size}",
            f"--iodepth={iodepth}",
            "--time_based",
            f"--runtime={runtime}",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_backlog=256",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish_fio(job: subprocess.Popen[str], timeout: float = 600) -> str:
    """Wait for ``job``; count and fail on any I/O or verify error."""
    out = job.communicate(timeout=timeout)[0]
    verify_errors = len(re.findall(r"verify.*(?:fail|bad)|bad (?:magic|header)", out, re.IGNORECASE))
    if job.returncode != 0 or "err= 0:" not in out:
        verify_errors = max(verify_errors, 1)
    tally.add("verify errors", verify_errors)
    assert verify_errors == 0 and job.returncode == 0, out
    return out


def fio_verify(dev: str, size: str = "32M") -> None:
    """A full write-then-verify pass: the disk works."""
    job = subprocess.Popen(
        [
            "fio",
            "--name=check",
            f"--filename={dev}",
            "--direct=1",
            "--ioengine=libaio",
            "--rw=randwrite",
            "--bs=4k",
            f"--size={size}",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    finish_fio(job)


def sysfs_counters(dev: str) -> dict[str, int]:
    folder = Path("/sys/block", Path(dev).name, "abuse")
    # Counters only: the config files (flags in hex) and "workers" (pids) are not counts.
    texts = {f.name: f.read_text().strip() for f in folder.iterdir() if f.name not in ("flags", "workers")}
    return {name: int(text) for name, text in texts.items() if text.isdigit()}


def block_stat(dev: str) -> list[int]:
    return [int(n) for n in Path("/sys/block", Path(dev).name, "stat").read_text().split()]


def assert_settled(dev: str) -> dict[str, int]:
    """Once idle, nothing is queued or held and every request completed once.

    The block layer counts each request it ends and the bytes it moved;
    the driver counts each request it retires and the bytes of those
    that succeeded.  Any difference is a request lost or completed twice,
    and goes to the "requests lost" count before failing.  Flushes are
    the exception: the block layer counts an empty flush it folds into
    another request's flush, which never reaches the driver, so with
    flushes the request counts can only be bounded.
    """

    def idle() -> bool:
        c = sysfs_counters(dev)
        return c["queued"] == 0 and c["in_flight"] == 0 and block_stat(dev)[_IN_FLIGHT] == 0

    try:
        wait_for(idle, timeout=60)
    except AssertionError:
        c = sysfs_counters(dev)
        tally.add("requests lost", c["queued"] + c["in_flight"])
        raise AssertionError(f"{dev} never settled: {c}, stat {block_stat(dev)}") from None
    counters = sysfs_counters(dev)
    stat = block_stat(dev)
    data_requests = stat[_READ_IOS] + stat[_WRITE_IOS] + stat[_DISCARD_IOS]
    retired = counters["completed"]
    if stat[_FLUSH_IOS] == 0:
        lost = abs(data_requests - retired)
    else:
        lost = max(0, data_requests + 1 - retired) + max(0, retired - data_requests - stat[_FLUSH_IOS])
    if counters["errors"] == 0:
        lost += (stat[_READ_SECTORS] * 512 != counters["bytes_read"]) + (
            stat[_WRITE_SECTORS] * 512 != counters["bytes_written"]
        )
    tally.add("requests lost", lost)
    assert lost == 0, f"block layer stat {stat}, driver counters {counters}"
    return counters


def mkfs_ext4(dev: str) -> None:
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev)


def fsck_clean(dev: str) -> None:
    run("fsck.ext4", "-fn", dev)
