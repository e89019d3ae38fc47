"""Real, verified I/O kept running on a disk while something hostile happens."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

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
        size = rng.choice((4, 8, 16)) * MiB
        offset = rng.randrange(0, (self.disk_size - size) // MiB + 1) * MiB
        self.proc = subprocess.Popen(
            [
                "fio",
                "--name=load",
                f"--filename={self.dev}",
                "--direct=1",
                "--ioengine=libaio",
                f"--rw={rng.choice(('randwrite', 'write'))}",
                f"--bsrange=4k-{rng.choice((4, 16, 64, 256))}k",
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

    def finish(self, timeout: float = 600) -> None:
        if self.proc is not None:
            self._reap(timeout)


def block_stat_ios(name: str) -> int:
    """Requests the block layer completed on ``name``: reads, writes, discards, flushes."""
    fields = [int(x) for x in Path(f"/sys/block/{name}/stat").read_text().split()]
    return sum(fields[i] for i in (0, 4, 11, 15) if i < len(fields))
