"""The argument parser of abusectl: one subcommand per verb."""

from __future__ import annotations

import argparse
from typing import NoReturn, Protocol

import abuse
from abuse import uapi
from abusectl.commands import create, destroy, reset, resize, serve, status
from abusectl.commands import list as list_

__all__ = ["COMMANDS", "Command", "Parser", "build_parser"]


class Command(Protocol):
    """A module of abusectl.commands."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


#: Verb -> module, in the order ``--help`` lists them.
COMMANDS: dict[str, Command] = {
    "create": create,
    "serve": serve,
    "status": status,
    "list": list_,
    "reset": reset,
    "resize": resize,
    "destroy": destroy,
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> Parser:
    """The full parser; each subcommand sets ``args.run``."""
    parser = Parser(prog="abusectl", description="Manage and serve abuse block devices.")
    parser.add_argument(
        "--version",
        action="version",
        version=f"abusectl {abuse.__version__} (uapi {uapi.ABUSE_VERSION})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the workers do")
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = verbs.add_parser(name, help=summary, description=summary)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser
