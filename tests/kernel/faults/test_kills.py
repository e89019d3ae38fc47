"""kill -9 of workers: at random under fio, and at chosen moments by hand.

The random storm runs through `abusectl serve`; the three chosen
moments (holding a fetched batch, half-way through answering it, and
stuck inside the PUT system call) use a forked hand-driven worker so
that the moment is certain, not likely.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from abuse import uapi
from abuse.backends.memory import MemoryBackend
from tests.kernel.blockio import Background, direct_read, direct_write, pattern
from tests.kernel.conftest import Disks, wait_for
from tests.kernel.faults import tally
from tests.kernel.faults.workload import assert_settled, finish_fio, start_fio_verify
from tests.kernel.raw import RawWorker, Request
from tests.kernel.serving import abusectl, served_disk, stop_pool, worker_pids

MiB = 1 << 20
BLOCK = 4096

# The pool backs off from a worker that dies within a second of its start
# (abuse.pool.Pool.quick_death) and gives up on a crash loop; a storm
# that only kills workers older than that is what a real crash looks like.
# Ages are counted from when the test first saw the worker, on the
# monotonic clock: psutil's create_time() rests on the boot time in whole
# seconds and was off by up to a second, so the storm once killed workers
# the pool saw die at 0.7 s, and the pool gave up.
OLD_ENOUGH = 1.2


def test_kill_storm_under_fio_verify(rng: random.Random) -> None:
    workers = 8
    killed: set[int] = set()
    seen: dict[int, float] = {}
    with served_disk("256M", "memory", workers, "--timeout", "5") as (dev, serve):
        # fio rounds until 100 kills have hit live I/O: how many fit in
        # one round depends on how fast a loaded guest restarts workers.
        while len(killed) < 100:
            job = start_fio_verify(dev, 60, size="128M", bs="4k", iodepth=32, extra=("--bsrange=4k-128k",))
            while job.poll() is None:
                time.sleep(rng.uniform(0.0, 0.1))
                victims = _old_workers(serve.pid, killed, seen)
                if victims:
                    victim = rng.choice(victims)
                    victim.send_signal(signal.SIGKILL)
                    killed.add(victim.pid)
            try:
                finish_fio(job)
            except AssertionError as failed:
                status = abusectl("status", dev, "--json")
                raise AssertionError(
                    f"{failed}\nafter {len(killed)} kills; disk: {status}\npool: {stop_pool(serve)}"
                ) from None
        wait_for(lambda: len(worker_pids(serve)) == workers)
        status = json.loads(abusectl("status", dev, "--json"))["disks"][0]
        assert status["errors"] == 0, status
        counters = assert_settled(dev)
        summary = stop_pool(serve)
        assert f"restarts: {len(killed)}" in summary, summary
    print(f"kill storm: {len(killed)} kills, {counters['requeued']} requests requeued")
    assert len(killed) >= 100, len(killed)
    assert counters["requeued"] > 0
    tally.add("kills survived", len(killed))


def _old_workers(pool: int, killed: set[int], seen: dict[int, float]) -> list[psutil.Process]:
    """Live workers of ``pool`` old enough that their death looks like a crash.

    ``seen`` keeps when each worker was first seen: it is at least that old.
    """
    now = time.monotonic()
    old = []
    for child in _children(pool):
        if child.pid not in killed and now - seen.setdefault(child.pid, now) > OLD_ENOUGH:
            old.append(child)
    return sorted(old, key=lambda p: p.pid)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _in_child(body: Callable[[int], None]) -> tuple[int, int]:
    """Fork; the child runs ``body(write_fd)`` and then waits to be killed.

    Returns (pid, read_fd); the child writes one byte to say "now".
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            os.close(read_fd)
            body(write_fd)
            while True:
                time.sleep(60)
        finally:
            os._exit(1)
    os.close(write_fd)
    return pid, read_fd


def _wait_ready(read_fd: int, timeout: float = 120) -> None:
    ready, _, _ = select.select([read_fd], [], [], timeout)
    assert ready, "the hand-driven worker never got there"
    assert os.read(read_fd, 1) == b"!", "the hand-driven worker died early"
    os.close(read_fd)


def _kill_when_ready(pid: int, read_fd: int) -> None:
    _wait_ready(read_fd)
    os.kill(pid, signal.SIGKILL)
    _reap_killed(pid)


def _reap_killed(pid: int, timeout: float = 60) -> None:
    """Wait for a SIGKILLed child; fail, with its kernel stack, if it hangs."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            stack = Path(f"/proc/{pid}/stack").read_text()
            raise AssertionError(f"pid {pid} survives SIGKILL in:\n{stack}")
        time.sleep(0.05)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    tally.add("kills survived")


def _writers(path: str, count: int, seed: int) -> list[Background]:
    return [
        Background(lambda i=i: direct_write(path, i * BLOCK, pattern(seed + i, BLOCK))) for i in range(count)
    ]


def _check_blocks(path: str, count: int, seed: int) -> None:
    for i in range(count):
        assert direct_read(path, i * BLOCK, BLOCK) == pattern(seed + i, BLOCK), f"block {i}"


def test_kill_between_get_and_put(disks: Disks, rng: random.Random) -> None:
    config = disks.create(16 * MiB)
    count = rng.randint(1, 16)
    seed = rng.randrange(1 << 30)
    writers = _writers(config.path, count, seed)

    def fetch_and_hold(ready: int) -> None:
        worker = RawWorker(config.index)
        held = 0
        while held < count:
            held += len(worker.get(wait=True))
        os.write(ready, b"!")

    pid, ready = _in_child(fetch_and_hold)
    _kill_when_ready(pid, ready)
    assert disks.control.info(config.index).counters["requeued"] >= count
    disks.serve(config)
    for w in writers:
        assert w.join().error is None
    _check_blocks(config.path, count, seed)
    assert_settled(config.path)


def test_kill_half_way_through_a_batch(disks: Disks, rng: random.Random) -> None:
    config = disks.create(16 * MiB)
    backend = disks.backends[config.index] = MemoryBackend(config.size)
    count = rng.randint(2, 24)
    answered = rng.randint(1, count - 1)
    seed = rng.randrange(1 << 30)
    writers = _writers(config.path, count, seed)

    def answer_some(ready: int) -> None:
        worker = RawWorker(config.index)
        held: list[Request] = []
        while len(held) < count:
            held += worker.get(wait=True)
        for request in held[:answered]:
            backend.write(request.offset, worker.data(request))
        assert worker.put([worker.answer(r) for r in held[:answered]]) == [0] * answered
        # Half of the next one lands in the backend before the end: a new
        # worker must write it again, whole.
        torn = held[answered]
        backend.write(torn.offset, worker.data(torn)[: torn.length // 2])
        os.write(ready, b"!")

    pid, ready = _in_child(answer_some)
    _kill_when_ready(pid, ready)
    counters = disks.control.info(config.index).counters
    assert counters["completed"] >= answered
    assert counters["requeued"] >= count - answered
    disks.serve(config)
    for w in writers:
        assert w.join().error is None
    _check_blocks(config.path, count, seed)
    assert_settled(config.path)


def test_kill_inside_the_put_system_call(disks: Disks, rng: random.Random) -> None:
    """The PUT's copy faults on a page whose read waits on a second disk.

    The reply's data points into an mmap of the trap disk, which has no
    worker; the PUT blocks in that page fault until SIGKILL ends it.
    The test keeps the trap open too: the last close of a block device
    waits for its page cache I/O, and the child's exit must not be it.
    """
    target = disks.create(16 * MiB)
    trap = disks.create(16 * MiB)
    seed = rng.randrange(1 << 30)
    expected = pattern(seed, BLOCK)
    disks.backends[target.index] = backend = MemoryBackend(target.size)
    backend.write(0, memoryview(expected))
    reader = Background(lambda: direct_read(target.path, 0, BLOCK))
    trap_holder = os.open(trap.path, os.O_RDONLY)

    def put_from_trap(ready: int) -> None:
        worker = RawWorker(target.index)
        (request,) = worker.get(wait=True)
        fd = os.open(trap.path, os.O_RDONLY)
        trap_map = mmap.mmap(fd, BLOCK, mmap.MAP_SHARED, mmap.PROT_READ)
        address = int(uapi.ffi.cast("uintptr_t", uapi.ffi.from_buffer(trap_map)))
        os.write(ready, b"!")  # the parent waits for the trap's read below
        worker.put([{**worker.answer(request), "data": address}])
        os._exit(2)  # the PUT returned: the trap did not hold

    pid, ready = _in_child(put_from_trap)
    _wait_ready(ready)
    wait_for(lambda: disks.control.info(trap.index).counters["queued"] >= 1)
    stack = Path(f"/proc/{pid}/stack").read_text()
    assert "[abuse]" in stack, stack  # inside the ioctl, not back in user space
    os.kill(pid, signal.SIGKILL)
    _reap_killed(pid)
    assert disks.control.info(target.index).counters["requeued"] >= 1
    disks.serve(target)
    disks.serve(trap)  # the trap's read: the page cache must not keep it waiting
    assert reader.join().error is None
    assert reader.result == expected
    os.close(trap_holder)
    assert_settled(target.path)
    assert_settled(trap.path)
