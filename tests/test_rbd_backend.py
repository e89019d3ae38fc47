"""The rbd: backend against a real single-node Ceph cluster (no kernel needed).

One cluster per module (scripts/ceph-cluster, memstore, no mgr); each
test makes its own images.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from abuse.backends import Backend, check_spec, open_backend
from abuse.backends.rbd import split_rbd_argument
from abuse.pool import Pool, worker_ready
from tests.ceph import POOL, Cluster, start_cluster

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    yield from start_cluster(request.config)


@pytest.mark.parametrize(
    "spec",
    [
        "rbd:rbd/disk",
        "rbd:pool/image?conf=/etc/ceph/ceph.conf&id=abuse&keyring=/etc/ceph/k&timeout=5",
        "rbd:pool/image?queue_depth=1",
        "rbd:pool/image?queue_depth=64",
    ],
)
def test_good_specs(spec: str) -> None:
    assert check_spec(spec) == spec


@pytest.mark.parametrize(
    "spec, why",
    [
        ("rbd:", "needs rbd:POOL/IMAGE"),
        ("rbd:image", "rbd needs POOL/IMAGE"),
        ("rbd:pool/", "rbd needs POOL/IMAGE"),
        ("rbd:/image", "rbd needs POOL/IMAGE"),
        ("rbd:a/b/c", "rbd needs POOL/IMAGE"),
        ("rbd:a/b?user=x", "unknown option 'user=x'"),
        ("rbd:a/b?timeout=0", "timeout must be"),
        ("rbd:a/b?timeout=1.5", "timeout must be"),
        ("rbd:a/b?queue_depth=0", "queue_depth must be a whole number from 1 to 64, not '0'"),
        ("rbd:a/b?queue_depth=65", "queue_depth must be"),
        ("rbd:a/b?queue_depth=-1", "queue_depth must be"),
        ("rbd:a/b?queue_depth=", "unknown option 'queue_depth='"),
    ],
)
def test_bad_specs(spec: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_spec(spec)


def test_spec_options() -> None:
    target = split_rbd_argument("p/i?conf=/c&id=abuse&keyring=/k%3F&timeout=7&queue_depth=3")
    assert (
        target.pool,
        target.image,
        target.conf,
        target.client_id,
        target.keyring,
        target.timeout,
        target.queue_depth,
    ) == ("p", "i", "/c", "abuse", "/k?", 7, 3)
    assert split_rbd_argument("p/i").queue_depth == 8


def test_every_operation_and_workers_see_each_other(cluster: Cluster) -> None:
    image = cluster.create_image("ops", "16M")
    spec = cluster.spec(image)
    with open_backend(spec, 16 * MiB) as first, open_backend(spec, 16 * MiB) as second:
        assert (first.can_flush, first.can_discard, first.can_write_zeroes, first.shared_state) == (
            True,
            True,
            True,
            True,
        )
        first.check_workers(4)  # layering only: many workers are fine
        assert first.open_worker() != second.open_worker()
        data = os.urandom(64 * 1024)
        first.write(MiB, memoryview(data))
        first.flush()
        buf = bytearray(len(data))
        second.read(MiB, memoryview(buf))  # no cache: the other worker's write is seen at once
        assert buf == data
        second.write_zeroes(MiB, 4096)
        first.read(MiB, memoryview(buf))
        assert buf[:4096] == bytes(4096) and buf[4096:] == data[4096:]
        second.discard(0, 4 * MiB)  # a whole object: it reads as zeroes (a partial discard may not)
        first.read(MiB, memoryview(buf))
        assert buf == bytes(len(buf))


def test_bad_input_is_one_clear_error(cluster: Cluster, tmp_path: Path) -> None:
    image = cluster.create_image("bad", "8M")
    cases: list[tuple[str, int, type[Exception], str]] = [
        (f"rbd:nopool/{image}?conf={cluster.conf}", 8 * MiB, FileNotFoundError, "no pool 'nopool'"),
        (cluster.spec("nope"), 8 * MiB, FileNotFoundError, "no image 'nope' in pool 'rbd'"),
        (cluster.spec(image), 16 * MiB, ValueError, "holds 8388608 bytes, the disk needs 16777216"),
        (
            cluster.spec(image, id="nobody"),
            8 * MiB,
            OSError,
            "cannot connect to the cluster as client.nobody",
        ),
        (
            f"rbd:rbd/{image}?conf={tmp_path}/none.conf",
            8 * MiB,
            FileNotFoundError,
            "none.conf does not exist",
        ),
    ]
    wrong = tmp_path / "wrong.keyring"
    subprocess.run(
        ["ceph-authtool", "--create-keyring", str(wrong), "--gen-key", "-n", "client.admin"],
        check=True,
        capture_output=True,
    )
    cases.append((cluster.spec(image, keyring=str(wrong)), 8 * MiB, OSError, "the key was refused"))
    down = tmp_path / "down.conf"
    down.write_text(f"[global]\nmon host = v1:127.0.0.1:9\nkeyring = {cluster.dir}/client.admin.keyring\n")
    cases.append(
        (f"rbd:rbd/{image}?conf={down}&timeout=2", 8 * MiB, OSError, "no monitor answered within 2 s")
    )
    for spec, size, kind, message in cases:
        with pytest.raises(kind, match=message) as caught:
            open_backend(spec, size)
        assert "\n" not in str(caught.value)


def test_exclusive_lock_is_refused_for_several_workers(cluster: Cluster) -> None:
    image = cluster.create_image("locked", "8M", "layering", "exclusive-lock", "object-map", "fast-diff")
    with open_backend(cluster.spec(image), 8 * MiB) as backend:
        backend.check_workers(1)
        with pytest.raises(
            ValueError, match=f"rbd feature disable rbd/{image} fast-diff object-map exclusive-lock"
        ):
            backend.check_workers(2)


def test_fence_blocklists_a_client(cluster: Cluster) -> None:
    image = cluster.create_image("fence", "8M")
    spec = cluster.spec(image)
    with open_backend(spec, 8 * MiB) as supervisor, open_backend(spec, 8 * MiB) as old:
        identity = old.open_worker()
        old.write(0, memoryview(b"o" * 4096))
        supervisor.fence(identity)
        assert identity in cluster.blocklist()
        with pytest.raises(OSError) as refused:
            old.write(0, memoryview(b"s" * 4096))
        assert refused.value.errno == errno.ESHUTDOWN  # EBLOCKLISTED
        with open_backend(spec, 8 * MiB) as new:
            buf = bytearray(4096)
            new.read(0, memoryview(buf))
            assert buf == b"o" * 4096


def test_fence_waits_until_the_osds_have_the_blocklist(cluster: Cluster) -> None:
    """A stopped OSD cannot have the new map: fence says so in the spec's timeout, and returns once it can."""
    image = cluster.create_image("fence-wait", "8M")
    spec = cluster.spec(image, timeout="3")
    osd = int((cluster.dir / "run" / "osd.0.pid").read_text())
    with open_backend(spec, 8 * MiB) as supervisor, open_backend(spec, 8 * MiB) as old:
        identity = old.open_worker()
        os.kill(osd, signal.SIGSTOP)
        try:
            with pytest.raises(OSError) as late:  # the spec's 3 s ran out: no test clock needed
                supervisor.fence(identity)
            assert late.value.errno == errno.ETIMEDOUT
            assert "osd.0 did not get OSD map" in str(late.value)
        finally:
            os.kill(osd, signal.SIGCONT)
        assert identity in cluster.blocklist()  # the entry is in; only its reach was not confirmed
        supervisor.fence(identity)  # the OSD runs again: confirmed
        with pytest.raises(OSError) as refused:
            old.write(0, memoryview(b"s" * 4096))
        assert refused.value.errno == errno.ESHUTDOWN


def test_fence_by_a_client_with_rbd_caps_only_warns_that_it_cannot_ask_the_osds(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The caps the README gives (profile rbd) allow the blocklist, not OSD commands."""
    image = cluster.create_image("fence-caps", "8M")
    keyring = cluster.dir / "client.rbdonly.keyring"
    if not keyring.exists():
        cluster.ceph("auth", "get-or-create", "client.rbdonly", "mon", "profile rbd",
                     "osd", f"profile rbd pool={POOL}", "-o", str(keyring))  # fmt: skip
    spec = cluster.spec(image, id="rbdonly", keyring=str(keyring))
    with open_backend(spec, 8 * MiB) as supervisor, open_backend(cluster.spec(image), 8 * MiB) as old:
        identity = old.open_worker()
        supervisor.fence(identity)
        assert identity in cluster.blocklist()
    assert "cannot ask osd.0 for its OSD map" in caplog.text


def test_forked_workers_have_their_own_client_and_fence_alone(cluster: Cluster) -> None:
    """Workers forked after the supervisor's check each get their own RADOS address.

    They once all drew the supervisor's nonce: the OSD swapped their
    sessions at every operation, and a fence of one refused them all.
    """
    image = cluster.create_image("forked", "8M")
    spec = cluster.spec(image)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])  # the children inherit it
    try:
        _fork_workers_and_fence_one(spec)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _fork_workers_and_fence_one(spec: str) -> None:
    with open_backend(spec, 8 * MiB) as backend:  # the supervisor connected to check the image
        children = []
        for _ in range(3):
            reader, writer = os.pipe()
            pid = os.fork()
            if pid == 0:  # a worker: say its identity, then write once the parent says go
                os.close(reader)
                signal.alarm(60)  # a worker that hangs dies; the parent then fails, not hangs
                code = 1
                try:
                    os.write(writer, backend.open_worker().encode() + b"\n")
                    os.close(writer)
                    signal.sigwait([signal.SIGUSR1])
                    try:
                        backend.write(0, memoryview(b"w" * 4096))
                        code = 0
                    except OSError as err:
                        code = err.errno or 1
                finally:
                    os._exit(code)
            os.close(writer)
            with os.fdopen(reader) as lines:  # empty if the worker died first
                children.append((pid, lines.readline().strip()))
        identities = [identity for _, identity in children]
        assert len(set(identities)) == 3, identities
        backend.fence(identities[0])
        codes = []
        for pid, _ in children:
            os.kill(pid, signal.SIGUSR1)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        assert codes == [errno.ESHUTDOWN, 0, 0]  # only the fenced worker is refused


def test_started_reads_and_writes_overlap_and_fail_alone(cluster: Cluster) -> None:
    """librbd aio: many started at once, each read's data in its buffer when its finish returns."""
    image = cluster.create_image("aio", "16M")
    spec = cluster.spec(image, queue_depth="3")
    with open_backend(spec, 16 * MiB) as backend, open_backend(spec, 16 * MiB) as supervisor:
        assert backend.queue_depth == 3
        identity = backend.open_worker()
        blocks = [os.urandom(64 * 1024) for _ in range(16)]
        finishes = [backend.start_write(i * MiB, memoryview(block)) for i, block in enumerate(blocks)]
        for finish in finishes:
            finish()
        bufs = [bytearray(64 * 1024) for _ in blocks]
        finishes = [backend.start_read(i * MiB, memoryview(buf)) for i, buf in enumerate(bufs)]
        for finish in finishes:
            finish()  # the read's data is there now, not when librbd's own wait returns
        assert bufs == blocks
        supervisor.fence(identity)
        finish = backend.start_write(0, memoryview(b"s" * 4096))
        with pytest.raises(OSError) as refused:
            finish()
        assert refused.value.errno == errno.ESHUTDOWN  # EBLOCKLISTED, answered to that request alone
    with open_backend(cluster.spec(image), 16 * MiB) as reader:
        buf = bytearray(64 * 1024)
        reader.read(0, memoryview(buf))
        assert buf == blocks[0]


def _stalling_target(index: int, backend: Backend, batch: int) -> None:
    """A pool child that attaches with its backend's identity, then writes the wedge block."""
    identity = backend.open_worker()
    worker_ready(identity)
    backend.write(0, memoryview(b"S" * 4096))  # held by its proxy: this child stops answering
    signal.pause()


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "control-unfenced"])
def test_pool_fences_a_silent_worker_before_killing_it(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fenced: bool
) -> None:
    """The pool's liveness kill blocklists the worker's client first: its late write is refused.

    The control case, with a backend that does not fence, shows the
    check can fail: the late write lands over the newer data.
    """
    image = cluster.create_image(f"pool-{fenced}", "8M")
    spec = cluster.spec(image)
    monkeypatch.setenv("ABUSE_DELAYED_RBD", json.dumps({"spec": spec, "wedge": 0, "dir": str(tmp_path)}))
    from tests.delayed_rbd import DelayedRbd

    backend = DelayedRbd(8 * MiB)
    if not fenced:
        monkeypatch.setattr(backend, "fence", lambda identity: None)
    pool = Pool(0, backend, workers=1, target=_stalling_target, alive_timeout=2.0)

    def until_killed(pool: Pool) -> None:
        if pool.hung_kills:
            pool.stop()

    assert pool.run(on_tick=until_killed, tick=0.1) == 0
    assert pool.hung_kills == 1
    held_by = int((tmp_path / "held").read_text())
    with open_backend(spec, 8 * MiB) as newer:
        newer.write(0, memoryview(b"N" * 4096))
        (tmp_path / "release").touch()
        deadline = time.monotonic() + 120
        while not (tmp_path / "result").exists():  # the proxy writes it once the write is refused or done
            assert time.monotonic() < deadline, "the held write never finished"
            time.sleep(0.05)
        buf = bytearray(4096)
        newer.read(0, memoryview(buf))
    result = int((tmp_path / "result").read_text())
    if fenced:
        assert (result, bytes(buf)) == (errno.ESHUTDOWN, b"N" * 4096)  # refused: EBLOCKLISTED
    else:
        assert (result, bytes(buf)) == (0, b"S" * 4096)  # the stale write landed
    while _running(held_by):  # the proxy leaves once its worker's pipe is gone
        assert time.monotonic() < deadline, "the proxy did not exit"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie that init has not reaped yet does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
