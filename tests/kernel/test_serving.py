"""Serving through abusectl and the worker pool (issue: Serving)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

from tests.kernel.conftest import run, wait_for
from tests.kernel.faults.workload import start_fio_verify
from tests.kernel.serving import (
    abusectl,
    check_files,
    drop_caches,
    fio,
    mounted,
    pool_rss,
    served_disk,
    stop_pool,
    worker_pids,
    write_files,
)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def _memfd_allocated(serve_pid: int) -> int:
    """Bytes the memory backend's memfd really holds."""
    for fd in Path(f"/proc/{serve_pid}/fd").iterdir():
        if "memfd:abuse" in os.readlink(fd):
            return os.stat(fd).st_blocks * 512
    raise AssertionError("no memfd in the pool")


def test_ext4_on_10g_memory_disk(tmp_path: Path) -> None:
    with served_disk("10G", "memory", 4) as (dev, serve):
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev)
        with mounted(dev, tmp_path / "mnt") as mnt:
            sums = write_files(mnt, 50, 4 * MiB)  # 200 MiB
            drop_caches()
            check_files(mnt, sums)
        assert pool_rss(serve) < 400 * MiB
        assert _memfd_allocated(serve.pid) < 400 * MiB  # sparse: a 10G disk
        status = abusectl("status", dev)
        assert dev.removeprefix("/dev/") in status


def test_ext4_on_file_backend_lands_in_the_image(tmp_path: Path) -> None:
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=512M", "tmpfs", str(tmpfs))
    try:
        _file_backend_round_trip(tmp_path, tmpfs / "disk.img")
    finally:
        subprocess.run(["umount", str(tmpfs)], capture_output=True)


def _file_backend_round_trip(tmp_path: Path, image: Path) -> None:
    with served_disk("256M", f"file:{image}", 2) as (dev, serve):
        assert image.stat().st_size == 256 * MiB
        run("mkfs.ext4", "-q", "-F", dev)
        with mounted(dev, tmp_path / "mnt") as mnt:
            sums = write_files(mnt, 8, 2 * MiB)
    run("fsck.ext4", "-fn", str(image))
    with mounted(str(image), tmp_path / "loop", "-o", "loop,ro,noload") as mnt:
        check_files(mnt, sums)


def test_xfs_on_4k_block_disk(tmp_path: Path) -> None:
    with served_disk("512M", "memory", 2, "--block-size", "4096") as (dev, _):
        run("mkfs.xfs", "-q", "-f", dev)
        with mounted(dev, tmp_path / "mnt") as mnt:
            sums = write_files(mnt, 4, 4 * MiB)
            drop_caches()
            check_files(mnt, sums)


def test_readme_example_backend_passes_fio_verify() -> None:
    spec = f"python:{ROOT / 'examples' / 'ramdisk.py'}:RamDisk"
    with served_disk("128M", spec, 1) as (dev, _):
        proc = fio(dev, "--rw=randwrite", "--bs=4k", "--size=32M", "--iodepth=8")
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kill_9_workers_during_fio_verify() -> None:
    with served_disk("256M", "memory", 4, "--timeout", "5") as (dev, serve):
        kills = 0
        rng = random.Random(1)
        # fio rounds until 20 kills have hit live I/O: on a loaded host
        # a round of 30 s may see fewer.
        while kills < 20:
            job = start_fio_verify(dev, 30, size="64M", iodepth=16)
            while job.poll() is None:
                time.sleep(1)
                pids = worker_pids(serve)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    kills += 1
            out = job.communicate()[0]
            assert job.returncode == 0, out
            assert "err= 0:" in out, out
        wait_for(lambda: len(worker_pids(serve)) == 4)
        status = json.loads(abusectl("status", dev, "--json"))
        assert status["disks"][0]["errors"] == 0
        summary = stop_pool(serve)
        assert f"restarts: {kills}" in summary, summary


def test_reset_while_workers_are_stopped() -> None:
    """Reset fences the stopped workers that hold requests (the disk's default).

    They are killed, the pool replaces them, and the writer's requests
    are served by the new workers; a stopped worker that held nothing is
    left alone and continued.
    """
    with served_disk("64M", "memory", 2) as (dev, serve):
        pids = worker_pids(serve)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        writer = subprocess.Popen(
            ["dd", "if=/dev/urandom", f"of={dev}", "bs=64k", "count=64", "oflag=direct"],
            stderr=subprocess.PIPE,
            text=True,
        )
        counters = Path(f"/sys/block/{Path(dev).name}/abuse")
        wait_for(lambda: int((counters / "queued").read_text()) > 0)
        abusectl("reset", dev)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # fenced
        assert writer.wait(timeout=120) == 0, writer.stderr.read() if writer.stderr else ""
        wait_for(lambda: len(worker_pids(serve)) == 2)


def test_make_run_main_job_script() -> None:
    proc = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checksums equal" in proc.stdout
    assert "/dev/abuse0" in proc.stdout and "COMPLETED" in proc.stdout
