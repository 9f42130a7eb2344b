"""The `wiremesh` command line.

Each subcommand group lives in its own module beside this one and exposes
`register(subparsers)`, which adds its parsers and sets `func` (taking the parsed
namespace, returning an exit code) as the parser default. Add a module by appending
its name to COMMAND_MODULES.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES: list[str] = [
    "keys",
    "policy",
    "admin",
    "local",
    "net",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wiremesh", description="wiremesh mesh VPN command line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
