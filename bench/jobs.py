"""The fio jobs of the benchmark, shared by the guest runner and the report."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BATCH_JOBS", "BATCH_SIZES", "JOBS", "SCALE_QUEUE_DEPTHS", "SCALE_WORKERS", "Job", "scale_job"]


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


def scale_job(queue_depth: int) -> Job:
    """The scaling figure's job: 4k random reads at ``queue_depth``."""
    return Job(f"randread-4k-qd{queue_depth}", "randread", "4k", queue_depth)
