"""Drive the real CLI: create a disk, serve it with a pool, clean up."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from tests.kernel.conftest import run

ABUSECTL = [sys.executable, "-m", "abusectl"]
# The output file of each pool start_pool started, by pid, until stop_pool reads it.
_POOL_LOGS: dict[int, Any] = {}


def abusectl(*args: str) -> str:
    return run(*ABUSECTL, *args).stdout.strip()


@contextmanager
def served_disk(
    size: str, backend: str, workers: int, *create_args: str
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """A disk made with `abusectl create` and served by `abusectl serve`.

    The pool leads its own session, so that a test can kill it whole.
    """
    dev = abusectl("create", "--size", size, *create_args)
    try:
        serve = start_pool(dev, backend, workers)
        try:
            yield dev, serve
        finally:
            stop_pool(serve)
    finally:
        subprocess.run([*ABUSECTL, "destroy", dev, "--force"], capture_output=True)


def start_pool(dev: str, backend: str, workers: int) -> subprocess.Popen[str]:
    """`abusectl serve`, returned once it says READY=1 (every worker attached).

    Not merely once its workers exist or the disk counts them attached: a
    worker attaches before it tells the pool so, and a worker stopped in
    between is one the pool's liveness check does not watch (only its
    start timeout, a minute or more, would end it).

    The pool's output goes to an unlinked file, not a pipe: a pool that
    logs a failure per request would fill a pipe nobody reads until
    :func:`stop_pool`, and its workers would then block in write(2).
    """
    log = tempfile.TemporaryFile("w+", prefix="abuse-pool-")
    serve, ready = start_ready(
        [*ABUSECTL, "serve", dev, "--backend", backend, "--workers", str(workers)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _POOL_LOGS[serve.pid] = log
    if not ready:
        raise AssertionError(stop_pool(serve))
    return serve


def start_ready(argv: list[str], **popen: Any) -> tuple[subprocess.Popen[Any], bool]:
    """Start ``argv`` with a $NOTIFY_SOCKET; it and whether it said READY=1 (False: it exited first)."""
    with notify_socket() as (path, listener):
        process = subprocess.Popen(argv, env={**os.environ, "NOTIFY_SOCKET": path}, **popen)
        return process, wait_ready(listener, process)


@contextmanager
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A datagram socket to pass as $NOTIFY_SOCKET, as systemd would."""
    with tempfile.TemporaryDirectory(prefix="notify-") as where:
        path = os.path.join(where, "socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(path)
            yield path, listener


def wait_ready(listener: socket.socket, serve: subprocess.Popen[Any], timeout: float = 300) -> bool:
    """Wait for READY=1 from ``serve``; False if it exited first.

    ``timeout`` bounds a stuck pool; Python starts slowly under TCG, and
    slower still on a busy host.
    """
    deadline = time.monotonic() + timeout
    listener.settimeout(1)
    while time.monotonic() < deadline:
        try:
            message = listener.recv(4096).decode()
        except TimeoutError:
            if serve.poll() is not None:
                return False
            continue
        if "READY=1" in message.splitlines():
            return True
    raise AssertionError(f"serve did not say READY=1 in {timeout:.0f}s")


def worker_pids(serve: subprocess.Popen[str]) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(serve.pid).children()]
    except psutil.NoSuchProcess:
        return []


def stop_pool(serve: subprocess.Popen[str]) -> str:
    """Stop the pool (SIGCONT it and its workers first); its output, once.

    The output is read from start_pool's file, else from the pool's stdout pipe.
    """
    log = _POOL_LOGS.pop(serve.pid, None)
    if log is None and (serve.stdout is None or serve.stdout.closed):
        return ""
    if serve.poll() is None:
        serve.send_signal(signal.SIGCONT)  # a test that stopped it may have failed before continuing it
        for pid in worker_pids(serve):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        serve.send_signal(signal.SIGTERM)
    if log is None:
        out, _ = serve.communicate(timeout=60)
        return str(out)
    serve.wait(timeout=60)
    with log:
        log.seek(0)
        return log.read()


def pool_rss(serve: subprocess.Popen[str]) -> int:
    """Private resident bytes of the pool: the memory disk's shared pages,
    mapped by every worker, are not counted (the memfd's size says those)."""
    procs = [psutil.Process(serve.pid), *psutil.Process(serve.pid).children()]
    return sum(p.memory_info().rss - p.memory_info().shared for p in procs)


def write_files(root: Path, count: int, size: int) -> dict[str, str]:
    sums = {}
    for i in range(count):
        data = os.urandom(size)
        (root / f"f{i}").write_bytes(data)
        sums[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return sums


def check_files(root: Path, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, name


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextmanager
def mounted(dev: str, mnt: Path, *options: str) -> Iterator[Path]:
    mnt.mkdir(parents=True, exist_ok=True)
    run("mount", *options, dev, str(mnt))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def fio(dev: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "fio",
            "--name=verify",
            f"--filename={dev}",
            "--direct=1",
            "--ioengine=libaio",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--output-format=terse",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
