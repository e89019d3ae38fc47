"""The kernel tier can fail but never quietly skip where it is required."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE_KERNEL_TEST = "tests/kernel/test_driver.py::test_info_reports_config"


def _pytest(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "ABUSE_REQUIRE_KERNEL")}
    return {**env, **extra}


def test_kernel_test_fails_without_module_in_ci() -> None:
    if os.path.exists("/dev/abuse"):
        return  # the module is really here: nothing to simulate
    proc = _pytest(ONE_KERNEL_TEST, env=_env(CI="true"))
    assert proc.returncode == 1, proc.stdout
    assert "kernel tier required but cannot run" in proc.stdout


def test_kernel_test_skips_without_module_outside_ci() -> None:
    if os.path.exists("/dev/abuse"):
        return
    proc = _pytest(ONE_KERNEL_TEST, env=_env())
    assert proc.returncode == 0, proc.stdout
    assert "1 skipped" in proc.stdout


def test_vm_run_fails_when_the_module_is_missing(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["scripts/vm-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "ABUSE_KO": str(tmp_path / "abuse.ko"), "OUT": str(tmp_path / "out")},
    )
    assert proc.returncode != 0
    assert "abuse.ko is missing" in proc.stderr
