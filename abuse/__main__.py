"""``python -m abuse --version``: the package and uapi versions."""

from __future__ import annotations

import sys

from abuse import __version__, uapi


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["--version"]:
        print("usage: python -m abuse --version (the CLI is abusectl)", file=sys.stderr)
        return 2
    print(f"abuse {__version__} (uapi {uapi.ABUSE_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
