"""The fio jobs of the benchmark, shared by the guest runner and the report."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BATCH_JOBS",
    "BATCH_SIZES",
    "CEPH_JOBS",
    "JOBS",
    "SCALE_JOBS",
    "SCALE_QUEUE_DEPTHS",
    "SCALE_WORKERS",
    "SLOW_DELAY_S",
    "SLOW_JOB",
    "SLOW_ROUNDS",
    "SLOW_WORKERS",
    "WORKER_SCALING_JOBS",
    "Job",
    "scale_job",
]


@dataclass(frozen=True)
class Job:
    """One fio job: direct I/O through io_uring for a fixed time."""

    name: str
    rw: str
    block_size: str
    queue_depth: int

    @property
    def sequential(self) -> bool:
        return not self.rw.startswith("rand")


# Every device is written whole before its jobs (bench.guest.prefill).
JOBS = [
    Job("seqwrite-1M-qd4", "write", "1M", 4),
    Job("seqread-1M-qd4", "read", "1M", 4),
    Job("randwrite-4k-qd32", "randwrite", "4k", 32),
    Job("randread-4k-qd32", "randread", "4k", 32),
    Job("randwrite-4k-qd1", "randwrite", "4k", 1),
    Job("randread-4k-qd1", "randread", "4k", 1),
]

SCALE_WORKERS = (1, 2, 4)
# The batching figure: one worker at QD32, 1 to 64 requests per GET.
BATCH_SIZES = (1, 4, 16, 64)
BATCH_JOBS = [job for job in JOBS if job.name in ("randread-4k-qd32", "randwrite-4k-qd32")]
SCALE_QUEUE_DEPTHS = (1, 8, 32, 128)


def scale_job(queue_depth: int, rw: str = "randread") -> Job:
    """The scaling figure's job: 4k random I/O (reads by default) at ``queue_depth``."""
    return Job(f"{rw}-4k-qd{queue_depth}", rw, "4k", queue_depth)


# The worker-scaling table (issue 12): memory disks with 1, 2 and 4
# workers, each judged against one worker on the same job.
WORKER_SCALING_JOBS = [
    scale_job(32),
    scale_job(128),
    scale_job(32, "randwrite"),
    scale_job(128, "randwrite"),
    *[job for job in JOBS if job.sequential],
]
# Every scaling series (loop's too) runs the read depths of the figure,
# then the rest of the worker-scaling table, then the write at QD1: the
# targets against loop (bench.report.LOOP_PAIRED) are judged in its rounds.
_SCALE_READS = [scale_job(qd) for qd in SCALE_QUEUE_DEPTHS]
SCALE_JOBS = [
    *_SCALE_READS,
    *[job for job in WORKER_SCALING_JOBS if job not in _SCALE_READS],
    scale_job(1, "randwrite"),
]

# A backend that waits (bench/slow_backend.py): each read sleeps this
# long, served by 1, 4 and 16 workers at QD32.
SLOW_DELAY_S = 0.005
SLOW_WORKERS = (1, 4, 16)
SLOW_JOB = Job("randread-4k-qd32", "randread", "4k", 32)
# Each slow cell, and the bare sleepers beside it, is measured this many
# times, interleaved, and the report takes the median run, so that one
# slow minute of the rig does not decide it.  (Three runs in one boot
# stayed within 1%; three boots of the same tree on 6.1 gave 2,487-2,599
# IOPS: between boots the rig moves more, as the guest's speed figures say.)
SLOW_ROUNDS = 3

# The ceph group: abuse rbd: with 1 and 4 workers, rbd-nbd and krbd on
# one single-node cluster (memstore OSD), each judged against krbd.
CEPH_JOBS = JOBS  # the same six jobs as every device
