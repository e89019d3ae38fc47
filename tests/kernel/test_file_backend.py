"""The file backend served in place (issue 13, item 4).

The image (a file, or a block device) is mapped shared by every worker
and the kernel copies each write into the mapping at GET: these tests
check that such a disk keeps a file system across remounts and new
pools, that its data is in the image itself, that FLUSH and FUA reach
the backend's flush, that a block device serves as the image, and that
an image larger than the guest's RAM (4 GiB) works, sparse.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

from tests.kernel.conftest import run
from tests.kernel.serving import (
    abusectl,
    check_files,
    drop_caches,
    mounted,
    served_disk,
    start_pool,
    stop_pool,
    worker_pids,
    write_files,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1G") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    dev = run("losetup", "--find", "--show", str(image)).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], capture_output=True)


def image_mapping(pid: int, image: str) -> dict[str, str]:
    """The smaps fields of worker ``pid``'s mapping of ``image``."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    for at, line in enumerate(lines):
        if line.endswith(" " + image) and "-" in line.split()[0]:
            fields = {}
            for field in lines[at + 1 :]:
                name, _, value = field.partition(":")
                if " " in name or not value:
                    break
                fields[name] = value.strip()
                if name == "VmFlags":
                    break
            return fields
    raise AssertionError(f"worker {pid} does not map {image}")


def assert_served_in_place(serve: subprocess.Popen[str], image: str) -> None:
    """Every worker maps the image; the kernel has copied through the
    mapping of at least one (its pages are in that worker's page tables);
    and none of it is locked in RAM despite the workers' mlockall."""
    rss = 0
    for pid in worker_pids(serve):
        fields = image_mapping(pid, image)
        assert fields["Locked"] == "0 kB", fields
        assert "lo" not in fields["VmFlags"].split(), fields
        assert "sh" in fields["VmFlags"].split(), fields
        rss += int(fields["Rss"].split()[0])
    assert rss > 0, "no worker touched its mapping: served by copy?"


def sha256_at(path: str, offset: int, length: int, direct: bool = False) -> str:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        buf = mmap.mmap(-1, length)  # page-aligned, as O_DIRECT wants
        try:
            assert os.preadv(fd, [buf], offset) == length
            return hashlib.sha256(buf).hexdigest()
        finally:
            buf.close()
    finally:
        os.close(fd)


def dd_random(dev: str, offset: int, length: int, oflag: str = "direct", *more: str) -> str:
    """Write ``length`` random bytes at ``offset`` with dd; their sha256."""
    data = os.urandom(length)
    chunk = 64 * KiB
    argv = ["dd", f"of={dev}", f"bs={chunk}", f"seek={offset // chunk}", f"count={length // chunk}"]
    argv += ["iflag=fullblock"]  # stdin is a pipe: a read may return less than bs
    argv += [f"oflag={oflag}"] if oflag else []
    proc = subprocess.run([*argv, *more, "status=none"], input=data, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    return hashlib.sha256(data).hexdigest()


def test_ext4_in_place_on_an_image_larger_than_ram(tmp_path: Path) -> None:
    """16 GiB sparse image (the guest has 4 GiB) on a 1 GiB tmpfs: ext4,
    checksums after a remount, in the image itself, and after a new pool."""
    assert os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") < 16 * GiB
    with tmpfs(tmp_path / "tmpfs") as fs:
        image = fs / "disk.img"
        spec = f"file:{image}"
        with served_disk("16G", spec, 2) as (dev, serve):
            assert image.stat().st_size == 16 * GiB
            # The last GiB stays outside the file system: the far-end check's.
            run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev, "15G")
            with mounted(dev, tmp_path / "mnt") as mnt:
                sums = write_files(mnt, 16, 4 * MiB)
            end = dd_random(dev, 16 * GiB - 1 * MiB, 1 * MiB)  # the mapping's far end
            assert_served_in_place(serve, str(image))
            drop_caches()
            with mounted(dev, tmp_path / "mnt") as mnt:
                check_files(mnt, sums)
            # A new pool over the same image, on the same disk.
            stop_pool(serve)
            again = start_pool(dev, spec, 2)
            try:
                with mounted(dev, tmp_path / "mnt") as mnt:
                    check_files(mnt, sums)
                    (mnt / "more").mkdir()
                    more = write_files(mnt / "more", 4, 4 * MiB)
                drop_caches()
                with mounted(dev, tmp_path / "mnt") as mnt:
                    check_files(mnt / "more", more)
                assert sha256_at(dev, 16 * GiB - 1 * MiB, 1 * MiB, direct=True) == end
                assert_served_in_place(again, str(image))
            finally:
                stop_pool(again)
        assert image.stat().st_blocks * 512 < 512 * MiB  # sparse: only what was written
        # The data is in the image file itself.
        assert sha256_at(str(image), 16 * GiB - 1 * MiB, 1 * MiB) == end
        run("fsck.ext4", "-fn", str(image))
        with mounted(str(image), tmp_path / "loop", "-o", "loop,ro,noload") as mnt:
            check_files(mnt, sums)
            check_files(mnt / "more", more)


COUNTING = textwrap.dedent(
    """
    import os

    from abuse.backends.file import FileBackend

    class CountingFile(FileBackend):
        '''The file backend, served in place, that logs every flush.'''

        def __init__(self, size):
            super().__init__({image!r}, size)
            assert self.mapped

        def flush(self):
            super().flush()
            fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"flush\\n")
            finally:
                os.close(fd)
    """
)


def test_flush_and_fua_reach_fdatasync_in_place(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tmpfs", "256M") as fs:
        image, log = fs / "disk.img", fs / "flushes"
        module = fs / "counting.py"
        module.write_text(COUNTING.format(image=str(image), log=str(log)))
        with served_disk("64M", f"python:{module}:CountingFile", 2) as (dev, serve):

            def flushes() -> int:
                return len(log.read_text().splitlines()) if log.exists() else 0

            before = flushes()
            written = dd_random(dev, 0, 1 * MiB, "direct", "conv=fsync")  # fsync: a FLUSH at the end
            after_fsync = flushes()
            assert after_fsync > before
            fua = dd_random(dev, 4 * MiB, 8 * 64 * KiB, "direct,dsync")  # each write FUA (or + FLUSH)
            assert flushes() >= after_fsync + 8
            assert_served_in_place(serve, str(image))
            assert sha256_at(str(image), 0, 1 * MiB) == written
            assert sha256_at(str(image), 4 * MiB, 8 * 64 * KiB) == fua


def test_block_device_as_the_image(tmp_path: Path) -> None:
    """A loop device over a tmpfs file is the image: writes land on it,
    reads come from it, discard and write zeroes reach it."""
    with tmpfs(tmp_path / "tmpfs", "512M") as fs:
        backing = fs / "backing.img"
        run("truncate", "-s", "256M", str(backing))
        with loop_device(backing) as loop:
            with served_disk("256M", f"file:{loop}", 2, "--discard", "--write-zeroes") as (dev, serve):
                first = dd_random(dev, 0, 4 * MiB)
                last = dd_random(dev, 252 * MiB, 4 * MiB)
                run("sync")
                assert_served_in_place(serve, loop)
                assert sha256_at(loop, 0, 4 * MiB) == first
                assert sha256_at(loop, 252 * MiB, 4 * MiB) == last
                # Written behind the disk's back, through the device: the
                # disk reads it (one page cache, the device's).
                other = dd_random(loop, 8 * MiB, 1 * MiB, "", "conv=fsync")
                drop_caches()
                assert sha256_at(dev, 8 * MiB, 1 * MiB, direct=True) == other
                zeroes = hashlib.sha256(bytes(1 * MiB)).hexdigest()
                run("blkdiscard", "-o", "0", "-l", str(1 * MiB), dev)
                run("blkdiscard", "-z", "-o", str(252 * MiB), "-l", str(1 * MiB), dev)
                assert sha256_at(dev, 0, 1 * MiB, direct=True) == zeroes
                assert sha256_at(dev, 252 * MiB, 1 * MiB, direct=True) == zeroes
                assert sha256_at(loop, 252 * MiB, 1 * MiB) == zeroes
                assert sha256_at(dev, 253 * MiB, 3 * MiB, direct=True) != zeroes
                # ext4 on it, read back after a remount.
                run("mkfs.ext4", "-q", "-F", dev)
                with mounted(dev, tmp_path / "mnt") as mnt:
                    sums = write_files(mnt, 4, 2 * MiB)
                drop_caches()
                with mounted(dev, tmp_path / "mnt") as mnt:
                    check_files(mnt, sums)
            with mounted(loop, tmp_path / "mnt", "-o", "ro,noload") as mnt:
                check_files(mnt, sums)


def test_mapped_0_serves_the_file_by_copy(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tmpfs", "256M") as fs:
        image = fs / "disk.img"
        with served_disk("64M", f"file:{image}?mapped=0", 2) as (dev, serve):
            written = dd_random(dev, 1 * MiB, 2 * MiB)
            for pid in worker_pids(serve):
                assert str(image) not in Path(f"/proc/{pid}/maps").read_text()
            assert sha256_at(str(image), 1 * MiB, 2 * MiB) == written
            status = abusectl("status", dev)
            assert dev.removeprefix("/dev/") in status


def test_grown_disk_is_served_by_copy_past_the_mapping(tmp_path: Path) -> None:
    """Grown online past the mapping, the workers fall back to copies
    (pwritev extends the image) and still see what was stored in place."""
    with tmpfs(tmp_path / "tmpfs", "256M") as fs:
        image = fs / "disk.img"
        with served_disk("32M", f"file:{image}", 2) as (dev, serve):
            before = dd_random(dev, 0, 1 * MiB)
            assert_served_in_place(serve, str(image))
            abusectl("resize", dev, "--size", "64M")
            after = dd_random(dev, 48 * MiB, 1 * MiB)
            assert sha256_at(dev, 0, 1 * MiB, direct=True) == before
            assert sha256_at(dev, 48 * MiB, 1 * MiB, direct=True) == after
            assert sha256_at(str(image), 48 * MiB, 1 * MiB) == after
            assert image.stat().st_size >= 49 * MiB
