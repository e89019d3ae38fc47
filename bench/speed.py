"""The rig's speed of the moment: seconds for a fixed Python loop.

The same emulated guest ran at a fifth of its usual speed on some days
with the host idle, and the host's own speed says little of it.  So the
loop runs on the host (bench/run, before the boot) and in the guest
(bench/guest.py, before and after the jobs); the report prints all
three, and the guest's figure tells a slow boot apart from a slow host.
``python -m bench.speed`` prints the seconds.

One timing says little on a slow guest: in one 6.12 boot back-to-back
timings alternated between 4.7 and 7.2 s with no trend (the drift probe
of 2026-12-04 23:33), so the bench takes the median of SPEED_RUNS.

Until 2026-12-04 the host ran the loop at a module's top level, on
global names, which takes about 2.8 times as long: 1.24 s there against
0.44 s here, on the same host half an hour apart.  Reports before then
say "bench/run" beside the figure, later ones "bench/speed.py".
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

__all__ = ["SPEED_RUNS", "median_loop_seconds"]

LOOP_ADDITIONS = 10_000_000
SPEED_RUNS = 3


def python_loop_seconds() -> float:
    """Seconds for LOOP_ADDITIONS additions in a Python loop (lower is faster)."""
    start = time.perf_counter()
    total = 0
    for i in range(LOOP_ADDITIONS):
        total += i
    return time.perf_counter() - start


def median_loop_seconds(runs: int = SPEED_RUNS, measure: Callable[[], float] = python_loop_seconds) -> float:
    """The median of ``runs`` timings of ``measure`` (the loop by default)."""
    return statistics.median(measure() for _ in range(runs))


if __name__ == "__main__":
    print(f"{median_loop_seconds():.2f}")
