"""How many sleeps a second N bare processes manage: the 5 ms backend's ceiling on this rig.

The slow backend's ideal (N workers / 5 ms) assumes a 5 ms sleep takes
5 ms.  Under QEMU TCG it takes 5.5-5.8 ms, and 16 sleepers' timer and
wake-up work share 2 emulated CPUs, so N processes that do nothing but
sleep fall short of the ideal too.  bench.guest measures them in the
same boot as the slow backend's runs, and bench.report sets the workers'
IOPS beside it: what is left between the two is the workers' own (the
dispatch, the PUT+GET and their CPU per request).
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from multiprocessing.queues import Queue

__all__ = ["sleeps_per_second"]

# How long past its deadline a sleeper may take to report before it counts as lost.
REPORT_GRACE_S = 60.0


def _sleep_until(deadline: float, delay: float, counts: Queue[int]) -> None:
    done = 0
    while time.monotonic() < deadline:
        time.sleep(delay)
        done += 1
    counts.put(done)


def sleeps_per_second(processes: int, seconds: float, delay: float) -> float:
    """Sleeps of ``delay`` a second, all ``processes`` together, over about ``seconds``."""
    if processes < 1 or seconds <= 0 or delay <= 0:
        raise ValueError(f"sleeps_per_second: bad processes {processes}, seconds {seconds} or delay {delay}")
    context = multiprocessing.get_context("fork")
    counts: Queue[int] = context.Queue()
    start = time.monotonic()
    children = [
        context.Process(target=_sleep_until, args=(start + seconds, delay, counts)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    deadline = start + seconds + REPORT_GRACE_S
    try:
        total = sum(counts.get(timeout=max(0.0, deadline - time.monotonic())) for _ in children)
        elapsed = time.monotonic() - start
    except queue.Empty:
        raise RuntimeError(
            f"sleeps_per_second: a sleeper did not report within {REPORT_GRACE_S:g} s of its deadline"
        ) from None
    finally:
        # Reported or lost, none may outlive the measure.
        for child in children:
            child.join(timeout=1)
            if child.is_alive():
                child.kill()
                child.join()
    return total / elapsed
