"""The argument parser of abusectl: one subcommand per verb."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn, Protocol

from abusectl.commands import create, destroy, features, reset, resize, serve, status
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
    "features": features,
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


class _VersionAction(argparse.Action):
    """``--version``: the library's version and the loaded module's, then exit 0."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        print(features.version_text())
        parser.exit(0)


def build_parser() -> Parser:
    """The full parser; each subcommand sets ``args.run``.

    ``-v`` is accepted before the verb and after it, anywhere among the
    verb's options.
    """
    parser = Parser(prog="abusectl", description="Manage and serve abuse block devices.")
    parser.add_argument(
        "--version", action=_VersionAction, help="print the library's and the loaded module's versions"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the workers do")
    common = Parser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what the workers do"
    )
    verbs = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        summary = (module.__doc__ or "").strip().splitlines()[0]
        sub = verbs.add_parser(name, help=summary, description=summary, parents=[common])
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser
