"""bench.report: rows, ratios, targets and files from canned fio output."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.jobs import BATCH_JOBS, CEPH_JOBS, JOBS, SCALE_JOBS, SLOW_DELAY_S, WORKER_SCALING_JOBS

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
    raw = raw_result({"abuse-mem-1w": 0.5, "loop": 1.0})
    raw.update(guest_speed_before=4.56, guest_speed_after=7.89)
    (raw_dir / "raw.json").write_text(json.dumps(raw))
    (raw_dir / "host-load-before").write_text("0.01 0.02 0.03 1/100 42\n")
    (raw_dir / "host-speed").write_text("0.93\n")
    readme = tmp_path / "README.md"
    start, end = (marker.format(series="6.1") for marker in (report.README_START, report.README_END))
    other = "<!-- bench:start 6.12 -->\nkept\n<!-- bench:end 6.12 -->\n"
    readme.write_text(f"intro\n{start}\nold\n{end}\n{other}rest\n")
    results = tmp_path / "results"
    assert report.main([str(raw_dir), "--results", str(results), "--readme", str(readme)]) == 0

    stem = "2026-01-02-0304-6.1.0-test"
    document = json.loads((results / f"{stem}.json").read_text())
    assert document["host_load_before"] == "0.01 0.02 0.03"
    assert document["host_speed"] == "0.93"
    header = (results / f"{stem}.md").read_text()
    assert "host speed probe 0.93 s" in header
    assert "the same loop in the guest 4.56 s before the jobs, 7.89 s after" in header
    assert "median of" not in header  # a raw from before medians: one timing each
    assert document["summary"][0]["4k QD1 IOPS"]["vs_loop"] == pytest.approx(0.5)
    assert len(document["runs"]) == 2 * len(JOBS) + 2 + 2 * len(BATCH_JOBS)
    assert list(document["batching"]) == ["1", "64"]
    for suffix in (".png", "-scaling.png"):
        assert (results / f"{stem}{suffix}").read_bytes().startswith(b"\x89PNG")
    text = readme.read_text()
    assert "\nold\n" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "kept" in text  # the 6.12 block is another kernel's: left alone
    assert f"bench/results/{stem}.png" in text


def test_readme_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="bench:start"):
        report.replace_readme_block("no block here", "x", "6.1")


def _run(target: str, job: str, scale: float) -> dict[str, Any]:
    return {
        "target": target,
        "job": job,
        "fio": fio_output(job, scale),
        "server_cpu_s": 1.0,
        "guest_busy_cpu_s": 1.0,
    }


def _with_p50(run: dict[str, Any], p50_us: float) -> dict[str, Any]:
    run["fio"]["jobs"][0]["read"]["clat_ns"]["percentile"]["50.000000"] = p50_us * 1e3
    return run


def _file_raw(in_place: float, copy: float) -> dict[str, Any]:
    """Memory at 1.0, the file targets at ``in_place`` and ``copy`` of it;
    the in-place file's 1M write at 0.7 whatever ``in_place`` says."""
    raw = raw_result({"abuse-mem-1w": 1.0, "loop": 1.0}, scaling=False)
    for job in JOBS:
        scale = 0.7 if job.name == "seqwrite-1M-qd4" else in_place
        raw["runs"].append(_run(report.FILE_IN_PLACE, job.name, scale))
        raw["runs"].append(_run(report.FILE_COPY, job.name, copy))
    return raw


def test_file_in_place_is_judged_against_memory_by_the_worse_of_read_and_write() -> None:
    rows = report.rows_from_raw(_file_raw(in_place=0.9, copy=0.3))
    entries = {entry["target"]: entry for entry in report.file_vs_memory(rows)}
    assert list(entries) == [report.FILE_IN_PLACE, report.FILE_COPY]
    qd32 = entries[report.FILE_IN_PLACE]["4k QD32 IOPS"]
    assert qd32["vs_memory"] == pytest.approx(0.9)
    assert qd32["worst"] == pytest.approx(0.9)
    assert qd32["vs_copy"] == pytest.approx(3.0)
    assert (qd32["least"], qd32["holds"]) == (0.8, True)
    seq = entries[report.FILE_IN_PLACE]["1M seq MB/s"]
    assert seq["vs_memory"] == pytest.approx(0.8)  # the mean of 0.9 and 0.7 ...
    assert seq["worst"] == pytest.approx(0.7)  # ... but the write alone is short
    assert seq["holds"] is False
    assert "holds" not in entries[report.FILE_IN_PLACE]["4k QD1 IOPS"]  # not judged
    assert "holds" not in entries[report.FILE_COPY]["4k QD32 IOPS"]
    # Neither in the main table's targets check (memory only) nor lost from it.
    assert [s["target"] for s in report.summary(rows)][-2:] == [report.FILE_IN_PLACE, report.FILE_COPY]


def test_file_table_in_markdown_and_readme() -> None:
    raw = _file_raw(in_place=0.9, copy=0.3)
    rows = report.rows_from_raw(raw)
    for text in (report.markdown(raw, rows), report.readme_block(raw, rows, "stem")):
        assert "## File backend on tmpfs" in text
        line = next(
            line
            for line in text.splitlines()
            if line.startswith(f"| {report.FILE_IN_PLACE} | ") and "3.00x" in line
        )
        assert "0.70x" in line and line.endswith("| 3.00x, 2.67x | no |")


def _slow_raw(iops_by_workers: dict[int, float], p50_us: float = 5200.0) -> dict[str, Any]:
    raw = raw_result({"loop": 1.0}, scaling=False)
    for workers, iops in iops_by_workers.items():
        run = _with_p50(_run(f"slow-{workers}w", "randread-4k-qd32", iops / CANNED_IOPS), p50_us)
        raw["runs"].append(run)
    return raw


def test_slow_backend_against_the_ideal_and_one_worker() -> None:
    rows = report.rows_from_raw(_slow_raw({1: 195.0, 4: 780.0, 16: 2900.0}))
    entries = report.slow_backend(rows)
    assert [e["workers"] for e in entries] == [1, 4, 16]
    one, four, sixteen = entries
    assert one["ideal"] == pytest.approx(200.0)
    assert four["ideal"] == pytest.approx(800.0)
    assert sixteen["ideal"] == pytest.approx(3200.0)  # 16 workers / 5 ms, under QD32
    assert sixteen["vs_ideal"] == pytest.approx(2900.0 / 3200.0)
    assert sixteen["vs_1w"] == pytest.approx(2900.0 / 195.0)
    assert sixteen["p50_ms"] == pytest.approx(5.2)
    assert sixteen["holds"] is True
    assert "holds" not in one and "holds" not in four
    assert not any(row.target.startswith("slow-") for row in report._main_rows(rows))


def test_slow_backend_fails_short_of_the_ideal_or_of_ten_times_one_worker() -> None:
    (*_, short) = report.slow_backend(report.rows_from_raw(_slow_raw({1: 195.0, 16: 2322.0})))
    assert short["holds"] is False  # 0.73 of the ideal
    (*_, flat) = report.slow_backend(report.rows_from_raw(_slow_raw({1: 300.0, 16: 2600.0})))
    assert flat["vs_ideal"] >= 0.8 and flat["holds"] is False  # only 8.7x of one worker


def test_slow_table_in_markdown_json_and_readme(tmp_path: Path) -> None:
    raw = _slow_raw({1: 195.0, 4: 780.0, 16: 2900.0})
    rows = report.rows_from_raw(raw)
    for text in (report.markdown(raw, rows), report.readme_block(raw, rows, "stem")):
        assert "## A backend that sleeps 5 ms per request" in text
        assert "| 16 | 2,900 | 5.2 | 3,200 | 0.91x | 14.87x | - | - | yes |" in text
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    (raw_dir / "raw.json").write_text(json.dumps(raw))
    assert report.main([str(raw_dir), "--results", str(tmp_path / "results")]) == 0
    (document,) = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    assert [e["workers"] for e in document["slow_backend"]] == [1, 4, 16]


def test_slow_backend_beside_as_many_bare_sleepers(tmp_path: Path) -> None:
    raw = _slow_raw({1: 165.0, 16: 2376.0})
    raw["sleep_ceiling"] = {"1": 160.0, "4": 644.0, "16": 2267.0}
    one, sixteen = report.slow_backend(report.rows_from_raw(raw), raw["sleep_ceiling"])
    assert sixteen["sleepers"] == 2267.0 and sixteen["vs_sleepers"] == pytest.approx(2376.0 / 2267.0)
    assert sixteen["holds"] is False  # 0.74 of the ideal: the ceiling is shown, never judged
    assert "| 16 | 2,376 | 5.2 | 3,200 | 0.74x | 14.40x | 2,267 | 1.05x | no |" in report.markdown(
        raw, report.rows_from_raw(raw)
    )
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    assert report.main([str(tmp_path), "--results", str(tmp_path / "out")]) == 0
    document = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert document["slow_backend"][1]["vs_sleepers"] == pytest.approx(2376.0 / 2267.0)


def test_bare_sleepers_never_beat_the_ideal() -> None:
    from bench.sleep_ceiling import sleeps_per_second

    rate = sleeps_per_second(2, 0.2, SLOW_DELAY_S)
    assert 0 < rate <= 2 / SLOW_DELAY_S  # each sleep takes at least its delay
    with pytest.raises(ValueError, match="bad processes 0"):
        sleeps_per_second(0, 0.2, SLOW_DELAY_S)


def test_a_sleeper_that_never_reports_is_an_error_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import sleep_ceiling

    # Forked after the patch, the sleepers return without reporting (as one that died would).
    monkeypatch.setattr(sleep_ceiling, "_sleep_until", lambda deadline, delay, counts: None)
    monkeypatch.setattr(sleep_ceiling, "REPORT_GRACE_S", 0.5)
    with pytest.raises(RuntimeError, match="a sleeper did not report within 0.5 s of its deadline"):
        sleep_ceiling.sleeps_per_second(2, 0.1, SLOW_DELAY_S)


def _scaling_raw(scales: dict[int, dict[str, float]]) -> dict[str, Any]:
    raw = raw_result({"loop": 1.0}, scaling=False)
    for workers, by_job in scales.items():
        for job in WORKER_SCALING_JOBS:
            raw["runs"].append(_run(f"scale-abuse-mem-{workers}w", job.name, by_job.get(job.name, 1.0)))
        raw["runs"].append(_run(f"scale-abuse-mem-{workers}w", "randread-4k-qd1", 0.1))
    return raw


def test_worker_scaling_reports_every_job_against_one_worker() -> None:
    raw = _scaling_raw({1: {}, 2: {"randwrite-4k-qd128": 0.85}, 4: {"seqread-1M-qd4": 0.95}})
    entries = {e["job"]: e for e in report.worker_scaling(report.rows_from_raw(raw))}
    assert list(entries) == [job.name for job in WORKER_SCALING_JOBS]
    assert {"randread-4k-qd32", "randread-4k-qd128", "randwrite-4k-qd32", "randwrite-4k-qd128"} <= set(
        entries
    )
    assert {"seqread-1M-qd4", "seqwrite-1M-qd4"} <= set(entries)
    assert entries["randread-4k-qd32"]["holds"] is True
    assert entries["randwrite-4k-qd128"]["workers"][2]["vs_1w"] == pytest.approx(0.85)
    assert entries["randwrite-4k-qd128"]["holds"] is False  # < 0.9
    assert entries["seqread-1M-qd4"]["unit"] == "MB/s"
    assert entries["seqread-1M-qd4"]["least"] == 1.0
    assert entries["seqread-1M-qd4"]["holds"] is False  # 4 workers at 0.95 of one
    assert entries["seqwrite-1M-qd4"]["holds"] is True


def test_worker_scaling_leaves_the_queue_depth_figure_to_reads() -> None:
    raw = _scaling_raw({1: {"randwrite-4k-qd32": 5.0}, 2: {}})
    series = report.scaling(report.rows_from_raw(raw))
    assert series["abuse-mem-1w"][32] == pytest.approx(CANNED_IOPS)  # the read, not the write
    assert sorted(series["abuse-mem-1w"]) == [1, 32, 128]


def test_worker_scaling_table_in_markdown_and_readme() -> None:
    raw = _scaling_raw({1: {}, 2: {"randwrite-4k-qd128": 0.85}, 4: {}})
    rows = report.rows_from_raw(raw)
    for text in (report.markdown(raw, rows), report.readme_block(raw, rows, "stem")):
        assert "## Worker scaling: memory backend" in text
        line = next(line for line in text.splitlines() if line.startswith("| randwrite-4k-qd128 | IOPS | "))
        assert "0.85x" in line and line.endswith("| 0.9x | no |")
        assert "| seqwrite-1M-qd4 | MB/s | " in text


def test_per_round_ratios_pair_each_round_with_one_workers_same_round(tmp_path: Path) -> None:
    raw = raw_result({"loop": 1.0}, scaling=False)
    # Three rounds, each job on each disk in turn; the rig drifts 4x, and
    # the 2-worker disk's last round fell at a slow moment (0.3x).
    for one, two in ((1.0, 0.9), (2.0, 1.8), (4.0, 1.2)):
        raw["runs"] += [
            _run("scale-abuse-mem-1w", "randread-4k-qd32", one),
            _run("scale-abuse-mem-2w", "randread-4k-qd32", two),
        ]
    assert report.per_round_ratios(raw) == {
        ("randread-4k-qd32", 2): pytest.approx((0.9 * 0.9 * 0.3) ** (1 / 3))
    }
    entry = report.worker_scaling(report.rows_from_raw(raw), report.per_round_ratios(raw))[0]
    assert entry["workers"][2]["vs_1w"] == pytest.approx(0.6)  # the medians: 1.2 against 2.0, shown
    assert entry["workers"][2]["per_round_vs_1w"] == pytest.approx(0.624, abs=1e-3)
    assert entry["workers"][2]["judged"] == pytest.approx(0.624, abs=1e-3)
    assert entry["holds"] is False
    line = next(
        line
        for line in report.markdown(raw, report.rows_from_raw(raw)).splitlines()
        if line.startswith("| randread-4k-qd32 | IOPS | ")
    )
    # The three rounds' spread (0.9, 0.9, 0.3) puts the ratio anywhere in 0.30-1.30x.
    assert "| 0.60x | 0.62x (0.30-1.30) |" in line
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    assert report.main([str(tmp_path), "--results", str(tmp_path / "out")]) == 0
    document = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert document["worker_scaling"][0]["workers"]["2"]["per_round_vs_1w"] == pytest.approx(0.624, abs=1e-3)
    interval = document["worker_scaling"][0]["workers"]["2"]["per_round_interval"]
    assert interval == pytest.approx([0.300, 1.298], abs=1e-3)


def test_per_round_intervals_are_two_geometric_standard_errors_either_side() -> None:
    raw = raw_result({"loop": 1.0}, scaling=False)
    for one, two, four in ((1.0, 0.8, 1.0), (2.0, 2.0, 2.0), (1.0, 1.25, 1.0)):
        raw["runs"] += [
            _run("scale-abuse-mem-1w", "randread-4k-qd32", one),
            _run("scale-abuse-mem-2w", "randread-4k-qd32", two),
            _run("scale-abuse-mem-4w", "randread-4k-qd32", four),
        ]
    raw["runs"] += [
        _run("scale-abuse-mem-1w", "randwrite-4k-qd32", 1.0),
        _run("scale-abuse-mem-2w", "randwrite-4k-qd32", 0.9),
    ]
    intervals = report.per_round_intervals(raw)
    # 2 workers: ratios 0.8, 1.0, 1.25, logs -a, 0, +a: mean 1.0, standard error a / sqrt(3).
    spread = math.exp(2 * math.log(1.25) / math.sqrt(3))
    assert intervals[("randread-4k-qd32", 2)] == pytest.approx((1 / spread, spread))
    assert intervals[("randread-4k-qd32", 4)] == pytest.approx((1.0, 1.0))  # no spread, no doubt
    assert ("randwrite-4k-qd32", 2) not in intervals  # one round says nothing of the noise


def test_worker_scaling_judges_the_ratios_inside_the_rounds_not_the_medians() -> None:
    raw = raw_result({"loop": 1.0}, scaling=False)
    # The rig runs at 1x, 2x and 3x in three rounds; 2 workers reach 1.5x,
    # 0.8x and 0.8x of one worker in them (0.99x on the whole), but their
    # median (1.6) and one worker's (2.0) come from different rounds: 0.8x.
    for one, two in ((1.0, 1.5), (2.0, 1.6), (3.0, 2.4)):
        raw["runs"] += [
            _run("scale-abuse-mem-1w", "randread-4k-qd32", one),
            _run("scale-abuse-mem-2w", "randread-4k-qd32", two),
        ]
    entry = report.worker_scaling(report.rows_from_raw(raw), report.per_round_ratios(raw))[0]
    assert entry["workers"][2]["vs_1w"] == pytest.approx(0.8)
    assert entry["workers"][2]["judged"] == pytest.approx((1.5 * 0.8 * 0.8) ** (1 / 3))
    assert entry["holds"] is True
    # Without the rounds (a raw from before them), the medians are judged.
    assert report.worker_scaling(report.rows_from_raw(raw))[0]["holds"] is False


def test_dispatch_counts_what_the_driver_did_per_thousand_requests(tmp_path: Path) -> None:
    raw = raw_result({"loop": 1.0}, scaling=False)
    ios = fio_output("randread-4k-qd32", 1.0)["jobs"][0]["read"]["total_ios"]
    # Three rounds of the 2-worker disk: its counters per run, each scaled to the run's requests.
    for wakes, sleeps in ((0.010, 0.020), (0.030, 0.040), (0.020, 0.030)):
        run = _run("scale-abuse-mem-2w", "randread-4k-qd32", 1.0)
        run["dispatch"] = {
            "wake_now": round(wakes * ios / 2),
            "wake_lazy": round(wakes * ios / 2),
            "sleeps": round(sleeps * ios),
            "batches": ios // 10,
        }
        raw["runs"].append(run)
    one = _run("scale-abuse-mem-1w", "seqread-1M-qd4", 1.0)
    one["dispatch"] = {"sleeps": 5}
    big_ios = one["fio"]["jobs"][0]["read"]["total_ios"]
    raw["runs"] += [one, _run("scale-loop", "randread-4k-qd32", 1.0)]  # loop has no counters
    entries = report.dispatch(raw)
    assert [(e["target"], e["job"], e["rounds"]) for e in entries] == [
        ("scale-abuse-mem-2w", "randread-4k-qd32", 3),
        ("scale-abuse-mem-1w", "seqread-1M-qd4", 1),
    ]
    assert entries[1]["sleeps"] == pytest.approx(1000 * 5 / big_ios)
    assert entries[0]["wake-ups"] == pytest.approx(20.0, abs=0.1)  # the median of 10, 30 and 20 per 1,000
    assert entries[0]["sleeps"] == pytest.approx(30.0, abs=0.1)
    assert entries[0]["GETs with a batch"] == pytest.approx(100.0, abs=0.1)
    assert entries[0]["polls"] == 0
    text = report.markdown(raw, report.rows_from_raw(raw))
    assert "## Driver dispatch in the worker-scaling runs, per 1,000 requests" in text
    assert "| scale-abuse-mem-2w | randread-4k-qd32 | 20.0 | 30.0 | 0.0 | 0.0 | 0.0 | 100.0 |" in text
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    assert report.main([str(tmp_path), "--results", str(tmp_path / "out")]) == 0
    document = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert document["dispatch"][0]["sleeps"] == pytest.approx(30.0, abs=0.1)
    # A raw from before the counters: no table.
    assert "Driver dispatch" not in report.markdown(
        raw_result({"loop": 1.0}), report.rows_from_raw(raw_result({"loop": 1.0}))
    )


def test_dispatch_counters_are_none_for_a_disk_that_is_not_abuse() -> None:
    from bench.guest import dispatch_counters

    assert dispatch_counters("/dev/no-such-disk") is None


def _loop_paired_raw(kernel: str, ratios: dict[tuple[str, int], tuple[float, float]]) -> dict[str, Any]:
    """Two rounds in which the rig runs 3x faster in the second; ``ratios`` gives
    each (job, workers) its ratio to loop in each round."""
    raw = raw_result({"loop": 1.0}, scaling=False)
    raw["kernel"] = kernel
    raw["side_by_side"] = ["scale-loop", "scale-abuse-mem-1w", "scale-abuse-mem-2w", "scale-abuse-mem-4w"]
    for turn, drift in enumerate((1.0, 3.0)):
        for job in sorted({job for job, _ in ratios}):
            raw["runs"].append(_run("scale-loop", job, drift))
            for (name, workers), by_round in ratios.items():
                if name == job:
                    raw["runs"].append(_run(f"scale-abuse-mem-{workers}w", job, drift * by_round[turn]))
    return raw


LOOP_PAIRED_RATIOS = {
    ("randread-4k-qd1", 1): (0.8, 0.8),
    ("randwrite-4k-qd1", 1): (0.6, 0.6),  # 1w: the write holds it back
    ("randread-4k-qd1", 2): (0.75, 0.75),
    ("randwrite-4k-qd1", 2): (0.6, 0.9),  # per round: sqrt(0.54) = 0.73
    ("randread-4k-qd32", 1): (0.95, 0.95),
    ("randwrite-4k-qd32", 1): (0.95, 0.95),
    ("randread-4k-qd32", 2): (1.1, 1.1),
    ("randwrite-4k-qd32", 2): (0.99, 0.99),
}


def test_loop_paired_judges_the_best_worker_count_inside_the_rounds(tmp_path: Path) -> None:
    raw = _loop_paired_raw("6.12.117+deb13-amd64", LOOP_PAIRED_RATIOS)
    qd1, qd32 = report.loop_paired(raw)
    assert qd1["target"] == "4k QD1" and qd1["least"] == 0.7
    assert qd1["workers"] == {1: pytest.approx(0.6), 2: pytest.approx(0.5400**0.5), 4: None}
    assert qd1["best"] == 2 and qd1["holds"] is True
    assert qd32["workers"][2] == pytest.approx(0.99) and qd32["best"] == 2
    assert qd32["least"] == 1.0 and qd32["holds"] is False
    rows = report.rows_from_raw(raw)
    for text in (report.markdown(raw, rows), report.readme_block(raw, rows, "stem")):
        assert "## Against loop, side by side" in text
        line = next(line for line in text.splitlines() if line.startswith("| 4k QD1 ("))
        assert line.endswith("| 0.60x | 0.73x | - | 2w | 0.7x | yes |")
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    assert report.main([str(tmp_path), "--results", str(tmp_path / "out")]) == 0
    document = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert [entry["holds"] for entry in document["loop_paired"]] == [True, False]


def test_loop_paired_judges_qd32_against_loop_on_6_12_only() -> None:
    raw = _loop_paired_raw("6.1.0-57-amd64", LOOP_PAIRED_RATIOS)
    assert [entry["target"] for entry in report.loop_paired(raw)] == ["4k QD1"]
    raw["side_by_side"].remove("scale-loop")  # loop ran on its own: no rounds to pair with
    assert report.loop_paired(raw) == []


def test_every_job_judged_against_loop_runs_in_the_rounds() -> None:
    judged = {job for _, jobs, _, _ in report.LOOP_PAIRED for job in jobs}
    assert judged <= {job.name for job in SCALE_JOBS}


def test_slow_backend_delay_matches_the_jobs() -> None:
    from bench.slow_backend import SlowBackend

    assert SlowBackend.delay == SLOW_DELAY_S
    backend = SlowBackend(1 << 20)
    buf = bytearray(b"x" * 4096)
    backend.read(0, memoryview(buf))
    assert bytes(buf) == bytes(4096)


def test_ceph_group_is_judged_against_krbd() -> None:
    raw = raw_result({"abuse-mem-1w": 1.0, "loop": 1.0}, scaling=False)
    for target, scale in (("ceph-krbd", 1.0), ("ceph-rbd-nbd", 0.8), ("ceph-abuse-4w", 0.5)):
        for job in CEPH_JOBS:
            raw["runs"].append(_run(target, job.name, scale))
    rows = report.rows_from_raw(raw)
    entries = report.ceph(rows)
    assert [e["job"] for e in entries] == [job.name for job in CEPH_JOBS]
    assert entries[0]["targets"]["ceph-abuse-4w"]["vs_krbd"] == pytest.approx(0.5)
    assert entries[0]["targets"]["ceph-rbd-nbd"]["vs_krbd"] == pytest.approx(0.8)
    assert not any(row.target.startswith("ceph-") for row in report._main_rows(rows))
    assert "| randread-4k-qd1 | IOPS |" in report.markdown(raw, rows)


def test_rounds_report_the_median_and_their_spread() -> None:
    raw = raw_result({"loop": 1.0}, scaling=False)
    for scale in (1.0, 5.0, 2.0):  # three rounds of one job, the rig drifting
        raw["runs"].append(
            {
                "target": "scale-abuse-mem-1w",
                "job": "randread-4k-qd32",
                "fio": fio_output("randread-4k-qd32", scale),
                "server_cpu_s": 1.0,
                "guest_busy_cpu_s": 1.0,
            }
        )
    rows = [row for row in report.rows_from_raw(raw) if row.target == "scale-abuse-mem-1w"]
    assert len(rows) == 1 and rows[0].iops == pytest.approx(2.0 * CANNED_IOPS)
    assert report.spread(raw) == {
        ("scale-abuse-mem-1w", "randread-4k-qd32"): (
            pytest.approx(CANNED_IOPS),
            pytest.approx(5 * CANNED_IOPS),
            3,
        )
    }
    text = report.markdown(raw, report.rows_from_raw(raw))
    assert "## Rounds" in text and "| scale-abuse-mem-1w | randread-4k-qd32 | 3 |" in text
    assert "## Rounds" not in report.markdown(
        raw_result({"loop": 1.0}), report.rows_from_raw(raw_result({"loop": 1.0}))
    )


def test_markdown_says_the_scaling_disks_were_up_side_by_side() -> None:
    raw = _scaling_raw({1: {}, 2: {}})
    assert "side by side" not in report.markdown(raw, report.rows_from_raw(raw))
    raw["scale_size"] = 512 << 20
    assert "(512 MiB each) were up side by side" in report.markdown(raw, report.rows_from_raw(raw))
    raw["scale_runtime_s"] = 3
    assert "the same minutes of the rig, 3 s per job." in report.markdown(raw, report.rows_from_raw(raw))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--runtime", "0"], "--runtime must be >= 1, not 0"),
        (["--scale-runtime", "-1"], "--scale-runtime must be >= 0, not -1"),
        (["--rounds", "0"], "--rounds must be >= 1, not 0"),
    ],
)
def test_the_guest_refuses_bad_counts_before_it_touches_anything(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import guest

    with pytest.raises(SystemExit) as exc:
        guest.main(["--out", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_readme_block_nests_under_the_benchmarks_section() -> None:
    raw = _scaling_raw({1: {}, 2: {}})
    raw["runs"].append(_run("scale-abuse-mem-1w", "randread-4k-qd32", 3.0))  # a second round
    block = report.readme_block(raw, report.rows_from_raw(raw), "stem")
    assert block.startswith(f"### Kernel {raw['kernel']}\n")
    assert "#### Worker scaling: memory backend" in block
    assert not [line for line in block.splitlines() if line.startswith("## ")]
    assert "Rounds" not in block
    assert "## Rounds" in report.markdown(raw, report.rows_from_raw(raw))  # the full report keeps it


def test_the_header_says_when_the_speed_figures_are_medians() -> None:
    raw = raw_result({"loop": 1.0})
    raw.update(guest_speed_before=4.56, guest_speed_after=4.61, speed_runs=3)
    header = report.markdown(raw, report.rows_from_raw(raw))
    assert "4.56 s before the jobs, 4.61 s after (each the median of 3 runs)" in header


def test_the_slow_table_takes_the_median_of_its_rounds() -> None:
    raw = _slow_raw({1: 195.0, 16: 2400.0})
    for iops in (2600.0, 2500.0):  # two more rounds of 16 workers: 2,500 is the median
        raw["runs"].append(_with_p50(_run("slow-16w", "randread-4k-qd32", iops / CANNED_IOPS), 5200.0))
    (*_, sixteen) = report.slow_backend(report.rows_from_raw(raw))
    assert sixteen["iops"] == pytest.approx(2500.0)
    assert "the median of 3 interleaved rounds" in report.markdown(raw, report.rows_from_raw(raw))
    once = _slow_raw({1: 195.0})
    assert "interleaved rounds" not in report.markdown(once, report.rows_from_raw(once))


def test_the_guest_runs_the_slow_cells_in_rounds_with_the_sleepers_between(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import argparse
    import contextlib

    from bench import guest
    from bench.jobs import SLOW_ROUNDS, SLOW_WORKERS

    events: list[str] = []

    @contextlib.contextmanager
    def fake_disk(size: int, backend: str, workers: int, batch: int) -> Any:
        events.append(f"up {workers}")
        yield guest.Device(f"/dev/fake{workers}", [])
        events.append(f"down {workers}")

    def fake_run_job(result: dict[str, Any], name: str, *rest: Any) -> None:
        events.append(f"run {name}")
        result["runs"].append({"target": name})

    rates = iter([100.0, 400.0, 1600.0, 300.0, 500.0, 1500.0, 200.0, 600.0, 1700.0])

    def fake_sleepers(processes: int, seconds: float, delay: float) -> float:
        events.append(f"sleep {processes}")
        return next(rates)

    monkeypatch.setattr(guest, "abuse_disk", fake_disk)
    monkeypatch.setattr(guest, "_run_job", fake_run_job)
    monkeypatch.setattr(guest, "sleeps_per_second", fake_sleepers)
    assert SLOW_ROUNDS == 3 and SLOW_WORKERS == (1, 4, 16)  # the canned rates above assume them
    result: dict[str, Any] = {"runs": []}
    args = argparse.Namespace(size=1 << 20, batch=64, runtime=1)
    assert guest._measure_slow(result, args) == 0
    assert events[:3] == ["up 1", "up 4", "up 16"] and events[-3:] == ["down 16", "down 4", "down 1"]
    rounds = events[3:-3]
    assert rounds[:6] == ["run slow-1w", "run slow-4w", "run slow-16w", "sleep 1", "sleep 4", "sleep 16"]
    assert rounds[6:9] == ["run slow-4w", "run slow-16w", "run slow-1w"]  # each round starts one disk later
    assert len(rounds) == 18
    assert result["sleep_ceiling"] == {"1": 200.0, "4": 500.0, "16": 1600.0}
    assert result["sleep_ceiling_rounds"]["16"] == [1600.0, 1500.0, 1700.0]
    assert "side_by_side" not in result  # judged by medians, not paired round by round
