"""bench.report: rows, ratios, targets and files from canned fio output."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.jobs import BATCH_JOBS, JOBS

CANNED = json.loads((Path(__file__).parent / "data" / "fio-randread.json").read_text())
CANNED_IOPS = CANNED["jobs"][0]["read"]["iops"]


def fio_output(job: str, scale: float) -> dict[str, Any]:
    """The canned fio run, renamed to ``job`` and with throughput times ``scale``."""
    out = copy.deepcopy(CANNED)
    side = out["jobs"][0]["read"]
    for key in ("iops", "bw_bytes", "io_bytes", "total_ios"):
        side[key] = side[key] * scale
    out["jobs"][0]["jobname"] = job
    return out


def raw_result(scales: dict[str, float], scaling: bool = True) -> dict[str, Any]:
    runs = []
    for target, scale in scales.items():
        for job in JOBS:
            runs.append(
                {
                    "target": target,
                    "job": job.name,
                    "fio": fio_output(job.name, scale),
                    "server_cpu_s": None if target == "loop" else 2.0,
                    "guest_busy_cpu_s": 4.0,
                }
            )
    if scaling:
        for qd, scale in ((1, 1.0), (32, 3.0)):
            runs.append(
                {
                    "target": "scale-abuse-mem-2w",
                    "job": f"randread-4k-qd{qd}",
                    "fio": fio_output(f"randread-4k-qd{qd}", scale),
                    "server_cpu_s": 1.0,
                    "guest_busy_cpu_s": 1.0,
                }
            )
        for batch, scale in ((1, 0.5), (64, 2.0)):
            for job in BATCH_JOBS:
                runs.append(
                    {
                        "target": f"batch-{batch}",
                        "job": job.name,
                        "fio": fio_output(job.name, scale),
                        "server_cpu_s": 1.0,
                        "guest_busy_cpu_s": 1.0,
                    }
                )
    return {
        "kernel": "6.1.0-test",
        "cpus": 2,
        "runtime_s": 10,
        "size": 1 << 30,
        "batch": 64,
        "date": "2026-01-02 03:04:05",
        "runs": runs,
    }


def test_row_reads_fio_json() -> None:
    (row, *_) = report.rows_from_raw(raw_result({"loop": 1.0}))
    total_ios = CANNED["jobs"][0]["read"]["total_ios"]
    assert row.iops == pytest.approx(CANNED_IOPS)
    assert row.mbps == pytest.approx(CANNED["jobs"][0]["read"]["bw_bytes"] / 1e6)
    assert row.p50_us == pytest.approx(27.776)
    assert row.p99_us == pytest.approx(125.44)
    assert row.server_cpu_us is None  # loop has no server process
    assert row.guest_cpu_us == pytest.approx(4.0e6 / total_ios)


def test_ratios_to_loop_and_nbdkit() -> None:
    rows = report.rows_from_raw(raw_result({"abuse-mem-1w": 0.5, "loop": 1.0, "nbdkit-c": 0.25}))
    (abuse, *_) = report.summary(rows)
    cell = abuse["4k QD32 IOPS"]
    assert cell["value"] == pytest.approx(CANNED_IOPS * 0.5)
    assert cell["vs_loop"] == pytest.approx(0.5)
    assert cell["vs_nbdkit_c"] == pytest.approx(2.0)


def test_targets_judge_the_best_abuse_memory_target() -> None:
    rows = report.rows_from_raw(raw_result({"abuse-mem-1w": 0.35, "abuse-mem-2w": 0.45, "loop": 1.0}))
    checks = {check["target"]: check for check in report.targets_check(rows, "6.1.0-56-amd64")}
    qd32 = checks["4k QD32 random read and write IOPS"]
    assert (qd32["best"], qd32["holds"], qd32["least"]) == ("abuse-mem-2w", True, 0.3)
    assert qd32["ratio"] == pytest.approx(0.45)
    assert not checks["1M sequential read and write MB/s"]["holds"]  # 0.45 < 0.5
    assert checks["4k QD1 IOPS"]["holds"]


def test_on_6_12_qd32_must_be_level_with_ublk() -> None:
    rows = report.rows_from_raw(raw_result({"abuse-mem-1w": 0.45, "loop": 1.0}))
    checks = {check["target"]: check for check in report.targets_check(rows, "6.12.107+deb13-amd64")}
    qd32 = checks["4k QD32 random read and write IOPS"]
    assert (qd32["least"], qd32["holds"]) == (0.6, False)
    assert checks["4k QD1 IOPS"]["least"] == 0.4


def test_missing_loop_gives_no_ratio() -> None:
    rows = report.rows_from_raw(raw_result({"abuse-mem-1w": 1.0}))
    assert report.summary(rows)[0]["4k QD1 IOPS"]["vs_loop"] is None
    assert not any(check["holds"] for check in report.targets_check(rows, "6.1.0-56-amd64"))


def test_markdown_has_every_target_and_the_scaling_table() -> None:
    raw = raw_result({"abuse-mem-1w": 0.5, "loop": 1.0, "nbdkit-c": 0.25})
    raw["host_load_before"] = "0.10 0.20 0.30"
    text = report.markdown(raw, report.rows_from_raw(raw))
    assert "| abuse-mem-1w | " in text and "| nbdkit-c | " in text
    assert "0.50x" in text and "2.00x" in text
    assert "host loadavg before `0.10 0.20 0.30`" in text
    assert "| abuse-mem-2w | " in text  # scaling series
    assert "scale-" not in text and "batch-" not in text


def test_batching_reports_iops_and_cpu_per_request_by_batch_size() -> None:
    rows = report.rows_from_raw(raw_result({"loop": 1.0}))
    by_batch = report.batching(rows)
    assert list(by_batch) == [1, 64]
    total_ios = CANNED["jobs"][0]["read"]["total_ios"]
    assert by_batch[64]["randwrite-4k-qd32"] == pytest.approx(CANNED_IOPS * 2.0)
    assert by_batch[1]["randread-4k-qd32 server CPU us/req"] == pytest.approx(1e6 / (total_ios * 0.5))
    assert [s["target"] for s in report.summary(rows)] == ["loop"]  # not in the main table
    text = report.markdown(raw_result({"loop": 1.0}), rows)
    assert "## Batching" in text and "| 64 | " in text


def test_main_writes_markdown_json_charts_and_readme(tmp_path: Path) -> None:
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    (raw_dir / "raw.json").write_text(json.dumps(raw_result({"abuse-mem-1w": 0.5, "loop": 1.0})))
    (raw_dir / "host-load-before").write_text("0.01 0.02 0.03 1/100 42\n")
    readme = tmp_path / "README.md"
    start, end = (marker.format(series="6.1") for marker in (report.README_START, report.README_END))
    other = "<!-- bench:start 6.12 -->\nkept\n<!-- bench:end 6.12 -->\n"
    readme.write_text(f"intro\n{start}\nold\n{end}\n{other}rest\n")
    results = tmp_path / "results"
    assert report.main([str(raw_dir), "--results", str(results), "--readme", str(readme)]) == 0

    stem = "2026-01-02-0304-6.1.0-test"
    document = json.loads((results / f"{stem}.json").read_text())
    assert document["host_load_before"] == "0.01 0.02 0.03"
    assert document["summary"][0]["4k QD1 IOPS"]["vs_loop"] == pytest.approx(0.5)
    assert len(document["runs"]) == 2 * len(JOBS) + 2 + 2 * len(BATCH_JOBS)
    assert list(document["batching"]) == ["1", "64"]
    for suffix in (".png", "-scaling.png"):
        assert (results / f"{stem}{suffix}").read_bytes().startswith(b"\x89PNG")
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "kept" in text  # the 6.12 block is another kernel's: left alone
    assert f"bench/results/{stem}.png" in text


def test_readme_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="bench:start"):
        report.replace_readme_block("no block here", "x", "6.1")
