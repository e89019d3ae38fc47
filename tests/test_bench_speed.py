"""bench.speed: the rig gauge is a median, so one slow timing does not move it."""

from __future__ import annotations

from bench import speed


def test_the_gauge_is_the_median_of_its_runs() -> None:
    timings = iter([4.7, 7.2, 4.9])
    assert speed.median_loop_seconds(3, lambda: next(timings)) == 4.9
    assert next(timings, None) is None  # each run timed once
