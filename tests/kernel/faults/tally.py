"""Counts the fault suite reports at the end of a run.

Tests add to named counters (kills survived, resets, fuzz calls, verify
errors, requests lost...); conftest prints them after the summary and
writes them to faults.json in the run's output folder for RELIABILITY.md.
"""

from __future__ import annotations

from collections import Counter

# Always printed, even when zero: these are the promises.
HEADLINE = ("kills survived", "resets", "fuzz calls", "verify errors", "requests lost")

counts: Counter[str] = Counter({name: 0 for name in HEADLINE})


def add(name: str, n: int = 1) -> None:
    counts[name] += n
