"""A complete user backend: a RAM disk in a bytearray, shared by nobody.

Serve it with one worker (each worker process has its own copy):
    abusectl serve /dev/abuse0 --backend python:examples/ramdisk.py:RamDisk --workers 1
"""

from abuse import Backend


class RamDisk(Backend):
    shared_state = False  # the bytearray is this process's own: one worker only

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def read(self, offset: int, buf: memoryview) -> None:
        buf[:] = self.data[offset : offset + len(buf)]

    def write(self, offset: int, data: memoryview) -> None:
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        pass  # nothing is volatile
