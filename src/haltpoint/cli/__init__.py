"""The `haltpoint` command: a demo, and tools for the checkpoints haltpoint writes.

One module per subcommand (`demo`, `listing` for ls, `show`, `verify`, `export`, `gc`, `plot`,
`replay`, `importer` for import); `app` holds the parser and the error boundary, `flags` the
checks of values and output paths (each naming its flag), `output` the terminal and JSON
output, `runinfo` the read-only access to run directories.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run `haltpoint` with `argv` (default: the process's arguments); return the exit status.

    Nothing heavy is imported before this runs (importing `haltpoint` does not import torch),
    so a Ctrl-C during the imports is one line and exit status 130, like any other.

    >>> main(["--version"])
    haltpoint 0.1.0
    0
    """
    try:
        # NumPy first, from Python: torch imports it from C and, if a Ctrl-C lands there,
        # drops the KeyboardInterrupt and runs on with a half-imported NumPy.
        import numpy  # noqa: F401

        from haltpoint.cli.app import run
    except KeyboardInterrupt:
        sys.stderr.write("haltpoint: interrupted; nothing was done\n")
        return 130
    status = run(sys.argv[1:] if argv is None else list(argv))
    try:
        sys.stdout.flush()  # here, not at exit, where a closed pipe prints a traceback
    except BrokenPipeError:
        from haltpoint.cli.app import EXIT_BROKEN_PIPE, silence

        silence(sys.stdout)
        return EXIT_BROKEN_PIPE
    return status
