"""The coarse monotonic clock, for what runs once per batch.

CLOCK_MONOTONIC_COARSE reads the time of the last tick (a few
milliseconds old) from the vDSO without touching the hardware.  A
precise clock may have to: in an emulated guest whose clocksource is an
HPET, one precise read cost more than serving a request.  Same time base
as ``time.monotonic()``, so the two may be compared (to within a tick).
"""

from __future__ import annotations

import functools
import time

__all__ = ["coarse_ns", "coarse_seconds"]

# <linux/time.h>; Python's time module does not name it.
CLOCK_MONOTONIC_COARSE: int = getattr(time, "CLOCK_MONOTONIC_COARSE", 6)

coarse_ns = functools.partial(time.clock_gettime_ns, CLOCK_MONOTONIC_COARSE)
coarse_seconds = functools.partial(time.clock_gettime, CLOCK_MONOTONIC_COARSE)
