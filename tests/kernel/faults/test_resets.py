"""`abusectl reset` during I/O: requeue without loss; --fail ends I/O with EIO."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import time

from abuse.control import Control
from tests.kernel.conftest import wait_for
from tests.kernel.faults import tally
from tests.kernel.faults.workload import (
    assert_settled,
    finish_fio,
    fio_verify,
    start_fio_verify,
    sysfs_counters,
)
from tests.kernel.raw import RawWorker
from tests.kernel.serving import abusectl, served_disk, worker_pids


def test_reset_loop_during_fio_verify(rng: random.Random) -> None:
    """Resets at random moments, one in twenty by `abusectl reset`.

    The rest call the same ioctl through the library, which is faster
    than starting Python each time and so hits more moments.  The disk
    is not fenced: every reset requeues what the live workers hold, and
    their late answers are refused (test_fencing covers fenced resets).
    """
    with served_disk("128M", "memory", 2, "--no-fence") as (dev, serve), Control() as control:
        index = int(dev.removeprefix("/dev/abuse"))
        resets = 0
        # fio rounds until 30 resets, some of them on requests in flight: a
        # loaded guest starts `abusectl` slowly, and one round may see only
        # a few; on the debug kernel every random one can miss.  At most 10.
        # So one in ten resets is made while this process holds requests.
        rounds = held = 0
        while (resets < 30 or not sysfs_counters(dev)["requeued"]) and rounds < 10:
            rounds += 1
            job = start_fio_verify(dev, 30, size="64M", iodepth=32, extra=("--bsrange=4k-64k",))
            while job.poll() is None:
                if resets % 10 == 5 and _reset_while_held(dev, serve, control, index, job):
                    held += 1
                elif resets % 20 == 0:
                    abusectl("reset", dev)
                else:
                    control.reset(index)
                resets += 1
                time.sleep(rng.uniform(0.0, 0.1))
            finish_fio(job)
        counters = assert_settled(dev)
        assert counters["errors"] == 0, counters
    print(
        f"{resets} resets ({held} while the test held requests),"
        f" {counters['requeued']} requests requeued, {counters['rejected']} late replies"
    )
    assert resets >= 30, resets
    assert held > 0 and counters["requeued"] > 0, (held, counters)
    tally.add("resets", resets)


def _reset_while_held(
    dev: str, serve: subprocess.Popen[str], control: Control, index: int, job: subprocess.Popen[str]
) -> bool:
    """Hold requests in a file of the test's own, reset, answer late; whether it did.

    Resets at random moments alone can all miss held requests: on the
    debug kernel (2026-12-01, and 2026-12-04 with a stopped worker tried
    one reset in ten) 201 resets in ten rounds met none, its workers
    asleep in GET at every look.  So the pool and its workers are
    stopped (the pool first: it would replace stopped workers), a GET of
    the test's own takes what fio queued meanwhile, and the reset takes
    it back: each late answer must be refused (ESTALE).  Workers stopped
    while they held a batch lose it too, as in the random resets.
    """
    pool = [serve.pid, *worker_pids(serve)]
    for pid in pool:
        os.kill(pid, signal.SIGSTOP)
    holder = RawWorker(index)
    try:
        wait_for(lambda: sysfs_counters(dev)["queued"] > 0 or job.poll() is not None, timeout=120)
        held = holder.get()
        if not held:
            return False  # fio ended first
        control.reset(index)
        statuses = holder.put([holder.answer(request) for request in held])
        assert statuses == [-errno.ESTALE] * len(held), statuses
        return True
    finally:
        holder.close()
        for pid in reversed(pool):  # the workers first: they stamp before the pool judges them
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def test_reset_fail_gives_eio_and_the_disk_works_after(rng: random.Random) -> None:
    """With the workers stopped, a writer's requests wait; reset --fail ends them."""
    with served_disk("64M", "memory", 2) as (dev, serve):
        pids = worker_pids(serve)
        # The pool first: its liveness check would replace the stopped
        # workers, and the new ones would serve the writer before the reset.
        os.kill(serve.pid, signal.SIGSTOP)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        blocks = rng.randint(1, 64)
        writer = subprocess.Popen(
            ["dd", "if=/dev/urandom", f"of={dev}", "bs=64k", f"count={blocks}", "oflag=direct"],
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: sysfs_counters(dev)["queued"] + sysfs_counters(dev)["in_flight"] > 0)
        abusectl("reset", dev, "--fail")
        _, err = writer.communicate(timeout=60)
        assert writer.returncode != 0, "the writer did not see the failure"
        assert "Input/output error" in err, err
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # a holder, fenced by the reset
        os.kill(serve.pid, signal.SIGCONT)  # it replaces the fenced ones
        tally.add("resets")
        counters = sysfs_counters(dev)
        assert counters["errors"] >= 1, counters
        fio_verify(dev)
        settled = assert_settled(dev)
        assert settled["errors"] == counters["errors"], "errors after the reset"
