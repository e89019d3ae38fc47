"""Run every benchmark target in turn, inside one guest boot.

Each target is a block device set up, measured with the same fio jobs
and torn down before the next one starts, so only one of them holds
memory or CPU at a time; but the worker-scaling disks are up side by
side, each job run on each of them in turn (_measure_side_by_side).
Raw results (fio's own JSON plus the CPU time of the server processes)
go to OUT/raw.json; ``bench.report`` turns them into tables and charts
on the host.

    python -m bench.guest --out DIR [--runtime S] [--size BYTES] [--only NAMES]
                          [--groups scaling,batching,slow,ceph]

Besides the main targets, three groups of runs: ``scaling`` (memory
disks with 1, 2 and 4 workers, and loop, by queue depth and on the
worker-scaling jobs), ``batching`` (one worker, by requests per GET) and
``slow`` (a backend that sleeps 5 ms per request, bench/slow_backend.py,
with 1, 4 and 16 workers at QD32, then as many bare processes that only
sleep 5 ms, bench/sleep_ceiling.py, in SLOW_ROUNDS rounds).  ``ceph``,
only when asked for (its cluster takes minutes to start under TCG): one
single-node cluster (scripts/ceph-cluster), one 256 MiB image per
target, written once, then
abuse ``rbd:`` with 1 and 4 workers (and 4 at queue_depth=1, one librbd
call at a time per worker), rbd-nbd and krbd on the same jobs,
reported as ratios to krbd.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from abuse.control import Control
from bench.jobs import (
    BATCH_JOBS,
    BATCH_SIZES,
    CEPH_JOBS,
    JOBS,
    SCALE_JOBS,
    SCALE_WORKERS,
    SLOW_DELAY_S,
    SLOW_JOB,
    SLOW_ROUNDS,
    SLOW_WORKERS,
    Job,
)
from bench.sleep_ceiling import sleeps_per_second
from bench.speed import SPEED_RUNS, median_loop_seconds

ROOT = Path(__file__).resolve().parents[1]
TMPFS = Path("/tmp/bench-tmpfs")
PYTHON = sys.executable
SLOW_BACKEND = f"python:{ROOT / 'bench' / 'slow_backend.py'}:SlowBackend"
GROUPS = ("scaling", "batching", "slow", "ceph")
DEFAULT_GROUPS = ("scaling", "batching", "slow")
CEPH_DIR = Path("/tmp/bench-ceph")
CEPH_SIZE = 256 << 20
# The scaling group's devices are up side by side (three memory disks,
# each written whole, in a 4 GiB guest): at most this big each.
SCALE_SIZE = 512 << 20


@dataclass
class Device:
    """A block device under test and the user-space processes serving it."""

    path: str
    servers: list[psutil.Process]

    def server_cpu(self) -> float:
        """CPU seconds used so far by the servers and their children."""
        total = 0.0
        for proc in self.servers:
            with contextlib.suppress(psutil.NoSuchProcess):
                for p in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        times = p.cpu_times()
                        total += times.user + times.system
        return total


def run(cmd: list[str], **kwargs: Any) -> str:
    """Run ``cmd``; return its stdout; raise with its stderr on failure."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {done.stderr.strip()}")
    return str(done.stdout)


def wait_for(what: str, ready: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def served_abuse_disk(size: int, server: list[str], workers: int) -> Iterator[Device]:
    """A fresh abuse disk (no request timeout) served by ``server DEV``."""
    with Control() as control:
        config = control.create(size, timeout_ms=0)
        attached = Path(f"/sys/block/{config.name}/abuse/attached")
        proc = subprocess.Popen([*server, config.path], cwd=ROOT, stdout=subprocess.DEVNULL)

        def ready() -> bool:
            if proc.poll() is not None:  # refused its arguments or crashed: say so now
                raise RuntimeError(f"{' '.join(server)} exited with status {proc.returncode}")
            return int(attached.read_text()) == workers

        try:
            wait_for(f"{workers} workers on {config.path}", ready, timeout=60.0 + 10.0 * workers)
            yield Device(config.path, [psutil.Process(proc.pid)])
        finally:
            proc.terminate()
            proc.wait(timeout=120)
            control.destroy(config.index, force=True)


def abuse_disk(size: int, backend: str, workers: int, batch: int) -> Any:
    """An abuse disk served by ``workers`` processes of ``abusectl serve``."""
    serve = [PYTHON, "-m", "abusectl", "serve", "--backend", backend]
    serve += ["--workers", str(workers), "--batch", str(batch)]
    return served_abuse_disk(size, serve, workers)


@contextlib.contextmanager
def file_disk(size: int, image: Path, mapped: bool, workers: int, batch: int) -> Iterator[Device]:
    """An abuse disk over ``image`` (a tmpfs file), served in place or by copy."""
    spec = f"file:{image}" + ("" if mapped else "?mapped=0")
    try:
        with abuse_disk(size, spec, workers, batch) as device:
            yield device
    finally:
        image.unlink(missing_ok=True)


def profiled_disk(size: int, out: Path) -> Any:
    """An abuse disk served by one worker under cProfile (bench.profile_worker)."""
    return served_abuse_disk(size, [PYTHON, "-m", "bench.profile_worker", str(out)], 1)


@contextlib.contextmanager
def loop_disk(size: int) -> Iterator[Device]:
    """The in-kernel limit: loop over a tmpfs file (tmpfs has no O_DIRECT)."""
    image = TMPFS / "loop.img"
    run(["truncate", "-s", str(size), str(image)])
    path = run(["losetup", "--find", "--show", "--direct-io=off", str(image)]).strip()
    try:
        yield Device(path, [])
    finally:
        run(["losetup", "--detach", path])
        image.unlink()


@contextlib.contextmanager
def nbd_disk(plugin: list[str]) -> Iterator[Device]:
    """nbd-client on /dev/nbd0, connected to nbdkit over a Unix socket."""
    sock = TMPFS / "nbdkit.sock"
    server = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(sock), *plugin])
    path = "/dev/nbd0"
    try:
        wait_for("nbdkit's socket", sock.exists)
        run(["nbd-client", "-unix", str(sock), path, "-block-size", "4096"])
        try:
            size = Path("/sys/block/nbd0/size")
            wait_for(f"{path} to have a size", lambda: size.read_text().strip() != "0")
            yield Device(path, [psutil.Process(server.pid)])
        finally:
            run(["nbd-client", "-d", path])
    finally:
        server.terminate()
        server.wait(timeout=60)
        sock.unlink(missing_ok=True)


def fio(device: Device, job: Job, runtime: int) -> dict[str, Any]:
    """Run ``job`` on ``device``; fio's JSON, plus what the CPUs did."""
    cmd = [
        "fio",
        "--name=" + job.name,
        "--filename=" + device.path,
        "--ioengine=io_uring",
        "--direct=1",
        "--time_based",
        f"--runtime={runtime}",
        f"--rw={job.rw}",
        f"--bs={job.block_size}",
        f"--iodepth={job.queue_depth}",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]
    server_before = device.server_cpu()
    busy_before = _busy_cpu()
    dispatch_before = dispatch_counters(device.path)
    out = run(cmd)
    measured = {
        "fio": json.loads(out[out.index("{") :]),
        "server_cpu_s": device.server_cpu() - server_before if device.servers else None,
        "guest_busy_cpu_s": _busy_cpu() - busy_before,
    }
    dispatch_after = dispatch_counters(device.path)
    if dispatch_before is not None and dispatch_after is not None:
        measured["dispatch"] = {
            name: dispatch_after[name] - dispatch_before.get(name, 0) for name in dispatch_after
        }
    return measured


def dispatch_counters(path: str) -> dict[str, int] | None:
    """An abuse disk's dispatch counters (its sysfs ``abuse/dispatch``); None for other disks."""
    try:
        text = (Path("/sys/block") / Path(path).name / "abuse" / "dispatch").read_text()
    except OSError:
        return None
    return {name: int(value) for name, value in (line.split() for line in text.splitlines())}


def prefill(device: Device) -> None:
    """Write the whole device once, so that every job reads written data.

    Reads of never-written ranges cost differently on each target (a
    shared zero page, a fresh page, a sparse-array lookup): not the
    thing measured.
    """
    run(
        [
            "fio",
            "--name=prefill",
            "--filename=" + device.path,
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=write",
            "--bs=1M",
            "--iodepth=4",
            "--output-format=json",
        ]
    )


def _busy_cpu() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


@contextlib.contextmanager
def ceph_cluster() -> Iterator[Path]:
    """A single-node cluster for the ceph group; its ceph.conf."""
    env = {**os.environ, "CEPH_MGR": "0"}
    start = time.monotonic()
    run([str(ROOT / "scripts" / "ceph-cluster"), "start", str(CEPH_DIR)], env=env)
    print(f"bench: ceph cluster up in {time.monotonic() - start:.0f} s", flush=True)
    try:
        yield CEPH_DIR / "ceph.conf"
    finally:
        run([str(ROOT / "scripts" / "ceph-cluster"), "stop", str(CEPH_DIR)])


@contextlib.contextmanager
def rbd_image(conf: Path, name: str) -> Iterator[str]:
    """A fresh layering-only image of CEPH_SIZE; removed afterwards."""
    run(["rbd", "-c", str(conf), "create", "--size", f"{CEPH_SIZE}B", "--image-feature", "layering", name])
    try:
        yield name
    finally:
        run(["rbd", "-c", str(conf), "rm", "--no-progress", name])


@contextlib.contextmanager
def abuse_rbd_disk(conf: Path, workers: int, batch: int, queue_depth: int = 8) -> Iterator[Device]:
    with rbd_image(conf, f"rbd/abuse-{workers}w-qd{queue_depth}") as name:
        spec = f"rbd:{name}?conf={conf}&queue_depth={queue_depth}"
        with abuse_disk(CEPH_SIZE, spec, workers, batch) as device:
            yield device


@contextlib.contextmanager
def krbd_disk(conf: Path) -> Iterator[Device]:
    with rbd_image(conf, "rbd/krbd") as name:
        # noudev: the guest runs no udevd, and `rbd map` would wait for it.
        path = run(["rbd", "-c", str(conf), "device", "map", "-o", "noudev", name]).strip()
        try:
            yield Device(path, [])
        finally:
            run(["rbd", "-c", str(conf), "device", "unmap", "-o", "noudev", path])


@contextlib.contextmanager
def rbd_nbd_disk(conf: Path) -> Iterator[Device]:
    with rbd_image(conf, "rbd/nbd") as name:
        path = run(["rbd-nbd", "-c", str(conf), "map", name]).strip()
        try:
            server = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "rbd-nbd"]
            yield Device(path, server)
        finally:
            run(["rbd-nbd", "unmap", path])


def ceph_targets(conf: Path, batch: int) -> dict[str, Any]:
    """The ceph group's targets, krbd (the reference) first."""
    return {
        "ceph-krbd": lambda: krbd_disk(conf),
        "ceph-rbd-nbd": lambda: rbd_nbd_disk(conf),
        "ceph-abuse-1w": lambda: abuse_rbd_disk(conf, 1, batch),
        "ceph-abuse-4w": lambda: abuse_rbd_disk(conf, 4, batch),
        # one librbd call at a time per worker, as before queue_depth: what the aio window gains
        "ceph-abuse-4w-qd1": lambda: abuse_rbd_disk(conf, 4, batch, queue_depth=1),
    }


def targets(size: int, batch: int) -> dict[str, Any]:
    """Every target of the main table, by name, as a context-manager factory."""
    plugin = str(ROOT / "bench" / "nbdkit_memory.py")
    return {
        "abuse-mem-1w": lambda: abuse_disk(size, "memory", 1, batch),
        "abuse-mem-2w": lambda: abuse_disk(size, "memory", 2, batch),
        "abuse-file-1w": lambda: file_disk(size, TMPFS / "abuse.img", True, 1, batch),
        "abuse-file-copy-1w": lambda: file_disk(size, TMPFS / "abuse.img", False, 1, batch),
        "loop": lambda: loop_disk(size),
        "nbdkit-c": lambda: nbd_disk(["memory", str(size)]),
        "nbdkit-py": lambda: nbd_disk(["python", plugin, f"size={size}"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.guest")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    parser.add_argument(
        "--scale-runtime",
        type=int,
        default=0,
        help="seconds per fio job of the side-by-side scaling rounds (default: --runtime)",
    )
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes per device")
    parser.add_argument("--batch", type=int, default=64, help="abuse requests per GET")
    parser.add_argument("--only", default="", help="comma-separated targets (default: all)")
    parser.add_argument("--no-scaling", action="store_true", help="skip every group (--groups '')")
    parser.add_argument(
        "--groups",
        default=",".join(DEFAULT_GROUPS),
        help=f"comma-separated groups to run after the targets: {GROUPS}",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the scaling group this many times, interleaved (the report takes the medians)",
    )
    parser.add_argument("--profile", action="store_true", help="only profile one worker, per job")
    parser.add_argument("--no-prefill", action="store_true", help="do not write each device first")
    args = parser.parse_args(argv)
    for name, least in (("runtime", 1), ("scale_runtime", 0), ("rounds", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be >= {least}, not {getattr(args, name)}")

    TMPFS.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "tmpfs", "-o", "size=3g", "bench", str(TMPFS)])
    result: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "runtime_s": args.runtime,
        "size": args.size,
        "batch": args.batch,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "guest_loadavg_before": os.getloadavg(),
        "guest_speed_before": round(median_loop_seconds(), 2),
        "speed_runs": SPEED_RUNS,
        "runs": [],
    }
    chosen = [name for name in args.only.split(",") if name]
    fill = not args.no_prefill
    result["prefilled"] = fill
    failed = 0
    try:
        if args.profile:
            for job in JOBS:
                out = args.out / f"profile-{job.name}.txt"
                factory = lambda out=out: profiled_disk(args.size, out)  # noqa: E731
                failed += _measure(result, "abuse-profiled", factory, [job], args.runtime, fill)
            return 1 if failed else 0
        for name, factory in targets(args.size, args.batch).items():
            if chosen and name not in chosen:
                continue
            failed += _measure(result, name, factory, JOBS, args.runtime, fill)
        groups = set() if args.no_scaling else {name for name in args.groups.split(",") if name}
        if groups - set(GROUPS):
            raise SystemExit(f"bench.guest: unknown groups {sorted(groups - set(GROUPS))}")
        if "scaling" in groups:
            size = result["scale_size"] = min(args.size, SCALE_SIZE)
            scale_runtime = result["scale_runtime_s"] = args.scale_runtime or args.runtime
            # loop runs in the rounds too: the targets against it are
            # judged there (bench.report.loop_paired).
            factories: dict[str, Any] = {"scale-loop": lambda: loop_disk(size)}
            factories |= {
                f"scale-abuse-mem-{workers}w": lambda w=workers: abuse_disk(size, "memory", w, args.batch)
                for workers in SCALE_WORKERS
            }
            failed += _measure_side_by_side(result, factories, SCALE_JOBS, scale_runtime, args.rounds, fill)
        if "batching" in groups:
            for batch in BATCH_SIZES:
                factory = lambda b=batch: abuse_disk(args.size, "memory", 1, b)  # noqa: E731
                failed += _measure(result, f"batch-{batch}", factory, BATCH_JOBS, args.runtime, fill)
        if "slow" in groups:
            failed += _measure_slow(result, args)
        if "ceph" in groups:
            with ceph_cluster() as conf:
                for name, factory in ceph_targets(conf, args.batch).items():
                    failed += _measure(result, name, factory, CEPH_JOBS, args.runtime, fill)
    finally:
        result["guest_loadavg_after"] = os.getloadavg()
        result["guest_speed_after"] = round(median_loop_seconds(), 2)
        (args.out / "raw.json").write_text(json.dumps(result, indent=1))
        run(["umount", str(TMPFS)])
    return 1 if failed else 0


def _measure_side_by_side(
    result: dict[str, Any], factories: dict[str, Any], jobs: list[Job], runtime: int, rounds: int, fill: bool
) -> int:
    """Run each job on every device from ``factories`` in turn, ``rounds`` times; the number that failed.

    The devices are all set up first and stay up throughout, so that one
    job's runs on them are seconds apart: a ratio between two of them
    then compares the same minute of the rig, whose speed drifts by more
    than the effect measured (up to 1.7x over minutes under TCG).  Each
    round starts the rotation one device later, so none always runs
    first.  A device's idle workers sleep meanwhile (a wake-up per
    worker every 5 s, the pool's idle wait), alike for every run.
    """
    failed = 0
    # For the report: which targets' runs pair up round by round.
    result.setdefault("side_by_side", []).extend(factories)
    with contextlib.ExitStack() as stack:
        devices = _set_up(result, factories, fill, stack)
        failed += len(factories) - len(devices)
        for turn in range(max(1, rounds)):
            failed += _run_round(result, devices, jobs, runtime, turn)
    return failed


def _set_up(
    result: dict[str, Any], factories: dict[str, Any], fill: bool, stack: contextlib.ExitStack
) -> dict[str, Device]:
    """Every device of ``factories`` that came up, by name, kept up by ``stack``."""
    devices: dict[str, Device] = {}
    for name, factory in factories.items():
        print(f"bench: {name}", flush=True)
        try:
            device = stack.enter_context(factory())
            if fill:
                prefill(device)
            devices[name] = device
        except Exception as err:  # one broken target must not lose the others
            _failed(result, name, err)
    return devices


def _run_round(
    result: dict[str, Any], devices: dict[str, Device], jobs: list[Job], runtime: int, turn: int
) -> int:
    """Round ``turn``: each job on every device, the ``turn``-th first; drops and counts the failed."""
    failed = 0
    for job in jobs:
        names = list(devices)
        shift = turn % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            try:
                _run_job(result, name, devices[name], job, runtime, f"round {turn + 1}")
            except Exception as err:
                failed += _failed(result, name, err)
                del devices[name]
    return failed


def _measure_slow(result: dict[str, Any], args: argparse.Namespace) -> int:
    """The slow group: SLOW_ROUNDS rounds of each worker count, then as many bare sleepers.

    The disks are up side by side (_measure_side_by_side), one round at
    a time, and each round ends with the sleepers of every count, so the
    median run of each cell and the median ceiling come from the same
    minutes (the disks' idle workers wake every 5 s meanwhile, as during
    the runs).  Nothing to prefill: the backend stores nothing.
    Returns how many targets failed.
    """
    failed = 0
    factories = {
        f"slow-{workers}w": lambda w=workers: abuse_disk(args.size, SLOW_BACKEND, w, args.batch)
        for workers in SLOW_WORKERS
    }
    rates: dict[str, list[float]] = {str(workers): [] for workers in SLOW_WORKERS}
    with contextlib.ExitStack() as stack:
        devices = _set_up(result, factories, False, stack)
        failed += len(factories) - len(devices)
        for turn in range(SLOW_ROUNDS):
            failed += _run_round(result, devices, [SLOW_JOB], args.runtime, turn)
            for workers in SLOW_WORKERS:
                try:
                    rate = sleeps_per_second(workers, args.runtime, SLOW_DELAY_S)
                except Exception as err:  # the ceiling is context: it must not cost the groups after it
                    failed += _failed(result, f"sleepers-{workers}", err)
                    continue
                rates[str(workers)].append(rate)
                print(f"bench:   {workers} bare sleepers {rate:10.0f} sleeps/s", flush=True)
    result["sleep_ceiling_rounds"] = rates
    # The lower median, as bench.report takes each cell's median run.
    result["sleep_ceiling"] = {count: statistics.median_low(found) for count, found in rates.items() if found}
    return failed


def _measure(
    result: dict[str, Any], name: str, factory: Any, jobs: list[Job], runtime: int, fill: bool = True
) -> int:
    """Run ``jobs`` on a fresh device from ``factory``; 1 if it failed."""
    print(f"bench: {name}", flush=True)
    start = time.monotonic()
    try:
        with factory() as device:
            if fill:
                prefill(device)
                print(f"bench:   prefilled  (t+{time.monotonic() - start:.0f} s)", flush=True)
            for job in jobs:
                _run_job(result, name, device, job, runtime, f"started at t+{time.monotonic() - start:.0f} s")
    except Exception as err:  # one broken target must not lose the others
        return _failed(result, name, err)
    return 0


def _run_job(result: dict[str, Any], name: str, device: Device, job: Job, runtime: int, when: str) -> None:
    """Run ``job`` on ``device``, print its IOPS and keep the run as ``name``'s."""
    measured = fio(device, job, runtime)
    iops = sum(measured["fio"]["jobs"][0][side]["iops"] for side in ("read", "write"))
    print(f"bench:   {name} {job.name:18} {iops:10.0f} IOPS  ({when})", flush=True)
    result["runs"].append({"target": name, "job": job.name, **measured})


def _failed(result: dict[str, Any], name: str, err: Exception) -> int:
    """Report and keep ``name``'s failure; 1, for the count of failed targets."""
    print(f"bench: {name} failed: {err}", flush=True)
    result.setdefault("failures", {})[name] = str(err)
    return 1


if __name__ == "__main__":
    sys.exit(main())
