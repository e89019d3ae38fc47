"""Read the kernel log from a point on, and judge it."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

# Lines that mean the kernel is unwell, one regular expression per line,
# shared with scripts/vm-run.  The taint notices every unsigned
# out-of-tree module prints at load are expected and do not match.
_PATTERNS = Path(__file__).with_name("bad-log.txt").read_text().split("\n")
BAD_LOG = re.compile("|".join(p for p in _PATTERNS if p))


class KernelLog:
    """Messages printed to /dev/kmsg since this object was made."""

    def __init__(self) -> None:
        self._fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.lseek(self._fd, 0, os.SEEK_END)

    def read(self) -> list[str]:
        lines = []
        while True:
            try:
                record = os.read(self._fd, 8192)
            except OSError as err:
                if err.errno == errno.EAGAIN:
                    return lines
                if err.errno == errno.EPIPE:  # overwritten; keep reading
                    continue
                raise
            lines.append(record.decode(errors="replace").split(";", 1)[-1].rstrip())

    def close(self) -> None:
        os.close(self._fd)


def bad_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if BAD_LOG.search(line)]
