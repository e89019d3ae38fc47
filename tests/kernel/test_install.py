"""Installing abuse the way users do: DKMS, the udev rule, the systemd unit.

The guest is a throwaway VM with a read-only root: the DKMS test gets
tmpfs overlays (tests/kernel/dkms-guest), the udev rule goes to
/run/udev/rules.d, and the unit's command runs without systemd.
"""

from __future__ import annotations

import grp
import mmap
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from abuse import uapi
from abuse.control import Control
from tests.kernel.conftest import Disks, run, wait_for
from tests.kernel.serving import ABUSECTL, abusectl, stop_pool, worker_pids

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "dist" / "systemd" / "abuse-serve@.service"
RULE = ROOT / "dist" / "udev" / "59-abuse.rules"
TRIXIE_ROOT = Path(os.environ.get("ABUSE_CACHE", "/var/cache/abuse")) / "trixie-root"
MiB = 1 << 20


def _build_root(kver: str) -> str:
    """Where the running kernel's headers are: the guest root or the trixie chroot."""
    if Path(f"/lib/modules/{kver}/build/Makefile").exists():
        return "/"
    # Its Makefile links into the chroot, so look for the folder.
    assert (TRIXIE_ROOT / f"usr/src/linux-headers-{kver}").is_dir(), f"no headers for {kver}"
    return str(TRIXIE_ROOT)


def test_dkms_install_builds_and_loads_the_module() -> None:
    """scripts/dkms-install's module loads with modprobe and is the tier's.

    `make test-kernel` runs the DKMS build for this kernel on the host
    first (tests/kernel/dkms-prebuild, native speed); without it the
    build runs here, under TCG, in about 9 minutes.
    """
    kver = os.uname().release
    tier_ko = os.environ["ABUSE_KO"]
    command = ["unshare", "-m", str(ROOT / "tests/kernel/dkms-guest"), _build_root(kver)]
    prebuilt = ROOT / "build" / f"dkms-{kver}"
    if prebuilt.is_dir():
        command.append(str(prebuilt))
    run("rmmod", "abuse")  # the tier's module; no disks exist between tests
    try:
        proc = run(*command, timeout=1800)
        loaded = Path("/sys/module/abuse")
        assert loaded.is_dir(), proc.stdout + proc.stderr
        # dkms-guest's overlays are gone: ask it what modprobe found.
        assert re.search(
            rf"^loaded: /lib/modules/{re.escape(kver)}/updates/dkms/abuse\.ko", proc.stdout, re.M
        ), proc.stdout
        if prebuilt.is_dir():
            assert re.search(rf"^abuse/[^,]+, {re.escape(kver)}, x86_64: installed", proc.stdout, re.M), (
                proc.stdout
            )
            # Built from the sources under test, not from an older run's.
            for name in ("abuse.c", "abuse.h"):
                (built,) = prebuilt.glob(f"_usr_src/abuse-*/{name}")
                assert built.read_bytes() == (ROOT / "kernel" / name).read_bytes(), built
        with Control() as control:
            assert control.version()[0] == uapi.ABUSE_VERSION
            config = control.create(16 * MiB)
            assert Path(config.path).exists()
            control.destroy(config.index)
            assert control.list() == []
    finally:
        if Path("/sys/module/abuse").exists():
            run("rmmod", "abuse")
        run("insmod", tier_ko)


def _unit_command(record: Path, conf: dict[str, str]) -> list[str]:
    """The unit's ExecStart as systemd would run it for instance "test"."""
    (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
    words = shlex.split(line.removeprefix("ExecStart="))
    assert words[0] == "/usr/local/bin/abusectl"
    args = []
    for word in words[1:]:
        word = word.replace("/run/abuse/%i.dev", str(record))
        word = word.replace("/run/abuse/%i.pid", str(record.with_suffix(".pid")))
        args.append(re.sub(r"\$\{(\w+)\}", lambda m: conf[m.group(1)], word))
    return [*ABUSECTL, *args]


@contextmanager
def _unit_running(command: list[str], workers: int = 2) -> Iterator[subprocess.Popen[str]]:
    """The unit's command in its own session; stopped on the way out."""
    serve = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        wait_for(lambda: len(worker_pids(serve)) == workers or serve.poll() is not None, timeout=120)
        assert serve.poll() is None, serve.communicate()[0]
        yield serve
    finally:
        stop_pool(serve)


def _destroy_recorded(record: Path) -> None:
    if record.exists():
        subprocess.run([*ABUSECTL, "destroy", record.read_text().strip(), "--force"], capture_output=True)


def _round_trip(dev: str) -> None:
    """Write 64 KiB past the page cache and read it back."""
    data = os.urandom(64 * 1024)
    with mmap.mmap(-1, len(data)) as out, mmap.mmap(-1, len(data)) as back:
        out[:] = data
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pwritev(fd, [out], MiB) == len(data)
            assert os.preadv(fd, [back], MiB) == len(data)
        finally:
            os.close(fd)
        assert back[:] == data


def test_unit_command_serves_the_same_disk_after_a_crash(tmp_path: Path) -> None:
    """What Restart=on-failure does: the second run finds the first one's disk."""
    record = tmp_path / "run" / "test.dev"
    command = _unit_command(record, {"SIZE": "64M", "BACKEND": "memory", "WORKERS": "2"})
    try:
        with _unit_running(command) as serve:
            dev = record.read_text().strip()
            assert re.fullmatch(r"/dev/abuse[0-9]+", dev)
            _round_trip(dev)
            os.killpg(serve.pid, signal.SIGKILL)  # the service crashes, workers too
            serve.wait(timeout=60)
        with _unit_running(command):  # systemd starts it again
            assert record.read_text().strip() == dev
            assert abusectl("list").split() == [dev]
            _round_trip(dev)
    finally:
        _destroy_recorded(record)


def test_unit_command_refuses_a_served_disk(tmp_path: Path) -> None:
    record = tmp_path / "test.dev"
    command = _unit_command(record, {"SIZE": "64M", "BACKEND": "null", "WORKERS": "2"})
    try:
        with _unit_running(command):
            dev = record.read_text().strip()
            second = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert second.returncode == 1
            assert (
                second.stderr
                == f"abusectl: {dev} (recorded in {record}) is already served by another process\n"
            )
    finally:
        _destroy_recorded(record)


def test_unit_file_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify, without a running systemd."""
    abusectl_bin = Path(sys.executable).parent / "abusectl"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/abusectl", str(abusectl_bin)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "abuse-serve@test.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def _udev_test(syspath: str) -> str:
    """`udevadm test` output with the rule installed; no diagnostics about it."""
    rules = Path("/run/udev/rules.d")
    rules.mkdir(parents=True, exist_ok=True)
    installed = rules / RULE.name
    installed.write_text(RULE.read_text())
    try:
        proc = run("udevadm", "test", "--action=add", syspath, timeout=300)
    finally:
        installed.unlink()
    out = proc.stdout + proc.stderr
    assert f"Reading rules file: {installed}" in out
    complaints = [line for line in out.splitlines() if line.startswith(f"{installed}:")]
    assert complaints == []
    return out


def _mode_and_group(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_udev_rule_sets_the_control_device_mode() -> None:
    _udev_test("/sys/class/misc/abuse")
    assert _mode_and_group("/dev/abuse") == (0o660, grp.getgrnam("disk").gr_gid)


def test_udev_rule_keeps_probes_off_an_unserved_disk(disks: Disks) -> None:
    """A disk with no worker and no timeout would hang any read from udev."""
    config = disks.create(64 * MiB, timeout_ms=0)
    out = _udev_test(f"/sys/block/{config.name}")
    assert "UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG=1" in out.splitlines()
    assert "UDISKS_IGNORE=1" in out.splitlines()
    assert not any(line.startswith("ID_FS_") for line in out.splitlines())
    assert _mode_and_group(config.path) == (0o660, grp.getgrnam("disk").gr_gid)
    assert disks.control.info(config.index).counters["completed"] == 0
