"""The `haltpoint` command: a demo, and tools for the checkpoints haltpoint writes.

One module per subcommand (`demo`, `listing` for ls, `show`, `verify`, `export`, `gc`, `plot`,
`replay`, `importer` for import); `app` holds the parser and the error boundary, `flags` the
checks of values and output paths (each naming its flag), `output` the terminal and JSON
output, `runinfo` the read-only access to run directories.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run `haltpoint` with `argv` (default: the process's arguments); return the exit status.

    Nothing heavy is imported before this runs (importing `haltpoint` does not import torch),
    so a Ctrl-C during the imports is one line and exit status 130, like any other.

    >>> main(["--version"])
    haltpoint 0.1.0
    0
    """
    with _SigintSeen() as seen:
        try:
            # NumPy first, from Python: torch imports it from C and, if a Ctrl-C lands there,
            # drops the KeyboardInterrupt and runs on with a half-imported NumPy.
            import numpy  # noqa: F401

            from haltpoint.cli.app import run
        except (KeyboardInterrupt, ImportError):
            if not seen:  # a real ImportError: the error boundary is not imported yet
                raise
            # a Ctrl-C inside a C extension's import can come out as an ImportError
            # (NumPy's: "PyCapsule_Import could not import module datetime")
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


class _SigintSeen:
    """While in the block, Ctrl-C raises KeyboardInterrupt as usual and is also remembered
    (the object is truthy once one came); the previous handler is put back after it."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None
        self._installed = False

    def __bool__(self) -> bool:
        return self.count > 0

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        raise KeyboardInterrupt

    def __enter__(self) -> _SigintSeen:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        except ValueError:  # not the main thread: no handler of ours, nothing remembered
            pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:  # None: a handler not set from Python; Python's own then
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
