"""systemd's notify protocol, without a dependency (sd_notify(3)).

A service of ``Type=notify`` is started once its main process sends
``READY=1`` to the datagram socket named by ``$NOTIFY_SOCKET``; with
``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC`` and restarts the
service unless it hears ``WATCHDOG=1`` at least that often.
"""

from __future__ import annotations

import os
import socket

__all__ = ["notify", "watchdog_interval"]


def notify(state: str) -> bool:
    """Send ``state`` (``READY=1``, ``WATCHDOG=1``, ...) to systemd.

    Returns False, doing nothing, outside a notify service.  Raises
    OSError if the socket cannot take it.
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path  # '@': the abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None.

    None when systemd asks for no pings from this process.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid.isdigit() and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6
