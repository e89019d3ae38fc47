"""The fault suite: seeded randomness, counts printed at the end.

Every test takes its random choices from ``rng``, which is seeded from
the run's seed and the test's id, so a failure reproduces with
``make test-faults SEED=<seed>`` (the seed is printed first and last).
"""

from __future__ import annotations

import faulthandler
import json
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from abuse.control import Control, list_disks
from tests.kernel.faults import tally

HANG_SECONDS = int(os.environ.get("ABUSE_HANG_SECONDS") or 900)

_seed = int(os.environ.get("ABUSE_SEED") or random.SystemRandom().randrange(1 << 32))


def pytest_report_header() -> str:
    return f"fault suite seed: {_seed} (rerun with SEED={_seed})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.faults)


def _hung() -> None:
    # pytest holds fd 2 and os._exit() drops what it captured, so the
    # report goes to the console and to a file in the output folder.
    Path("/proc/sysrq-trigger").write_text("w\n")  # blocked tasks' kernel stacks, to dmesg
    files = [open("/dev/console", "w")]
    out = os.environ.get("ABUSE_OUT")
    if out:
        files.append(open(Path(out, "hang-stacks.txt"), "w"))
    for f in files:
        print(f"\nfault suite: a case hung for {HANG_SECONDS} s; stacks follow", file=f, flush=True)
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.flush()
    os._exit(3)


@pytest.fixture(autouse=True)
def hang_guard() -> Iterator[None]:
    """A hung case dumps the stacks and ends the run.

    A fault case that hangs is a failure; without this the guest would
    sit until vm-run's timeout and keep no kernel log.
    """
    timer = threading.Timer(HANG_SECONDS, _hung)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


@pytest.fixture(autouse=True)
def no_disk_left_behind() -> Iterator[None]:
    """Each case removes the disks it made; one it left fails that case.

    Left behind, a disk would change what the next case sees (the fuzzer
    treats it as someone else's) and keep the module from unloading.
    """
    before = set(list_disks())
    yield
    left = sorted(set(list_disks()) - before)
    if left:
        with Control() as control:
            for index in left:
                control.destroy(index, force=True)
        pytest.fail(f"disks left behind: {', '.join(f'abuse{i}' for i in left)}")


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    return random.Random(f"{_seed}:{request.node.nodeid}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    counts = dict(tally.counts)
    terminalreporter.section("fault suite")
    for name, value in counts.items():
        terminalreporter.write_line(f"{name}: {value}")
    terminalreporter.write_line(f"seed: {_seed} (rerun with SEED={_seed})")
    out = os.environ.get("ABUSE_OUT")
    if out:
        Path(out, "faults.json").write_text(json.dumps({"seed": _seed, **counts}, indent=2) + "\n")
