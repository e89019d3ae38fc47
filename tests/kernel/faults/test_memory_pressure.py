"""Dirty mmap writeback through abuse, inside a small memory cgroup.

The writer and the whole pool share one cgroup far smaller than the
data: reclaim in that cgroup must write dirty pages back through the
very workers that allocate in it.  The workers run with PR_SET_IO_FLUSHER
and mlockall (abuse.pool) so that their own allocations never wait on
that writeback; without them this is the classic userspace-block-device
deadlock.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.kernel.conftest import run
from tests.kernel.faults.workload import assert_settled, fsck_clean, mkfs_ext4
from tests.kernel.serving import drop_caches, mounted, served_disk, worker_pids

MiB = 1 << 20
CGROUPS = Path("/sys/fs/cgroup")
LIMIT = 96 * MiB
DIRTY = 256 * MiB

# Runs in the cgroup: dirty DIRTY bytes of a shared file mapping, sync it,
# print the data's digest.
DIRTY_MMAP = """
import hashlib, mmap, os, random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, size)
m = mmap.mmap(fd, size)
rng, digest = random.Random(seed), hashlib.sha256()
for offset in range(0, size, 1 << 20):
    chunk = rng.randbytes(1 << 20)
    m[offset:offset + len(chunk)] = chunk
    digest.update(chunk)
m.flush()
m.close()
os.fsync(fd)
print(digest.hexdigest())
"""


@contextmanager
def memory_cgroup(name: str, limit: int) -> Iterator[Path]:
    if not (CGROUPS / "cgroup.controllers").exists():
        run("mount", "-t", "cgroup2", "none", str(CGROUPS))
    (CGROUPS / "cgroup.subtree_control").write_text("+memory\n")
    group = CGROUPS / name
    group.mkdir()
    try:
        (group / "memory.max").write_text(f"{limit}\n")
        if (group / "memory.swap.max").exists():
            (group / "memory.swap.max").write_text("0\n")
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                (CGROUPS / "cgroup.procs").write_text(pid + "\n")
            except ProcessLookupError:
                pass
        group.rmdir()


def test_dirty_mmap_writeback_in_a_small_cgroup(tmp_path: Path, rng: random.Random) -> None:
    # The backend is a preallocated tmpfs image: its pages are charged to
    # the test, not to the cgroup, so the limit bites on the page cache.
    store = tmp_path / "store"
    store.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=600M", "tmpfs", str(store))
    try:
        image = store / "disk.img"
        run("fallocate", "-l", "512M", str(image))
        with served_disk("512M", f"file:{image}", 2) as (dev, serve):
            mkfs_ext4(dev)
            seed = rng.randrange(1 << 30)
            with mounted(dev, tmp_path / "mnt") as mnt, memory_cgroup("abuse-pressure", LIMIT) as group:
                for pid in [serve.pid, *worker_pids(serve)]:
                    (group / "cgroup.procs").write_text(f"{pid}\n")
                writer = subprocess.run(
                    ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"', sys.executable,
                     "-c", DIRTY_MMAP, str(mnt / "big"), str(DIRTY), str(seed)],
                    capture_output=True,
                    text=True,
                    timeout=900,
                )  # fmt: skip
                assert writer.returncode == 0, writer.stderr
                events = (group / "memory.events").read_text()
                print("cgroup memory.events:", " ".join(events.split()))
                assert "oom_kill 0" in events, events
                drop_caches()
                digest = hashlib.sha256((mnt / "big").read_bytes()).hexdigest()
                assert digest == writer.stdout.strip(), "the file's data changed"
            fsck_clean(dev)
            assert_settled(dev)
    finally:
        run("umount", str(store))
