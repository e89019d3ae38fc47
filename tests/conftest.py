"""Shared pytest setup: the kernel tier may skip only outside CI."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-kernel",
        action="store_true",
        default=os.environ.get("CI", "").lower() == "true" or os.environ.get("ABUSE_REQUIRE_KERNEL") == "1",
        help="fail instead of skipping kernel tests (default when CI=true)",
    )
