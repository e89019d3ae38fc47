"""The dispatch probe behind docs/SCALING.md, run in the guest.

For 1, 2 and 4 memory workers, with the worker's adaptive batch size
and without it, and for the old dispatch (a GET sleeper
woken for every request, no polling: module parameters wake_max_us=0,
spin_max_us=0) beside the new one (lazy, bounded wake-ups and polling),
it runs fio jobs and reads, with the module parameter lock_stats on, how
many critical sections on the disk's lock the request path took and how
long it held the lock, plus the CPU time of the workers and of the
whole guest per request.  Writes OUT/lock-probe.txt and .json.

    scripts/vm-run --script bench/guest-bench --module bench.lock_probe
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench.guest import abuse_disk, fio, prefill
from bench.jobs import Job

PARAMS = Path("/sys/module/abuse/parameters")
_NEW = {"wake_max_us": "10000", "wake_min_us": "10000", "spin_max_us": "200", "share_kib": "0"}
MODES = {
    "old": {**_NEW, "wake_max_us": "0", "spin_max_us": "0"},
    "new": _NEW,
    # the same with a lazy wake-up as soon as 50 us (before 2026-12-01): more timer runs
    "min50us": {**_NEW, "wake_min_us": "50"},
    # the same with big requests shared between workers (share_kib, off by default)
    "share": {**_NEW, "share_kib": "1024"},
}
# The worker's batch budget (ABUSE_BATCH_BUDGET_US): adaptive, and off.
BUDGETS_US = ("1000", "0")
JOBS = (
    Job("randread-4k-qd32", "randread", "4k", 32),
    Job("randwrite-4k-qd32", "randwrite", "4k", 32),
    Job("randread-4k-qd128", "randread", "4k", 128),
    Job("randread-4k-qd1", "randread", "4k", 1),
    Job("seqread-1M-qd4", "read", "1M", 4),
    Job("seqwrite-1M-qd4", "write", "1M", 4),
    Job("randwrite-4k-qd128", "randwrite", "4k", 128),
)


def _set(params: dict[str, str]) -> None:
    for name, value in params.items():
        (PARAMS / name).write_text(value)


def _lock_stats(path: str) -> tuple[int, int]:
    taken, ns = Path(f"/sys/block/{Path(path).name}/abuse/lock_stats").read_text().split()
    return int(taken), int(ns)


def _dispatch(path: str) -> dict[str, int]:
    text = Path(f"/sys/block/{Path(path).name}/abuse/dispatch").read_text()
    return {name: int(count) for name, count in (line.split() for line in text.splitlines())}


def _per_worker(device: Any) -> dict[int, tuple[float, int]]:
    """CPU seconds and context switches of each worker process."""
    found: dict[int, tuple[float, int]] = {}
    for proc in device.servers:
        for child in proc.children(recursive=True):
            times, switches = child.cpu_times(), child.num_ctx_switches()
            found[child.pid] = (times.user + times.system, switches.voluntary + switches.involuntary)
    return found


def _measure(device: Any, job: Job, runtime: int) -> dict[str, Any]:
    taken0, ns0 = _lock_stats(device.path)
    dispatch0 = _dispatch(device.path)
    workers0 = _per_worker(device)
    result = fio(device, job, runtime)
    workers1 = _per_worker(device)
    taken1, ns1 = _lock_stats(device.path)
    dispatch1 = _dispatch(device.path)
    side = result["fio"]["jobs"][0]["read" if "read" in job.rw else "write"]
    ios = max(int(side["total_ios"]), 1)
    dispatch = {name: (dispatch1[name] - count) / ios for name, count in dispatch0.items()}
    shares = {
        pid: (round((cpu - workers0[pid][0]) * 1e6 / ios, 1), round((switches - workers0[pid][1]) / ios, 3))
        for pid, (cpu, switches) in workers1.items()
        if pid in workers0
    }
    return {
        "worker_us_and_switches_per_request": sorted(shares.values(), reverse=True),
        "dispatch_per_request": dispatch,
        "job": job.name,
        "iops": float(side["iops"]),
        "sections_per_request": (taken1 - taken0) / ios,
        "ns_per_section": (ns1 - ns0) / max(taken1 - taken0, 1),
        "lock_ns_per_request": (ns1 - ns0) / ios,
        "worker_us_per_request": result["server_cpu_s"] * 1e6 / ios,
        "guest_us_per_request": result["guest_busy_cpu_s"] * 1e6 / ios,
    }


def _line(row: dict[str, Any]) -> str:
    return (
        f"{row['mode']:4} {row['budget_us']:6} {row['workers']:7} {row['job']:20} {row['iops']:8.0f}"
        f" {row['sections_per_request']:13.2f} {row['ns_per_section']:11.0f}"
        f" {row['lock_ns_per_request']:12.0f} {row['worker_us_per_request']:14.1f}"
        f" {row['guest_us_per_request']:13.1f}  "
        + " ".join(f"{name}={count:.3f}" for name, count in row["dispatch_per_request"].items())
        + f" per-worker(us,switches)={row['worker_us_and_switches_per_request']}"
    )


def _medians(rows: list[dict[str, Any]]) -> list[str]:
    """Median IOPS of each mode, workers, budget and job over the rounds, and its ratio to 1 worker."""
    runs: dict[tuple[str, int, int, str], list[float]] = {}
    for row in rows:
        runs.setdefault((row["mode"], row["budget_us"], row["workers"], row["job"]), []).append(row["iops"])
    medians = {key: statistics.median(iops) for key, iops in runs.items()}
    lines = ["", "medians over the rounds: mode budget workers job  IOPS  vs-1-worker  (min-max)"]
    for (mode, budget, workers, job), median in medians.items():
        one = medians.get((mode, budget, 1, job))
        ratio = f"{median / one:.2f}x" if one else "-"
        low, high = min(runs[mode, budget, workers, job]), max(runs[mode, budget, workers, job])
        spread = f"({low:.0f}-{high:.0f})"
        lines.append(f"{mode:8} {budget:6} {workers:7} {job:20} {median:8.0f} {ratio:>6}  {spread}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runtime", type=int, default=8)
    parser.add_argument("--size", type=int, default=256 << 20)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--modes", default=",".join(MODES), help="of: " + ", ".join(MODES))
    parser.add_argument("--budgets", default=",".join(BUDGETS_US), help="ABUSE_BATCH_BUDGET_US values")
    parser.add_argument("--jobs", default="", help="job names (default: all)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every mode and job, interleaved")
    args, _ = parser.parse_known_args(argv)
    modes = {name: MODES[name] for name in args.modes.split(",")}
    jobs = [job for job in JOBS if not args.jobs or job.name in args.jobs.split(",")]
    (PARAMS / "lock_stats").write_text("1")
    rows: list[dict[str, Any]] = []
    lines = [
        "mode budget workers job                    IOPS  sections/req  ns/section  lock-ns/req"
        "  worker-us/req  guest-us/req  dispatch events/req"
    ]
    for workers in map(int, args.workers.split(",")):
        for budget in args.budgets.split(","):
            os.environ["ABUSE_BATCH_BUDGET_US"] = budget
            with abuse_disk(args.size, "memory", workers, 64) as device:
                prefill(device)
                for _ in range(args.rounds):
                    for mode, params in modes.items():
                        _set(params)
                        for job in jobs:
                            row = _measure(device, job, args.runtime)
                            row.update(mode=mode, workers=workers, budget_us=int(budget))
                            rows.append(row)
                            lines.append(_line(row))
                            print(lines[-1], flush=True)
    if args.rounds > 1:
        lines += _medians(rows)
        print("\n".join(_medians(rows)), flush=True)
    _set(MODES["new"])
    (PARAMS / "lock_stats").write_text("0")
    args.out.joinpath("lock-probe.txt").write_text("\n".join(lines) + "\n")
    args.out.joinpath("lock-probe.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
