"""How a subcommand plugs into the parser: a handler, what an interruption keeps, `add_command`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from haltpoint.cli.output import Output

__all__ = ["Handler", "Interrupted", "add_command"]

Handler = Callable[[argparse.Namespace, Output], int]
"""A subcommand: parsed arguments and where to write -> exit status."""

Interrupted = Callable[[argparse.Namespace], str]
"""What a Ctrl-C during a subcommand kept: the one line shown when it exits with 130."""

READ_ONLY = "interrupted; nothing was changed"


def add_command(
    commands: Any,
    name: str,
    handler: Handler,
    *,
    help: str,
    epilog: str,
    interrupted: Interrupted | str = READ_ONLY,
) -> argparse.ArgumentParser:
    """Add subcommand `name` with its one-line help, an epilog of examples, and the line that
    says what a Ctrl-C kept (default: nothing was changed, for read-only commands)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        description=help[0].upper() + help[1:] + ".",
        epilog="examples:\n" + epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    said = (lambda args: interrupted) if isinstance(interrupted, str) else interrupted
    parser.set_defaults(handler=handler, interrupted=said, command_parser=parser)
    return parser
