"""abusectl through ``main([...])``: output, exit status, one-line errors.

No kernel is needed.  The autouse fixture points the control device at a
path that does not exist, so nothing here depends on the host's
/dev/abuse; tests that need disks swap in a FakeControl instead.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import abuse
import abuse.control
import abusectl.devices
from abuse import DiskConfig, DiskInfo, ModuleFeatures, uapi
from abuse._exceptions import AbuseError, error_from_errno
from abuse.backends import Backend, MemoryBackend
from abuse.control import CONTROL_PATH
from abusectl.__main__ import main
from abusectl.commands.serve import StatusLine
from abusectl.devices import parse_dev

G = 1 << 30
COMMAND_NAMES = ("create", "serve", "status", "list", "reset", "resize", "destroy", "features")
COUNTERS = abuse.control.COUNTER_FIELDS


@pytest.fixture(autouse=True)
def missing_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    path = str(tmp_path / "abuse")
    monkeypatch.setattr(abuse.control, "CONTROL_PATH", path)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"want one stderr line, got {err!r}"
    assert "Traceback" not in err
    return lines[0]


def disk(index: int, size: int = 10 * G, flags: int = uapi.ABUSE_F_FLUSH, **counters: int) -> DiskInfo:
    config = DiskConfig(
        index=index,
        block_size=4096,
        size=size,
        flags=flags,
        queue_depth=128,
        max_request_bytes=1 << 20,
        timeout_ms=30000,
        retries=3,
    )
    return DiskInfo(config, {name: counters.get(name, 0) for name in COUNTERS})


class FakeControl:
    """Stands in for abuse.Control: disks in a dict, calls recorded."""

    def __init__(self, *disks: DiskInfo) -> None:
        self.disks = {info.config.index: info for info in disks}
        self.calls: list[tuple[str, Any]] = []
        self.busy = False
        self.module = FULL_MODULE

    def __enter__(self) -> FakeControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.calls.append(("close", None))

    def info(self, index: int) -> DiskInfo:
        if index not in self.disks:
            raise error_from_errno(errno.ENODEV, "info")
        return self.disks[index]

    def list(self) -> list[int]:
        return sorted(self.disks)

    def create(self, size: int, index: int | None = None, **kwargs: int) -> DiskConfig:
        self.calls.append(("create", {"size": size, **kwargs, **({} if index is None else {"index": index})}))
        if index in self.disks:
            raise error_from_errno(errno.EEXIST, "create")
        return disk(len(self.disks) if index is None else index, size).config

    def destroy(self, index: int, force: bool = False) -> None:
        if self.busy and not force:
            raise error_from_errno(errno.EBUSY, "destroy")
        self.calls.append(("destroy", (index, force)))

    def reset(self, index: int, fail: bool = False) -> None:
        self.calls.append(("reset", (index, fail)))

    def resize(self, index: int, size: int) -> None:
        self.calls.append(("resize", (index, size)))

    def features(self) -> ModuleFeatures:
        return self.module


FULL_MODULE = ModuleFeatures.from_answer(uapi.ABUSE_VERSION, 1024, uapi.ABUSE_F_ALL, uapi.ABUSE_XFER_ALL)


@pytest.fixture
def control(monkeypatch: pytest.MonkeyPatch) -> FakeControl:
    fake = FakeControl(
        disk(0), disk(3, size=512 << 20, flags=uapi.ABUSE_F_READ_ONLY, completed=42, attached=2)
    )
    monkeypatch.setattr(abusectl.devices, "Control", lambda path: fake)
    monkeypatch.setattr(abusectl.devices, "list_disks", fake.list)
    return fake


@dataclass
class WorkerStat:
    pid: int
    cpu_percent: float
    rss: int
    restarts: int
    alive: bool
    ready: bool = True


class FakePool:
    """Stands in for abuse.pool.Pool (written in parallel); records its use."""

    made: list[FakePool] = []
    wait_for_stop = False  # run() returns only after stop(), as the real one

    def __init__(self, index: int, backend: Backend, workers: int, batch: int = 64, **kwargs: Any) -> None:
        self.index, self.backend, self.workers, self.batch = index, backend, workers, batch
        self.kwargs = kwargs
        self.stopped = threading.Event()
        self.restarts = 0
        self.hung_kills = 0
        self.ran: dict[str, Any] = {}
        FakePool.made.append(self)

    def run(self, on_tick: Any = None, tick: float = 1.0, on_ready: Any = None) -> int:
        self.ran = {"tick": tick}
        self.backend_size_at_run = self.backend.size
        hook = getattr(FakePool, "run_hook", None)
        if hook is not None:
            hook()
        if on_ready is not None:
            on_ready(self)
        if on_tick is not None:
            on_tick(self)
        if FakePool.wait_for_stop:
            assert self.stopped.wait(60), "nothing stopped the pool"
        return 0

    def pids(self) -> list[int]:
        return [100 + i for i in range(self.workers)]

    def stop(self) -> None:
        self.stopped.set()

    def stats(self) -> list[WorkerStat]:
        return [WorkerStat(100 + i, 0.0, 0, 0, True, True) for i in range(self.workers)]


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> type[FakePool]:
    module = types.ModuleType("abuse.pool")
    module.Pool = FakePool  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "abuse.pool", module)
    FakePool.made = []
    return FakePool


# --- version, help, usage -------------------------------------------------


def test_version_without_the_module(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--version")
    assert code == 0
    library, module = out.splitlines()
    assert library == f"abusectl {abuse.__version__} (uapi {uapi.ABUSE_VERSION})"
    assert module.startswith("module: unknown (") and "not found" in module


def test_version_names_the_loaded_module(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    control.module = ModuleFeatures.from_answer(1, 1024, 0x1F, 0)
    code, out, err = run(capsys, "--version")
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == "module: uapi 1"


@pytest.mark.parametrize(
    "verb", ["create", "serve", "status", "list", "reset", "resize", "destroy", "features"]
)
def test_help(capsys: pytest.CaptureFixture[str], verb: str) -> None:
    code, out, err = run(capsys, verb, "--help")
    assert code == 0
    assert out.startswith(f"usage: abusectl {verb}")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["create"], "required: -s/--size"),
        (["create", "--size", "0"], "invalid size '0': must be greater than zero"),
        (["create", "--size", "ten"], "invalid size 'ten'"),
        (["create", "--size=-1G"], "invalid size '-1G'"),
        (["create", "--size", "-1G"], "--size: expected one argument"),
        (["create", "--size", "1G", "--block-size", "0"], "invalid size '0'"),
        (["create", "--size", "1G", "--timeout", "-1"], "invalid time '-1'"),
        (["create", "--size", "1G", "--timeout", "soon"], "invalid time 'soon'"),
        (["create", "--size", "1G", "--retries", "-1"], "invalid number '-1'"),
        (["create", "--size", "1G", "--queue-depth", "0"], "invalid count '0'"),
        (["serve", "0", "--backend", "bogus", "--workers", "1"], "bad backend 'bogus'"),
        (["serve", "0", "--backend", "file:", "--workers", "1"], "bad backend 'file:'"),
        (["serve", "0", "--backend", "memory", "--workers", "0"], "invalid count '0'"),
        (["serve", "0", "--backend", "memory"], "required: -w/--workers"),
        (["serve", "/dev/sda", "--backend", "memory", "--workers", "1"], "not an abuse disk: /dev/sda"),
        (["serve", "foo", "--backend", "memory", "--workers", "1"], "not an abuse disk: foo"),
        (["status", "/dev/sda"], "not an abuse disk: /dev/sda"),
        (["status", "foo"], "not an abuse disk: foo"),
        (["reset", "/dev/abuse0p1"], "not an abuse disk: /dev/abuse0p1"),
        (["resize", "0", "--size", "ten"], "invalid size 'ten'"),
        (["resize", "0"], "required: -s/--size"),
        (["destroy", "sda"], "not an abuse disk: sda"),
        (["create", "-s", "1G", "--index", "-1"], "invalid disk index '-1'"),
        (["create", "-s", "1G", "--index", "x"], "invalid disk index 'x'"),
        (["create", "-s", "1G", "-i", "4294967296"], "invalid disk index '4294967296'"),
        (["serve", "0", "-b", "memory", "-w", "1", "--user", "no-such-user-here"], "no such user"),
        (["serve", "0", "-b", "memory", "-w", "1", "-u", "4000000000"], "no such user"),
        (["serve", "0", "-b", "memory", "-w", "1", "--group", "no-such-group-here"], "no such group"),
        (["serve", "0", "-b", "memory", "-w", "1", "--pidfile"], "--pidfile: expected one argument"),
        (["serve", "0", "-b", "memory", "-w", "1", "--run"], "--run: expected one argument"),
        (["serve", "0", "-b", "memory", "-w", "x"], "invalid count 'x'"),
        (["serve", "0", "-b", "memory", "-w", "1", "--start-timeout", "-5"], "invalid time '-5'"),
        (["serve", "0", "-b", "memory", "-w", "1", "--start-timeout", "inf"], "invalid time 'inf'"),
        (["serve", "0", "-b", "memory", "-w", "1", "--start-timeout", "soon"], "invalid time 'soon'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["features", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert says in one_line(err)
    assert out == ""


# --- no /dev/abuse ----------------------------------------------------------


def test_missing_module_message_names_dev_abuse() -> None:
    assert str(error_from_errno(errno.ENOENT, CONTROL_PATH)) == (
        "/dev/abuse not found: is the abuse module loaded? (make load)"
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["create", "--size", "10G"],
        ["status", "0"],
        ["features"],
        ["destroy", "--all"],
        ["reset", "0"],
        ["reset", "abuse0", "--fail"],
        ["resize", "/dev/abuse0", "--size", "1G"],
        ["destroy", "0"],
        ["destroy", "0", "--force"],
        ["serve", "0", "--backend", "memory", "--workers", "1"],
        ["serve", "0", "--backend", "file:/no/such/dir/img", "--workers", "1"],
    ],
)
def test_without_the_module(
    capsys: pytest.CaptureFixture[str], missing_control: str, argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert one_line(err) == f"abusectl: {missing_control} not found: is the abuse module loaded? (make load)"
    assert out == ""


def test_permission_denied_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(path: str) -> None:
        raise error_from_errno(errno.EACCES, path)

    monkeypatch.setattr(abusectl.devices, "Control", denied)
    code, out, err = run(capsys, "features")
    assert code == 1
    assert "Permission denied" in one_line(err)


def test_bugs_are_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(abusectl.devices, "Control", broken)
    with pytest.raises(RuntimeError):
        main(["features"])


# --- DEV names --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "index"), [("/dev/abuse0", 0), ("abuse12", 12), ("7", 7), ("4294967295", 2**32 - 1)]
)
def test_parse_dev(text: str, index: int) -> None:
    assert parse_dev(text) == index


@pytest.mark.parametrize(
    "text",
    ["/dev/sda", "foo", "", "abuse", "/dev/abuse", "/dev/abuse0p1", "-1", "01", "abuse 1", "4294967296"],
)
def test_parse_dev_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_dev(text)
    assert str(info.value) == f"not an abuse disk: {text}"


def test_parse_dev_follows_symlinks(tmp_path: Path) -> None:
    link = tmp_path / "by-id"
    link.symlink_to("/dev/abuse5")
    assert parse_dev(str(link)) == 5


# --- create -------------------------------------------------------------------


def test_create(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    code, out, err = run(capsys, "create", "--size", "10G")
    assert (code, out, err) == (0, "/dev/abuse2\n", "")
    assert control.calls[0] == (
        "create",
        {
            "size": 10 * G,
            "block_size": 4096,
            "flags": uapi.ABUSE_F_FLUSH | uapi.ABUSE_F_FENCE,
            "queue_depth": 0,
            "max_request_bytes": 0,
            "timeout_ms": 30000,
            "retries": 3,
        },
    )


def test_create_options(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    argv = [
        "create",
        "--size",
        "64M",
        "--block-size",
        "512",
        "--read-only",
        "--no-flush",
        "--discard",
        "--no-fence",
    ]
    argv += ["--timeout", "0.5", "--retries", "0", "--queue-depth", "32", "--max-request", "256K"]
    code, out, err = run(capsys, *argv)
    assert code == 0
    _, kwargs = control.calls[0]
    assert kwargs["flags"] == uapi.ABUSE_F_READ_ONLY | uapi.ABUSE_F_DISCARD
    assert kwargs["block_size"] == 512
    assert kwargs["timeout_ms"] == 500
    assert kwargs["retries"] == 0
    assert kwargs["queue_depth"] == 32
    assert kwargs["max_request_bytes"] == 256 << 10


def test_create_timeout_zero_waits_forever(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    assert run(capsys, "create", "--size", "1G", "--timeout", "0")[0] == 0
    assert control.calls[0][1]["timeout_ms"] == 0


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--size", "10000"], "not a multiple of the block size 4096"),
        (["--size", "1G", "--block-size", "1000"], "block size must be one of 512, 1024, 2048, 4096"),
    ],
)
def test_create_checks_before_the_kernel(
    capsys: pytest.CaptureFixture[str], control: FakeControl, argv: list[str], says: str
) -> None:
    code, out, err = run(capsys, "create", *argv)
    assert code == 1
    assert says in one_line(err)
    assert control.calls == []


# --- status, list -----------------------------------------------------------


def test_status_table(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    code, out, err = run(capsys, "status")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
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
    ]
    assert rows[0].split() == ["0", "/dev/abuse0", "10G", "4096", "flush", "0", "0", "0", "0", "0", "0", "-"]
    assert rows[1].split() == [
        "3",
        "/dev/abuse3",
        "512M",
        "4096",
        "read-only",
        "0",
        "0",
        "42",
        "0",
        "0",
        "2",
        "-",
    ]


def test_status_json(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    code, out, err = run(capsys, "status", "/dev/abuse3", "--json")
    assert code == 0
    (record,) = json.loads(out)["disks"]
    assert record["index"] == 3
    assert record["path"] == "/dev/abuse3"
    assert record["size"] == 512 << 20
    assert record["flags"] == ["read-only"]
    assert record["completed"] == 42
    assert record["attached"] == 2


def test_status_of_a_missing_disk(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    code, out, err = run(capsys, "status", "abuse9")
    assert code == 1
    assert one_line(err) == "abusectl: /dev/abuse9: no such abuse disk"


def test_list(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    assert run(capsys, "list") == (0, "/dev/abuse0\n/dev/abuse3\n", "")
    assert json.loads(run(capsys, "list", "--json")[1]) == {
        "disks": [{"index": 0, "path": "/dev/abuse0"}, {"index": 3, "path": "/dev/abuse3"}]
    }


# --- reset, resize, destroy ---------------------------------------------------


def test_reset(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    assert run(capsys, "reset", "3", "--fail") == (0, "", "")
    assert ("reset", (3, True)) in control.calls


def test_resize(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    assert run(capsys, "resize", "abuse0", "--size", "20G") == (0, "", "")
    assert ("resize", (0, 20 * G)) in control.calls


def test_resize_to_a_partial_block(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    code, out, err = run(capsys, "resize", "0", "--size", "1000")
    assert code == 1
    assert "not a multiple of the block size 4096" in one_line(err)


def test_destroy(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    assert run(capsys, "destroy", "/dev/abuse3", "--force") == (0, "", "")
    assert ("destroy", (3, True)) in control.calls


def test_destroy_busy_says_force(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    control.busy = True
    code, out, err = run(capsys, "destroy", "0")
    assert code == 1
    assert one_line(err) == "abusectl: /dev/abuse0 is in use: close it, or --force to fail its I/O"


@pytest.mark.parametrize("verb", [["reset"], ["destroy"], ["resize", "--size", "1G"]])
def test_missing_disk(capsys: pytest.CaptureFixture[str], control: FakeControl, verb: list[str]) -> None:
    code, out, err = run(capsys, verb[0], "8", *verb[1:])
    assert code == 1
    assert one_line(err) == "abusectl: /dev/abuse8: no such abuse disk"


# --- serve ------------------------------------------------------------------


def test_serve(capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]) -> None:
    code, out, err = run(
        capsys, "serve", "/dev/abuse3", "--backend", "memory", "--workers", "2", "--batch", "8"
    )
    assert (code, out) == (0, "")
    assert one_line(err) == "abusectl: stopped serving /dev/abuse3: workers: 2, restarts: 0"
    (made,) = pool.made
    assert (made.index, made.workers, made.batch) == (3, 2, 8)
    assert isinstance(made.backend, MemoryBackend)
    assert made.backend_size_at_run == 512 << 20
    assert made.ran == {"tick": 1.0}
    assert made.backend.fd == -1, "backend closed after the pool returned"
    assert made.kwargs["start_timeout"] is None  # the pool's own default


@pytest.mark.parametrize(("given", "timeout"), [("120", 120.0), ("0.5", 0.5), ("0", 0.0)])
def test_serve_start_timeout_reaches_the_pool(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool], given: str, timeout: float
) -> None:
    code, _, _ = run(capsys, "serve", "3", "-b", "memory", "-w", "2", "--start-timeout", given)
    assert code == 0
    (made,) = pool.made
    assert made.kwargs["start_timeout"] == timeout


def test_serve_file_in_a_missing_directory(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool], tmp_path: Path
) -> None:
    spec = f"file:{tmp_path}/no/such/disk.img"
    code, out, err = run(capsys, "serve", "0", "--backend", spec, "--workers", "1")
    assert code == 1
    assert one_line(err) == f"abusectl: backend {spec!r}: directory {tmp_path}/no/such does not exist"
    assert pool.made == [], "no worker starts without a backend"


def test_serve_python_backend_that_is_missing(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    code, out, err = run(
        capsys, "serve", "0", "--backend", "python:no_such_module_abuse:Disk", "--workers", "1"
    )
    assert code == 1
    assert "no module named 'no_such_module_abuse'" in one_line(err)
    assert pool.made == []


def test_serve_a_missing_disk(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    code, out, err = run(capsys, "serve", "5", "--backend", "memory", "--workers", "1")
    assert code == 1
    assert one_line(err) == "abusectl: /dev/abuse5: no such abuse disk"
    assert pool.made == []


def test_serve_batch_over_the_limit(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    batch = str(uapi.ABUSE_MAX_BATCH + 1)
    code, out, err = run(capsys, "serve", "0", "--backend", "null", "--workers", "1", "--batch", batch)
    assert code == 1
    assert "--batch" in one_line(err)


def test_serve_unknown_backend_fails_before_dev_abuse(capsys: pytest.CaptureFixture[str]) -> None:
    # The spec's shape is checked while parsing, so the control device
    # (missing here) is never reached.
    code, out, err = run(capsys, "serve", "0", "--backend", "nbd:x", "--workers", "1")
    assert code == 2
    assert "bad backend 'nbd:x'" in one_line(err)


def test_status_line() -> None:
    control = FakeControl(disk(0, completed=1000, in_flight=3, queued=5, bytes_written=10**6))
    pool = FakePool(0, MemoryBackend(4096), workers=4)
    pool.restarts = 1
    times = iter([10.0, 10.5])
    out = io.StringIO()
    line = StatusLine(control, control.disks[0].config, out, clock=lambda: next(times))  # type: ignore[arg-type]
    line(pool)
    control.disks[0] = disk(0, completed=1500, in_flight=3, queued=5, bytes_written=3 * 10**6)
    line(pool)
    line.finish()
    first, second = out.getvalue().split("\r")[1:]
    assert first.startswith(
        "/dev/abuse0 10G: 0 req/s, 0.0 MB/s, 3 in flight, 5 queued, 4/4 workers, 1 restarts"
    )
    assert second.startswith("/dev/abuse0 10G: 1,000 req/s, 4.0 MB/s")
    assert second.endswith("\n")
    pool.backend.close()


def test_status_line_skips_a_vanished_disk() -> None:
    control = FakeControl()
    out = io.StringIO()
    line = StatusLine(control, disk(0).config, out)  # type: ignore[arg-type]
    line(FakePool(0, MemoryBackend(4096), workers=1))
    line.finish()
    assert out.getvalue() == ""


def test_abuse_errors_pickle() -> None:
    import pickle

    err = error_from_errno(errno.ENOENT, CONTROL_PATH)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, AbuseError)
    assert str(again) == str(err)


# --- serve --create/--record (the systemd unit) -------------------------------


def test_serve_create_records_the_new_disk(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool], tmp_path: Path
) -> None:
    record = tmp_path / "run" / "disk.dev"
    code, out, err = run(
        capsys, "serve", "--create", "1G", "--record", str(record), "--backend", "null", "--workers", "2"
    )
    assert code == 0, err
    assert control.calls[0] == (
        "create",
        {
            "size": G,
            "flags": uapi.ABUSE_F_FLUSH
            | uapi.ABUSE_F_DISCARD
            | uapi.ABUSE_F_WRITE_ZEROES
            | uapi.ABUSE_F_FENCE,
            "timeout_ms": 30000,
            "retries": 3,
        },
    )
    assert record.read_text() == "/dev/abuse2\n"
    assert pool.made[0].index == 2


def test_serve_create_reuses_the_recorded_disk(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool], tmp_path: Path
) -> None:
    record = tmp_path / "disk.dev"
    record.write_text("/dev/abuse0\n")
    code, out, err = run(
        capsys, "serve", "--create", "10G", "--record", str(record), "--backend", "null", "--workers", "1"
    )
    assert code == 0, err
    assert [call for call in control.calls if call[0] == "create"] == []
    assert pool.made[0].index == 0


def test_serve_create_replaces_a_stale_record(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool], tmp_path: Path
) -> None:
    record = tmp_path / "disk.dev"
    record.write_text("/dev/abuse7\n")  # gone: the module was reloaded
    code, out, err = run(
        capsys, "serve", "--create", "1G", "--record", str(record), "--backend", "null", "--workers", "1"
    )
    assert code == 0, err
    assert record.read_text() == "/dev/abuse2\n"


@pytest.mark.parametrize(
    ("recorded", "size", "message"),
    [
        ("/dev/abuse3", "512M", "/dev/abuse3 (recorded in {}) is already served by another process"),
        ("/dev/abuse0", "1G", "/dev/abuse0 (recorded in {}) is 10G, not 1G: resize or destroy it first"),
    ],
)
def test_serve_create_refuses_a_recorded_disk_it_cannot_take(
    capsys: pytest.CaptureFixture[str],
    control: FakeControl,
    pool: type[FakePool],
    tmp_path: Path,
    recorded: str,
    size: str,
    message: str,
) -> None:
    record = tmp_path / "disk.dev"
    record.write_text(recorded + "\n")
    code, out, err = run(
        capsys, "serve", "--create", size, "--record", str(record), "--backend", "null", "--workers", "1"
    )
    assert code == 1
    assert one_line(err) == "abusectl: " + message.format(record)
    assert pool.made == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["0", "--create", "1G"], "serve takes DEV or --create SIZE, not both"),
        ([], "serve needs DEV or --create SIZE"),
        (["0", "--record", "/tmp/x"], "--record needs --create"),
    ],
)
def test_serve_create_usage(
    capsys: pytest.CaptureFixture[str], control: FakeControl, argv: list[str], message: str
) -> None:
    code, out, err = run(capsys, "serve", *argv, "--backend", "null", "--workers", "1")
    assert code == 1
    assert one_line(err) == f"abusectl: {message}"
    assert control.calls == []


# --- features, versions ---------------------------------------------------------


def test_features_lists_every_header_bit(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    control.module = ModuleFeatures.from_answer(1, 1024, 0x1F, 0)  # a version-1 module
    code, out, err = run(capsys, "features")
    assert (code, err) == (0, "")
    first, header, *rows = out.splitlines()
    assert "uapi version 1" in first
    table_ = {row.split()[2]: row.split()[3] for row in rows}
    assert set(table_) == set(uapi.DISK_FEATURES) | set(uapi.XFER_FEATURES)
    assert table_["ABUSE_F_FENCE"] == "no" and table_["ABUSE_F_DISCARD"] == "yes"
    assert table_["ABUSE_XFER_NOWAIT"] == "yes" and table_["ABUSE_XFER_MAPPED"] == "no"
    record = json.loads(run(capsys, "features", "--json")[1])
    assert record["module"]["uapi"] == 1
    assert record["module"]["xfer_features"] == ["nowait"]
    assert "fence" not in record["module"]["features"]


def test_feature_names_come_from_the_header() -> None:
    header = uapi.HEADER_TEXT
    for name in list(uapi.DISK_FEATURES) + list(uapi.XFER_FEATURES):
        assert f"#define {name}" in header
    assert "ABUSE_F_ALL" not in uapi.DISK_FEATURES
    assert sum(uapi.DISK_FEATURES.values()) == uapi.ABUSE_F_ALL
    assert sum(uapi.XFER_FEATURES.values()) == uapi.ABUSE_XFER_ALL
    assert uapi.feature_names(uapi.ABUSE_F_WRITE_ZEROES | 1 << 40, uapi.DISK_FEATURES) == [
        "write-zeroes",
        hex(1 << 40),
    ]


def test_create_refuses_a_flag_the_module_lacks(
    capsys: pytest.CaptureFixture[str], control: FakeControl
) -> None:
    control.module = ModuleFeatures.from_answer(1, 1024, 0x1F, 0)
    with pytest.raises(abuse.FeatureMissing) as info:
        control.module.require(disk_flags=uapi.ABUSE_F_FENCE)
    assert str(info.value) == (
        "the loaded abuse module (uapi version 1) does not support fence (ABUSE_F_FENCE): "
        "load a newer abuse.ko"
    )


# --- create --index, destroy --all, -v anywhere -------------------------------------


def test_create_index_asks_the_module_for_that_index(
    capsys: pytest.CaptureFixture[str], control: FakeControl
) -> None:
    assert run(capsys, "create", "-s", "1G", "--index", "7") == (0, "/dev/abuse7\n", "")
    (call,) = [call for call in control.calls if call[0] == "create"]
    assert call[1]["index"] == 7


def test_create_index_taken(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    code, out, err = run(capsys, "create", "-s", "1G", "-i", "3")
    assert (code, out) == (1, "")
    assert one_line(err) == "abusectl: /dev/abuse3 exists; nothing created"


def test_create_index_above_the_limit(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    code, out, err = run(capsys, "create", "-s", "1G", "-i", str(uapi.ABUSE_MAX_INDEX + 1))
    assert (code, out) == (1, "")
    assert "above the module's limit" in one_line(err)
    assert not [call for call in control.calls if call[0] == "create"]


def test_destroy_all(capsys: pytest.CaptureFixture[str], control: FakeControl) -> None:
    assert run(capsys, "destroy", "--all", "-f") == (0, "", "")
    assert [call for call in control.calls if call[0] == "destroy"] == [
        ("destroy", (0, True)),
        ("destroy", (3, True)),
    ]


@pytest.mark.parametrize("argv", [["destroy"], ["destroy", "0", "--all"]])
def test_destroy_needs_dev_or_all(
    capsys: pytest.CaptureFixture[str], control: FakeControl, argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert one_line(err) == "abusectl: destroy takes DEV or --all"


@pytest.mark.parametrize("argv", [["-v", "list"], ["list", "-v"], ["list", "--verbose"]])
def test_verbose_anywhere(capsys: pytest.CaptureFixture[str], control: FakeControl, argv: list[str]) -> None:
    from abusectl.cli import build_parser

    assert build_parser().parse_args(argv).verbose is True
    assert run(capsys, *argv)[0] == 0


def test_short_options(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    assert run(capsys, "serve", "3", "-b", "memory", "-w", "2")[0] == 0
    assert pool.made[0].workers == 2


# --- list and status through sysfs ----------------------------------------------


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake /sys/block with abuse4, as the module exports it."""
    base = tmp_path / "block"
    files = {
        "block_size": "512",
        "size": str(G),
        "flags": "0x6",
        "queue_depth": "128",
        "max_request_bytes": "1048576",
        "timeout_ms": "2000",
        "retries": "3",
        "completed": "17",
        "attached": "2",
        "workers": "4242 4243",
    }
    (base / "abuse4" / "abuse").mkdir(parents=True)
    (base / "sda").mkdir()
    for name, text in files.items():
        (base / "abuse4" / "abuse" / name).write_text(text + "\n")
    monkeypatch.setattr(abuse.control, "SYSFS_BLOCK", str(base))
    return base


def test_list_and_status_need_no_control_device(capsys: pytest.CaptureFixture[str], sysfs: Path) -> None:
    # The autouse fixture made /dev/abuse missing: everything comes from sysfs.
    assert run(capsys, "list") == (0, "/dev/abuse4\n", "")
    code, out, err = run(capsys, "status", "--json")
    assert (code, err) == (0, "")
    (record,) = json.loads(out)["disks"]
    assert record["block_size"] == 512 and record["size"] == G and record["timeout_ms"] == 2000
    assert record["flags"] == ["flush", "discard"]
    assert record["completed"] == 17 and record["fenced"] == 0
    assert record["workers"] == [4242, 4243]
    code, out, err = run(capsys, "status", "abuse4")
    assert out.splitlines()[1].split()[-1] == "4242,4243"


def test_status_of_an_older_module_without_sysfs_config_asks_info(
    capsys: pytest.CaptureFixture[str], sysfs: Path, control: FakeControl
) -> None:
    (sysfs / "abuse4" / "abuse" / "size").unlink()
    code, out, err = run(capsys, "status", "abuse4")
    assert code == 1
    assert one_line(err) == "abusectl: /dev/abuse4: no such abuse disk"  # the fake has no disk 4


# --- serve: capabilities, process-local backends, pidfile, --run, --user ---------

PROCESS_LOCAL = """
from abuse import Backend

class Local(Backend):
    def __init__(self, size):
        self.size = size
        self.data = bytearray(size)
    def read(self, offset, buf):
        buf[:] = self.data[offset : offset + len(buf)]
    def write(self, offset, data):
        self.data[offset : offset + len(data)] = data
"""


def test_serve_refuses_workers_for_a_process_local_backend(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool], tmp_path: Path
) -> None:
    (tmp_path / "local.py").write_text(PROCESS_LOCAL)
    spec = f"python:{tmp_path}/local.py:Local"
    code, out, err = run(capsys, "serve", "3", "-b", spec, "-w", "4")
    assert code == 1
    assert one_line(err) == (
        f"abusectl: backend {spec!r} keeps its data in each process (shared_state is false): "
        "serve it with --workers 1, not 4"
    )
    assert pool.made == []
    assert run(capsys, "serve", "3", "-b", spec, "-w", "1")[0] == 0


def test_serve_create_advertises_what_the_backend_can_do(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    assert run(capsys, "serve", "--create", "1G", "-b", "zero", "-w", "1")[0] == 0
    # zero: no flush, no discard, no write zeroes; every disk is fenced
    assert control.calls[0][1]["flags"] == uapi.ABUSE_F_FENCE
    assert run(capsys, "serve", "--create", "1G", "-b", "memory", "-w", "1")[0] == 0
    can_all = uapi.ABUSE_F_FLUSH | uapi.ABUSE_F_DISCARD | uapi.ABUSE_F_WRITE_ZEROES
    assert control.calls[-2][1]["flags"] == can_all | uapi.ABUSE_F_FENCE


def test_serve_refuses_a_disk_advertising_more_than_the_backend(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    control.disks[5] = disk(5, flags=uapi.ABUSE_F_FLUSH | uapi.ABUSE_F_DISCARD)
    code, out, err = run(capsys, "serve", "5", "-b", "zero", "-w", "1")
    assert code == 1
    assert one_line(err) == (
        "abusectl: /dev/abuse5 advertises discard, which backend 'zero' cannot do: "
        "recreate the disk without --discard"
    )
    assert pool.made == []


def test_serve_pidfile(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool], tmp_path: Path
) -> None:
    pidfile = tmp_path / "serve.pid"
    seen: list[str] = []
    FakePool.run_hook = lambda: seen.append(pidfile.read_text())  # type: ignore[attr-defined]
    try:
        assert run(capsys, "serve", "3", "-b", "null", "-w", "1", "--pidfile", str(pidfile))[0] == 0
    finally:
        del FakePool.run_hook  # type: ignore[attr-defined]
    assert seen == [f"{os.getpid()}\n"]
    assert not pidfile.exists(), "removed when serving ends"


def test_serve_pidfile_in_a_missing_directory(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool], tmp_path: Path
) -> None:
    code, out, err = run(capsys, "serve", "3", "-b", "null", "-w", "1", "-p", str(tmp_path / "no" / "x.pid"))
    assert code == 1
    assert "--pidfile" in one_line(err)


def test_serve_run_passes_the_device_and_its_status(
    capsys: pytest.CaptureFixture[str],
    control: FakeControl,
    pool: type[FakePool],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out_file = tmp_path / "dev"
    monkeypatch.setattr(FakePool, "wait_for_stop", True)
    code, out, err = run(
        capsys, "serve", "3", "-b", "null", "-w", "1", "--run", f'echo "$ABUSE_DEVICE" >{out_file}; exit 7'
    )
    assert code == 7
    assert out_file.read_text() == "/dev/abuse3\n"


def test_serve_run_empty_command(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    code, out, err = run(capsys, "serve", "3", "-b", "null", "-w", "1", "--run", " ")
    assert code == 1
    assert one_line(err) == "abusectl: --run needs a command"


def test_serve_user_and_group_become_credentials(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    if os.geteuid() != 0:
        code, out, err = run(capsys, "serve", "3", "-b", "null", "-w", "1", "-u", "nobody")
        assert code == 1 and "need root" in one_line(err)
        return
    assert run(capsys, "serve", "3", "-b", "null", "-w", "1", "-u", "nobody", "-g", "0")[0] == 0
    creds = pool.made[0].kwargs["credentials"]
    assert (creds.uid, creds.gid, creds.groups) == (nobody.pw_uid, 0, (0,))


def test_serve_notifies_systemd_when_ready(
    capsys: pytest.CaptureFixture[str],
    control: FakeControl,
    pool: type[FakePool],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        assert run(capsys, "serve", "3", "-b", "null", "-w", "2")[0] == 0
        listener.settimeout(0)
        first = listener.recv(4096).decode()
        second = listener.recv(4096).decode()
    assert first.splitlines()[0] == "READY=1"
    assert "STATUS=serving /dev/abuse3 with 2 workers" in first
    assert second == "WATCHDOG=1"
    assert pool.made[0].ran == {"tick": 0.5}


def test_serve_run_command_is_stopped_when_serving_ends_first(
    capsys: pytest.CaptureFixture[str], control: FakeControl, pool: type[FakePool]
) -> None:
    # FakePool.run returns at once, as a pool whose disk was destroyed.
    code, out, err = run(capsys, "serve", "3", "-b", "null", "-w", "1", "--run", "exec sleep 600")
    assert code == 128 + signal.SIGTERM
