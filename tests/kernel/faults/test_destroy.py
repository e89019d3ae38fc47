"""Forced destroys under I/O and under a mount, rmmod under I/O, and leaks."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from abuse import DiskNotFound
from abuse.control import Control
from tests.kernel.conftest import wait_for
from tests.kernel.faults.workload import finish_fio, mkfs_ext4, start_fio_verify, sysfs_counters
from tests.kernel.serving import abusectl, served_disk, stop_pool

MiB = 1 << 20


def _gone(dev: str) -> bool:
    return not Path("/sys/block", Path(dev).name).exists()


def test_forced_destroy_during_io_fails_it_and_ends_the_pool(rng: random.Random) -> None:
    with served_disk("128M", "memory", 2) as (dev, serve):
        job = subprocess.Popen(
            ["fio", "--name=doomed", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
             "--rw=randrw", "--bs=4k", "--iodepth=32", "--time_based", "--runtime=3600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        # Destroy at a random point of the I/O, once fio has really started
        # (an event, not a time: a loaded guest may take seconds to start
        # it).  fio runs until the destroy stops it: a guest on a loaded
        # host once served fewer requests in fio's old 60 s than the point
        # chosen, and the destroy came after the I/O.
        done = rng.randint(200, 5000)
        wait_for(lambda: sysfs_counters(dev)["completed"] >= done or job.poll() is not None, timeout=1800)
        abusectl("destroy", dev, "--force")
        out = job.communicate(timeout=120)[0]
        # Requests the driver held fail with EIO; a write submitted after
        # the block layer set the capacity to 0 fails with ENOSPC before
        # reaching the driver.  fio stops at whichever comes first.
        failures = ("Input/output error", "No space left on device")
        assert job.returncode != 0 and any(f in out for f in failures), out
        # Its workers see ENODEV and the pool ends on its own, successfully.
        assert serve.wait(timeout=60) == 0, stop_pool(serve)
        wait_for(lambda: _gone(dev))


def test_forced_destroy_under_a_mounted_ext4(tmp_path: Path, rng: random.Random) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with served_disk("256M", "memory", 2) as (dev, serve):
        mkfs_ext4(dev)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        writer = subprocess.Popen(
            ["sh", "-c", f"i=0; while dd if=/dev/urandom of={mnt}/f$i bs=64k count=16 conv=fsync 2>/dev/null;"
             " do i=$((i+1)); done; echo wrote $i files"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            written = sysfs_counters(dev)["bytes_written"] + rng.randint(1, 8) * MiB
            started = lambda: sysfs_counters(dev)["bytes_written"] >= written or writer.poll() is not None  # noqa: E731
            wait_for(started, timeout=300)
            abusectl("destroy", dev, "--force")
            assert "wrote" in writer.communicate(timeout=120)[0]
            assert serve.wait(timeout=60) == 0
        finally:
            umount = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        assert umount.returncode == 0, umount.stderr
        # The mount held the disk open; with it gone the disk is freed.
        wait_for(lambda: _gone(dev))


def test_rmmod_is_refused_while_io_runs() -> None:
    with served_disk("128M", "memory", 2) as (dev, _):
        job = start_fio_verify(dev, 20, size="32M", iodepth=16)
        attempts = 0
        while job.poll() is None:
            proc = subprocess.run(["rmmod", "abuse"], capture_output=True, text=True)
            assert proc.returncode != 0 and "in use" in proc.stderr, proc.stderr
            attempts += 1
            time.sleep(0.5)
        finish_fio(job)
        assert attempts >= 10


def _meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":")
        fields[name] = int(value.split()[0]) * 1024
    return fields


def _settle_memory() -> dict[str, int]:
    """Memory figures after RCU and the slab shrinkers had their chance."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    time.sleep(2)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return _meminfo()


def test_a_thousand_disks_created_and_destroyed_leak_nothing() -> None:
    refcount = Path("/sys/module/abuse/refcnt")
    with Control() as control:
        base_refs = int(refcount.read_text())
        for _ in range(50):  # warm the slab caches first
            control.destroy(control.create(16 * MiB).index)
        before = _settle_memory()
        for i in range(1000):
            config = control.create(16 * MiB + i * 4096)
            assert int(refcount.read_text()) == base_refs + 1
            control.destroy(config.index)
        after = _settle_memory()
        with pytest.raises(DiskNotFound):
            control.info(config.index)
        assert int(refcount.read_text()) == base_refs
    grown = {k: after[k] - before[k] for k in ("Slab", "SUnreclaim", "Percpu", "VmallocUsed")}
    print(f"1000 disks: growth {grown}")
    # One disk costs tens of KiB (tag set, queue, gendisk, sysfs): a leak
    # of even a small part of each would pass these bounds many times over.
    assert grown["SUnreclaim"] < 8 * MiB, grown
    assert grown["Percpu"] < 2 * MiB, grown
    assert grown["VmallocUsed"] < 8 * MiB, grown
