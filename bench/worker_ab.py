"""Two trees' workers side by side on the 5 ms backend, in one boot.

A change to the worker's hot path moves the slow backend's IOPS by a
few percent, less than the emulated rig drifts from one boot to the
next, so both trees run in the same boot: for each worker count, a disk
served by ``abusectl serve`` of tree A and one of tree B, up at the same
time, each fio job run on each disk in turn, the order rotated per
round.  Judged by the geometric mean of the B/A ratios inside each
round.  The module (abuse.ko) is the booting tree's: only Python
differs.  Writes OUT/worker-ab.txt.

    git worktree add /tmp/A <before>   # or a clone
    scripts/vm-run --script bench/guest-bench --module bench.worker_ab --a /tmp/A --b "$PWD"
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import Any

from bench.guest import PYTHON, SLOW_BACKEND, Device, fio, served_abuse_disk
from bench.jobs import SLOW_JOB

SIZE = 256 << 20


def _served(tree: Path, workers: int) -> Any:
    serve = ["env", "-C", str(tree), PYTHON, "-m", "abusectl", "serve", "--backend", SLOW_BACKEND]
    return served_abuse_disk(SIZE, [*serve, "--workers", str(workers)], workers)


def _cpu_per_request(device: Device, before: float, requests: float) -> float:
    return (device.server_cpu() - before) / max(requests, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.worker_ab")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--a", type=Path, required=True, help="tree A (the baseline)")
    parser.add_argument("--b", type=Path, required=True, help="tree B (the change)")
    parser.add_argument("--workers", default="1,16", help="comma-separated worker counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.workers.split(",") if n]
    when = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"# bench.worker_ab {when}: A = {args.a}, B = {args.b}; {SLOW_JOB.name}"]
    ratios: dict[int, list[float]] = {n: [] for n in counts}
    with contextlib.ExitStack() as stack:
        disks = {
            (n, side): stack.enter_context(_served(tree, n))
            for n in counts
            for side, tree in (("A", args.a), ("B", args.b))
        }
        order = list(disks)
        for device in disks.values():  # warm-up: the workers measure their backend
            fio(device, SLOW_JOB, 1)
        for r in range(args.rounds):
            got: dict[tuple[int, str], float] = {}
            for key in order[r % len(order) :] + order[: r % len(order)]:
                device = disks[key]
                before = device.server_cpu()
                measured = fio(device, SLOW_JOB, args.runtime)
                iops = float(measured["fio"]["jobs"][0]["read"]["iops"])
                got[key] = iops
                cpu = _cpu_per_request(device, before, iops * args.runtime)
                lines.append(f"r{r} {key[0]}w-{key[1]}: {iops:.0f} IOPS, worker CPU {cpu:.0f} us/req")
                print(lines[-1], flush=True)
            for n in counts:
                ratios[n].append(got[(n, "B")] / got[(n, "A")])
    for n in counts:
        mean = math.exp(sum(math.log(x) for x in ratios[n]) / len(ratios[n]))
        each = " ".join(f"{x:.2f}" for x in ratios[n])
        lines.append(f"{n}w B/A: {mean:.3f}x per round ({each})")
        print(lines[-1], flush=True)
    (args.out / "worker-ab.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
