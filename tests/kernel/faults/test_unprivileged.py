"""Unprivileged access (issue #4, item 3).

The policy (kernel/abuse.c, abuse_ioc_needs_admin): opening /dev/abuse
needs CAP_SYS_ADMIN, and so does every CREATE, DESTROY, SET_INFO, ATTACH
and RESET, checked at each call.  A file a privileged supervisor opened
and attached may be handed to an unprivileged worker, which can then
GET, PUT, poll and read INFO and VERSION for that one disk, and nothing
else.  Each case runs as user nobody and as root without CAP_SYS_ADMIN,
in a child process with the system python3 (the venv lives under /root).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from abuse import uapi
from abuse.control import CONTROL_PATH, Control
from tests.kernel.blockio import Background, direct_read
from tests.kernel.conftest import Disks, MiB
from tests.kernel.faults import tally
from tests.kernel.faults.fuzzer import CONFIG, TARGET, XFER

CHILD = Path(__file__).with_name("unprivileged_child.py").read_text()
NOBODY = 65534
CAP_SYS_ADMIN = 1 << 21
IOC = uapi.ioctls


def _child(who: str, steps: list[list[Any]], pass_fds: tuple[int, ...] = ()) -> list[Any]:
    """Run ``steps`` as ``who``: "nobody", or "root-nocap" (root minus CAP_SYS_ADMIN)."""
    argv = ["/usr/bin/python3", "-I", "-c", CHILD, json.dumps([["whoami"], *steps])]
    kwargs: dict[str, Any] = {}
    if who == "nobody":
        kwargs = {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    else:
        argv = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--", *argv]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, pass_fds=pass_fds, cwd="/", **kwargs
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (uid, caps), *results = list(json.loads(proc.stdout))
    # The child really is unprivileged.
    assert uid == (NOBODY if who == "nobody" else 0)
    assert not caps & CAP_SYS_ADMIN, f"{who} still has CAP_SYS_ADMIN: {caps:#x}"
    if who == "nobody":
        assert caps == 0
    return results


@contextmanager
def _mode(path: str, mode: int) -> Iterator[None]:
    old = stat.S_IMODE(os.stat(path).st_mode)
    os.chmod(path, mode)
    try:
        yield
    finally:
        os.chmod(path, old)


WHO = pytest.mark.parametrize("who", ["nobody", "root-nocap"])


@WHO
def test_cannot_open_the_control_device(who: str) -> None:
    opens = [["open", CONTROL_PATH, os.O_RDWR], ["open", CONTROL_PATH, os.O_RDONLY]]
    mode = stat.S_IMODE(os.stat(CONTROL_PATH).st_mode)
    assert mode == 0o600, f"{CONTROL_PATH} is {mode:#o}"
    # nobody is stopped by the mode; root without the capability by the driver.
    want = errno.EACCES if who == "nobody" else errno.EPERM
    assert _child(who, opens) == [want, want]
    # With the node open to all, the driver still refuses.
    with _mode(CONTROL_PATH, 0o666):
        assert _child(who, opens) == [errno.EPERM, errno.EPERM]
    tally.add("unprivileged refusals", 4)


@WHO
def test_handed_down_file_serves_its_disk_and_nothing_more(disks: Disks, who: str) -> None:
    config = disks.create(16 * MiB)
    other = disks.create(16 * MiB)
    attached = disks.attach(config.index)
    loose = Control()
    try:
        target = TARGET.pack(config.index, 0, 0, 0).hex()
        other_target = TARGET.pack(other.index, 0, 0, 0).hex()
        cfg = CONFIG.pack(0, 4096, MiB, 0, 0, 0, 0, 0, 0, 0, 0, 0).hex()
        current = disks.control.info(config.index).config
        fixed = (current.queue_depth, current.max_request_bytes, current.timeout_ms, current.retries)
        resize = CONFIG.pack(config.index, 4096, 2 * config.size, 0, *fixed, 0, 0, 0, 0).hex()
        info = config.index.to_bytes(4, "little") + bytes(uapi.sizeof("abuse_info") - 4)
        xfer = XFER.pack(0, 0, 0, 0, 0, 1, 0, 0, uapi.ABUSE_XFER_NOWAIT, 0, 0, 0).hex()
        fill = bytes(range(256)) * 16
        a, b = attached.fileno(), loose.fileno()
        reader = Background(lambda: direct_read(config.path, 0, 4096))
        results = _child(
            who,
            [
                ["serve_read", a, IOC["ABUSE_IOC_GET"], IOC["ABUSE_IOC_PUT"], fill.hex()],
                ["ioctl", a, IOC["ABUSE_IOC_VERSION"], bytes(32).hex()],
                ["ioctl", a, IOC["ABUSE_IOC_INFO"], info.hex()],
                ["ioctl", a, IOC["ABUSE_IOC_CREATE"], cfg],
                ["ioctl", a, IOC["ABUSE_IOC_DESTROY"], other_target],
                ["ioctl", a, IOC["ABUSE_IOC_SET_INFO"], resize],
                ["ioctl", a, IOC["ABUSE_IOC_RESET"], target],
                ["ioctl", a, IOC["ABUSE_IOC_ATTACH"], target],
                ["ioctl", b, IOC["ABUSE_IOC_ATTACH"], other_target],
                ["ioctl", b, IOC["ABUSE_IOC_GET"], xfer],
                ["ioctl", b, IOC["ABUSE_IOC_DESTROY"], target],
            ],
            pass_fds=(a, b),
        )
        reader.join(60)
        assert reader.error is None, reader.error
        assert reader.result == fill, "the read did not return the child's answer"
        assert results[0] == [0, 0], results[0]
        assert results[1:3] == [0, 0], "VERSION/INFO refused"
        assert results[3:9] == [errno.EPERM] * 6, results
        assert results[9:] == [errno.EBADFD, errno.EPERM], results
        tally.add("unprivileged refusals", 7)
        # Nothing changed: both disks exist, same size, nothing failed.
        assert set(disks.control.list()) >= {config.index, other.index}
        counters = disks.control.info(config.index).counters
        assert disks.control.info(config.index).config == current
        assert counters["completed"] == 1 and counters["errors"] == counters["requeued"] == 0, counters
    finally:
        loose.close()
