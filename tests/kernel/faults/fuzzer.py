"""A seeded ioctl fuzzer for /dev/abuse with an exact model of each answer.

Every call is drawn from one ``random.Random``: the command (real, near
miss or random), the bytes of its struct (random or a valid one with a
field broken), where the struct lives (see :mod:`hostile`), and for GET
and PUT the nested arrays, the data buffer, the batch sizes and the
handles.  Before each call the fuzzer works out what the driver must
answer from what it knows (which disks exist, which requests each of its
files holds); a different errno fails at once with the call described.

It never completes a real request: a PUT entry names a handle that was
never handed out, a stale one, one that another of its files holds, or
one it holds with a field that is certain to be refused.  Requests it
GETs are requeued when its file is closed (it rotates files) or by
RESET, so the real worker serving the disk answers every request
exactly once.  Nothing it issues can block: every GET carries
ABUSE_XFER_NOWAIT.
"""

from __future__ import annotations

import errno
import os
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from abuse import uapi
from abuse.control import CONTROL_PATH, Control
from tests.kernel.faults.hostile import LOW_LIMIT, PAGE, Arena, ioctl, place, pointer
from tests.kernel.holders import describe_file, describe_tags

# Layouts derived from kernel/abuse.h (one struct code per field, arrays
# spread), never a second hand-written copy: a field added to the header
# changes these with it.
CONFIG = struct.Struct(uapi.struct_format("abuse_config"))
COUNTERS = struct.Struct(uapi.struct_format("abuse_counters"))
TARGET = struct.Struct(uapi.struct_format("abuse_target"))
XFER = struct.Struct(uapi.struct_format("abuse_xfer"))
REPLY = struct.Struct(uapi.struct_format("abuse_reply"))
REQUEST = struct.Struct(uapi.struct_format("abuse_request"))
VERSION = struct.Struct(uapi.struct_format("abuse_version"))
INFO_SIZE = uapi.sizeof("abuse_info")

IOC = uapi.ioctls
VERSION_CMD = IOC["ABUSE_IOC_VERSION"]
CREATE = IOC["ABUSE_IOC_CREATE"]
DESTROY = IOC["ABUSE_IOC_DESTROY"]
INFO = IOC["ABUSE_IOC_INFO"]
SET_INFO = IOC["ABUSE_IOC_SET_INFO"]
ATTACH = IOC["ABUSE_IOC_ATTACH"]
GET = IOC["ABUSE_IOC_GET"]
PUT = IOC["ABUSE_IOC_PUT"]
RESET = IOC["ABUSE_IOC_RESET"]

MAX_BATCH = uapi.ABUSE_MAX_BATCH
UNTOUCHED = 0x5A5A5A5A  # a PUT entry's status before the call: a refused PUT leaves it so
NOWAIT = uapi.ABUSE_XFER_NOWAIT
MAPPED = uapi.ABUSE_XFER_MAPPED
MAX_ERRNO = 4095
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

# Commands the VFS answers before the driver sees them (fs/ioctl.c):
# a random number equal to one of these is drawn again.
VFS_COMMANDS = frozenset(
    {
        0x5421, 0x5450, 0x5451, 0x5452, 0x5460, 0x541B, 0x00000002,
        0xC0045877, 0xC0045878, 0xC020660B, 0x40049409, 0x4020940D,
        0xC0189436, 0x80086601, 0x40086602, 0x801C581F, 0x401C5820,
    }
)  # fmt: skip
DRIVER_COMMANDS = frozenset(IOC.values())

# Batch sizes around the limits, and sometimes far past them.
EDGE_COUNTS: tuple[int, ...] = (0, 1, 2, 15, 16, 17, 31, 32, 33, MAX_BATCH - 1, MAX_BATCH, MAX_BATCH + 1)
EDGE_COUNTS += (1 << 16, 1 << 31, U32)


def errname(err: int) -> str:
    return errno.errorcode.get(err, str(err)) if err else "0"


class FuzzFailure(AssertionError):
    pass


@dataclass
class Disk:
    index: int
    size: int
    block_size: int
    queue_depth: int
    config: bytes  # CONFIG-packed, as INFO reports it
    busy: bool  # real I/O runs on it: never RESET_FAIL, never fail a request


@dataclass
class File:
    """One open /dev/abuse and what the fuzzer knows it holds."""

    fd: int
    disk: Disk | None = None
    held: dict[int, tuple[int, int]] = field(default_factory=dict)  # handle -> (op, length)


class Fuzzer:
    """Issue ``calls`` checked ioctls; see the module docstring."""

    def __init__(self, rng: random.Random, busy: Disk, spare: Disk, control: Control) -> None:
        self.rng = rng
        self.control = control
        self.disks = {busy.index: busy, spare.index: spare}
        self.others = set(control.list()) - set(self.disks)
        self.busy = busy
        self.spare = spare
        self.args = Arena(4)
        self.replies = Arena(MAX_BATCH * REPLY.size // PAGE + 1)
        self.requests = Arena(MAX_BATCH * REQUEST.size // PAGE + 1)
        # 4 MiB: room for several 1 MiB requests.  Its tail covers the
        # most one GET can hand out (queue depth x request size) past it,
        # and a whole disk for ABUSE_XFER_MAPPED (data at its offset).
        reach = max(max(d.queue_depth * CONFIG.unpack(d.config)[5], d.size) for d in (busy, spare))
        self.data = Arena(1024, tail=reach)
        self.calls = 0
        self.created = 0
        self.resets = 0
        self.got = 0
        self.stale: list[int] = []
        # What happened to each handle the fuzzer held, for a failure's report.
        self.history: dict[int, str] = {}
        self.loose = File(os.open(CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC))
        self.bound = self._attached(busy)
        self.fresh: File | None = None  # fresh_file's, while it lives
        self.rotate_at = 0

    # -- bookkeeping -------------------------------------------------------

    def _attached(self, disk: Disk) -> File:
        f = File(os.open(CONTROL_PATH, os.O_RDWR | os.O_CLOEXEC))
        arg = TARGET.pack(disk.index, 0, 0, 0)
        self.args.write(self.args.base, arg)
        self._call(f.fd, ATTACH, self.args.base, {0}, "attach")
        f.disk = disk
        return f

    def _close(self, f: File) -> None:
        """Closing requeues what ``f`` holds: those handles are stale now."""
        self._note_stale(f.held, f"file {f.fd} closed")
        self.stale.extend(f.held)
        f.held.clear()
        os.close(f.fd)
        del self.stale[:-512]

    def _held_by_others(self, f: File) -> list[int]:
        """Live handles of ``f``'s disk that another of the fuzzer's files holds."""
        others = (g for g in (self.bound, self.fresh) if g is not None and g is not f and g.disk is f.disk)
        return [handle for g in others for handle in g.held]

    def _note_stale(self, handles: Iterable[int], why: str) -> None:
        for handle in handles:
            self.history[handle] = f"{self.history.get(handle, '?')}, stale at call {self.calls} ({why})"

    def _call(self, fd: int, cmd: int, arg: int, allowed: set[int], what: str) -> int:
        err = ioctl(fd, cmd, arg)
        self.calls += 1
        if err not in allowed:
            raise FuzzFailure(
                f"call {self.calls}: {what} (cmd {cmd:#x}, arg {arg:#x}) got {errname(err)}, "
                f"want one of {sorted(errname(a) for a in allowed)}"
            )
        return err

    def _index(self) -> int:
        """A disk index: one that exists, a small one, or any u32."""
        pick = self.rng.random()
        if pick < 0.4:
            return self.rng.choice(list(self.disks))
        if pick < 0.8:
            return self.rng.randrange(0, 64)
        return self.rng.randrange(0, 1 << 32)

    def _exists(self, index: int) -> bool:
        return index in self.disks or index in self.others

    def _u32(self) -> int:
        return self.rng.choice((0, 1, 2, 3, 0x80000000, U32, self.rng.randrange(1 << 32)))

    def _count(self) -> int:
        if self.rng.random() < 0.3:
            return self.rng.choice(EDGE_COUNTS)
        return self.rng.randrange(0, 40)

    # -- one step ----------------------------------------------------------

    def run(self, calls: int) -> None:
        ops = (
            (self.random_command, 10),
            (self.version, 3),
            (self.info, 8),
            (self.create, 6),
            (self.destroy, 6),
            (self.set_info, 6),
            (self.attach, 6),
            (self.reset, 3),
            (self.get, 22),
            (self.put, 26),
            (self.loose_xfer, 4),
            (self.fresh_file, 1),
        )
        funcs = [f for f, _ in ops]
        weights = [w for _, w in ops]
        target = self.calls + calls
        while self.calls < target:
            if self.calls >= self.rotate_at:
                self._close(self.bound)
                self.bound = self._attached(self.busy)
                self.rotate_at = self.calls + self.rng.randrange(20, 400)
            self.rng.choices(funcs, weights)[0]()

    def sweep(self) -> None:
        """Every batch size from 0 past ABUSE_MAX_BATCH, arrays ending at a guard page.

        PUT n never-issued handles: all -ESTALE, none accepted.  The same
        array one entry short of its end: -EFAULT, with nothing answered
        (every status as it was).  GET n on the idle spare disk: 0
        descriptors.  Past the limit: -E2BIG.
        """
        spare = self._attached(self.spare)
        depth = self.busy.queue_depth
        never = ((0x80000000 | i) << 32 | i % (2 * depth) for i in range(MAX_BATCH))
        blob = b"".join(REPLY.pack(handle, 0, 4096, 0, UNTOUCHED, 0) for handle in never)
        want_all = [-errno.ESTALE] * MAX_BATCH
        requests_end = self.requests.guard
        xfer = self.args.base
        for n in sorted({*range(MAX_BATCH + 2), *EDGE_COUNTS}):
            big = n > MAX_BATCH
            k = min(n, MAX_BATCH)
            for short in (0, 1) if k else (0,):
                start = self.replies.guard - (k - short) * REPLY.size
                self.replies.write(start, blob[: (k - short) * REPLY.size])
                self.args.write(xfer, XFER.pack(start, 0, 0, 0, n, 0, 0, 0, NOWAIT, 0, 0, 0))
                want = errno.E2BIG if big else errno.EFAULT if short else 0
                self._call(self.bound.fd, PUT, xfer, {want}, f"sweep PUT {n} short {short}")
                if big:
                    continue
                want = want_all[:k] if not short else [UNTOUCHED] * (k - 1)
                self._check_statuses(start, want, f"sweep PUT {n} short {short}")
                if not short:
                    assert XFER.unpack(self.args.read(xfer, XFER.size))[7] == 0
            requests = requests_end - k * REQUEST.size
            arg = XFER.pack(0, requests, self.data.base, self.data.size, 0, n, 9, 9, NOWAIT, 0, 0, 0)
            self.args.write(xfer, arg)
            self._call(spare.fd, GET, xfer, {errno.E2BIG if big else 0}, f"sweep GET {n}")
            if not big:
                assert XFER.unpack(self.args.read(xfer, XFER.size))[6] == 0
        self._close(spare)

    def close(self) -> None:
        self._close(self.bound)
        self._close(self.loose)
        for arena in (self.args, self.replies, self.requests, self.data):
            arena.close()

    # -- the commands ------------------------------------------------------

    def random_command(self) -> None:
        rng = self.rng
        while True:
            pick = rng.random()
            if pick < 0.4:
                cmd = rng.randrange(1 << 32)
            elif pick < 0.7:  # our magic, any number, size and direction
                cmd = rng.randrange(4) << 30 | rng.randrange(1 << 14) << 16 | 0xE4 << 8 | rng.randrange(256)
            else:  # a real command with its size or direction changed
                real = rng.choice(sorted(DRIVER_COMMANDS))
                cmd = real ^ (1 << rng.choice((16, 17, 18, 19, 20, 21, 30, 31, 0, 1, 2, 3)))
            if cmd not in VFS_COMMANDS and cmd not in DRIVER_COMMANDS:
                break
        ptr = place(rng, self.args, rng.randbytes(rng.choice((0, 8, 72, 200))))
        f = rng.choice((self.loose, self.bound))
        self._call(f.fd, cmd, ptr.address, {errno.ENOTTY}, "unknown command")

    def version(self) -> None:
        ptr = place(self.rng, self.args, self.rng.randbytes(VERSION.size))
        want = 0 if ptr.writable else errno.EFAULT
        err = self._call(self.loose.fd, VERSION_CMD, ptr.address, {want}, "VERSION")
        if not err:
            got = VERSION.unpack(self.args.read(ptr.address, VERSION.size))
            assert got == (uapi.ABUSE_VERSION, MAX_BATCH, uapi.ABUSE_F_ALL, uapi.ABUSE_XFER_ALL, 0), got

    def info(self) -> None:
        rng = self.rng
        index = self._index()
        arg = struct.pack("<I", index) + rng.randbytes(INFO_SIZE - 4)
        ptr = place(rng, self.args, arg)
        if not ptr.readable:
            want = errno.EFAULT
        elif not self._exists(index):
            want = errno.ENODEV
        else:
            want = 0 if ptr.writable else errno.EFAULT
        if self._call(self.loose.fd, INFO, ptr.address, {want}, f"INFO {index}") or index not in self.disks:
            return
        got = self.args.read(ptr.address, INFO_SIZE)
        disk = self.disks[index]
        assert got[: CONFIG.size] == disk.config, f"INFO {index} config changed"
        counters = COUNTERS.unpack_from(got, CONFIG.size)
        assert counters[-1] == 0, "INFO reserved counter not 0"
        if disk is self.spare:
            assert counters[0] == counters[2] == 0, f"spare disk has I/O: {counters}"

    def _config(self) -> tuple[bytes, tuple[int, ...]]:
        """CREATE/SET_INFO bytes: random, or a valid config with one field broken."""
        rng = self.rng
        if rng.random() < 0.5:
            raw = rng.randbytes(CONFIG.size)
            return raw, CONFIG.unpack(raw)
        base = self.busy if rng.random() < 0.5 else self.spare
        fields = list(CONFIG.unpack(base.config))
        for _ in range(rng.choice((0, 1, 1, 1, 2))):
            which = rng.randrange(12)
            value = rng.choice(
                (0, 1, 511, 512, 1024, 4096, 8192, 1 << 20, 8 << 20, (8 << 20) + 4096, 1 << 40, U32, U64)
            )
            if which in (0, 1, 4, 5, 6, 7):
                value &= U32
            fields[which] = value
        return CONFIG.pack(*fields), tuple(fields)

    @staticmethod
    def _config_error(fields: tuple[int, ...]) -> int:
        """abuse_check_config(): 0 or the errno CREATE must give."""
        index, bs, size, flags, depth, max_bytes, timeout, retries, *reserved = fields
        if any(reserved) or flags & ~uapi.ABUSE_F_ALL:
            return errno.EINVAL
        if flags & uapi.ABUSE_F_INDEX and index > uapi.ABUSE_MAX_INDEX:
            return errno.EINVAL
        if not 512 <= bs <= 4096 or bs & (bs - 1):
            return errno.EINVAL
        if not size or size % bs or (size >> 9) > ((1 << 63) - 1) >> 9:
            return errno.EINVAL
        depth = depth or uapi.ABUSE_DEFAULT_QUEUE_DEPTH
        max_bytes = max_bytes or uapi.ABUSE_DEFAULT_REQUEST_BYTES
        if depth > uapi.ABUSE_MAX_QUEUE_DEPTH:
            return errno.EINVAL
        if not PAGE <= max_bytes <= uapi.ABUSE_MAX_REQUEST_BYTES or max_bytes % bs:
            return errno.EINVAL
        if timeout > 24 * 3600 * 1000 or retries > 1000:
            return errno.EINVAL
        return 0

    def create(self) -> None:
        rng = self.rng
        raw, fields = self._config()
        want = self._config_error(fields)
        if not want and rng.random() < 0.9:
            # A valid CREATE makes a disk: keep that rare, it is slow.
            raw = raw[: CONFIG.size - 8] + struct.pack("<Q", 1 + rng.randrange(U64))
            want = errno.EINVAL
        before = self.control.list()
        if not want and fields[3] & uapi.ABUSE_F_INDEX and fields[0] in before:
            want = errno.EEXIST
        ptr = place(rng, self.args, raw)
        if not ptr.readable or (not want and not ptr.writable):
            want = errno.EFAULT
        self._call(self.loose.fd, CREATE, ptr.address, {want}, f"CREATE {fields}")
        if want == errno.EFAULT and not self._config_error(fields) and ptr.readable:
            assert self.control.list() == before, "CREATE that could not report its index left a disk"
        if want == 0:
            index = CONFIG.unpack(self.args.read(ptr.address, CONFIG.size))[0]
            assert index not in before
            self.control.destroy(index)
            self.created += 1

    def _target(self, index: int, flags: int) -> bytes:
        reserved = (0, 0) if self.rng.random() < 0.7 else (self.rng.randrange(U64 + 1), self.rng.randrange(2))
        return TARGET.pack(index, flags, *reserved)

    def destroy(self) -> None:
        rng = self.rng
        index = self._index()
        flags = rng.choice((0, 1, 2, 3, self._u32()))
        raw = self._target(index, flags)
        valid_fields = not flags & ~1 and raw[8:] == bytes(16)
        if self._exists(index) and valid_fields:
            raw = raw[:8] + struct.pack("<QQ", 0, 1 + rng.randrange(U64))  # never destroy a live disk
            valid_fields = False
        ptr = place(rng, self.args, raw)
        if not ptr.readable:
            want = errno.EFAULT
        elif not valid_fields:
            want = errno.EINVAL
        else:
            want = errno.ENODEV
        self._call(self.loose.fd, DESTROY, ptr.address, {want}, f"DESTROY {index}")

    def set_info(self) -> None:
        rng = self.rng
        raw, fields = self._config()
        index = fields[0] if rng.random() < 0.5 else self._index()
        raw = struct.pack("<I", index) + raw[4:]
        if index in self.others:
            raw = raw[:-8] + struct.pack("<Q", 1)  # not ours: refused, never changed
        disk = self.disks.get(index)
        want = self._set_info_error(index, raw)
        if disk and not want:
            raw = disk.config  # only ever a no-op on our disks
        ptr = place(rng, self.args, raw)
        if not ptr.readable:
            want = errno.EFAULT
        self._call(self.loose.fd, SET_INFO, ptr.address, {want}, f"SET_INFO {CONFIG.unpack(raw)}")

    def _set_info_error(self, index: int, raw: bytes) -> int:
        fields = CONFIG.unpack(raw)
        if any(fields[8:]):
            return errno.EINVAL
        if not self._exists(index):
            return errno.ENODEV
        disk = self.disks[index]
        cur = CONFIG.unpack(disk.config)
        ro = uapi.ABUSE_F_READ_ONLY
        _, bs, size, flags, depth, max_bytes, timeout, retries = fields[:8]
        if (
            bs != cur[1]
            or flags & ~ro != cur[3] & ~ro
            or (depth, max_bytes, timeout, retries) != cur[4:8]
            or not size
            or size % cur[1]
            or (size >> 9) > ((1 << 63) - 1) >> 9
        ):
            return errno.EINVAL
        return 0

    def attach(self) -> None:
        rng = self.rng
        f = rng.choice((self.loose, self.bound))
        index = self._index()
        raw = self._target(index, rng.choice((0, 0, 1, self._u32())))
        valid_fields = raw[4:] == bytes(20)
        if f is self.loose and valid_fields and self._exists(index):
            raw = raw[:4] + struct.pack("<I", 1) + raw[8:]  # the loose file stays loose
            valid_fields = False
        ptr = place(rng, self.args, raw)
        if not ptr.readable:
            want = errno.EFAULT
        elif not valid_fields:
            want = errno.EINVAL
        elif not self._exists(index):
            want = errno.ENODEV
        else:
            want = errno.EBUSY
        self._call(f.fd, ATTACH, ptr.address, {want}, f"ATTACH {index}")

    def reset(self) -> None:
        rng = self.rng
        index = self._index()
        flags = rng.choice((0, 0, 1, 2, self._u32()))
        if index == self.busy.index and flags == uapi.ABUSE_RESET_FAIL:
            flags = 0  # failing live I/O would be our doing, not a loss
        raw = self._target(index, flags)
        if index in self.others and raw[4:] == bytes(20):
            raw = raw[:4] + struct.pack("<I", 2) + raw[8:]
        flags = struct.unpack_from("<I", raw, 4)[0]  # what the driver reads
        ptr = place(rng, self.args, raw)
        if not ptr.readable:
            want = errno.EFAULT
        elif flags & ~1 or raw[8:] != bytes(16):
            want = errno.EINVAL
        elif not self._exists(index):
            want = errno.ENODEV
        else:
            want = 0
        err = self._call(self.loose.fd, RESET, ptr.address, {want}, f"RESET {index} flags {flags:#x}")
        if not err and index == self.busy.index:
            # Everything in flight went back, ours included.
            self.resets += 1
            self._note_stale(self.bound.held, "RESET")
            self.stale.extend(self.bound.held)
            self.bound.held.clear()

    def loose_xfer(self) -> None:
        rng = self.rng
        cmd = rng.choice((GET, PUT))
        ptr = place(rng, self.args, rng.randbytes(XFER.size))
        want = errno.EBADFD if ptr.readable and ptr.writable else errno.EFAULT
        self._call(self.loose.fd, cmd, ptr.address, {want}, "GET/PUT on an unattached file")

    def fresh_file(self) -> None:
        """Open, ATTACH (often for real), a few GET/PUT, close: requeues."""
        rng = self.rng
        disk = rng.choice((self.busy, self.spare))
        f = self.fresh = self._attached(disk)
        for _ in range(rng.randrange(1, 8)):
            self._xfer(f, rng.choice((GET, PUT)))
        self.fresh = None
        self._close(f)

    def get(self) -> None:
        self._xfer(self.bound, GET)

    def put(self) -> None:
        self._xfer(self.bound, PUT)

    # -- GET and PUT -------------------------------------------------------

    def _buffer(self) -> tuple[int, int, bool]:
        """The GET data buffer: address, size, and whether all of it is ours."""
        rng = self.rng
        arena = self.data
        pick = rng.random()
        if pick < 0.5:
            size = rng.choice((PAGE, 2 * PAGE, 16 * PAGE, 64 * PAGE, 256 * PAGE, arena.size))
            start = arena.base + rng.randrange(0, arena.size - size + 1) // PAGE * PAGE
            if rng.random() < 0.2:
                start += rng.randrange(1, PAGE)  # unaligned, and may run past the end
                return start, size, start + size <= arena.guard
            return start, size, True
        if pick < 0.7:
            size = rng.choice((0, 1, PAGE - 1, rng.randrange(1 << 20)))
            return arena.guard - size, size, True
        size = rng.choice((0, PAGE, 1 << 20, arena.size + PAGE, 1 << 40, U64, rng.randrange(U64 + 1)))
        ptr = pointer(rng, arena, max(1, min(size, arena.size)))
        if ptr.kind in ("null", "low"):
            # Below mmap_min_addr nothing is ever mapped; past it, a
            # payload could land in the process's own memory.
            size = min(size, LOW_LIMIT - ptr.address)
        if ptr.kind in ("aligned", "odd", "at_guard"):
            return ptr.address, size, ptr.address + size <= arena.guard
        return ptr.address, size, size == 0

    def _entries(self, f: File, n: int) -> tuple[bytes, list[int], list[str]]:
        """``n`` PUT entries that cannot complete anything, their statuses, and what each names.

        Up to 4 are drawn (drawing is the slow part under TCG); a longer
        batch repeats them, which is no different to the driver: none of
        them is ever accepted.
        """
        out = []
        want = []
        about = []
        for _ in range(min(n, 4)):
            entry, status, names = self._entry(f)
            out.append(entry)
            want.append(-status)
            about.append(names)
        reps = -(-n // len(out))
        return (b"".join(out) * reps)[: n * REPLY.size], (want * reps)[:n], (about * reps)[:n]

    def _entry(self, f: File) -> tuple[bytes, int, str]:
        rng = self.rng
        assert f.disk is not None
        bits = rng.getrandbits
        reserved = 0 if rng.random() < 0.85 else bits(32) | 1
        result = (0, 0, 0, -errno.EIO, -1 - bits(12))[bits(16) % 5]
        if rng.random() < 0.08:
            result = (1, bits(31) | 1, -MAX_ERRNO - 1, -(1 << 31))[bits(2)]
        length = (0, 512, 4096, bits(32))[bits(2)]
        data = (0, self.data.base, bits(64))[bits(16) % 3]
        pick = rng.random()
        if pick < 0.35 and f.held:
            handle, (op, real_length) = rng.choice(list(f.held.items()))
            names = f"held by file {f.fd}"
            if op == uapi.ABUSE_OP_READ and rng.random() < 0.5:
                # Right length, no error: only the unreadable data stops it.
                length, result = real_length, 0
                data = rng.choice(
                    (0, self.data.guard + rng.randrange(PAGE), 0xFFFF888000000000, 1 << 63,
                     self.data.guard - rng.randrange(1, min(real_length, PAGE)))
                )  # fmt: skip
                status = errno.EFAULT
            else:
                if length == real_length:
                    length += rng.choice((1, 512, 4096))
                status = errno.EINVAL
        elif pick < 0.45 and (theirs := self._held_by_others(f)):
            # Only the file that took a request answers it.
            handle = rng.choice(theirs)
            names = f"held by another file than {f.fd}"
            status = errno.ESTALE
        elif pick < 0.55 and self.stale:
            handle = rng.choice(self.stale)
            names = "stale"
            status = errno.ESTALE
        else:
            depth = f.disk.queue_depth
            tag = rng.randrange(0, depth * 2) if rng.random() < 0.7 else bits(32)
            gen = bits(32)
            if tag < depth:
                gen |= 1 << 31  # never handed out in a test this short
            handle = gen << 32 | tag
            names = "never handed out"
            status = errno.ESTALE
        if reserved or result > 0 or result < -MAX_ERRNO:
            status = errno.EINVAL  # checked before the handle
        names = f"{handle:#x}: {names}; {self.history.get(handle, 'no history')}"
        return REPLY.pack(handle, data & U64, length & U32, result, 0x5A5A5A5A, reserved), status, names

    def _xfer(self, f: File, cmd: int) -> None:
        rng = self.rng
        put = cmd == PUT
        assert f.disk is not None
        nr_replies = self._count() if put or rng.random() < 0.05 else 0
        max_requests = self._count()
        pick = rng.random()
        flags = NOWAIT if pick < 0.8 else NOWAIT | MAPPED if pick < 0.9 else self._u32() | NOWAIT
        mapped = flags == NOWAIT | MAPPED
        pad = 0 if rng.random() < 0.95 else self._u32() or 1
        reserved = (0, 0) if rng.random() < 0.95 else (rng.randrange(U64 + 1), 1)

        # The replies array.
        entries_want: list[int] = []
        entries_about: list[str] = []
        replies_ok = True
        replies_addr = 0
        if nr_replies and nr_replies <= MAX_BATCH:
            blob, entries_want, entries_about = self._entries(f, nr_replies)
            rptr = place(rng, self.replies, blob)
            replies_addr, replies_ok = rptr.address, rptr.readable and rptr.writable
        elif nr_replies:
            replies_addr = pointer(rng, self.replies, REPLY.size).address
        # The requests array and the data buffer.
        want_requests = min(max_requests, MAX_BATCH)
        qptr = pointer(rng, self.requests, max(1, want_requests) * REQUEST.size)
        buf, buf_size, buf_ok = self._buffer()

        raw = XFER.pack(
            replies_addr, qptr.address, buf, buf_size, nr_replies, max_requests,
            rng.randrange(1 << 32), rng.randrange(1 << 32), flags, pad, *reserved,
        )  # fmt: skip
        aptr = place(rng, self.args, raw)

        # What the driver must answer.
        exact: int | None = None
        allowed: set[int] = set()
        answered = False  # the PUT half ran over every entry
        if not aptr.readable or not aptr.writable:
            exact = errno.EFAULT  # checked first: nothing answered, nothing taken
        elif flags & ~(NOWAIT | MAPPED) or pad or any(reserved) or (not put and nr_replies):
            exact = errno.EINVAL
        elif max_requests and buf + buf_size >= 1 << 64:  # its end does not fit in 64 bits
            exact = errno.EINVAL
        elif max_requests and mapped and buf_size < f.disk.size:  # the disk must fit
            exact = errno.EINVAL
        elif nr_replies > MAX_BATCH or max_requests > MAX_BATCH:
            exact = errno.E2BIG
        elif put and nr_replies and not replies_ok:
            exact = errno.EFAULT
        elif not max_requests:
            exact = 0
        else:
            allowed = {0}
            answered = put
            if not (qptr.writable and buf_ok):
                allowed.add(errno.EFAULT)
            if not put:
                allowed.add(errno.ENOBUFS)
        if exact == 0:
            answered = put
        if exact is not None:
            allowed = {exact}
        what = f"{'PUT' if put else 'GET'} replies={nr_replies} requests={max_requests}"
        what += f" buffer={buf:#x}+{buf_size:#x}"
        err = self._call(f.fd, cmd, aptr.address, allowed, what)

        if answered and nr_replies:
            self._check_statuses(replies_addr, entries_want, what, entries_about, f)
        if err:
            return
        out = XFER.unpack(self.args.read(aptr.address, XFER.size))
        nr_requests, nr_accepted = out[6], out[7]
        if put:
            assert nr_accepted == 0, f"{what}: the fuzzer completed {nr_accepted} real requests"
        assert nr_requests <= max_requests, f"{what}: {nr_requests} descriptors"
        if nr_requests:
            self._took(f, qptr.address, nr_requests, buf, buf_size, mapped, what)

    def _check_statuses(
        self,
        address: int,
        want: list[int],
        what: str,
        about: list[str] | None = None,
        f: File | None = None,
    ) -> None:
        blob = self.replies.read(address, len(want) * REPLY.size)
        got = list(memoryview(blob).cast("i")[6::8])
        if got != want:
            bad = [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w][:5]
            named = "".join(f"\n  entry {i}: {about[i]}" for i, _, _ in bad) if about else ""
            if f is not None and f.disk is not None:
                # What the driver says now of those tags and of this file.
                handles = memoryview(blob).cast("Q")[:: REPLY.size // 8]
                tags = {handles[i] & U32 for i, _, _ in bad}
                named += f"\n  driver: {describe_tags(f'abuse{f.disk.index}', tags)}"
                named += f"\n  file {f.fd}: {describe_file(f.fd)}"
            raise FuzzFailure(f"call {self.calls}: {what}: entry statuses (index, got, want) {bad}{named}")

    def _took(
        self, f: File, address: int, count: int, buf: int, buf_size: int, mapped: bool, what: str
    ) -> None:
        """Check the descriptors a GET filled and hold them."""
        assert f.disk is not None
        self.got += count
        blob = self.requests.read(address, count * REQUEST.size)
        for handle, offset, data, length, op, flags in REQUEST.iter_unpack(blob):
            ok = (
                (handle & U32) < f.disk.queue_depth
                and op in (uapi.ABUSE_OP_READ, uapi.ABUSE_OP_WRITE)
                and flags & ~uapi.ABUSE_REQ_FUA == 0
                and 0 < length
                and offset + length <= f.disk.size
                and offset % f.disk.block_size == 0
                and (data - buf == offset if mapped else (data - buf) % uapi.ABUSE_DATA_ALIGN == 0)
                and buf <= data
                and data + length <= buf + buf_size
            )
            assert ok, f"{what}: bad descriptor {(handle, offset, data, length, op, flags)}"
            assert handle not in f.held, f"{what}: handle {handle:#x} handed out twice"
            f.held[handle] = (op, length)
            self.history[handle] = f"taken at call {self.calls} by file {f.fd} ({what})"
