"""The Backend interface every device implements."""

from __future__ import annotations

from types import TracebackType

__all__ = ["Backend"]

_ZEROES = bytes(1 << 20)


class Backend:
    """Base class of a disk's storage.

    Subclasses set ``size`` (bytes) and override :meth:`read` and
    :meth:`write`; the rest have working defaults.  The capability flags
    say what the disk should advertise at CREATE.
    """

    can_flush = False
    can_discard = False
    can_write_zeroes = False

    # Fencing tokens: when true, ``write``, ``discard`` and ``write_zeroes``
    # are called with a third argument, ``token``: a number that grows with
    # every hand-out of a request by the kernel (ABUSE_XFER_TOKENS).  A store
    # with conditional writes keeps, per block, the largest token it has
    # stored and drops a change with a smaller one: that change is stale (its
    # request was timed out and handed to another worker) or superseded by a
    # later one.  See examples/fenced_store.py.
    wants_tokens = False

    size: int = 0

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

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
