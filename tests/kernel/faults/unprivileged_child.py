"""Run by the system python3 as an unprivileged process: stdlib only.

argv[1] is a JSON list of steps; the result of each is printed as one
JSON list.  Steps:
  ["whoami"]                          -> [uid, effective capability mask]
  ["open", path, flags]               -> errno (0: opened, the fd is kept)
  ["ioctl", fd, cmd, hex struct]      -> errno
  ["serve_read", fd, get, put, hex]   -> [errno, status]: GET one read
                                         request, answer it with the bytes
"""

import ctypes
import json
import os
import struct
import sys
import time
from typing import Any, Callable

XFER = struct.Struct("<QQQQIIIIII2Q")
REQUEST = struct.Struct("<QQQIHH")
REPLY = struct.Struct("<QQIiiI")
NOWAIT = 1

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
kept: list[int] = []


def call(fd: int, cmd: int, buf: Any) -> int:
    return 0 if libc.ioctl(fd, cmd, ctypes.addressof(buf)) == 0 else ctypes.get_errno()


def whoami() -> list[int]:
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return [os.getuid(), int(line.split()[1], 16)]
    raise RuntimeError("no CapEff")


def do_open(path: str, flags: int) -> int:
    try:
        kept.append(os.open(path, flags))
        return 0
    except OSError as err:
        return err.errno or -1


def do_ioctl(fd: int, cmd: int, arg: str) -> int:
    buf = ctypes.create_string_buffer(bytes.fromhex(arg), len(arg) // 2)
    return call(fd, cmd, buf)


def serve_read(fd: int, get: int, put: int, fill_hex: str) -> list[Any]:
    fill = bytes.fromhex(fill_hex)
    requests = ctypes.create_string_buffer(REQUEST.size)
    data = ctypes.create_string_buffer(1 << 20)
    xfer = ctypes.create_string_buffer(XFER.size)
    XFER.pack_into(
        xfer, 0, 0, ctypes.addressof(requests), ctypes.addressof(data), len(data), 0, 1, 0, 0, NOWAIT, 0, 0, 0
    )
    deadline = time.monotonic() + 60
    while True:
        err = call(fd, get, xfer)
        if err:
            return [err, None]
        if XFER.unpack_from(xfer)[6]:
            break
        if time.monotonic() > deadline:
            return ["nothing queued", None]
        time.sleep(0.01)
    handle, _, address, length, op, _ = REQUEST.unpack_from(requests)
    assert op == 0 and length == len(fill), (op, length)
    ctypes.memmove(address, fill, length)
    reply = ctypes.create_string_buffer(REPLY.pack(handle, address, length, 0, 12345, 0), REPLY.size)
    XFER.pack_into(xfer, 0, ctypes.addressof(reply), 0, 0, 0, 1, 0, 0, 0, NOWAIT, 0, 0, 0)
    err = call(fd, put, xfer)
    return [err, REPLY.unpack_from(reply)[4]]


STEPS: dict[str, Callable[..., Any]] = {
    "whoami": whoami,
    "open": do_open,
    "ioctl": do_ioctl,
    "serve_read": serve_read,
}
print(json.dumps([STEPS[step[0]](*step[1:]) for step in json.loads(sys.argv[1])]))
