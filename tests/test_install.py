"""What `make install` and `pip install .` put in place, checked on the host.

The kernel tier repeats the unit and rule checks in the guest, where the
module is loaded, and runs DKMS for real (tests/kernel/test_install.py).
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import abuse
from abuse import uapi
from abusectl.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "dist" / "systemd" / "abuse-serve@.service"
RULE = ROOT / "dist" / "udev" / "59-abuse.rules"
EXAMPLE = ROOT / "dist" / "abuse.conf.example"


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if re.match(r"\w+=", line))
    return {key: value for key, value in pairs}


def test_dkms_conf_names_the_package_version() -> None:
    text = (ROOT / "kernel" / "dkms.conf").read_text()
    assert re.search(r'^PACKAGE_NAME="abuse"$', text, re.M)
    assert re.search(rf'^PACKAGE_VERSION="{re.escape(abuse.__version__)}"$', text, re.M)
    assert re.search(r'^AUTOINSTALL="yes"$', text, re.M)


def _verify(unit_text: str, tmp_path: Path) -> str:
    """systemd-analyze verify of an instance, with abusectl from this venv."""
    abusectl = str(Path(sys.executable).parent / "abusectl")
    (tmp_path / UNIT.name).write_text(unit_text.replace("/usr/local/bin/abusectl", abusectl))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "abuse-serve@disk0.service"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    return f"{proc.returncode} {proc.stdout}{proc.stderr}".strip()


def test_unit_file_verifies(tmp_path: Path) -> None:
    """Any warning fails too."""
    assert _verify(UNIT.read_text(), tmp_path) == "0"


def test_unit_file_verify_catches_a_bad_setting(tmp_path: Path) -> None:
    """The check above can fail: a broken copy of the unit does not pass."""
    broken = UNIT.read_text().replace("Restart=on-failure", "Restart=sometimes")
    assert "Failed to parse service restart specifier" in _verify(broken, tmp_path)


def test_unit_command_line_parses_with_the_example_config() -> None:
    """ExecStart, with the example's SIZE, BACKEND and WORKERS, is valid abusectl."""
    conf = _env_file(EXAMPLE)
    assert set(conf) == {"SIZE", "BACKEND", "WORKERS"}
    (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
    words = [re.sub(r"\$\{(\w+)\}", lambda m: conf[m.group(1)], w) for w in shlex.split(line[10:])]
    assert words[:2] == ["/usr/local/bin/abusectl", "serve"]
    args = build_parser().parse_args(words[1:])
    assert (args.dev, args.create, args.workers) == (None, 10 << 30, 4)
    assert str(args.record) == "/run/abuse/%i.dev"


def test_unit_command_line_parses_with_the_rbd_example_config() -> None:
    """The rbd: example's BACKEND (with its ? and &) is one well-formed spec on the unit's line."""
    conf = _env_file(ROOT / "dist" / "abuse-rbd.conf.example")
    (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
    words = [re.sub(r"\$\{(\w+)\}", lambda m: conf[m.group(1)], w) for w in shlex.split(line[10:])]
    args = build_parser().parse_args(words[1:])
    assert (args.backend, args.workers) == (conf["BACKEND"], 8)


def _udev_complaints(rule_text: str) -> list[str]:
    """udevadm test's complaints about a rule, in a private mount namespace.

    /run and /dev are fresh tmpfs there, so the rule is seen and nothing
    on the host (its device nodes, its udev database) is touched.
    """
    script = (
        "mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /dev && mkdir -p /run/udev/rules.d && "
        'cat > /run/udev/rules.d/59-abuse.rules && exec udevadm test --action=add "$0"'
    )
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "/sys/class/mem/null"],
        input=rule_text,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Reading rules file: /run/udev/rules.d/59-abuse.rules" in out
    return [line for line in out.splitlines() if line.startswith("/run/udev/rules.d/59-abuse.rules:")]


def test_udev_rule_parses() -> None:
    assert _udev_complaints(RULE.read_text()) == []


def test_udev_rule_check_catches_a_typo() -> None:
    broken = RULE.read_text().replace('MODE="0660", GROUP="disk"\n\n#', 'MODE="0660", GRUOP="disk"\n\n#')
    assert broken != RULE.read_text()
    assert _udev_complaints(broken)


def test_make_install_files_into_destdir(tmp_path: Path) -> None:
    subprocess.run(
        ["make", "-s", "install-files", f"DESTDIR={tmp_path}"], cwd=ROOT, check=True, capture_output=True
    )
    installed = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert installed == [
        "etc/abuse/NAME-rbd.conf.example",
        "etc/abuse/NAME.conf.example",
        "etc/systemd/system/abuse-serve@.service",
        "etc/udev/rules.d/59-abuse.rules",
        "usr/share/abuse/abuse-serve-ceph.conf",
    ]
    assert (tmp_path / "etc/udev/rules.d/59-abuse.rules").read_text() == RULE.read_text()


def test_pip_install_into_a_fresh_venv(tmp_path: Path) -> None:
    """`pip install .` gives a working abusectl with the uapi header inside."""
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".*_cache"),
    )
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = subprocess.run(
        [env_dir / "bin" / "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr
    want = f"{abuse.__version__} (uapi {uapi.ABUSE_VERSION})"
    cli = subprocess.run([env_dir / "bin" / "abusectl", "--version"], capture_output=True, text=True)
    assert cli.stdout.splitlines()[0] == f"abusectl {want}"
    module = subprocess.run(
        [env_dir / "bin" / "python", "-m", "abuse", "--version"], capture_output=True, text=True
    )
    assert module.stdout == f"abuse {want}\n"
    (header,) = env_dir.glob("lib/python*/site-packages/abuse/abuse.h")
    assert not header.is_symlink()
    assert header.read_text() == (ROOT / "kernel" / "abuse.h").read_text()
    missing = subprocess.run([env_dir / "bin" / "abusectl", "features"], capture_output=True, text=True)
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1


def test_package_declares_dependencies_with_floors() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = [r for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    assert {re.split(r"[<>=!~]", r)[0] for r in requires} == {"cffi", "ioctl-opt", "psutil"}
    assert all(">=" in r for r in requires)


@pytest.mark.parametrize("name", ["trixie-kernel", "chroot-module", "dkms-install"])
def test_scripts_are_executable(name: str) -> None:
    assert (ROOT / "scripts" / name).stat().st_mode & 0o111
