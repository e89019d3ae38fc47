"""Backends: where a disk's bytes live.

A backend is a small class with a ``size`` and five operations; the
worker calls them with memoryviews into its GET buffer, so a backend
that reads with ``os.preadv`` copies straight into the kernel's view.
Failures raise ``OSError(errno, ...)``; the worker sends ``-errno`` to
the application, and any other exception becomes ``-EIO``.
"""

from __future__ import annotations

from abuse.backends.base import Backend

__all__ = ["Backend"]
