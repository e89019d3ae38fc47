"""A backend's errors reach the application on exactly the failing requests."""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from pathlib import Path

from tests.kernel.blockio import direct_read, direct_write, pattern
from tests.kernel.faults import failing_backend as bad
from tests.kernel.faults.workload import assert_settled, sysfs_counters
from tests.kernel.serving import served_disk

BLOCK = 4096
BACKEND = f"python:{Path(bad.__file__).resolve()}:FailingBackend"


def _errno_of(call: Callable[..., object], *args: object) -> int:
    try:
        call(*args)
    except OSError as err:
        return err.errno or -1
    return 0


def test_backend_errors_reach_exactly_the_failing_requests(rng: random.Random) -> None:
    with served_disk("32M", BACKEND, 2) as (dev, _):
        # Blocks picked at random around and inside both bad ranges.
        edges = (bad.EIO_START, bad.EIO_END, bad.NOSPC_START, bad.NOSPC_END)
        offsets = sorted({e + rng.randint(-8, 7) * BLOCK for e in edges for _ in range(6)})
        offsets += [rng.randrange(0, 32 << 20, BLOCK) for _ in range(16)]
        expected_failures = 0
        for offset in offsets:
            data = pattern(offset, BLOCK)
            in_eio = bad.EIO_START <= offset < bad.EIO_END
            in_nospc = bad.NOSPC_START <= offset < bad.NOSPC_END
            want_write = errno.EIO if in_eio else errno.ENOSPC if in_nospc else 0
            got = _errno_of(direct_write, dev, offset, data)
            assert got == want_write, f"write at {offset:#x}: {errno.errorcode.get(got, got)}"
            want_read = errno.EIO if in_eio else 0
            got = _errno_of(direct_read, dev, offset, BLOCK)
            assert got == want_read, f"read at {offset:#x}: {errno.errorcode.get(got, got)}"
            if not want_write:
                assert direct_read(dev, offset, BLOCK) == data
            expected_failures += bool(want_write) + bool(want_read)
        counters = assert_settled(dev)
        assert counters["errors"] == expected_failures, (counters, expected_failures)
        assert sysfs_counters(dev)["requeued"] == 0
