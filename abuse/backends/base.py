"""The Backend interface every device implements."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

__all__ = ["API_VERSION", "CAPABILITIES", "Backend", "Finish", "capabilities", "overlaps"]

#: What :meth:`Backend.start_read` and :meth:`Backend.start_write` return:
#: called once, it waits for the operation and raises as read/write would.
Finish = Callable[[], None]

_ZEROES = bytes(1 << 20)

#: The Backend API this library speaks; a backend declaring a newer one is refused.
API_VERSION = 1

#: Capability flag -> the optional method it says is implemented.
CAPABILITIES = {
    "can_flush": "flush",
    "can_discard": "discard",
    "can_write_zeroes": "write_zeroes",
}


class Backend:
    """Base class of a disk's storage.

    Subclasses set ``size`` (bytes) and override :meth:`read` and
    :meth:`write`; the rest have working defaults.

    Capabilities, as nbdkit's plugins have them: ``can_flush``,
    ``can_discard`` and ``can_write_zeroes`` say what the disk advertises
    (``abusectl serve --create`` sets its flags from them, ``serve DEV``
    refuses a disk that advertises more).  Each defaults to whether the
    subclass overrides :meth:`flush`, :meth:`discard` or
    :meth:`write_zeroes`; a value set in a class body (of the subclass or
    any ancestor below Backend) wins.

    ``shared_state``: whether every process sees the same data, so that
    the disk may be served by several worker processes (each one forks
    from the supervisor with its own copy of the Python objects).  False
    for a backend that keeps its data in Python objects; true for one
    whose data lives in a file, a memfd or elsewhere outside the process.
    A process-local backend is refused for more than one worker.

    ``api_version``: the Backend API the class was written for
    (:data:`API_VERSION` today); a newer one is refused at serve.
    """

    can_flush = False
    can_discard = False
    can_write_zeroes = False
    shared_state = False
    api_version = API_VERSION

    # Fencing tokens: when true, ``write``, ``discard`` and ``write_zeroes``
    # are called with a third argument, ``token``: a number that grows with
    # every hand-out of a request by the kernel (ABUSE_XFER_TOKENS).  A store
    # with conditional writes keeps, per block, the largest token it has
    # stored and drops a change with a smaller one: that change is stale (its
    # request was timed out and handed to another worker) or superseded by a
    # later one.  See examples/fenced_store.py.
    wants_tokens = False

    size: int = 0

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        derived = set()
        for flag, method in CAPABILITIES.items():
            if _explicit(cls, flag):
                continue
            setattr(cls, flag, getattr(cls, method) is not getattr(Backend, method))
            derived.add(flag)
        cls._derived_capabilities = frozenset(derived)

    def read(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""
        raise NotImplementedError

    def write(self, offset: int, data: memoryview) -> None:
        """Store ``data`` at ``offset``."""
        raise NotImplementedError

    def mapped_address(self, offset: int, length: int) -> int:
        """Where ``length`` bytes at ``offset`` sit in this process's memory, or 0.

        A backend that keeps the whole disk mapped returns the address, and
        the worker answers a read with it: the kernel copies the data from
        there into the request, with no copy into the worker's buffer
        first.  The default, 0, means "call :meth:`read`".
        """
        return 0

    def mapping(self) -> tuple[int, int] | None:
        """The whole disk as mapped in this process, ``(address, size)``, or None.

        A backend that returns it is served in place (ABUSE_XFER_MAPPED):
        the kernel copies each write's payload straight into the mapping,
        without a call to :meth:`write`, and reads each answer from it,
        without a call to :meth:`read`.  The default, None, means "call
        them".
        """
        return None

    # Overlapped I/O.  A backend whose store answers many operations at
    # once (librbd's aio_read/aio_write) overrides both start_ methods: the
    # worker then starts every read and write of a batch before it waits
    # for any, so one worker keeps a whole batch in flight.  The batch is
    # bounded by ``queue_depth`` requests and ``queue_bytes`` of payload,
    # so that what a worker holds is all in flight and a slow store is not
    # sent more than it answers within its timeouts.  The defaults run
    # the operation at once.

    #: With start_read/start_write: requests one worker keeps in flight.
    queue_depth = 8
    #: With start_read/start_write: payload bytes one worker keeps in flight
    #: (at least one request of the disk's largest size).
    queue_bytes = 2 << 20

    def start_read(self, offset: int, buf: memoryview) -> Finish:
        """Start filling ``buf`` with the bytes at ``offset``; return its :data:`Finish`."""
        self.read(offset, buf)
        return _done

    def start_write(self, offset: int, data: memoryview) -> Finish:
        """Start storing ``data`` at ``offset``; return its :data:`Finish`.

        ``data`` is the worker's buffer: it stays untouched until the
        finish has been called.
        """
        self.write(offset, data)
        return _done

    def flush(self) -> None:
        """Make every completed write durable."""

    def discard(self, offset: int, length: int) -> None:
        """Forget ``length`` bytes at ``offset`` (they may read as anything)."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zeroes."""
        view = memoryview(_ZEROES)
        end = offset + length
        while offset < end:
            chunk = min(end - offset, len(view))
            self.write(offset, view[:chunk])
            offset += chunk

    def close(self) -> None:
        """Release what the backend holds."""

    def check_workers(self, workers: int) -> None:
        """Raise ValueError if this storage cannot be served by ``workers`` processes.

        Called at serve, before any worker starts (``shared_state`` is
        checked besides).  The default accepts any number.
        """

    # Per-worker life and fencing.  A pool forks its workers from the
    # supervisor, which opened the backend; a client library that cannot
    # cross a fork (librados's threads) connects in open_worker instead.

    def open_worker(self) -> str | None:
        """Open what this worker process needs of its own; return its fencing identity.

        Called in each worker after the fork and before it attaches.  The
        identity (None: the backend cannot fence) names this process's
        client to the store: the supervisor passes it to :meth:`fence`
        when it gives up on the worker.  Exceptions end the worker.
        """
        return None

    def close_worker(self) -> None:
        """Release what :meth:`open_worker` opened (a worker that stops on its own)."""

    def fence(self, identity: str) -> None:
        """Make the store refuse anything more from the worker named ``identity``.

        Called in the supervisor when its liveness check gives up on a
        worker, before it kills the worker and before the kernel can
        hand the worker's requests to another: a write of the old
        worker's still on its way to the store (a network, a queue) is
        then refused there.  Raise OSError if the fence could not be
        set; the worker is killed anyway.  A fence need not be lifted:
        an identity names one process's client, never reused (for
        ``rbd:``, the blocklist entry expires).
        """

    _derived_capabilities: frozenset[str] = frozenset()

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _explicit(cls: type, flag: str) -> bool:
    """Whether ``flag`` is set in the body of ``cls`` or an ancestor below Backend."""
    for klass in cls.__mro__:
        if klass is Backend:
            return False
        if flag in vars(klass) and flag not in vars(klass).get("_derived_capabilities", ()):
            return True
    return False


def capabilities(backend: Backend) -> dict[str, bool]:
    """The capability flags of ``backend``, by name (``can_flush``, ...)."""
    return {flag: bool(getattr(backend, flag)) for flag in CAPABILITIES}


def overlaps(backend: Backend) -> bool:
    """Whether ``backend`` overrides both :meth:`Backend.start_read` and :meth:`Backend.start_write`."""
    kind = type(backend)
    return kind.start_read is not Backend.start_read and kind.start_write is not Backend.start_write


def _done() -> None:
    pass
