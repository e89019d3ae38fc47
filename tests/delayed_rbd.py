"""An rbd: backend whose writes can be held "in the network" past their worker's death.

Each worker runs its RADOS client in a proxy process of its own (this
file run as a script), which outlives the worker as a socket buffer
would: the worker's fencing identity is its proxy's client address.
The first write at the wedge offset is held by the proxy until the test
creates ``DIR/release``, then stored and its outcome written to
``DIR/result`` ("0", or the errno).  The worker waits for the proxy's
answer meanwhile, stops answering, and the pool fences and kills it.

Configured by ``$ABUSE_DELAYED_RBD``: JSON ``{"spec": "rbd:...", "wedge":
OFFSET, "dir": PATH}``.  Served as ``python:tests/delayed_rbd.py:DelayedRbd``.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from abuse.backends import open_backend
from abuse.backends.base import Backend

_REQUEST = struct.Struct("=BQQ")  # op, offset, length (then the data of a write)
_ANSWER = struct.Struct("=iQ")  # errno, length (then the data of a read)
_READ, _WRITE, _FLUSH, _DISCARD, _ZEROES = range(5)


def _config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads(os.environ["ABUSE_DELAYED_RBD"])
    return config


def _read_exactly(stream: IO[bytes], length: int) -> bytes:
    data = stream.read(length)
    if data is None or len(data) < length:
        raise EOFError
    return bytes(data)


class DelayedRbd(Backend):
    """rbd: through a per-worker proxy process; see the module docstring."""

    can_flush = True
    can_discard = True
    can_write_zeroes = True
    shared_state = True

    def __init__(self, size: int) -> None:
        self.size = size
        self._proxy: subprocess.Popen[bytes] | None = None
        self._rbd = open_backend(_config()["spec"], size)  # checks the image now, as rbd: does

    def fence(self, identity: str) -> None:
        self._rbd.fence(identity)  # the identity is the proxy's RADOS client

    def open_worker(self) -> str:
        self._proxy = subprocess.Popen(
            [sys.executable, __file__, str(self.size)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # outlives its worker
        )
        assert self._proxy.stdout is not None
        return self._proxy.stdout.readline().decode().strip()

    def _call(self, op: int, offset: int, length: int, data: bytes = b"") -> bytes:
        proxy = self._proxy
        assert proxy is not None and proxy.stdin is not None and proxy.stdout is not None
        proxy.stdin.write(_REQUEST.pack(op, offset, length) + data)
        proxy.stdin.flush()
        code, size = _ANSWER.unpack(_read_exactly(proxy.stdout, _ANSWER.size))
        if code:
            raise OSError(code, os.strerror(code))
        return _read_exactly(proxy.stdout, size) if size else b""

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self._call(_READ, offset, len(buf))

    def write(self, offset: int, data: memoryview) -> None:
        self._call(_WRITE, offset, len(data), bytes(data))

    def flush(self) -> None:
        self._call(_FLUSH, 0, 0)

    def discard(self, offset: int, length: int) -> None:
        self._call(_DISCARD, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._call(_ZEROES, offset, length)


def _hold(directory: Path, offset: int, wedge: int) -> bool:
    """Whether this write is the one to hold (the first at the wedge offset)."""
    if offset != wedge:
        return False
    try:
        os.close(os.open(directory / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    (directory / "held.tmp").write_text(f"{os.getpid()}\n")
    (directory / "held.tmp").rename(directory / "held")  # the test reads it as soon as it exists
    while not (directory / "release").exists():
        time.sleep(0.05)
    return True


def _proxy(size: int) -> None:
    config = _config()
    directory, wedge = Path(config["dir"]), int(config["wedge"])
    backend = open_backend(config["spec"], size)
    identity = backend.open_worker()
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    out.write(f"{identity}\n".encode())
    out.flush()
    while True:
        try:
            op, offset, length = _REQUEST.unpack(_read_exactly(inp, _REQUEST.size))
            data = _read_exactly(inp, length) if op == _WRITE else b""
        except EOFError:
            return
        answer = b""
        code = 0
        held = op == _WRITE and _hold(directory, offset, wedge)
        try:
            if op == _READ:
                buf = bytearray(length)
                backend.read(offset, memoryview(buf))
                answer = bytes(buf)
            elif op == _WRITE:
                backend.write(offset, memoryview(data))
            elif op == _FLUSH:
                backend.flush()
            elif op == _DISCARD:
                backend.discard(offset, length)
            else:
                backend.write_zeroes(offset, length)
        except OSError as err:
            code = err.errno or errno.EIO
        if held:
            (directory / "result.tmp").write_text(f"{code}\n")
            (directory / "result.tmp").rename(directory / "result")
        try:
            out.write(_ANSWER.pack(code, len(answer)) + answer)
            out.flush()
        except BrokenPipeError:
            return


if __name__ == "__main__":
    _proxy(int(sys.argv[1]))
