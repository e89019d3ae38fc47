"""Workers that stop answering: SIGSTOP past the timeout, and no workers at all."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from tests.kernel.conftest import asleep_in_driver, wait_for
from tests.kernel.faults import tally
from tests.kernel.faults.workload import assert_settled, finish_fio, start_fio_verify, sysfs_counters
from tests.kernel.serving import served_disk, start_pool, stop_pool, worker_pids

TIMEOUT = 2  # seconds, the disks' request timeout in these cases


def test_stopped_worker_loses_its_requests_and_its_late_puts(rng: random.Random) -> None:
    """A SIGSTOPped worker's requests time out and move to the other worker.

    After SIGCONT its PUTs answer requests that now have a new generation:
    the driver refuses them (the "rejected" counter) and the data written
    by the worker that really finished them stands (fio verifies it).
    """
    create = ("--timeout", str(TIMEOUT), "--retries", "10", "--no-fence")  # fenced: test_fencing
    with served_disk("128M", "memory", 2, *create) as (dev, serve):
        job = start_fio_verify(dev, 90, size="64M", iodepth=32)
        stops = replaced = 0
        # A stop only counts if the victim held a batch; stop until one did.
        while job.poll() is None and (stops < 6 or (not (_late_put_refused(dev) or replaced) and stops < 12)):
            time.sleep(rng.uniform(0.5, 2.0))
            victim = _awake_worker(serve, rng)
            os.kill(victim, signal.SIGSTOP)
            time.sleep(TIMEOUT * 2 + rng.uniform(0, 1))
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                replaced += 1  # the pool's liveness check killed it first
            stops += 1
        finish_fio(job)
        counters = assert_settled(dev)
    print(
        f"{stops} stops: {counters['timeouts']} timeouts, {counters['rejected']} late replies rejected,"
        f" {replaced} stopped workers killed by the pool's liveness check"
    )
    # Each stop that held requests ends one of two ways: the timeout moved
    # them and the late answers were refused, or the pool killed the worker
    # (at half the timeout) and its close requeued them.
    assert (counters["timeouts"] > 0 and counters["rejected"] > 0) or replaced > 0, counters
    assert counters["errors"] == 0, counters


def _late_put_refused(dev: str) -> bool:
    counters = sysfs_counters(dev)
    return counters["timeouts"] > 0 and counters["rejected"] > 0


def _awake_worker(serve: subprocess.Popen[str], rng: random.Random) -> int:
    """A worker not asleep in GET, so most likely holding requests.

    GET sleepers wake LIFO, so under load one worker takes most batches
    and the other mostly sleeps: a blind pick would often stop a worker
    that holds nothing, and nothing would time out.
    """
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        awake = [pid for pid in worker_pids(serve) if not asleep_in_driver(f"/proc/{pid}")]
        if awake:
            return rng.choice(awake)
        time.sleep(0.001)
    return rng.choice(worker_pids(serve))


def test_no_worker_for_ten_seconds_with_timeout_zero(tmp_path: Path) -> None:
    """Timeout 0 waits forever: a pool killed whole, and a new one 10 s later.

    The data lives in an image file, so that it outlives the first pool.
    """
    image = tmp_path / "disk.img"
    image.touch()
    os.truncate(image, 128 << 20)
    backend = f"file:{image}"
    with served_disk("128M", backend, 2, "--timeout", "0") as (dev, first):
        job = start_fio_verify(dev, 40, size="64M", iodepth=16)
        wait_for(lambda: sysfs_counters(dev)["completed"] >= 500 or job.poll() is not None, timeout=300)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        wait_for(lambda: sysfs_counters(dev)["attached"] == 0)
        time.sleep(10)
        waiting = sysfs_counters(dev)
        assert waiting["queued"] > 0 and waiting["errors"] == 0, waiting
        assert job.poll() is None, "fio ended while no worker was serving"
        second = start_pool(dev, backend, 2)
        try:
            finish_fio(job)
            counters = assert_settled(dev)
            assert counters["errors"] == 0, counters
            assert counters["timeouts"] == 0, counters
        finally:
            stop_pool(second)
    tally.add("kills survived", 3)  # the pool and its two workers
