"""``rbd:POOL/IMAGE`` — a Ceph RBD image, through librbd (python3-rbd).

The spec's options follow ``file:``'s shape::

    rbd:POOL/IMAGE?conf=/etc/ceph/ceph.conf&id=admin&keyring=PATH&timeout=30&queue_depth=8

``conf`` is the cluster's ceph.conf (default: librados's search path),
``id`` the client name without ``client.`` (default ``admin``),
``keyring`` overrides the conf's keyring, ``timeout`` (whole seconds,
default 10) bounds connecting (client_mount_timeout) and every operation
(rados_osd_op_timeout, rados_mon_op_timeout): a request whose operation
times out (the cluster went away) fails with EIO.  ``queue_depth``
(default 8, at most 64) is how many reads and writes one worker keeps
in flight through librbd's aio calls (1: one at a time).  Keep it below half
the disk's ``--timeout`` (30 s by default), when the pool's liveness
check kills a silent worker: a killed worker's requests are requeued,
and a cluster that stays away would then hold them for ever instead of
failing them.

librados runs threads, which do not survive a fork: the supervisor
connects only to check the image (it exists, it is large enough, its
features suit the number of workers) and disconnects before the pool
forks; each worker connects and opens the image in
:meth:`RbdBackend.open_worker`, after the fork, and reports its RADOS
client address (``get_addrs()``, ``IP:PORT/NONCE``) as its fencing
identity.  When the pool gives up on a silent worker it calls
:meth:`RbdBackend.fence` first, which blocklists that address (``osd
blocklist add``) and waits until the OSDs have the new map, before the
worker is killed and its requests go to another worker: a write of its
that is still on its way is refused by the OSDs (EBLOCKLISTED, which is
ESHUTDOWN).  The entry is not removed
when the worker is reaped (a write of the dead process may still sit in
a socket buffer on its way); it expires after :data:`FENCE_EXPIRE`
seconds, and no later client has that address.

Every worker writes the same image, so neither librbd's cache (which
would serve a worker stale data another worker overwrote; it is turned
off) nor the exclusive-lock feature fit: with exclusive-lock every write
of one worker would take the lock from another.  More than one worker on
an image with exclusive-lock (or object-map, fast-diff or journaling,
which need it) is refused, naming the ``rbd feature disable`` command.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from abuse.backends.base import Backend, Finish

__all__ = ["FENCE_EXPIRE", "MAX_QUEUE_DEPTH", "RbdBackend", "RbdTarget", "split_rbd_argument"]

log = logging.getLogger(__name__)

_OPTIONS = ("conf", "id", "keyring", "timeout", "queue_depth")
#: The most operations one worker may keep in flight (``queue_depth``).
MAX_QUEUE_DEPTH = 64
#: Seconds a fenced worker's client stays blocklisted: long after its
#: process is dead and the OSDs have dropped its connections.
FENCE_EXPIRE = 600.0
# What depends on exclusive-lock, in the order `rbd feature disable` wants them.
_SINGLE_CLIENT_FEATURES = ("journaling", "fast-diff", "object-map", "exclusive-lock")


@dataclass(frozen=True)
class RbdTarget:
    """Where an ``rbd:`` spec points: the image and how to reach its cluster."""

    pool: str
    image: str
    conf: str | None = None
    client_id: str = "admin"
    keyring: str | None = None
    timeout: int = 10
    queue_depth: int = 8

    @property
    def name(self) -> str:
        return f"{self.pool}/{self.image}"


def split_rbd_argument(argument: str) -> RbdTarget:
    """The :class:`RbdTarget` of an ``rbd:`` spec's argument, ``POOL/IMAGE[?OPTIONS]``.

    Raises ValueError for a missing pool or image, or an unknown option or value.
    """
    name, _, query = argument.partition("?")
    pool, slash, image = name.partition("/")
    if not slash or not pool or not image or "/" in image:
        raise ValueError("rbd needs POOL/IMAGE")
    options: dict[str, str] = {}
    for option in filter(None, query.split("&")):
        key, equals, value = option.partition("=")
        if key not in _OPTIONS or not equals or not value:
            raise ValueError(f"unknown option {option!r} (rbd:POOL/IMAGE?{'=...&'.join(_OPTIONS)}=...)")
        options[key] = unquote(value)
    timeout = RbdTarget.timeout
    if "timeout" in options:
        value = options["timeout"]
        if not value.isdigit() or not 0 < int(value) < 1_000_000:
            raise ValueError(f"timeout must be a whole number of seconds > 0, not {value!r}")
        timeout = int(value)
    queue_depth = RbdTarget.queue_depth
    if "queue_depth" in options:
        value = options["queue_depth"]
        if not value.isdigit() or not 0 < int(value) <= MAX_QUEUE_DEPTH:
            raise ValueError(f"queue_depth must be a whole number from 1 to {MAX_QUEUE_DEPTH}, not {value!r}")
        queue_depth = int(value)
    return RbdTarget(
        pool,
        image,
        conf=options.get("conf"),
        client_id=options.get("id", "admin"),
        keyring=options.get("keyring"),
        timeout=timeout,
        queue_depth=queue_depth,
    )


def _bindings() -> tuple[Any, Any]:
    try:
        import rados
        import rbd
    except ImportError as err:
        raise ValueError(
            f"the rbd: backend needs python3-rados and python3-rbd ({err}); "
            "scripts/bootstrap installs them and links them into .venv"
        ) from None
    return rados, rbd


def _errno(err: Exception) -> int:
    """The positive errno of a rados or rbd exception, EIO if it has none."""
    code = getattr(err, "errno", None)
    return abs(code) if isinstance(code, int) and code else errno.EIO


def _failed(what: str, err: Exception) -> OSError:
    """The OSError a request answers for a failed librbd call: a timeout is EIO."""
    code = _errno(err)
    if code == errno.ETIMEDOUT:
        log.warning("%s timed out: is the cluster reachable?", what)
        code = errno.EIO
    else:
        log.warning("%s failed: %s", what, err)
    return OSError(code, f"{what}: {err}")


class _Pending:
    """One started librbd aio call; calling it waits for it (a :data:`Finish`).

    The wait is on our own event, set at the end of the callback: librbd's
    ``wait_for_complete_and_cb`` can return before a read's callback (which
    brings its data) has run.  librbd calls back for every operation,
    failed or timed out (rados_osd_op_timeout), so the wait ends.
    """

    def __init__(self, what: str, buf: memoryview | None = None, payload: bytes = b"") -> None:
        self.what = what
        self.buf = buf  # a read's destination
        self.payload = payload  # a write's data, referenced until it completes
        self.code = 0
        self.done = threading.Event()

    def on_complete(self, completion: Any, data: bytes | None = None) -> None:
        """librbd's callback, in one of its threads: keep the result, copy a read's data."""
        try:
            self.code = int(completion.get_return_value())
            if self.buf is not None and self.code >= 0:
                if data is None or len(data) != len(self.buf):
                    self.code = -errno.EIO
                else:
                    self.buf[:] = data
        except BaseException:
            self.code = -errno.EIO
            raise
        finally:
            self.done.set()

    def __call__(self) -> None:
        self.done.wait()
        self.payload = b""
        if self.code < 0:
            raise _failed(self.what, OSError(-self.code, os.strerror(-self.code)))


def _connect_in_a_fresh_thread(cluster: Any) -> None:
    """``cluster.connect()``, called from a thread that never used Ceph before.

    connect() draws the client's address nonce from a random engine that
    Ceph keeps per thread (ceph::util::generate_random_number), seeded on
    its first use.  A pool's workers are forked from the supervisor after
    it connected once to check the image: in each one the main thread's
    engine is the supervisor's, in the same state, so every worker drew
    the same nonce.  The OSD then took each worker's connection for the
    others' (one session replaced another at every operation: 4 workers
    served 5 IOPS where 1 served 72 under TCG), and fencing one worker's
    address blocklisted them all.  A new thread has a new engine.
    """
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            cluster.connect()
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=connect, name="rados-connect")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


class _Session:
    """One connection to the cluster; the image opened on it if asked."""

    def __init__(self, target: RbdTarget, open_image: bool = True) -> None:
        rados, rbd = _bindings()
        self.target = target
        self.cluster: Any = None
        self.ioctx: Any = None
        self.image: Any = None
        where = f"rbd:{target.name}"
        for option, path in (("conf", target.conf), ("keyring", target.keyring)):
            if path is not None and not os.path.isfile(path):
                raise FileNotFoundError(errno.ENOENT, f"{where}: {option} {path} does not exist")
        try:
            cluster = rados.Rados(rados_id=target.client_id, conffile=target.conf or "")
        except rados.Error as err:
            raise OSError(_errno(err), f"{where}: cannot read the Ceph configuration: {err}") from None
        self.cluster = cluster
        try:
            seconds = str(target.timeout)
            settings = {
                "client_mount_timeout": seconds,
                "rados_osd_op_timeout": seconds,
                "rados_mon_op_timeout": seconds,
                "rbd_cache": "false",  # every worker must see every other worker's writes
                "log_to_stderr": "false",
                "err_to_stderr": "false",
            }
            if target.keyring is not None:
                settings["keyring"] = target.keyring
            for key, value in settings.items():
                cluster.conf_set(key, value)
            try:
                _connect_in_a_fresh_thread(cluster)
            except rados.Error as err:
                raise OSError(
                    _errno(err),
                    f"{where}: cannot connect to the cluster as client.{target.client_id} "
                    f"({_connect_reason(err, target.timeout)})",
                ) from None
            try:
                self.ioctx = cluster.open_ioctx(target.pool)
            except rados.ObjectNotFound:
                raise FileNotFoundError(errno.ENOENT, f"{where}: no pool {target.pool!r}") from None
            except rados.Error as err:
                raise OSError(_errno(err), f"{where}: cannot open pool {target.pool!r}: {err}") from None
            if open_image:
                try:
                    self.image = rbd.Image(self.ioctx, target.image)
                except rbd.ImageNotFound:
                    raise FileNotFoundError(
                        errno.ENOENT, f"{where}: no image {target.image!r} in pool {target.pool!r}"
                    ) from None
                except rbd.Error as err:
                    raise OSError(_errno(err), f"{where}: cannot open the image: {err}") from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the image and the connection; librados's threads end here."""
        for resource in (self.image, self.ioctx):
            if resource is not None:
                try:
                    resource.close()
                except Exception:  # already broken (blocklisted, cluster gone): nothing to keep
                    pass
        self.image = self.ioctx = None
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def _connect_reason(err: Exception, timeout: int) -> str:
    code = _errno(err)
    if code == errno.ETIMEDOUT:
        return f"no monitor answered within {timeout} s"
    if code in (errno.EACCES, errno.EPERM):
        return "the key was refused: check id= and keyring="
    if code == errno.ENOENT:
        return "no keyring or monitor address found: check conf= and keyring="
    return os.strerror(code)


def _feature_names(features: int, rbd: Any) -> list[str]:
    bits = {
        "journaling": rbd.RBD_FEATURE_JOURNALING,
        "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
        "object-map": rbd.RBD_FEATURE_OBJECT_MAP,
        "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
    }
    return [name for name in _SINGLE_CLIENT_FEATURES if features & bits[name]]


class RbdBackend(Backend):
    """An existing RBD image of at least the disk's size, served by librbd.

    Opening checks the image from the supervisor and closes the
    connection again; each worker connects in :meth:`open_worker`.  See
    the module docstring.  Raises FileNotFoundError for a missing conf,
    keyring, pool or image, OSError for a cluster that cannot be
    reached or refuses the key, ValueError for an image smaller than the
    disk.
    """

    can_flush = True
    can_discard = True
    can_write_zeroes = True
    shared_state = True  # the image is the state; every worker opens it

    def __init__(self, target: RbdTarget, size: int) -> None:
        self.target = target
        self.size = size
        self.queue_depth = target.queue_depth
        self._session: _Session | None = None
        _, rbd = _bindings()
        session = _Session(target)
        try:
            image_size = int(session.image.size())
            self.single_client_features = _feature_names(int(session.image.features()), rbd)
        finally:
            session.close()
        if image_size < size:
            raise ValueError(
                f"rbd:{target.name} holds {image_size} bytes, the disk needs {size}: "
                f"rbd resize --size {size}B {target.name}"
            )

    def check_workers(self, workers: int) -> None:
        if workers > 1 and self.single_client_features:
            raise ValueError(
                f"rbd:{self.target.name} has {', '.join(self.single_client_features)}, whose lock "
                f"{workers} workers would take from each other on every write: serve it with --workers 1 "
                f"or run: rbd feature disable {self.target.name} {' '.join(self.single_client_features)}"
            )

    # --- in each worker ------------------------------------------------------

    def open_worker(self) -> str:
        """Connect this worker and open the image; return its RADOS client address."""
        self._session = _Session(self.target)
        return str(self._session.cluster.get_addrs())

    def close_worker(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _image(self) -> Any:
        session = self._session
        if session is None:  # used outside a pool: connect on first use
            self.open_worker()
            session = self._session
            assert session is not None
        return session.image

    def read(self, offset: int, buf: memoryview) -> None:
        image = self._image()
        try:
            buf[:] = image.read(offset, len(buf))
        except Exception as err:
            raise _failed(f"rbd read at {offset}", err) from None

    def write(self, offset: int, data: memoryview) -> None:
        image = self._image()
        try:
            image.write(bytes(data), offset)
        except Exception as err:
            raise _failed(f"rbd write at {offset}", err) from None

    # Overlapped: the worker starts a whole batch (at most queue_depth
    # requests and queue_bytes, 2 MiB) through librbd's aio calls, then
    # waits for each; one worker keeps that much in flight, as krbd and
    # rbd-nbd keep their queue depth.  The bound keeps every operation
    # well inside rados_osd_op_timeout on a slow cluster.

    def start_read(self, offset: int, buf: memoryview) -> Finish:
        image = self._image()
        pending = _Pending(f"rbd read at {offset}", buf)
        try:
            image.aio_read(offset, len(buf), pending.on_complete)
        except Exception as err:
            raise _failed(pending.what, err) from None
        return pending

    def start_write(self, offset: int, data: memoryview) -> Finish:
        image = self._image()
        # librbd reads the bytes until the write completes: _Pending keeps them.
        pending = _Pending(f"rbd write at {offset}", payload=bytes(data))
        try:
            image.aio_write(pending.payload, offset, pending.on_complete)
        except Exception as err:
            raise _failed(pending.what, err) from None
        return pending

    def flush(self) -> None:
        image = self._image()
        try:
            image.flush()
        except Exception as err:
            raise _failed("rbd flush", err) from None

    def discard(self, offset: int, length: int) -> None:
        image = self._image()
        try:
            image.discard(offset, length)
        except Exception as err:
            raise _failed(f"rbd discard at {offset}", err) from None

    def write_zeroes(self, offset: int, length: int) -> None:
        image = self._image()
        try:
            image.write_zeroes(offset, length)
        except Exception as err:
            raise _failed(f"rbd write zeroes at {offset}", err) from None

    def close(self) -> None:
        self.close_worker()

    # --- in the supervisor ---------------------------------------------------

    def fence(self, identity: str) -> None:
        """Blocklist the client ``identity``; return once the OSDs refuse its operations.

        The monitors put the entry in a new OSD map, but an OSD refuses the
        client only once it has that map.  Until then a write of the fenced
        worker's still on its way could land after a newer one that another
        worker, whose own map is as old, sent to the same OSD.  So this
        waits, up to the spec's ``timeout``, until every OSD that is up
        reports that map (:func:`_wait_for_osds`), and raises OSError
        (ETIMEDOUT) if one does not.

        The entry expires after :data:`FENCE_EXPIRE` seconds; the address
        holds a random nonce, so no later client has it.
        """
        command = {"prefix": "osd blocklist", "blocklistop": "add", "addr": identity, "expire": FENCE_EXPIRE}
        session = _Session(self.target, open_image=False)
        try:
            code, _, status = session.cluster.mon_command(json.dumps(command), b"")
            if code < 0:
                raise OSError(-code, f"osd blocklist add {identity}: {status or os.strerror(-code)}")
            _wait_for_osds(session.cluster, f"osd blocklist add {identity}", self.target.timeout)
        finally:
            session.close()


def _wait_for_osds(cluster: Any, what: str, timeout: int) -> None:
    """Return once every OSD that is up has the cluster's newest OSD map.

    Asks each (``tell osd.N status``: its ``newest_map``), again every
    10 ms, for at most ``timeout`` seconds in all.  A client whose caps
    do not allow OSD commands (``profile rbd`` has none) cannot know:
    it logs a warning and returns, the entry made but its reach not
    confirmed (a write still on its way is then refused only once the
    OSDs have the map, within milliseconds on a healthy cluster).
    """
    code, out, status = cluster.mon_command(json.dumps({"prefix": "osd dump", "format": "json"}), b"")
    if code < 0:
        raise OSError(-code, f"{what}: osd dump: {status or os.strerror(-code)}")
    dump = json.loads(out)
    epoch = int(dump["epoch"])
    waiting = [int(osd["osd"]) for osd in dump["osds"] if osd["up"]]
    deadline = time.monotonic() + timeout
    while waiting:
        osd = waiting[0]
        left = max(1, math.ceil(deadline - time.monotonic()))
        code, out, status = cluster.osd_command(osd, json.dumps({"prefix": "status"}), b"", left)
        if code in (-errno.EACCES, -errno.EPERM):
            log.warning("%s: cannot ask osd.%d for its OSD map (%s): not waiting for it", what, osd, status)
            return
        if code == 0 and int(json.loads(out)["newest_map"]) >= epoch:
            waiting.pop(0)
            continue
        if time.monotonic() >= deadline:
            raise OSError(errno.ETIMEDOUT, f"{what}: osd.{osd} did not get OSD map {epoch} in {timeout} s")
        time.sleep(0.01)
