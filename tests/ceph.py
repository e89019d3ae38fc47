"""A real single-node Ceph cluster for tests (scripts/ceph-cluster).

:func:`cluster_fixture` starts one per test module: the host tier's
backend tests and the kernel tier's rbd tests share it.  A machine
without the Ceph daemons skips those tests, unless the tier is required
(CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "ceph-cluster"
POOL = "rbd"


@dataclass
class Cluster:
    """A running cluster: its directory, conf and how long it took to start."""

    dir: Path
    started_in: float  # seconds

    @property
    def conf(self) -> str:
        return str(self.dir / "ceph.conf")

    def spec(self, image: str, **options: str) -> str:
        """The rbd: backend spec of ``image`` in the test pool."""
        query = "&".join(f"{key}={value}" for key, value in {"conf": self.conf, **options}.items())
        return f"rbd:{POOL}/{image}?{query}"

    def rbd(self, *args: str, timeout: float = 300) -> str:
        """Run the rbd CLI on this cluster; its stdout."""
        return self._run("rbd", *args, timeout=timeout)

    def ceph(self, *args: str, timeout: float = 300) -> str:
        """Run the ceph CLI on this cluster; its stdout."""
        return self._run("ceph", *args, timeout=timeout)

    def _run(self, tool: str, *args: str, timeout: float) -> str:
        done = subprocess.run(
            [tool, "-c", self.conf, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)}: {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def create_image(self, name: str, size: str, *features: str) -> str:
        """``rbd create`` an image (layering only unless ``features`` are named)."""
        feature_args = [arg for feature in features or ("layering",) for arg in ("--image-feature", feature)]
        self.rbd("create", "--size", size, *feature_args, f"{POOL}/{name}")
        return name

    def blocklist(self) -> str:
        return self.ceph("osd", "blocklist", "ls")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _missing() -> str | None:
    for tool in ("ceph-mon", "ceph-osd", "rbd", "ceph"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap installs Ceph)"
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError as err:
        return f"python3-rados/python3-rbd are not importable ({err}): run scripts/bootstrap"
    return None


def start_cluster(config: pytest.Config) -> Iterator[Cluster]:
    """Start a cluster in a fresh directory, yield it, stop it and remove it."""
    problem = _missing()
    if problem is not None:
        if config.getoption("--require-kernel") or os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Ceph tests required but cannot run: {problem}")
        pytest.skip(problem)
    base = Path(tempfile.mkdtemp(prefix="abuse-ceph-"))
    directory = base / "cluster"
    env = {**os.environ, "CEPH_PORT": str(_free_port()), "CEPH_MGR": "0", "CEPH_CLUSTER_VERBOSE": "1"}
    began = time.monotonic()
    try:
        done = subprocess.run(
            [str(SCRIPT), "start", str(directory), POOL], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            pytest.fail(f"ceph-cluster start: {done.stderr.strip()}")
        cluster = Cluster(directory, time.monotonic() - began)
        print(f"ceph cluster up in {cluster.started_in:.1f} s:\n{done.stderr.strip()}", flush=True)
        yield cluster
    finally:
        subprocess.run([str(SCRIPT), "stop", str(directory)], check=False)
        shutil.rmtree(base, ignore_errors=True)
