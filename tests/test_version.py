"""Both entry points report the package and uapi versions."""

from __future__ import annotations

import subprocess
import sys

import abuse
from abuse import uapi


def test_python_m_abuse_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "abuse", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"abuse {abuse.__version__} (uapi {uapi.ABUSE_VERSION})"


def test_python_m_abuse_rejects_other_arguments() -> None:
    proc = subprocess.run([sys.executable, "-m", "abuse", "--frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
