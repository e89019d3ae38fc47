"""How disks are shown: flag words, status rows, aligned tables."""

from __future__ import annotations

from abuse import uapi
from abuse.control import DiskInfo
from abuse.sizes import format_size

__all__ = ["TABLE_COLUMNS", "disk_record", "flag_words", "table", "table_row"]

#: Header of ``abusectl status``; counters are named as in struct abuse_counters.
TABLE_COLUMNS = (
    "INDEX",
    "PATH",
    "SIZE",
    "BS",
    "FLAGS",
    "QUEUED",
    "IN_FLIGHT",
    "COMPLETED",
    "ERRORS",
    "REQUEUED",
    "ATTACHED",
    "PIDS",
)
_COUNTERS = ("queued", "in_flight", "completed", "errors", "requeued", "attached")


def flag_words(flags: int) -> list[str]:
    """ABUSE_F_* bits as words (``read-only``, ``flush``, ...); unknown bits in hex.

    The words come from the header's macro names (abuse.uapi.DISK_FEATURES).
    """
    return uapi.feature_names(flags, uapi.DISK_FEATURES)


def disk_record(info: DiskInfo, workers: list[int] | None = None) -> dict[str, object]:
    """One disk as a JSON-ready dict: config, flag words, every counter, serving pids.

    ``workers`` is None when the module does not say who serves the disk.
    """
    config = info.config
    return {
        "index": config.index,
        "path": config.path,
        "size": config.size,
        "block_size": config.block_size,
        "flags": flag_words(config.flags),
        "queue_depth": config.queue_depth,
        "max_request_bytes": config.max_request_bytes,
        "timeout_ms": config.timeout_ms,
        "retries": config.retries,
        **info.counters,
        "workers": workers,
    }


def table_row(info: DiskInfo, workers: list[int] | None = None) -> list[str]:
    """One disk as the cells of :data:`TABLE_COLUMNS`."""
    config = info.config
    flags = ",".join(flag_words(config.flags)) or "-"
    cells = [str(config.index), config.path, format_size(config.size), str(config.block_size), flags]
    pids = ",".join(map(str, workers)) if workers else "-"
    return cells + [str(info.counters.get(name, 0)) for name in _COUNTERS] + [pids]


def table(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    """Lines of an aligned table: text columns left, numeric columns right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    numeric = [bool(rows) and all(row[i].isdigit() for row in rows) for i in range(len(header))]
    lines = []
    for row in [list(header), *rows]:
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
