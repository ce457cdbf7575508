"""The `haltpoint` argument parser and the error boundary of every subcommand."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from haltpoint import __version__
from haltpoint.cli.command import Handler
from haltpoint.cli.flags import UsageError
from haltpoint.cli.output import Output
from haltpoint.errors import CheckpointError, first_line

__all__ = [
    "EXIT_BROKEN_PIPE",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Parser",
    "build_parser",
    "os_error_text",
    "run",
]

EXIT_OK = 0
EXIT_FAILURE = 1
"""The command could not do its job on its inputs: damage found (verify), no checkpoint, a
damaged or locked run, an input that is missing or not what it should be, a write that failed."""
EXIT_USAGE = 2
"""The command line cannot work: an unknown flag, a value out of range, a flag this run needs,
an output path that cannot be written (found before any work)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, at any moment (imports included); one line says what was kept."""
EXIT_BROKEN_PIPE = 141
"""The reader of the results went away (`haltpoint ls DIR | head -1`): no line is printed,
and the status is the shell's for a process ended by SIGPIPE (128 + 13)."""

_DESCRIPTION = """\
haltpoint: early stopping and atomic, verified, pickle-free PyTorch checkpoints.

Start with `haltpoint demo`: it trains a small network on handwritten digits, stops it
early, checkpoints it, and leaves a run directory the other commands can inspect."""

_EPILOG = """\
examples:
  haltpoint demo                       train the demo into runs/demo (Ctrl-C, then rerun: resumes)
  haltpoint ls runs/demo               the checkpoints of a run
  haltpoint verify runs/demo           check every hash of every checkpoint
  haltpoint export runs/demo -o model.safetensors
  haltpoint replay runs/demo           where other patience settings would have stopped

`haltpoint COMMAND --help` shows each command's options and examples."""

_MODULES = ("demo", "listing", "show", "verify", "export", "gc", "plot", "replay", "importer")
"""The modules of the subcommands, in the order `--help` lists them."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors raise `UsageError` (one line, exit status 2)
    instead of printing the usage and exiting; subcommand parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `haltpoint` and all its subcommands."""
    parser = Parser(
        prog="haltpoint",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"haltpoint {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in _MODULES:
        importlib.import_module(f"haltpoint.cli.{name}").register(commands)
    return parser


def run(argv: Sequence[str] | None = None, out: Output | None = None) -> int:
    """Parse `argv`, run the subcommand, and turn every expected failure into one line on
    stderr, never a traceback.

    Returns the exit status: `EXIT_OK`, `EXIT_FAILURE`, `EXIT_USAGE` or `EXIT_INTERRUPTED`.
    """
    out = out or Output()
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
            if extra:  # named by the subcommand's parser, so the hint is its --help
                getattr(args, "command_parser", parser).error(
                    f"unrecognized arguments: {' '.join(extra)}"
                )
        except SystemExit as exc:  # --help and --version
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(out.stdout)
            return EXIT_USAGE
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(out)
            return handler(args, out)
    except KeyboardInterrupt:
        out.note(f"haltpoint: {_interrupted(args)}", style="yellow")
        return EXIT_INTERRUPTED
    except UsageError as exc:
        out.error(str(exc))
        return EXIT_USAGE
    except BrokenPipeError as exc:
        if not reader_gone(out.stdout):  # a socket or another pipe of the command's own
            out.error(os_error_text(exc))
            return EXIT_FAILURE
        silence(out.stdout)
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        out.error(os_error_text(exc))
        return EXIT_FAILURE
    except (CheckpointError, ValueError, TypeError, ImportError) as exc:
        out.error(str(exc) or type(exc).__name__)
        return EXIT_FAILURE
    except Exception as exc:  # none of the above: the storage's own, or a bug; one line
        backend = storage_backend(exc)
        if backend is not None:
            out.error(
                f"{backend} error {type(exc).__name__}: {first_line(exc) or 'no message'} "
                "(from the storage, not haltpoint: check the URL, the credentials, the "
                "endpoint and the network)"
            )
            return EXIT_FAILURE
        out.error(
            f"unexpected {type(exc).__name__}: {first_line(exc) or 'no message'} (a bug in "
            "haltpoint; please report it with the command that caused it)"
        )
        return EXIT_FAILURE


#: Packages whose own exceptions (not OSErrors) fsspec back ends pass through as they are:
#: botocore's NoCredentialsError or EndpointConnectionError behind s3fs, Google's and Azure's.
_STORAGE_PACKAGES = ("botocore", "aiobotocore", "s3fs", "fsspec", "gcsfs", "google", "azure")


def storage_backend(exc: BaseException) -> str | None:
    """The storage package that raised `exc` (an exception class of its own), else None.

    >>> class NoCredentialsError(Exception): ...
    >>> NoCredentialsError.__module__ = "botocore.exceptions"
    >>> storage_backend(NoCredentialsError()), storage_backend(KeyError("x"))
    ('botocore', None)
    """
    for cls in type(exc).__mro__:
        package = cls.__module__.partition(".")[0]
        if package in _STORAGE_PACKAGES:
            return package
    return None


def _interrupted(args: argparse.Namespace | None) -> str:
    """What a Ctrl-C kept, as the subcommand says (before one was chosen: nothing done)."""
    said = getattr(args, "interrupted", None)
    if said is None:
        return "interrupted; nothing was done"
    try:
        return str(said(args))
    except Exception as exc:  # the line must come out whatever the run directory holds
        return f"interrupted (what was kept is unknown: {exc})"


def reader_gone(stream: Any) -> bool:
    """Whether `stream` is a pipe whose reading end was closed (poll reports an error on
    it); False where that cannot be told (no file descriptor, no poll)."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # io.StringIO, a closed file, no poll
        return False


def silence(stream: Any) -> None:
    """Point `stream`'s file descriptor at the null device, so that Python's flush at exit
    does not fail again on the closed pipe (the recipe of Python's `signal` docs)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def os_error_text(exc: OSError) -> str:
    """One line for an OS error: the path and the reason, without `[Errno N]`.

    >>> os_error_text(FileNotFoundError(2, "No such file or directory", "/nope/x.png"))
    '/nope/x.png: No such file or directory'
    >>> os_error_text(ConnectionResetError(104, "Connection reset by peer"))
    'Connection reset by peer'
    """
    if exc.strerror and exc.filename is not None:
        names = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return f"{names}: {exc.strerror}"
    return exc.strerror or str(exc) or type(exc).__name__


def _show_warning(out: Output) -> Callable[..., None]:
    """Print warnings (a damaged checkpoint skipped, a torn history line) as one note each."""

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        out.note("haltpoint: warning: " + " ".join(str(message).split()), style="yellow")

    return show
