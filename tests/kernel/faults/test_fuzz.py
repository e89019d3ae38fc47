"""Hostile ioctls under load (issue #4, item 2).

The seed printed in the header reproduces every random choice here;
thread and process interleavings (fio, the worker pool, the racing
threads) are the kernel's and are not replayed.
"""

from __future__ import annotations

import errno
import os
import random
import select
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import astuple
from functools import partial

import pytest

from abuse import uapi
from abuse.control import Control, DiskConfig
from tests.kernel.blockio import Background, direct_read, direct_write, pattern
from tests.kernel.conftest import Disks, MiB, wait_for
from tests.kernel.faults import tally
from tests.kernel.faults.fuzzer import CONFIG, CREATE, Disk, Fuzzer
from tests.kernel.faults.hostile import Arena, ioctl
from tests.kernel.faults.load import FioLoad, ForkedWorker, block_stat_ios
from tests.kernel.raw import RawWorker, Request
from tests.kernel.serving import fio

ffi = uapi.ffi
# The issue asks for at least 100,000 per run; more on a host that loads modules.
FUZZ_CALLS = int(os.environ.get("ABUSE_FUZZ_CALLS") or 100_000)


def _disk(control: Control, index: int, busy: bool) -> Disk:
    c = control.info(index).config
    packed = CONFIG.pack(*astuple(c), 0, 0, 0, 0)  # same field order as the struct
    return Disk(c.index, c.size, c.block_size, c.queue_depth, packed, busy)


def _verify(dev: str, size: str = "32M") -> None:
    proc = fio(dev, "--rw=randwrite", "--bsrange=4k-128k", f"--size={size}", "--iodepth=8")
    if proc.returncode != 0:
        tally.add("verify errors")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fuzz_ioctls_under_load(rng: random.Random) -> None:
    """100,000 checked hostile ioctls while fio verifies I/O on the same disk."""
    with Control() as control:
        config = control.create(64 * MiB, queue_depth=32)  # no timeout: nothing fails by itself
        spare = control.create(16 * MiB, queue_depth=8)
        worker = ForkedWorker(config.index, config.size)
        fuzzer = None
        load: FioLoad | None = None
        try:
            busy = _disk(control, config.index, busy=True)
            idle = _disk(control, spare.index, busy=False)
            load = FioLoad(config.path, config.size, random.Random(rng.random()))
            fuzzer = Fuzzer(random.Random(rng.random()), busy, idle, control)
            fuzzer.sweep()
            while fuzzer.calls < FUZZ_CALLS:
                # Now and then the worker stalls, so that requests wait in
                # the queue for the fuzzer to take, hold and give back.
                stalled = rng.random() < 0.3
                worker.pause(stalled)
                fuzzer.run(500)
                worker.pause(False)
                load.tick()
                assert not load.failures, load.failures[0]
                assert worker.alive(), "the real worker died"
                _progress(f"{fuzzer.calls} calls, {fuzzer.got} taken, {load.jobs} fio jobs\n")
            fuzzer.close()
            load.finish()
            assert not load.failures, load.failures[0]
            print(
                f"fuzz: {fuzzer.calls} calls, {fuzzer.got} requests taken and requeued, "
                f"{fuzzer.resets} resets, {fuzzer.created} disks created, {load.jobs} fio jobs verified"
            )
            assert load.jobs >= 2, "the fuzzer ran without I/O alongside"

            # Everything the fuzzer held went back and was served.
            wait_for(lambda: _idle(control, config.index), 120)
            _verify(config.path)
            wait_for(lambda: _idle(control, config.index), 120)
            counters = control.info(config.index).counters
            lost = counters["queued"] + counters["in_flight"]
            tally.add("requests lost", lost)
            assert lost == 0
            assert counters["errors"] == 0, counters
            assert counters["completed"] == block_stat_ios(config.name), counters
            assert counters["attached"] == 1, counters  # the worker's file only
            spare_counters = control.info(spare.index).counters
            assert spare_counters["completed"] == spare_counters["queued"] == 0
            assert worker.stop() == 0, "the real worker failed"
        except BaseException:
            # Written before the clean-up below, which could itself hang.
            _progress(traceback.format_exc())
            raise
        finally:
            if fuzzer is not None:
                tally.add("fuzz calls", fuzzer.calls)
                tally.add("resets", fuzzer.resets)
            # Fail whatever is still queued first: fio cannot exit while
            # its I/O waits for a worker that is stopped or gone.
            for index in (config.index, spare.index):
                control.destroy(index, force=True)
            if load is not None:
                load.kill()
            if worker.alive():
                worker.stop()

        # And a disk made afterwards works as any other.
        fresh = control.create(64 * MiB)
        worker = ForkedWorker(fresh.index, fresh.size)
        try:
            _verify(fresh.path)
            assert worker.stop() == 0
        finally:
            if worker.alive():
                worker.stop()
            control.destroy(fresh.index, force=True)


def _progress(line: str) -> None:
    """Where a long run stands, for whoever watches the output folder."""
    out = os.environ.get("ABUSE_OUT")
    if out:
        with open(os.path.join(out, "fuzz-progress"), "a") as f:
            f.write(line)


def _idle(control: Control, index: int) -> bool:
    counters = control.info(index).counters
    return counters["queued"] == counters["in_flight"] == 0


class _Racer:
    """One thread's PUT of one reply, with its own structs and data."""

    def __init__(self, worker: RawWorker, payload: bytes) -> None:
        self.fd = worker.control.fileno()
        self.data = ffi.new("char[]", payload)
        self.reply = ffi.new("struct abuse_reply *")
        self.xfer = ffi.new("struct abuse_xfer *")
        self.xfer.replies = int(ffi.cast("uintptr_t", self.reply))
        self.xfer.nr_replies = 1
        self.xfer.flags = uapi.ABUSE_XFER_NOWAIT
        self.status: int | None = None

    def aim(self, handle: int, length: int) -> None:
        self.reply.handle = handle
        self.reply.length = length
        self.reply.data = int(ffi.cast("uintptr_t", self.data))
        self.reply.status = 12345

    def fire(self, barrier: threading.Barrier) -> None:
        barrier.wait()
        assert uapi.lib.ioctl(self.fd, uapi.ABUSE_IOC_PUT, self.xfer) == 0, ffi.errno
        self.status = int(self.reply.status)


def _take_one(worker: RawWorker) -> Request:
    deadline = time.monotonic() + 30
    while True:
        got = worker.get()
        if got:
            assert len(got) == 1, got
            return got[0]
        assert time.monotonic() < deadline, "the request never reached the queue"
        time.sleep(0.005)


def test_two_threads_put_one_handle_exactly_one_wins(disks: Disks, rng: random.Random) -> None:
    config = disks.create(16 * MiB, queue_depth=8)
    workers = [RawWorker(config.index, batch=4), RawWorker(config.index, batch=4)]
    rounds = 100
    calls = 0
    try:
        for r in range(rounds):
            length = rng.choice((4096, 16384))
            # Within the disk: an I/O past its end comes back short.
            offset = rng.randrange(0, (config.size - length) // 4096 + 1) * 4096
            payloads = [pattern(rng.randrange(1 << 30), length) for _ in range(2)]
            reading = rng.random() < 0.5
            io: Background
            if reading:
                io = Background(partial(direct_read, config.path, offset, length))
            else:
                io = Background(partial(direct_write, config.path, offset, payloads[0]))
            holder, other = rng.sample(workers, 2)
            request = _take_one(holder)
            calls += 1
            # Two threads PUT the handle at once: both on the holder's file
            # (one wins), or one of them on another file (refused, however
            # the two interleave: only the file that took a request answers).
            pair = rng.choice(((holder, holder), (holder, other), (other, holder)))
            racers = [_Racer(worker, payloads[k]) for k, worker in enumerate(pair)]
            for racer in racers:
                racer.aim(request.handle, request.length)
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=racer.fire, args=(barrier,)) for racer in racers]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
                assert not t.is_alive(), "PUT hung"
            calls += 2
            statuses = [racer.status for racer in racers]
            assert sorted(statuses) == [-errno.ESTALE, 0], f"round {r}: {statuses}"  # type: ignore[type-var]
            winner = statuses.index(0)
            assert pair[winner] is holder, f"round {r}: another file's answer won"
            io.join(30)
            assert io.error is None, io.error
            if reading:
                assert io.result == payloads[winner], f"round {r}: read data is not the winner's"
        counters = disks.control.info(config.index).counters
        assert counters["completed"] == rounds, counters
        assert counters["rejected"] == rounds, counters
        assert counters["errors"] == counters["queued"] == counters["in_flight"] == 0, counters
    finally:
        for w in workers:
            w.close()
        tally.add("fuzz calls", calls)


def _blocking_get(worker: RawWorker, out: list[int]) -> Callable[[], None]:
    def run() -> None:
        while True:
            try:
                worker.get(wait=True)  # a request (held), or blocks
            except OSError as err:
                out.append(err.errno or 0)
                return

    return run


def test_get_on_a_disk_being_destroyed_returns_enodev(rng: random.Random) -> None:
    rounds = 60
    calls = 0
    eio = 0
    with Control() as control:
        for r in range(rounds):
            config: DiskConfig = control.create(16 * MiB, queue_depth=8)
            workers = [RawWorker(config.index, batch=4) for _ in range(rng.randint(1, 3))]
            errs: list[int] = []
            getters = [threading.Thread(target=_blocking_get(w, errs), daemon=True) for w in workers]
            for t in getters:
                t.start()
            writer = None
            if rng.random() < 0.5:
                data = pattern(r, 8192)
                writer = Background(partial(direct_write, config.path, 0, data))
            time.sleep(rng.uniform(0, 0.1))
            control.destroy(config.index, force=True)
            calls += 1 + len(workers)
            for t in getters:
                t.join(30)
                assert not t.is_alive(), f"round {r}: GET still blocked after DESTROY"
            assert errs == [errno.ENODEV] * len(workers), f"round {r}: {errs}"
            if writer is not None:
                writer.join(30)
                if writer.error is not None:
                    assert isinstance(writer.error, OSError), writer.error
                    # EIO if the driver held it; ENOSPC if it was submitted after the
                    # destroy set the capacity to 0 (as in test_destroy); ENXIO or
                    # ENOENT if it opened the disk too late.
                    allowed = (errno.EIO, errno.ENOSPC, errno.ENXIO, errno.ENOENT)
                    assert writer.error.errno in allowed, writer.error
                    eio += 1
            for w in workers:
                fd = w.control.fileno()
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                assert poller.poll(0) == [(fd, select.POLLHUP)]
                for call in (w.get, lambda w=w: w.put([{"handle": 1, "length": 4096}])):
                    with pytest.raises(OSError) as failed:
                        call()
                    assert failed.value.errno == errno.ENODEV
                calls += 2
                w.close()
            info = ffi.new("struct abuse_info *", {"config": {"index": config.index}})
            address = int(ffi.cast("uintptr_t", info))
            assert ioctl(control.fileno(), uapi.ABUSE_IOC_INFO, address) == errno.ENODEV
            assert config.index not in control.list()
    print(f"destroy: {rounds} disks destroyed under blocked GETs, {eio} writes failed by the destroy")
    tally.add("fuzz calls", calls)


def test_create_that_cannot_report_its_index_leaves_no_disk() -> None:
    """CREATE with its argument in a read-only page: EFAULT and nothing made."""
    arena = Arena(1)
    with Control() as control:
        before = control.list()
        address = arena.fill_readonly(CONFIG.pack(0, 4096, 16 * MiB, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        for _ in range(5):
            assert ioctl(control.fileno(), CREATE, address) == errno.EFAULT
        assert control.list() == before
    arena.close()
    tally.add("fuzz calls", 5)
