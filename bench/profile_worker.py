"""One abuse worker under cProfile, for ``bench.guest --profile``.

    python -m bench.profile_worker OUT.txt /dev/abuseN

Serves the disk from a memory backend until SIGTERM, then writes the
profile (CPU time, sorted by own time) to OUT.txt.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import signal
import sys
import time
from types import FrameType

from abuse.backends.memory import MemoryBackend
from abuse.control import Control
from abuse.worker import Worker


def main(argv: list[str]) -> int:
    out, device = argv
    index = int(device.removeprefix("/dev/abuse"))
    stop = False

    def on_term(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    with Control() as control:
        size = control.info(index).config.size
        with MemoryBackend(size) as backend:
            worker = Worker(control, index, backend)
            profile = cProfile.Profile(time.process_time)
            profile.runcall(worker.serve, lambda: stop)
            worker.close()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    with open(out, "w") as f:
        f.write(f"requests served: {worker.served}\n{text.getvalue()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
