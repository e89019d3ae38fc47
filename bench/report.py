"""Turn the guest's raw.json into tables, a JSON summary and charts.

    python -m bench.report RAW_DIR [--results bench/results] [--readme README.md]

RAW_DIR holds raw.json (bench.guest) and, optionally, host-load-before
and host-load-after (copies of the host's /proc/loadavg) and host-speed
(bench/run's probe: seconds of a fixed Python loop on the host).  Writes
RESULTS/<date>-<kernel>.md, .json, .png and -scaling.png, and, with
--readme, replaces README's Benchmarks block with the new summary.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.jobs import (
    BATCH_JOBS,
    JOBS,
    SCALE_JOBS,
    SCALE_QUEUE_DEPTHS,
    SCALE_WORKERS,
    SLOW_DELAY_S,
    SLOW_JOB,
    WORKER_SCALING_JOBS,
)

__all__ = [
    "Row",
    "batching",
    "dispatch",
    "file_vs_memory",
    "loop_paired",
    "main",
    "markdown",
    "per_round_intervals",
    "per_round_ratios",
    "rows_from_raw",
    "slow_backend",
    "spread",
    "summary",
    "targets_check",
    "worker_scaling",
]

LOOP = "loop"
NBDKIT_C = "nbdkit-c"
# README keeps one block per kernel series, between these markers.
README_START = "<!-- bench:start {series} -->"
README_END = "<!-- bench:end {series} -->"

# (label, job names) of the summary table; ratios are of the mean.
SUMMARY_COLUMNS = [
    ("4k QD1 IOPS", ("randread-4k-qd1", "randwrite-4k-qd1")),
    ("4k QD32 IOPS", ("randread-4k-qd32", "randwrite-4k-qd32")),
    ("1M seq MB/s", ("seqread-1M-qd4", "seqwrite-1M-qd4")),
]

# The targets for abuse: (label, job names, least ratio to loop).
# On 6.12, where ublk exists, 4k QD32 must be level with ublk's C server.
TARGETS = [
    ("4k QD32 random read and write IOPS", ("randread-4k-qd32", "randwrite-4k-qd32"), 0.3),
    ("1M sequential read and write MB/s", ("seqread-1M-qd4", "seqwrite-1M-qd4"), 0.5),
    ("4k QD1 IOPS", ("randread-4k-qd1", "randwrite-4k-qd1"), 0.4),
]
QD32_LEAST_6_12 = 0.6

# The file backend served in place against the memory backend (issue 13):
# at least FILE_LEAST of memory's figure, read and write, in these columns.
MEMORY_1W = "abuse-mem-1w"
FILE_IN_PLACE = "abuse-file-1w"
FILE_COPY = "abuse-file-copy-1w"
FILE_LEAST = 0.8
FILE_JUDGED = ("4k QD32 IOPS", "1M seq MB/s")

# The 5 ms backend (issue 12): the most workers reach SLOW_LEAST_IDEAL of
# the ideal and SLOW_LEAST_VS_1W times one worker.
SLOW_LEAST_IDEAL = 0.8
SLOW_LEAST_VS_1W = 10.0

# Worker scaling (issue 12): every worker count reaches this much of one
# worker's figure, on 4k random jobs and on 1M sequential ones.
SCALING_LEAST_4K = 0.9
SCALING_LEAST_SEQ = 1.0
# The worker-scaling disks' targets: this, then the worker count, then "w".
SCALE_PREFIX = "scale-abuse-mem-"
SCALE_ONE = f"{SCALE_PREFIX}1w"
# loop over tmpfs, up side by side with the worker-scaling disks.
SCALE_LOOP = "scale-loop"

# The targets against loop (issue 12), judged inside the rounds:
# (label, job names, least ratio, oldest kernel series it applies to).
# The best worker count must reach it, read and write.
LOOP_PAIRED = [
    ("4k QD1", ("randread-4k-qd1", "randwrite-4k-qd1"), 0.7, (6, 1)),
    ("4k QD32", ("randread-4k-qd32", "randwrite-4k-qd32"), 1.0, (6, 12)),
]


def kernel_series(kernel: str) -> str:
    """ "6.12" of "6.12.107+deb13-amd64"."""
    return ".".join(kernel.split(".")[:2])


def _least(label: str, least: float, kernel: str) -> float:
    newer = tuple(int(x) for x in kernel_series(kernel).split(".")) >= (6, 12)
    return QD32_LEAST_6_12 if newer and label.startswith("4k QD32") else least


@dataclass(frozen=True)
class Row:
    """One fio job on one target, reduced to what the tables show."""

    target: str
    job: str
    iops: float
    mbps: float  # MB/s, 10^6 bytes
    p50_us: float | None
    p99_us: float | None
    server_cpu_us: float | None  # server processes' CPU per request
    guest_cpu_us: float  # the whole guest's busy CPU per request

    @property
    def sequential(self) -> bool:
        return not self.job.startswith("rand")

    @property
    def figure(self) -> float:
        """What the job is judged by: MB/s when sequential, else IOPS."""
        return self.mbps if self.sequential else self.iops


def _row(run: dict[str, Any]) -> Row:
    job = run["fio"]["jobs"][0]
    sides = [job[side] for side in ("read", "write") if job[side]["total_ios"]]
    ios = sum(side["total_ios"] for side in sides) or 1
    iops = sum(side["iops"] for side in sides)
    mbps = sum(side["bw_bytes"] for side in sides) / 1e6
    p50 = p99 = None
    if sides:
        percentiles = sides[0]["clat_ns"].get("percentile", {})
        if "50.000000" in percentiles:
            p50 = percentiles["50.000000"] / 1e3
            p99 = percentiles["99.000000"] / 1e3
    server = run.get("server_cpu_s")
    return Row(
        target=run["target"],
        job=run["job"],
        iops=iops,
        mbps=mbps,
        p50_us=p50,
        p99_us=p99,
        server_cpu_us=None if server is None else server * 1e6 / ios,
        guest_cpu_us=run["guest_busy_cpu_s"] * 1e6 / ios,
    )


def rows_from_raw(raw: dict[str, Any]) -> list[Row]:
    """Every (target, job) of ``raw`` (bench.guest's output) as a Row.

    A job run in several rounds (``--rounds``) is the round with the
    median figure (the lower one of an even count), so that one slow or
    fast round of the rig does not decide a ratio.
    """
    return [_median(rounds) for rounds in _rounds(raw).values()]


def _runs(raw: dict[str, Any]) -> dict[tuple[str, str], list[Row]]:
    """Every run of ``raw`` as a Row, by (target, job), in the order run."""
    runs: dict[tuple[str, str], list[Row]] = {}
    for run in raw["runs"]:
        row = _row(run)
        runs.setdefault((row.target, row.job), []).append(row)
    return runs


def _rounds(raw: dict[str, Any]) -> dict[tuple[str, str], list[Row]]:
    """Every run of ``raw`` as a Row, by (target, job), sorted by figure."""
    return {key: sorted(rows, key=lambda row: row.figure) for key, rows in _runs(raw).items()}


def _median(ordered: list[Row]) -> Row:
    return ordered[(len(ordered) - 1) // 2]


def spread(raw: dict[str, Any]) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(target, job) -> (lowest, highest figure, rounds) for the jobs run more than once."""
    return {
        key: (rows[0].figure, rows[-1].figure, len(rows))
        for key, rows in _rounds(raw).items()
        if len(rows) > 1
    }


def _main_rows(rows: list[Row]) -> list[Row]:
    return [row for row in rows if not row.target.startswith(("scale-", "batch-", "slow-", "ceph-"))]


KRBD = "ceph-krbd"


def ceph(rows: list[Row]) -> list[dict[str, Any]]:
    """The ceph group, per job: each target's figure and its ratio to krbd."""
    group = [row for row in rows if row.target.startswith("ceph-")]
    out = []
    for job in dict.fromkeys(row.job for row in group):
        base = _figure(group, KRBD, (job,))
        entry: dict[str, Any] = {"job": job, "unit": "MB/s" if not job.startswith("rand") else "IOPS"}
        entry["targets"] = {
            target: {
                "value": _figure(group, target, (job,)),
                "vs_krbd": _ratio(_figure(group, target, (job,)), base),
            }
            for target in _targets(group)
        }
        out.append(entry)
    return out


def _section(title: str, columns: list[str], intro: str | None = None) -> list[str]:
    """A report section's heading, its optional intro and its table's head."""
    lines = ["", f"## {title}", ""]
    if intro is not None:
        lines += [intro, ""]
    return lines + ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _ceph_table(rows: list[Row]) -> list[str]:
    entries = ceph(rows)
    if not entries:
        return []
    targets = list(entries[0]["targets"])
    lines = _section(
        "Ceph RBD: abuse rbd: vs rbd-nbd vs krbd, one single-node cluster (memstore OSD)",
        ["job", "unit", *[cell for t in targets for cell in (t.removeprefix("ceph-"), "vs krbd")]],
    )
    for entry in entries:
        cells = " | ".join(
            f"{_fmt(entry['targets'][t]['value'], 1)} | {_x(entry['targets'][t]['vs_krbd'])}" for t in targets
        )
        lines.append(f"| {entry['job']} | {entry['unit']} | {cells} |")
    return lines


def _figure(rows: list[Row], target: str, jobs: tuple[str, ...]) -> float | None:
    """Mean figure of ``jobs`` on ``target``, or None if any is missing."""
    found = {row.job: row.figure for row in rows if row.target == target}
    if any(job not in found for job in jobs):
        return None
    return sum(found[job] for job in jobs) / len(jobs)


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _interval(bounds: tuple[float, float] | None) -> str:
    return "" if bounds is None else f" ({bounds[0]:.2f}-{bounds[1]:.2f})"


def _targets(rows: list[Row]) -> list[str]:
    seen: list[str] = []
    for row in rows:
        if row.target not in seen:
            seen.append(row.target)
    return seen


def summary(rows: list[Row]) -> list[dict[str, Any]]:
    """Per target: each summary column's figure and its ratios to loop and nbdkit-C."""
    main = _main_rows(rows)
    out = []
    for target in _targets(main):
        entry: dict[str, Any] = {"target": target}
        for label, jobs in SUMMARY_COLUMNS:
            value = _figure(main, target, jobs)
            entry[label] = {
                "value": value,
                "vs_loop": _ratio(value, _figure(main, LOOP, jobs)),
                "vs_nbdkit_c": _ratio(value, _figure(main, NBDKIT_C, jobs)),
            }
        out.append(entry)
    return out


def _worst_ratio(rows: list[Row], target: str, jobs: tuple[str, ...], base: str = LOOP) -> float | None:
    """The lowest ratio to ``base`` (loop) among ``jobs`` on ``target``."""
    ratios = [_ratio(_figure(rows, target, (job,)), _figure(rows, base, (job,))) for job in jobs]
    return None if None in ratios else min(r for r in ratios if r is not None)


def targets_check(rows: list[Row], kernel: str) -> list[dict[str, Any]]:
    """The issue's targets for abuse on ``kernel``, on the best abuse memory target.

    A target holds when every job it names (read and write) reaches it.
    """
    main = _main_rows(rows)
    candidates = [t for t in _targets(main) if t.startswith("abuse-mem")]
    checks = []
    for label, jobs, least in TARGETS:
        least = _least(label, least, kernel)
        best = max(
            ((t, _worst_ratio(main, t, jobs)) for t in candidates),
            key=lambda pair: pair[1] or 0.0,
            default=(None, None),
        )
        checks.append(
            {
                "target": label,
                "least": least,
                "best": best[0],
                "ratio": best[1],
                "holds": best[1] is not None and best[1] >= least,
            }
        )
    return checks


def file_vs_memory(rows: list[Row]) -> list[dict[str, Any]]:
    """Per file target: each summary column's figure and its ratio to one memory worker.

    ``vs_memory`` is the ratio of the means of read and write, ``worst``
    the worse of the two ratios; the in-place target is judged by
    ``worst`` against FILE_LEAST in the FILE_JUDGED columns and also gets
    its ratio to the by-copy target.
    """
    main = _main_rows(rows)
    out = []
    for target in (t for t in _targets(main) if t.startswith("abuse-file")):
        entry: dict[str, Any] = {"target": target}
        for label, jobs in SUMMARY_COLUMNS:
            value = _figure(main, target, jobs)
            cell: dict[str, Any] = {
                "value": value,
                "vs_memory": _ratio(value, _figure(main, MEMORY_1W, jobs)),
                "worst": _worst_ratio(main, target, jobs, MEMORY_1W),
            }
            if target == FILE_IN_PLACE:
                cell["vs_copy"] = _ratio(value, _figure(main, FILE_COPY, jobs))
                if label in FILE_JUDGED:
                    cell["least"] = FILE_LEAST
                    cell["holds"] = cell["worst"] is not None and cell["worst"] >= FILE_LEAST
            entry[label] = cell
        out.append(entry)
    return out


def slow_backend(rows: list[Row], ceiling: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """The 5 ms backend by workers: IOPS, median latency, ratios to the ideal and to 1 worker.

    The ideal is min(workers, queue depth) requests per SLOW_DELAY_S.
    The most workers are judged against SLOW_LEAST_IDEAL and
    SLOW_LEAST_VS_1W.  ``ceiling`` (raw "sleep_ceiling", by workers) is
    what as many bare sleeping processes managed in the same boot
    (bench.sleep_ceiling): shown beside the ideal, not judged.
    """
    found = {
        int(row.target.removeprefix("slow-").removesuffix("w")): row
        for row in rows
        if row.target.startswith("slow-") and row.job == SLOW_JOB.name
    }
    one = found.get(1)
    out: list[dict[str, Any]] = []
    for workers, row in sorted(found.items()):
        ideal = min(workers, SLOW_JOB.queue_depth) / SLOW_DELAY_S
        out.append(
            {
                "workers": workers,
                "iops": row.iops,
                "p50_ms": None if row.p50_us is None else row.p50_us / 1e3,
                "ideal": ideal,
                "vs_ideal": _ratio(row.iops, ideal),
                "vs_1w": _ratio(row.iops, one.iops if one else None),
                "sleepers": (ceiling or {}).get(str(workers)),
                "vs_sleepers": _ratio(row.iops, (ceiling or {}).get(str(workers))),
            }
        )
    if out and out[-1]["workers"] > 1:
        last = out[-1]
        vs_ideal, vs_1w = last["vs_ideal"] or 0.0, last["vs_1w"] or 0.0
        last["holds"] = vs_ideal >= SLOW_LEAST_IDEAL and vs_1w >= SLOW_LEAST_VS_1W
    return out


def _round_pairs(raw: dict[str, Any], base: str) -> dict[tuple[str, int], list[float]]:
    """(job, workers) -> the worker-scaling disk's figure against ``base``'s, round by round."""
    runs = _runs(raw)
    out = {}
    for (target, job), own in runs.items():
        if not target.startswith(SCALE_PREFIX) or target == base:
            continue
        theirs = runs.get((base, job), [])
        pairs = [a.figure / b.figure for a, b in zip(own, theirs) if a.figure > 0 and b.figure > 0]
        if pairs:
            out[(job, int(target.removeprefix(SCALE_PREFIX).removesuffix("w")))] = pairs
    return out


def per_round_ratios(raw: dict[str, Any], base: str = SCALE_ONE) -> dict[tuple[str, int], float]:
    """(job, workers) -> the geometric mean, over the rounds, of the
    worker-scaling disk's figure against ``base``'s (1 worker, or
    SCALE_LOOP) in the same round.

    The rounds run each job on each disk in turn (bench.guest), so the
    k-th run of a (disk, job) is its k-th round, and a ratio inside one
    round compares the same minute of the rig.  Its drift (up to 2x
    between rounds under TCG) then cancels out, where a ratio of two
    medians can take them from different minutes.  A disk that fails is
    dropped from then on, so its runs still pair with the same rounds.
    """
    return {key: statistics.geometric_mean(pairs) for key, pairs in _round_pairs(raw, base).items()}


def per_round_intervals(
    raw: dict[str, Any], base: str = SCALE_ONE
) -> dict[tuple[str, int], tuple[float, float]]:
    """(job, workers) -> the per-round ratio's geometric mean divided and
    multiplied by its geometric standard error twice over: about a 95%
    interval, which says how far the rig's noise alone could carry it.

    Single rounds of one job span 0.6-1.5x under TCG, so a 7-round ratio
    of 0.88x can come from a disk that is at 0.93x.  Only shown, never
    judged: the targets are the ratios themselves.  Needs 2 rounds.
    """
    out = {}
    for key, pairs in _round_pairs(raw, base).items():
        if len(pairs) < 2:
            continue
        spread = math.exp(2 * statistics.stdev(map(math.log, pairs)) / math.sqrt(len(pairs)))
        mean = statistics.geometric_mean(pairs)  # per_round_ratios' figure
        out[key] = (mean / spread, mean * spread)
    return out


def worker_scaling(
    rows: list[Row],
    per_round: dict[tuple[str, int], float] | None = None,
    intervals: dict[tuple[str, int], tuple[float, float]] | None = None,
) -> list[dict[str, Any]]:
    """Memory workers 1, 2, 4 on the worker-scaling jobs, each against 1 worker.

    A job holds when every worker count with a figure reaches
    SCALING_LEAST_4K (random 4k) or SCALING_LEAST_SEQ (1M sequential) of
    one worker's figure.  Judged is each count's ratio inside the rounds
    (``per_round``, per_round_ratios), where the rig's drift cancels out,
    as loop_paired judges; the ratio of the medians only where there is
    none (a raw without rounds).  Both are shown, and the per-round
    ratio's interval (``intervals``, per_round_intervals) beside it.
    """
    figures: dict[str, dict[int, float]] = {}
    for row in rows:
        if row.target.startswith(SCALE_PREFIX):
            workers = int(row.target.removeprefix(SCALE_PREFIX).removesuffix("w"))
            figures.setdefault(row.job, {})[workers] = row.figure
    out = []
    for job in WORKER_SCALING_JOBS:
        by_workers = figures.get(job.name, {})
        if not by_workers:
            continue
        one = by_workers.get(1)
        least = SCALING_LEAST_SEQ if job.sequential else SCALING_LEAST_4K
        cells: dict[int, dict[str, Any]] = {
            w: {
                "value": by_workers.get(w),
                "vs_1w": _ratio(by_workers.get(w), one),
                "per_round_vs_1w": (per_round or {}).get((job.name, w)),
                "per_round_interval": (intervals or {}).get((job.name, w)),
            }
            for w in SCALE_WORKERS
        }
        for cell in cells.values():
            cell["judged"] = cell["per_round_vs_1w"] if cell["per_round_vs_1w"] is not None else cell["vs_1w"]
        ratios = [cell["judged"] for w, cell in cells.items() if w != 1 and cell["value"] is not None]
        out.append(
            {
                "job": job.name,
                "unit": "MB/s" if job.sequential else "IOPS",
                "least": least,
                "workers": cells,
                "holds": bool(ratios)
                and None not in ratios
                and min(r for r in ratios if r is not None) >= least,
            }
        )
    return out


def loop_paired(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets against loop that apply to ``raw``'s kernel, from the rounds.

    Per worker count, the worse of its read and write per-round ratios to
    SCALE_LOOP (per_round_ratios); a target holds when the best count
    reaches its least.  Empty unless loop ran in the rounds (benches
    before 2026-12-03 ran it on its own, after them).
    """
    if SCALE_LOOP not in raw.get("side_by_side", []):
        return []
    ratios = per_round_ratios(raw, SCALE_LOOP)
    series = tuple(int(x) for x in kernel_series(raw["kernel"]).split("."))
    out = []
    for label, jobs, least, since in LOOP_PAIRED:
        if series < since:
            continue
        worst: dict[int, float | None] = {}
        for workers in SCALE_WORKERS:
            found = [ratios.get((job, workers)) for job in jobs]
            worst[workers] = None if None in found else min(r for r in found if r is not None)
        judged = {w: r for w, r in worst.items() if r is not None}
        if not judged:
            continue
        best = max(judged, key=lambda w: judged[w])
        out.append(
            {
                "target": label,
                "jobs": list(jobs),
                "least": least,
                "workers": worst,
                "best": best,
                "holds": judged[best] >= least,
            }
        )
    return out


def scaling(rows: list[Row]) -> dict[str, dict[int, float]]:
    """4k random read IOPS by queue depth for each scaling series (workers, and loop)."""
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        if row.target.startswith("scale-") and row.job.startswith("randread-4k-qd"):
            depth = int(row.job.rsplit("qd", 1)[1])
            series.setdefault(row.target.removeprefix("scale-"), {})[depth] = row.iops
    return series


def batching(rows: list[Row]) -> dict[int, dict[str, float | None]]:
    """By requests per GET: each batching job's IOPS, and server CPU per request."""
    out: dict[int, dict[str, float | None]] = {}
    for row in rows:
        if row.target.startswith("batch-"):
            entry = out.setdefault(int(row.target.removeprefix("batch-")), {})
            entry[row.job] = row.iops
            entry[f"{row.job} server CPU us/req"] = row.server_cpu_us
    return dict(sorted(out.items()))


def _load(meta: dict[str, Any]) -> str:
    before = meta.get("host_load_before") or "?"
    after = meta.get("host_load_after") or "?"
    # The guest's two emulated CPUs alone hold the host's load near 2 while
    # they are busy, so "after" says little; "before" tells whether the host
    # was idle.
    load = f"host loadavg before `{before}`, after `{after}` (the guest's own vCPUs count in it)"
    speed = meta.get("host_speed")
    if speed:
        load = f"{load}; host speed probe {speed} s (bench/speed.py: lower is faster)"
    if "guest_speed_before" in meta:
        # The guest's own figure tells a slow boot apart: the host's may not move.
        before, after = meta["guest_speed_before"], meta.get("guest_speed_after", "?")
        load = f"{load}; the same loop in the guest {before} s before the jobs, {after} s after"
        if "speed_runs" in meta:
            # Since 2026-12-05 each figure is a median; older ones one timing.
            load = f"{load} (each the median of {meta['speed_runs']} runs)"
    return load


def markdown(raw: dict[str, Any], rows: list[Row], images: tuple[str, str] | None = None) -> str:
    """The full report: summary, targets, details, scaling."""
    lines = [
        f"# abuse benchmark, kernel {raw['kernel']}, {raw['date']}",
        "",
        f"fio io_uring, direct=1, {raw['runtime_s']} s per job, {raw['size'] >> 20} MiB devices, "
        f"{raw['cpus']} vCPUs (QEMU TCG); abuse batch {raw['batch']}; {_load(raw)}.",
        ("Each device was written whole before its jobs. " if raw.get("prefilled") else "")
        + "Ratios compare targets inside this one boot only.",
        "",
    ]
    if raw.get("scale_size"):
        lines[-1:] = [
            f"The worker-scaling disks ({raw['scale_size'] >> 20} MiB each) were up side by side, "
            "each job run on each of them in turn, so that their ratios compare the same minutes of the rig"
            + (f", {raw['scale_runtime_s']} s per job." if raw.get("scale_runtime_s") else "."),
            "",
        ]
    lines += _summary_table(rows)
    lines += ["", "## Targets (best abuse memory target; the worse of read and write vs loop)", ""]
    lines += ["| target | least | best | ratio | holds |", "|---|---|---|---|---|"]
    for check in targets_check(rows, raw["kernel"]):
        lines.append(
            f"| {check['target']} | {check['least']}x | {check['best'] or '-'} | "
            f"{_x(check['ratio'])} | {'yes' if check['holds'] else 'no'} |"
        )
    if images:
        lines += ["", f"![ratio to loop]({images[0]})"]
    lines += _file_table(rows)
    lines += ["", "## Every job", ""]
    lines += [
        "| target | job | IOPS | MB/s | p50 us | p99 us | server CPU us/req | guest CPU us/req"
        " | vs loop | vs nbdkit-C |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    main = _main_rows(rows)
    for row in main:
        base_loop = _figure(main, LOOP, (row.job,))
        base_nbd = _figure(main, NBDKIT_C, (row.job,))
        lines.append(
            f"| {row.target} | {row.job} | {_fmt(row.iops)} | {_fmt(row.mbps, 1)} | "
            f"{_fmt(row.p50_us)} | {_fmt(row.p99_us)} | {_fmt(row.server_cpu_us)} | "
            f"{_fmt(row.guest_cpu_us)} | {_x(_ratio(row.figure, base_loop))} | "
            f"{_x(_ratio(row.figure, base_nbd))} |"
        )
    series = scaling(rows)
    if series:
        lines += ["", "## Scaling: 4k random read IOPS by queue depth", ""]
        lines += ["| series | " + " | ".join(f"QD{qd}" for qd in SCALE_QUEUE_DEPTHS) + " |"]
        lines += ["|---|" + "---|" * len(SCALE_QUEUE_DEPTHS)]
        for name, by_depth in series.items():
            cells = " | ".join(_fmt(by_depth.get(qd)) for qd in SCALE_QUEUE_DEPTHS)
            lines.append(f"| {name} | {cells} |")
        if images:
            lines += ["", f"![scaling]({images[1]})"]
    lines += _worker_scaling_table(raw, rows)
    lines += _loop_paired_table(raw)
    lines += _dispatch_table(raw)
    lines += _rounds_table(raw)
    lines += _slow_table(raw, rows)
    lines += _ceph_table(rows)
    by_batch = batching(rows)
    if by_batch:
        jobs = [job.name for job in BATCH_JOBS]
        lines += ["", "## Batching: one worker, memory backend, by requests per GET", ""]
        lines += ["| batch | " + " | ".join(f"{job} IOPS | server CPU us/req" for job in jobs) + " |"]
        lines += ["|---|" + "---|---|" * len(jobs)]
        for batch, entry in by_batch.items():
            cells = " | ".join(
                f"{_fmt(entry.get(job))} | {_fmt(entry.get(f'{job} server CPU us/req'))}" for job in jobs
            )
            lines.append(f"| {batch} | {cells} |")
    if raw.get("failures"):
        lines += ["", "## Failed targets", ""]
        lines += [f"- {name}: {why}" for name, why in raw["failures"].items()]
    return "\n".join(lines) + "\n"


def _holds(entry: dict[str, Any]) -> str:
    if "holds" not in entry:
        return "-"
    return "yes" if entry["holds"] else "no"


def _file_table(rows: list[Row]) -> list[str]:
    entries = file_vs_memory(rows)
    if not entries:
        return []
    lines = _section(
        f"File backend on tmpfs: in place ({FILE_IN_PLACE}) and by copy ({FILE_COPY}) "
        f"vs memory ({MEMORY_1W})",
        [
            "target",
            *[cell for label, _ in SUMMARY_COLUMNS for cell in (label, "vs memory", "worse of r/w")],
            "in place vs copy (4k QD32, 1M)",
            "holds",
        ],
        f"Ratios to {MEMORY_1W}: of the means of read and write, then the worse of the two; "
        f"the in-place target must reach {FILE_LEAST}x (the worse) at {' and '.join(FILE_JUDGED)}.",
    )
    for entry in entries:
        cells = []
        for label, _ in SUMMARY_COLUMNS:
            cell = entry[label]
            cells.append(f"{_fmt(cell['value'])} | {_x(cell['vs_memory'])} | {_x(cell['worst'])}")
        judged = [entry[label] for label in FILE_JUDGED]
        vs_copy = ", ".join(_x(cell.get("vs_copy")) for cell in judged) if "vs_copy" in judged[0] else "-"
        holds = "-"
        if any("holds" in cell for cell in judged):
            holds = "yes" if all(cell.get("holds") for cell in judged) else "no"
        lines.append(f"| {entry['target']} | " + " | ".join(cells) + f" | {vs_copy} | {holds} |")
    return lines


# (column, the driver's dispatch counters it adds up) of the dispatch table.
DISPATCH_COLUMNS = [
    ("wake-ups", ("wake_now", "wake_lazy", "wake_passed")),
    ("sleeps", ("sleeps",)),
    ("polls", ("polls",)),
    ("poll hits", ("poll_hits",)),
    ("deferred", ("deferred",)),
    ("GETs with a batch", ("batches",)),
]


def dispatch(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """What the driver did in the worker-scaling runs, per 1,000 requests.

    Per worker-scaling disk and job (the 1M sequential ones included), the
    median over the rounds of the counters of each DISPATCH_COLUMNS column
    (the disk's sysfs abuse/dispatch, read before and after each run by
    bench.guest).
    wake-ups counts the lazy ones asked for, some of which find nobody
    asleep.  Empty for a raw from before the counters were recorded.
    """
    scaled = {job.name for job in SCALE_JOBS}
    per_run: dict[tuple[str, str], list[dict[str, float]]] = {}
    for run in raw["runs"]:
        counters = run.get("dispatch")
        if not counters or not run["target"].startswith(SCALE_PREFIX) or run["job"] not in scaled:
            continue
        job = run["fio"]["jobs"][0]
        ios = sum(job[side]["total_ios"] for side in ("read", "write"))
        if not ios:
            continue
        per_run.setdefault((run["target"], run["job"]), []).append(
            {
                label: 1000 * sum(counters.get(name, 0) for name in names) / ios
                for label, names in DISPATCH_COLUMNS
            }
        )
    return [
        {
            "target": target,
            "job": job,
            "rounds": len(runs),
            **{label: statistics.median(r[label] for r in runs) for label, _ in DISPATCH_COLUMNS},
        }
        for (target, job), runs in per_run.items()
    ]


def _dispatch_table(raw: dict[str, Any]) -> list[str]:
    entries = dispatch(raw)
    if not entries:
        return []
    labels = [label for label, _ in DISPATCH_COLUMNS]
    lines = _section(
        "Driver dispatch in the worker-scaling runs, per 1,000 requests (median over the rounds)",
        ["target", "job", *labels],
        "From each disk's /sys/block/abuseN/abuse/dispatch counters, read before and after each run."
        " wake-ups counts lazy ones asked for, some of which find nobody asleep.",
    )
    for entry in entries:
        cells = " | ".join(_fmt(entry[label], 1) for label in labels)
        lines.append(f"| {entry['target']} | {entry['job']} | {cells} |")
    return lines


def _rounds_table(raw: dict[str, Any]) -> list[str]:
    ranges = spread(raw)
    if not ranges:
        return []
    lines = _section(
        "Rounds: jobs run in interleaved rounds (every table above shows the median)",
        ["target", "job", "rounds", "lowest", "highest", "highest / lowest"],
    )
    for (target, job), (low, high, count) in ranges.items():
        lines.append(f"| {target} | {job} | {count} | {_fmt(low)} | {_fmt(high)} | {_x(_ratio(high, low))} |")
    return lines


def _worker_scaling_table(raw: dict[str, Any], rows: list[Row]) -> list[str]:
    entries = worker_scaling(rows, per_round_ratios(raw), per_round_intervals(raw))
    if not entries:
        return []
    more = [w for w in SCALE_WORKERS if w != 1]
    lines = _section(
        "Worker scaling: memory backend, by workers, ratio to 1 worker",
        [
            "job",
            "unit",
            "1w",
            *[cell for w in more for cell in (f"{w}w", "vs 1w", "per round")],
            "least",
            "holds",
        ],
        f"Each worker count must reach {SCALING_LEAST_4K}x of 1 worker at 4k and {SCALING_LEAST_SEQ}x at 1M"
        " (per round: the geometric mean of the ratios inside each round, where the rig's drift cancels out,"
        " which is judged, and in brackets its interval of two standard errors either side, how far the rig's"
        " noise alone could carry it; vs 1w: the ratio of the medians, which can take two disks' figures from"
        " different minutes of the rig, shown).",
    )
    for entry in entries:
        cells = (
            _fmt(entry["workers"][1]["value"])
            + " | "
            + " | ".join(
                f"{_fmt(entry['workers'][w]['value'])} | {_x(entry['workers'][w]['vs_1w'])} | "
                f"{_x(entry['workers'][w]['per_round_vs_1w'])}{_interval(entry['workers'][w]['per_round_interval'])}"
                for w in more
            )
        )
        lines.append(f"| {entry['job']} | {entry['unit']} | {cells} | {entry['least']}x | {_holds(entry)} |")
    return lines


def _loop_paired_table(raw: dict[str, Any]) -> list[str]:
    entries = loop_paired(raw)
    if not entries:
        return []
    lines = _section(
        "Against loop, side by side: memory backend by workers, ratio to loop in the same round",
        ["target", *[f"{w}w" for w in SCALE_WORKERS], "best", "least", "holds"],
        "loop ran in the worker-scaling rounds; each cell is the worse of read and write of the geometric"
        " mean of the ratios inside each round. The best worker count must reach the least.",
    )
    for entry in entries:
        cells = " | ".join(_x(entry["workers"][w]) for w in SCALE_WORKERS)
        lines.append(
            f"| {entry['target']} ({', '.join(entry['jobs'])}) | {cells} | {entry['best']}w | "
            f"{entry['least']}x | {_holds(entry)} |"
        )
    return lines


def _slow_table(raw: dict[str, Any], rows: list[Row]) -> list[str]:
    entries = slow_backend(rows, raw.get("sleep_ceiling"))
    if not entries:
        return []
    ms = SLOW_DELAY_S * 1e3
    slow_runs = [runs for (target, _), runs in _runs(raw).items() if target.startswith("slow-")]
    rounds = max(map(len, slow_runs), default=1)
    median = f" IOPS and bare sleepers: the median of {rounds} interleaved rounds." if rounds > 1 else ""
    lines = _section(
        f"A backend that sleeps {ms:g} ms per request: {SLOW_JOB.name}, by workers",
        [
            "workers",
            "IOPS",
            "p50 ms",
            "ideal IOPS",
            "vs ideal",
            "vs 1w",
            "bare sleepers /s",
            "vs sleepers",
            "holds",
        ],
        f"Ideal: min(workers, QD{SLOW_JOB.queue_depth}) requests per {ms:g} ms. The most workers must reach "
        f"{SLOW_LEAST_IDEAL}x of the ideal and {SLOW_LEAST_VS_1W:g}x of 1 worker. Bare sleepers: as many"
        f" processes that only sleep {ms:g} ms, in the same boot (this rig's ceiling; not judged).{median}",
    )
    for entry in entries:
        lines.append(
            f"| {entry['workers']} | {_fmt(entry['iops'])} | {_fmt(entry['p50_ms'], 1)} | "
            f"{_fmt(entry['ideal'])} | {_x(entry['vs_ideal'])} | {_x(entry['vs_1w'])} | "
            f"{_fmt(entry['sleepers'])} | {_x(entry['vs_sleepers'])} | {_holds(entry)} |"
        )
    return lines


def _summary_table(rows: list[Row]) -> list[str]:
    head = (
        "| target | " + " | ".join(f"{label} | vs loop | vs nbdkit-C" for label, _ in SUMMARY_COLUMNS) + " |"
    )
    lines = [head, "|---|" + "---|---|---|" * len(SUMMARY_COLUMNS)]
    for entry in summary(rows):
        cells = []
        for label, _ in SUMMARY_COLUMNS:
            cell = entry[label]
            cells.append(f"{_fmt(cell['value'])} | {_x(cell['vs_loop'])} | {_x(cell['vs_nbdkit_c'])}")
        lines.append(f"| {entry['target']} | " + " | ".join(cells) + " |")
    return lines


def charts(rows: list[Row], bars: Path, lines: Path) -> None:
    """Bar chart of every job's ratio to loop; line chart of the scaling runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = _main_rows(rows)
    names = [t for t in _targets(main) if t != LOOP]
    jobs = [job.name for job in JOBS]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(names), 1)
    for i, target in enumerate(names):
        ratios = [_ratio(_figure(main, target, (job,)), _figure(main, LOOP, (job,))) or 0.0 for job in jobs]
        ax.bar([j + i * width for j in range(len(jobs))], ratios, width, label=target)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(jobs))], jobs, fontsize=8)
    ax.set_ylabel("ratio to loop over tmpfs (higher is better)")
    ax.set_title("abuse and its peers, relative to loop, same boot")
    if names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(bars, dpi=100)
    plt.close(fig)

    series = scaling(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_depth in series.items():
        depths = sorted(by_depth)
        ax.plot(depths, [by_depth[d] for d in depths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(SCALE_QUEUE_DEPTHS), [str(d) for d in SCALE_QUEUE_DEPTHS])
    ax.set_xlabel("queue depth")
    ax.set_ylabel("4k random read IOPS")
    ax.set_title(f"abuse memory backend: workers {', '.join(map(str, SCALE_WORKERS))}")
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(lines, dpi=100)
    plt.close(fig)


def replace_readme_block(readme: str, block: str, series: str) -> str:
    """``readme`` with the text between ``series``' bench markers set to ``block``."""
    start, end = README_START.format(series=series), README_END.format(series=series)
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise ValueError(f"README has no {start} ... {end} block")
    return pattern.sub(lambda _: f"{start}\n{block}{end}", readme)


def readme_block(raw: dict[str, Any], rows: list[Row], stem: str) -> str:
    """One kernel's block of the README's Benchmarks section.

    A heading per kernel and the report's tables a level below it, so
    that both kernels' blocks nest under "Benchmarks"; the per-round
    spread (dozens of rows) stays in the full report.
    """
    lines = [
        f"### Kernel {raw['kernel']}",
        "",
        f"{raw['date']}, {raw['runtime_s']} s per job, {_load(raw)}; "
        f"full report: [bench/results/{stem}.md](bench/results/{stem}.md).",
        "",
    ]
    lines += _summary_table(rows)
    tables = _file_table(rows) + _worker_scaling_table(raw, rows)
    tables += _loop_paired_table(raw) + _slow_table(raw, rows)
    lines += ["####" + line[2:] if line.startswith("## ") else line for line in tables]
    lines += [
        "",
        f"![ratio to loop](bench/results/{stem}.png)",
        f"![scaling](bench/results/{stem}-scaling.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.report")
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--readme", type=Path, help="README to update")
    args = parser.parse_args(argv)

    raw = json.loads((args.raw_dir / "raw.json").read_text())
    for when in ("before", "after"):
        path = args.raw_dir / f"host-load-{when}"
        if path.exists():
            raw[f"host_load_{when}"] = " ".join(path.read_text().split()[:3])
    speed = args.raw_dir / "host-speed"
    if speed.exists():
        raw["host_speed"] = speed.read_text().strip()
    rows = rows_from_raw(raw)
    stem = f"{raw['date'][:16].replace(' ', '-').replace(':', '')}-{raw['kernel']}"
    args.results.mkdir(parents=True, exist_ok=True)
    charts(rows, args.results / f"{stem}.png", args.results / f"{stem}-scaling.png")
    report = markdown(raw, rows, (f"{stem}.png", f"{stem}-scaling.png"))
    (args.results / f"{stem}.md").write_text(report)
    meta = {key: value for key, value in raw.items() if key != "runs"}
    document = {
        **meta,
        "summary": summary(rows),
        "targets": targets_check(rows, raw["kernel"]),
        "scaling": scaling(rows),
        "worker_scaling": worker_scaling(rows, per_round_ratios(raw), per_round_intervals(raw)),
        "loop_paired": loop_paired(raw),
        "dispatch": dispatch(raw),
        "file_vs_memory": file_vs_memory(rows),
        "slow_backend": slow_backend(rows, raw.get("sleep_ceiling")),
        "batching": batching(rows),
        "runs": [asdict(row) for row in rows],
    }
    (args.results / f"{stem}.json").write_text(json.dumps(document, indent=1) + "\n")
    if args.readme:
        block = readme_block(raw, rows, stem)
        series = kernel_series(raw["kernel"])
        args.readme.write_text(replace_readme_block(args.readme.read_text(), block, series))
    sys.stdout.write(report)
    print(f"bench: wrote {args.results}/{stem}.md, .json, .png, -scaling.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
