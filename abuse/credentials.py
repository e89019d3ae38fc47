"""Whom a worker becomes once it has attached (``abusectl serve --user --group``).

Opening /dev/abuse and ATTACH need CAP_SYS_ADMIN; an attached file then
serves in any process, so each worker attaches as root and drops to
these credentials before it serves a single request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Credentials"]


@dataclass(frozen=True)
class Credentials:
    """Whom a worker becomes once it has attached: uid, gid, supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def apply(self) -> None:
        """Drop to these credentials in this process (needs root); irreversible."""
        os.setgroups(list(self.groups))
        os.setgid(self.gid)
        os.setuid(self.uid)
