"""Installing abuse the way users do: DKMS, the udev rule, the systemd unit.

The guest is a throwaway VM with a read-only root: the DKMS test gets
tmpfs overlays (tests/kernel/dkms-guest), the udev rule goes to
/run/udev/rules.d.  The unit's command runs without systemd, and the
unit itself under a systemd that runs as PID 1 of a container in the
guest (tests/kernel/systemd-container), since virtme-ng's init is the
guest's PID 1.
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

import psutil

from abuse import uapi
from abuse.control import Control, sysfs_workers
from tests.kernel.conftest import Disks, run, wait_for
from tests.kernel.serving import (
    ABUSECTL,
    abusectl,
    check_files,
    drop_caches,
    mounted,
    stop_pool,
    worker_pids,
    write_files,
)

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "dist" / "systemd" / "abuse-serve@.service"
RULE = ROOT / "dist" / "udev" / "59-abuse.rules"
SYSTEMD_CONTAINER = ROOT / "tests" / "kernel" / "systemd-container"
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


class Systemd:
    """systemd as PID 1 of a container in the guest; commands run inside it."""

    def __init__(self, pid: int) -> None:
        self.pid = pid  # in the guest's pid namespace

    def run(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run a command in the container's mount and pid namespaces."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            # systemctl's D-Bus calls give up after 25 s; TCG on a busy host is slower.
            env={**os.environ, "SYSTEMD_BUS_TIMEOUT": str(int(timeout))},
        )
        assert not check or proc.returncode == 0, f"{argv}: {proc.stdout}{proc.stderr}"
        return proc

    def path(self, path: str) -> Path:
        """``path`` as the container sees it (its /run and /etc are its own)."""
        return Path(f"/proc/{self.pid}/root{path}")

    def show(self, unit: str, *names: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={n}" for n in names)).stdout
        return dict(line.split("=", 1) for line in out.splitlines())

    def guest_pid(self, pid: int) -> int:
        """The guest's pid of the container's ``pid``."""
        for proc in psutil.Process(self.pid).children(recursive=True):
            status = Path(f"/proc/{proc.pid}/status").read_text()
            (nspids,) = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
            if int(nspids[-1]) == pid:
                return int(proc.pid)
        raise AssertionError(f"no pid {pid} in the container")


def _systemd_pid(container: subprocess.Popen[str]) -> int | None:
    """systemd's pid once the container's first process has exec'd it."""
    try:
        children = psutil.Process(container.pid).children()
        return children[0].pid if children and children[0].name() == "systemd" else None
    except psutil.NoSuchProcess:
        return None


def _remove_cgroup(path: Path) -> None:
    for child in path.iterdir():
        if child.is_dir():
            _remove_cgroup(child)
    path.rmdir()


@contextmanager
def _systemd_container(*units: Path) -> Iterator[Systemd]:
    """tests/kernel/systemd-container with ``units``, booted; killed on the way out."""
    container = subprocess.Popen(
        [str(SYSTEMD_CONTAINER), *map(str, units)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: _systemd_pid(container) is not None or container.poll() is not None, timeout=300)
        pid = _systemd_pid(container)
        assert pid is not None, container.communicate()[0]
        systemd = Systemd(pid)
        state = ""

        def booted() -> bool:  # systemctl fails until systemd listens, then waits
            nonlocal state
            state = systemd.run("systemctl", "is-system-running", "--wait", check=False).stdout.strip()
            return state in ("running", "degraded") or container.poll() is not None

        wait_for(booted, timeout=300)
        failed = systemd.run("systemctl", "list-units", "--failed", "--plain", "--no-legend").stdout
        assert state == "running", f"systemd is {state!r}: {failed}"
        yield systemd
    finally:
        container.kill()  # unshare --kill-child: systemd and its whole pid namespace
        container.communicate(timeout=60)
        cgroup = Path("/sys/fs/cgroup/abuse-systemd")
        wait_for(lambda: not any(procs.read_text() for procs in cgroup.glob("**/cgroup.procs")), timeout=60)
        _remove_cgroup(cgroup)


def test_unit_serves_the_disk_when_systemctl_start_returns(tmp_path: Path) -> None:
    """The unit under a real systemd: once `systemctl start` returns, the disk mounts.

    The unit is Type=notify and the pool sends READY=1 once every worker
    has attached, so right after `systemctl start` the disk takes mkfs
    and a mount with no wait; `systemctl stop` ends the pool cleanly and
    leaves the disk.  systemd runs in a container in the guest
    (tests/kernel/systemd-container), as virtme-ng's init is PID 1.
    """
    workers = 3
    unit = "abuse-serve@db.service"
    with _systemd_container(UNIT) as systemd:
        systemd.path("/etc/abuse").mkdir()
        systemd.path("/etc/abuse/db.conf").write_text(f"SIZE=64M\nBACKEND=memory\nWORKERS={workers}\n")
        systemd.run("systemctl", "start", unit)
        dev = systemd.path("/run/abuse/db.dev").read_text().strip()
        index = int(dev.removeprefix("/dev/abuse"))
        try:
            # READY=1 came once every worker had attached.
            serving = sysfs_workers(index)
            assert serving is not None and len(serving) == workers, serving
            run("mkfs.ext4", "-q", dev, timeout=300)
            with mounted(dev, tmp_path / "mnt") as mnt:
                sums = write_files(mnt, 4, 256 << 10)
                drop_caches()
                check_files(mnt, sums)

            show = systemd.show(unit, "ActiveState", "SubState", "MainPID", "StatusText")
            assert (show["ActiveState"], show["SubState"]) == ("active", "running"), show
            assert show["StatusText"] == f"serving {dev} with {workers} workers"
            assert systemd.path("/run/abuse/db.pid").read_text().strip() == show["MainPID"]
            pool = psutil.Process(systemd.guest_pid(int(show["MainPID"])))
            assert sorted(serving) == sorted(p.pid for p in pool.children()), "the same workers"

            systemd.run("systemctl", "stop", unit)
            assert systemd.show(unit, "ActiveState") == {"ActiveState": "inactive"}
            assert not pool.is_running()
            assert sysfs_workers(index) == []
            # The pool exited 0 on SIGTERM, its workers first: no straggler
            # for KillMode=mixed to SIGKILL, no failure.
            journal = ""

            def logged_stop() -> bool:
                nonlocal journal
                journal = systemd.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout
                return f"{unit}: Deactivated successfully." in journal

            wait_for(logged_stop, timeout=60)
            for bad in ("SIGKILL", "Traceback", "Main process exited", "Failed with result", "code=killed"):
                assert bad not in journal, journal
        finally:
            systemd.run("systemctl", "stop", unit, check=False)
            with Control() as control:
                control.destroy(index, force=True)


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
