"""``abusectl``: the command line, and its only error boundary."""

from __future__ import annotations

import logging
import sys

from abuse._exceptions import AbuseError
from abusectl.cli import build_parser

__all__ = ["main"]


def _message(err: Exception) -> str:
    """One line saying what went wrong, without Python's decoration."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run abusectl with ``argv`` (default ``sys.argv[1:]``); the exit status.

    A failure of abuse, a bad value or a failed system call prints one
    line ``abusectl: <message>`` to stderr and returns 1; a usage error
    returns 2; Ctrl-C returns 130.  Anything else is a bug: a traceback.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors
        return stop.code if isinstance(stop.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="abusectl[%(process)d]: %(levelname)s: %(message)s",
    )
    try:
        return int(args.run(args))
    except (AbuseError, ValueError, OSError) as err:
        print(f"abusectl: {_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
