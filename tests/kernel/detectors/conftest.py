"""Fixtures for the detector tests: the selftest build on the debug kernel.

These tests expect reports in the kernel log, so they replace the kernel
tier's autouse ``kernel_ready`` (which fails any test that leaves one)
with one that only checks the module is the selftest build.  They run
only under ``make test-detectors`` (scripts/debug-tier --detectors),
which sets ABUSE_SELFTEST_BUGS; tests/kernel/conftest.py ignores this
folder otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from abuse.control import CONTROL_PATH
from tests.kernel.kmsg import KernelLog

PARAM = Path("/sys/module/abuse/parameters/selftest_bug")


@pytest.fixture(autouse=True)
def kernel_ready() -> Iterator[None]:
    """Fail unless the selftest build is loaded; leave the log to the test."""
    if not Path(CONTROL_PATH).exists():
        pytest.fail(f"{CONTROL_PATH} missing: abuse.ko is not loaded")
    if not PARAM.exists():
        pytest.fail("abuse.ko is not the selftest build (scripts/debug-module --selftest)")
    yield
    PARAM.write_text("0\n")


@pytest.fixture
def kmsg() -> Iterator[KernelLog]:
    log = KernelLog()
    yield log
    log.close()
