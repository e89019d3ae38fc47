"""Fixtures for the kernel tier: real module, real disks, real workers.

Every test here checks the kernel log afterwards and fails on a BUG,
WARNING, Oops, lockdep or hung-task report.  With --require-kernel (CI)
a missing module is a failure, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from abuse.backends.memory import MemoryBackend
from abuse.control import CONTROL_PATH, Control, DiskConfig
from abuse.worker import Worker
from tests.kernel.kmsg import KernelLog, bad_lines

MiB = 1 << 20

# The deliberate-bug tests need the selftest build and leave reports in
# the kernel log: they run only under make test-detectors.
if not os.environ.get("ABUSE_SELFTEST_BUGS"):
    collect_ignore = ["detectors"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.kernel)


@pytest.fixture(autouse=True)
def kernel_ready(request: pytest.FixtureRequest) -> Iterator[None]:
    """Skip (or, when required, fail) without the module; then watch dmesg."""
    problem = None
    if os.geteuid() != 0:
        problem = "kernel tests need root"
    elif not os.path.exists(CONTROL_PATH):
        problem = f"{CONTROL_PATH} missing: abuse.ko is not loaded"
    if problem:
        if request.config.getoption("--require-kernel"):
            pytest.fail(f"kernel tier required but cannot run: {problem}")
        pytest.skip(problem)
    log = KernelLog()
    yield
    lines = log.read()
    log.close()
    bad = bad_lines(lines)
    assert not bad, "kernel log:\n" + "\n".join(lines)


@pytest.fixture
def control() -> Iterator[Control]:
    with Control() as ctl:
        yield ctl


@dataclass
class ServedDisk:
    """A running test worker thread over a memory backend."""

    worker: Worker
    thread: threading.Thread
    stop: threading.Event

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "worker did not stop"


class Disks:
    """Creates disks and workers for one test and always removes them."""

    def __init__(self) -> None:
        self.control = Control()
        self.indexes: list[int] = []
        self.served: list[ServedDisk] = []
        self.controls: list[Control] = []
        self.backends: dict[int, MemoryBackend] = {}

    def create(self, size: int = 64 * MiB, **kwargs: int) -> DiskConfig:
        config = self.control.create(size, **kwargs)
        self.indexes.append(config.index)
        return config

    def attach(self, index: int) -> Control:
        """A new attached Control that the test drives by hand."""
        ctl = Control()
        ctl.attach(index)
        self.controls.append(ctl)
        return ctl

    def serve(self, config: DiskConfig, batch: int = 16) -> ServedDisk:
        """Start a worker thread serving ``config`` from shared memory."""
        backend = self.backends.get(config.index)
        if backend is None:
            backend = self.backends[config.index] = MemoryBackend(config.size)
        ctl = Control()
        self.controls.append(ctl)
        worker = Worker(ctl, config.index, backend, batch=batch)
        stop = threading.Event()
        thread = threading.Thread(target=worker.serve, args=(stop.is_set, 50), daemon=True)
        thread.start()
        served = ServedDisk(worker, thread, stop)
        self.served.append(served)
        return served

    def cleanup(self) -> None:
        for served in self.served:
            served.stop.set()
        for index in self.indexes:
            try:
                self.control.destroy(index, force=True)
            except Exception:
                pass
        for served in self.served:
            served.thread.join(timeout=30)
            served.worker.close()
        for ctl in self.controls:
            ctl.close()
        for backend in self.backends.values():
            backend.close()
        self.control.close()


@pytest.fixture
def disks() -> Iterator[Disks]:
    pool = Disks()
    try:
        yield pool
    finally:
        pool.cleanup()


def run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command, fail the test with its output if it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
    return proc


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def task_state(task: str) -> str:
    """The state letter (S, D, R...) of the thread at ``task`` (a /proc task folder); "" once gone."""
    try:
        with open(f"{task}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def asleep_in_driver(task: str) -> bool:
    """Whether the thread at ``task`` (a /proc task folder) sleeps in abuse.ko.

    A worker asleep there (a blocking GET) holds no requests; one awake
    may be holding the batch it took.
    """
    if task_state(task) != "S":
        return False
    try:
        with open(f"{task}/wchan") as f:
            return f.read().startswith("abuse")
    except (FileNotFoundError, ProcessLookupError):  # the task is gone
        return False
