"""Real, verified I/O kept running on a disk while something hostile happens."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import time
import traceback
from pathlib import Path

from abuse.backends.memory import MemoryBackend
from abuse.control import Control
from abuse.worker import Worker

MiB = 1 << 20


class FioLoad:
    """fio jobs, one after the other, each writing a random region and verifying it.

    :meth:`tick` starts the next job when the last one is done; every job
    must end with status 0 (fio's crc32c verify found nothing wrong).
    """

    def __init__(self, dev: str, disk_size: int, rng: random.Random) -> None:
        self.dev = dev
        self.disk_size = disk_size
        self.rng = rng
        self.jobs = 0
        self.failures: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._start()

    def _start(self) -> None:
        rng = self.rng
        size = rng.choice((2, 4, 8)) * MiB
        offset = rng.randrange(0, (self.disk_size - size) // MiB + 1) * MiB
        self.proc = subprocess.Popen(
            [
                "fio",
                "--name=load",
                f"--filename={self.dev}",
                "--direct=1",
                "--ioengine=libaio",
                f"--rw={rng.choice(('randwrite', 'write'))}",
                f"--bsrange={rng.choice((4, 16))}k-{rng.choice((16, 64, 256))}k",
                f"--size={size}",
                f"--offset={offset}",
                f"--iodepth={rng.choice((1, 4, 16))}",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_backlog=16",
                f"--randseed={rng.randrange(1, 1 << 31)}",
                "--output-format=terse",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # fio forks its job: kill() takes the whole group
        )
        self.jobs += 1

    def _reap(self, timeout: float | None) -> None:
        assert self.proc is not None
        out = self.proc.communicate(timeout=timeout)[0]
        if self.proc.returncode != 0:
            self.failures.append(f"fio job {self.jobs} exit {self.proc.returncode}: {out}")
        self.proc = None

    def tick(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self._reap(None)
            self._start()

    def kill(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.communicate()
            self.proc = None

    def finish(self, timeout: float = 600) -> None:
        if self.proc is not None:
            self._reap(timeout)


def block_stat_ios(name: str) -> int:
    """Requests the block layer completed on ``name``: reads, writes, discards, flushes."""
    fields = [int(x) for x in Path(f"/sys/block/{name}/stat").read_text().split()]
    return sum(fields[i] for i in (0, 4, 11, 15) if i < len(fields))


class ForkedWorker:
    """A real Worker serving disk ``index`` from memory, in a forked process.

    Out of the test's process so that a busy test loop does not starve it
    of the GIL; started in milliseconds, unlike the CLI pool under TCG.
    """

    def __init__(self, index: int, size: int, batch: int = 32) -> None:
        read_end, self._stop = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os.close(self._stop)
            code = 1
            try:
                poller = select.poll()
                poller.register(read_end, select.POLLIN)
                with Control() as control:
                    worker = Worker(control, index, MemoryBackend(size), batch=batch)
                    worker.serve(lambda: bool(poller.poll(0)), 50)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(read_end)
        self.pid = pid
        self.exit: int | None = None

    def pause(self, paused: bool) -> None:
        """Stop (or continue) serving, so that requests pile up in the queue."""
        os.kill(self.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def alive(self) -> bool:
        if self.exit is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exit = os.waitstatus_to_exitcode(status)
        return self.exit is None

    def stop(self, timeout: float = 120) -> int:
        """Ask it to answer what it holds and exit; its exit status."""
        os.close(self._stop)
        if self.alive():
            self.pause(False)
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                raise AssertionError("the worker did not stop")
            time.sleep(0.05)
        assert self.exit is not None
        return self.exit
