"""Stale workers: wedged in their backend, stopped, or reset while alive.

A worker that holds a write past the disk's timeout is fenced by the
driver (ABUSE_F_FENCE, on by default in `abusectl create`): it is killed,
and its request goes to another worker only once it is dead.  Under a
pool the liveness check usually kills it first, at half the timeout;
either way it is dead before its request moves on.  So a
newer write to the same block can never be overwritten by the old one.
The first test wedges a worker inside its backend's write (or, for the
memory backend, inside the flush of a FUA write) and checks, block by
block, that the newer data stands; the control test shows that the same
case without the fence does land a stale write, so the check can fail.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from abuse.backends.user import open_user_backend
from abuse.control import Control
from abuse.pool import serve_worker
from tests.kernel.blockio import _aligned, direct_read, direct_write, pattern
from tests.kernel.conftest import asleep_in_driver, wait_for
from tests.kernel.faults import tally
from tests.kernel.faults.workload import assert_settled, finish_fio, start_fio_verify, sysfs_counters
from tests.kernel.serving import abusectl, served_disk, stop_pool, worker_pids

HERE = Path(__file__).parent
TIMEOUT = 2  # seconds, the disks' request timeout here
WEDGE_SECONDS = 10  # how long a wedged worker sleeps before its stale store
CASES = 8  # wedges per backend: 24 per run
BLOCK = 4096
MiB = 1 << 20
BACKENDS = {"python": "WedgingStore", "file": "WedgingFile", "memory": "WedgingMemory"}


def _fua_write(dev: str, offset: int, data: bytes) -> None:
    """An O_DIRECT | O_DSYNC write: one request with FUA (the disk has a write cache)."""
    buf = _aligned(len(data))
    buf[: len(data)] = data
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    try:
        assert os.pwritev(fd, [memoryview(buf)[: len(data)]], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


@contextmanager
def _wedge_env(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "wedge"
    folder.mkdir()
    saved = {k: os.environ.get(k) for k in ("WEDGE_DIR", "WEDGE_STORE", "WEDGE_SECONDS")}
    os.environ.update(
        WEDGE_DIR=str(folder), WEDGE_STORE=str(tmp_path / "store.img"), WEDGE_SECONDS=str(WEDGE_SECONDS)
    )
    try:
        yield folder
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wedged_pid(folder: Path) -> int:
    """The pid of the worker that took the armed wedge (it must have)."""
    taken = list(folder.glob("wedged-*"))
    assert len(taken) == 1, f"the wedge was not taken: {sorted(p.name for p in folder.iterdir())}"
    pid = int(taken[0].name.removeprefix("wedged-"))
    taken[0].unlink()
    return pid


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts: it runs no more code)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # reaped, or being reaped
        return True


def _one_case(dev: str, folder: Path, offset: int, seed: int) -> tuple[bool, bool]:
    """Wedge a worker on an old write, write newer data; (stale landed, fenced)."""
    old, new = pattern(seed, BLOCK), pattern(seed + 1, BLOCK)
    (folder / "armed").touch()
    _fua_write(dev, offset, old)  # completes once another worker has served it
    pid = _wedged_pid(folder)
    direct_write(dev, offset, new)
    landed = folder / f"landed-{pid}"
    # Either the fence killed it, or it wakes and stores its stale write.
    wait_for(lambda: _gone(pid) or landed.exists(), timeout=WEDGE_SECONDS * 6)
    if not _gone(pid):
        wait_for(lambda: landed.exists(), timeout=WEDGE_SECONDS * 6)
    got = direct_read(dev, offset, BLOCK)
    assert got in (old, new), f"block at {offset} holds neither write"
    return got == old, not landed.exists()


@pytest.mark.parametrize("kind", sorted(BACKENDS))
def test_a_wedged_worker_never_lands_a_stale_write(kind: str, tmp_path: Path, rng: random.Random) -> None:
    """Workers wedge in their backend past the timeout while fio verifies the disk."""
    backend = f"python:{HERE / 'wedging_backend.py'}:{BACKENDS[kind]}"
    create = ("--timeout", str(TIMEOUT), "--retries", "100")
    with _wedge_env(tmp_path) as folder, served_disk("64M", backend, 2, *create) as (dev, serve):
        job = start_fio_verify(dev, CASES * 8, size="32M", iodepth=8)
        blocks = rng.sample(range(32 * MiB // BLOCK, 64 * MiB // BLOCK), CASES)
        stale = fenced = 0
        for case, block in enumerate(blocks):
            landed, was_fenced = _one_case(dev, folder, block * BLOCK, rng.randrange(1 << 30) + case)
            stale += landed
            fenced += was_fenced
        finish_fio(job)
        counters = assert_settled(dev)
    tally.add("wedged workers", CASES)
    tally.add("stale writes landed", stale)
    print(f"{kind}: {CASES} wedges, {fenced} fenced, {stale} stale writes landed; {counters}")
    assert stale == 0
    # Each wedged worker died before it could store: killed by the driver's
    # fence at the timeout, or first by the pool's liveness check at half of it.
    assert fenced == CASES
    assert counters["errors"] == 0, counters


def test_without_the_fence_a_wedged_worker_lands_a_stale_write(tmp_path: Path) -> None:
    """The control: no driver fence and no pool, and the stale write lands.

    Two bare worker processes (serve_worker, no supervisor to kill the
    wedged one) on a disk created with --no-fence.  This shows that the
    check above can see a stale write.
    """
    with _wedge_env(tmp_path) as folder:
        dev = abusectl("create", "--size", "16M", "--no-fence", "--timeout", str(TIMEOUT), "--retries", "100")
        index = int(dev.removeprefix("/dev/abuse"))
        path = str(HERE / "wedging_backend.py")
        backend = open_user_backend(path, "WedgingStore", 16 * MiB, f"python:{path}:WedgingStore")
        pids = []
        try:
            for _ in range(2):
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        serve_worker(index, backend)
                        code = 0
                    finally:
                        os._exit(code)
                pids.append(pid)
            with Control() as control:
                wait_for(lambda: control.info(index).counters["attached"] == 2, timeout=180)
            landed, fenced = _one_case(dev, folder, 4 * BLOCK, 77)
            assert landed and not fenced, "the stale write should have landed without the fence"
            assert sysfs_counters(dev)["fenced"] == 0
            tally.add("stale writes landed without the fence (control)", 1)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            for pid in pids:
                os.waitpid(pid, 0)
            backend.close()
            abusectl("destroy", dev, "--force")


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_sigstop_storm_and_resets_under_fio_verify(kind: str, tmp_path: Path, rng: random.Random) -> None:
    """Workers stopped in turn past the timeout, and reset while stopped.

    A stopped worker holding a batch is fenced at the timeout (or at the
    reset): killed, replaced by the pool, its requests served by another
    worker.  fio verifies every block; the pool's log names each worker it
    replaced.
    """
    if kind == "file":
        image = tmp_path / "disk.img"
        image.touch()
        os.truncate(image, 128 * MiB)
        backend = f"file:{image}"
    else:
        backend = "memory"
    stops = resets = replaced = 0
    with served_disk("128M", backend, 3, "--timeout", str(TIMEOUT), "--retries", "100") as (dev, serve):
        job = start_fio_verify(dev, 60, size="64M", iodepth=32)
        seen_waiting: set[int] = set()
        while job.poll() is None and stops < 8:
            victim = _awake_worker(serve, seen_waiting)
            if victim is None:
                continue
            os.kill(victim, signal.SIGSTOP)
            stops += 1
            if stops % 2 == 0:
                abusectl("reset", dev)
                resets += 1
            try:
                wait_for(lambda pid=victim: _gone(pid), timeout=TIMEOUT * 30)
                replaced += 1
            except AssertionError:
                os.kill(victim, signal.SIGCONT)  # it held nothing: nothing to fence
            wait_for(lambda: len(worker_pids(serve)) == 3, timeout=180)
        finish_fio(job)
        counters = assert_settled(dev)
        log = _pool_log_so_far(serve)
    tally.add("stopped workers replaced", replaced)
    print(f"{kind}: {stops} stops, {resets} resets, {replaced} replaced; {counters}")
    assert replaced > 0
    assert counters["errors"] == 0, counters
    # Killed by the driver's fence or by the pool's liveness check; the pool
    # names every worker it replaced either way.
    named = log.count("killed by SIGKILL") + log.count("stopped answering")
    assert named >= replaced, log


def _awake_worker(serve: subprocess.Popen[str], seen_waiting: set[int]) -> int | None:
    """A worker not asleep in GET (so likely holding a batch), or None.

    Only one seen waiting in GET before (noted in ``seen_waiting``): a
    replacement still starting up holds nothing, and stopped there it is
    the pool's start timeout that kills it, a minute later.
    """
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for pid in worker_pids(serve):
            if asleep_in_driver(f"/proc/{pid}"):
                seen_waiting.add(pid)
            elif pid in seen_waiting and not _gone(pid):
                return pid
        time.sleep(0.001)
    return None


def _pool_log_so_far(serve: subprocess.Popen[str]) -> str:
    """What the pool printed: stop it and collect its output."""
    return stop_pool(serve)
