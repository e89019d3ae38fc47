"""What operators and backend authors rely on, against the real module.

Feature discovery (and an older module's answer), capabilities driving
the disk's flags, process-local backends, readiness to systemd, --run,
--user, unprivileged list/status, and the pool's liveness kill.  Every
wait is on an event: a datagram, a counter, a process gone.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

import abuse
from abuse import uapi
from abuse.backends.memory import MemoryBackend
from abuse.control import Control, ModuleFeatures
from abuse.worker import Worker
from tests.kernel.blockio import direct_read, direct_write, pattern
from tests.kernel.conftest import Disks, MiB, wait_for
from tests.kernel.serving import ABUSECTL, abusectl, start_ready

ROOT = Path(__file__).resolve().parents[2]
V1 = ModuleFeatures.from_answer(1, uapi.ABUSE_MAX_BATCH, 0x1F, 0)  # what a version-1 module answers


def sysfs(dev: str, name: str) -> str:
    return Path("/sys/block", Path(dev).name, "abuse", name).read_text().strip()


def destroy(dev: str) -> None:
    subprocess.run([*ABUSECTL, "destroy", dev, "--force"], capture_output=True)


def serve_until_done(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ABUSECTL, "serve", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


# --- feature discovery -----------------------------------------------------------


def test_module_reports_every_header_feature(control: Control) -> None:
    module = control.features()
    assert module.version == uapi.ABUSE_VERSION
    assert module.features == sum(uapi.DISK_FEATURES.values()) == uapi.ABUSE_F_ALL
    assert module.xfer_features == sum(uapi.XFER_FEATURES.values()) == uapi.ABUSE_XFER_ALL
    record = json.loads(abusectl("features", "--json"))
    assert record["module"]["uapi"] == uapi.ABUSE_VERSION
    assert all(row["module"] for row in record["features"])
    assert abusectl("--version").splitlines()[1] == f"module: uapi {uapi.ABUSE_VERSION}"


def test_older_module_refuses_a_new_disk_flag(disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Control, "features", lambda self: V1)
    before = abuse.control.list_disks()
    with pytest.raises(
        abuse.FeatureMissing, match=r"uapi version 1\) does not support fence \(ABUSE_F_FENCE\)"
    ):
        disks.control.create(64 * MiB, flags=uapi.ABUSE_F_FENCE)
    assert abuse.control.list_disks() == before, "refused before the kernel was asked"


def test_older_module_is_served_by_copy_and_poll(disks: Disks, monkeypatch: pytest.MonkeyPatch) -> None:
    """No MAPPED, no TIMEOUT: the memory disk is served by copy, idle waits poll; data round-trips."""
    monkeypatch.setattr(Control, "features", lambda self: V1)
    config = disks.create(8 * MiB, flags=uapi.ABUSE_F_FLUSH, timeout_ms=30_000)
    backend = disks.backends[config.index] = MemoryBackend(config.size)
    ctl = Control()
    disks.controls.append(ctl)
    worker = Worker(ctl, config.index, backend, batch=8)
    assert not worker.in_place
    stop = threading.Event()
    wakes: list[float] = []
    thread = threading.Thread(
        target=worker.serve, args=(stop.is_set, 20, lambda: wakes.append(time.monotonic())), daemon=True
    )
    thread.start()
    try:
        wait_for(lambda: len(wakes) >= 3)  # idle wake-ups without ABUSE_XFER_TIMEOUT: poll()
        data = pattern(7, 64 << 10)
        direct_write(config.path, 4096, data)
        assert direct_read(config.path, 4096, len(data)) == data
    finally:
        stop.set()
        thread.join(30)
        worker.close()
    assert not thread.is_alive()


# --- capabilities, process-local backends ------------------------------------------


@pytest.mark.parametrize(
    ("backend", "flags"),
    [
        ("zero", uapi.ABUSE_F_FENCE),
        (
            "memory",
            uapi.ABUSE_F_FLUSH | uapi.ABUSE_F_DISCARD | uapi.ABUSE_F_WRITE_ZEROES | uapi.ABUSE_F_FENCE,
        ),  # noqa: E501
    ],
)
def test_capabilities_set_the_created_disk_flags(tmp_path: Path, backend: str, flags: int) -> None:
    record = tmp_path / "disk.dev"
    out = tmp_path / "flags"
    proc = serve_until_done(
        "--create", "16M", "--record", str(record), "-b", backend, "-w", "1",
        "--run", f'cat /sys/block/${{ABUSE_DEVICE#/dev/}}/queue/discard_max_bytes >{out}',
    )  # fmt: skip
    dev = record.read_text().strip()
    try:
        assert proc.returncode == 0, proc.stderr
        with Control() as control:
            assert control.info(int(dev[len("/dev/abuse") :])).config.flags == flags
        assert (out.read_text().strip() == "0") == (not flags & uapi.ABUSE_F_DISCARD)
    finally:
        destroy(dev)


def test_serving_a_disk_that_advertises_more_is_refused() -> None:
    dev = abusectl("create", "-s", "16M", "--discard")
    try:
        proc = serve_until_done(dev, "-b", "zero", "-w", "1")
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [
            f"abusectl: {dev} advertises discard, which backend 'zero' cannot do: "
            "recreate the disk without --discard"
        ]
    finally:
        destroy(dev)


def test_four_workers_refused_for_a_process_local_backend() -> None:
    dev = abusectl("create", "-s", "16M")
    spec = f"python:{ROOT}/examples/ramdisk.py:RamDisk"
    try:
        proc = serve_until_done(dev, "-b", spec, "-w", "4")
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [
            f"abusectl: backend {spec!r} keeps its data in each process (shared_state is false): "
            "serve it with --workers 1, not 4"
        ]
        assert int(sysfs(dev, "attached")) == 0
    finally:
        destroy(dev)


# --- readiness, --run, --user, unprivileged reads ------------------------------------


def test_sd_notify_ready_once_every_worker_attached(tmp_path: Path) -> None:
    dev = abusectl("create", "-s", "16M")
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(300)  # a bound on a stuck pool, not a guess at speed
    serve = subprocess.Popen(
        [*ABUSECTL, "serve", dev, "-b", "memory", "-w", "3"],
        env={**os.environ, "NOTIFY_SOCKET": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        message = listener.recv(4096).decode()
        assert message.splitlines()[0] == "READY=1"
        assert f"MAINPID={serve.pid}" in message.splitlines()
        assert int(sysfs(dev, "attached")) == 3, "READY=1 only after every worker attached"
        data = pattern(3, 8192)
        direct_write(dev, 0, data)  # served at once: no timeout, no retry needed
        assert direct_read(dev, 0, len(data)) == data
    finally:
        listener.close()
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
        destroy(dev)


def test_run_serves_for_the_command_and_returns_its_status(tmp_path: Path) -> None:
    dev = abusectl("create", "-s", "16M")
    try:
        proc = serve_until_done(
            dev, "-b", "memory", "-w", "2",
            "--run", 'dd if=/dev/urandom of="$ABUSE_DEVICE" bs=64k count=4 oflag=direct status=none; exit 3',
        )  # fmt: skip
        assert proc.returncode == 3, proc.stderr
        with Control() as control:
            counters = control.info(int(dev[len("/dev/abuse") :])).counters
        assert counters["bytes_written"] >= 256 << 10
        assert counters["attached"] == 0, "the workers stopped when the command exited"
    finally:
        destroy(dev)


def test_user_nobody_serves_under_fio_verify(tmp_path: Path) -> None:
    dev = abusectl("create", "-s", "32M")
    owners = tmp_path / "owners"
    os.chmod(tmp_path, 0o777)
    # The workers are the serving process's children other than this shell.
    job = (
        f"ps -o user= -o pid= --ppid $PPID | awk -v me=$$ '$2 != me {{print $1}}' >{owners} && "
        'fio --name=verify --filename="$ABUSE_DEVICE" --direct=1 --ioengine=libaio --rw=randwrite '
        "--bs=4k --size=16M --iodepth=16 --verify=crc32c --verify_fatal=1"
    )
    try:
        proc = serve_until_done(dev, "-b", "memory", "-w", "2", "--user", "nobody", "--run", job)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert owners.read_text().split() == ["nobody", "nobody"]
    finally:
        destroy(dev)


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """abusectl run by nobody.  The tree's venv python links into /root
    (mode 0700), so nobody runs the system python 3.11 on the venv's
    site-packages instead."""
    site = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    nobody = pwd.getpwnam("nobody")
    return subprocess.run(
        ["/usr/bin/python3", "-m", "abusectl", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{ROOT}:{site}", "PATH": "/usr/bin:/bin"},
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        cwd="/",
    )


def test_list_and_status_as_nobody() -> None:
    dev = abusectl("create", "-s", "16M", "--timeout", "7")
    serve = subprocess.Popen(
        [*ABUSECTL, "serve", dev, "-b", "memory", "-w", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: int(sysfs(dev, "attached")) == 2, timeout=300)
        listed = as_nobody("list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {"index": int(dev[len("/dev/abuse") :]), "path": dev} in json.loads(listed.stdout)["disks"]
        status = as_nobody("status", dev, "--json")
        assert status.returncode == 0, status.stderr
        (record,) = json.loads(status.stdout)["disks"]
        assert (record["size"], record["timeout_ms"], record["attached"]) == (16 * MiB, 7000, 2)
        assert sorted(record["workers"]) == sorted(p.pid for p in psutil.Process(serve.pid).children())
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        destroy(dev)


# --- liveness -----------------------------------------------------------------------


def _gone(process: psutil.Process) -> bool:
    """Whether ``process`` has ended (dead, a zombie, or already reaped)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # reaped between any two looks
        return True


def test_liveness_kills_a_stopped_worker_before_the_disk_timeout(tmp_path: Path) -> None:
    timeout_s = 8
    dev = abusectl("create", "-s", "16M", "--timeout", str(timeout_s))
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        # READY=1, not the disk's attached count: a worker attaches before
        # it tells the pool, and one stopped in between is not yet watched.
        serve, ready = start_ready(
            [*ABUSECTL, "serve", dev, "-b", "memory", "-w", "2"], stdout=out, stderr=out
        )
    try:
        assert ready, log.read_text()
        victim = psutil.Process(serve.pid).children()[0]
        stopped = time.monotonic()
        victim.send_signal(signal.SIGSTOP)
        wait_for(lambda: _gone(victim), timeout=60)
        took = time.monotonic() - stopped
        assert took < timeout_s, f"the stopped worker lived {took:.1f}s, past the disk's timeout"
        wait_for(lambda: int(sysfs(dev, "attached")) == 2, timeout=300)  # replaced
        data = pattern(11, 16384)
        direct_write(dev, 8192, data)
        assert direct_read(dev, 8192, len(data)) == data
        assert int(sysfs(dev, "timeouts")) == 0
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        destroy(dev)
    text = log.read_text()
    assert f"(pid {victim.pid}) stopped answering for" in text and "; killed" in text
    assert "killed for not answering: 1" in text
