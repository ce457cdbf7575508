"""Checks of command-line values, each naming its flag: numbers (as argparse types) and the
paths a command will write (checked before any work).

Library code names Python parameters (`keep_last must be ...`); a command's user typed
`--keep-last`. So every value is checked here, with the flag's name, before it reaches the
library: argparse reports a bad type value as `argument --keep-last: ...`, and the path checks
raise `UsageError` naming the flag. Both exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence

from haltpoint.store.run_dir import parse_step

__all__ = [
    "UsageError",
    "ascii_int",
    "check_output_dir",
    "check_output_file",
    "count",
    "finite_at_least",
    "seed",
    "user_path",
    "write_failed",
]

_SEED_MAX = 2**32 - 1  # NumPy's seeds: 0 ... 2**32 - 1
_DIGITS = re.compile("[0-9]+")  # not \d nor int(): both take Arabic-Indic and other digits
_NUMBER = re.compile("[0-9eE.+-]+|[+-]?(inf|infinity|nan)", re.IGNORECASE)


class UsageError(ValueError):
    """The command line cannot work as given; the message names the flag (exit status 2)."""


def ascii_int(text: str) -> int | None:
    """The int that `text` writes in the ASCII digits 0-9 alone, else None.

    `int()` also takes other scripts' digits, a sign, spaces and underscores; a value typed
    on the command line (or a step in a name on disk) is digits 0-9 only.

    >>> [ascii_int(text) for text in ("012", "\u0661\u0662", "+3", " 3 ", "3_0")]
    [12, None, None, None, None]
    """
    if _DIGITS.fullmatch(text) is None:
        return None
    try:
        return int(text)
    except ValueError:  # more digits than int() converts (4300)
        return None


def count(minimum: int, below: int | None = None) -> Callable[[str], int]:
    """An argparse type: an int >= `minimum` (and < `below`, when given), in the digits 0-9.

    >>> count(1)("3")
    3
    >>> count(1)("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be an int >= 1 (digits 0-9 only), got '0'
    >>> count(0, below=10)("10")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be an int >= 0 and below 10 (digits 0-9 only), got '10'
    """
    bound = "" if below is None else f" and below {below}"

    def parse(text: str) -> int:
        value = ascii_int(text)
        if value is None or value < minimum or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(
                f"must be an int >= {minimum}{bound} (digits 0-9 only), got {text!r}"
            )
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def finite_at_least(minimum: float) -> Callable[[str], float]:
    """An argparse type: a finite float >= `minimum`.

    >>> finite_at_least(0.0)("nan")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: must be a finite number >= 0 (ASCII: 0.001, 1e-3), got 'nan'
    """

    def parse(text: str) -> float:
        try:  # float() also takes other scripts' digits, spaces and underscores
            value = float(text) if _NUMBER.fullmatch(text) else math.nan
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be a finite number >= {minimum:g} (ASCII: 0.001, 1e-3), got {text!r}"
            )
        return value

    parse.__name__ = f"number >= {minimum:g}"
    return parse


def seed(text: str) -> int:
    """An argparse type: a random seed, an int from 0 to 2**32 - 1.

    >>> seed("7")
    7
    """
    value = ascii_int(text)
    if value is None or not 0 <= value <= _SEED_MAX:
        raise argparse.ArgumentTypeError(
            f"must be an int from 0 to 2**32 - 1 (digits 0-9 only), got {text!r}"
        )
    return value


def user_path(text: str) -> str:
    """An argparse type: a path with a leading `~` or `~user` expanded to the home folder, as
    the library's local run directories are; a URL as given.

    A shell expands `~` in `-o ~/x` but not in `--run-dir=~/x` or a quoted `'~/x'`, which
    would otherwise be a folder named `~` in the current one.

    >>> user_path("s3://bucket/~x")
    's3://bucket/~x'
    """
    return text if _is_url(text) else os.path.expanduser(text)


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _check_names(path: str, flag: str, folder: str) -> None:
    """Refuse a name in `path` longer than the file system at `folder` allows."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no pathconf (Windows)
        limit = 255
    for name in path.split(os.sep):
        if len(os.fsencode(name)) > limit:
            raise UsageError(
                f"{flag}: the name {name[:20]}... is {len(os.fsencode(name))} bytes long, more "
                f"than the {limit} the file system allows"
            )


def check_output_file(path: str, flag: str, suffixes: Sequence[str] = ()) -> None:
    """Refuse, before any work, a file `path` that cannot be written.

    Raises:
        UsageError: `path` is empty, does not end with one of `suffixes` (after a name:
            `.png` alone is a name without a suffix), is a folder, its
            folder does not exist or is not a folder, its name is too long, or it or its
            folder is not writable.
    """
    if not path:
        raise UsageError(f"{flag} must name a file, got ''")
    suffix = os.path.splitext(os.path.basename(path))[1].lower()  # ".png" alone: a name, no suffix
    if suffixes and suffix not in {s.lower() for s in suffixes}:
        raise UsageError(f"{flag} must name a file ending with {', '.join(suffixes)}; got {path!r}")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; name a file in it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        what = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise UsageError(f"{flag} {path}: {folder} {what}; name a file in an existing folder")
    _check_names(os.path.basename(path), flag, folder)
    inside = os.path.dirname(os.path.realpath(path))  # through links too
    if parse_step(os.path.basename(inside)) is not None:
        raise UsageError(
            f"{flag} {path} is inside the checkpoint folder {inside}; a file written there "
            "could replace the checkpoint's own data: name a file outside the run's step-* folders"
        )
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path} is not writable; pick a path you can write")


def check_output_dir(path: str, flag: str) -> None:
    """Refuse, before any work, a local folder `path` that cannot be created or written.

    Missing folders on the way are fine (they are created); URLs are checked by their store.

    Raises:
        UsageError: `path` is empty, it (or a folder on its way) is a file, a name in it is
            too long, or the nearest existing folder is not writable.
    """
    if not path:
        raise UsageError(f"{flag} must name a folder, got ''")
    if _is_url(path):
        return
    local = path.removeprefix("file://")
    existing = os.path.abspath(local)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(local) else f"is inside file {existing}"
        raise UsageError(f"{flag} {path} {where}, not a folder; pick a folder")
    _check_names(local, flag, existing)
    missing = os.path.relpath(os.path.abspath(local), existing)
    parts = os.path.realpath(existing).split(os.sep) + missing.split(os.sep)
    if any(parse_step(part) is not None for part in parts):
        raise UsageError(
            f"{flag} {path} is inside a checkpoint's step-* folder, which retention or gc may "
            "delete whole with everything in it; pick a folder outside the run's step-* folders"
        )
    if not os.access(existing, os.W_OK):
        raise UsageError(f"{flag} {path} is not writable (in {existing}); pick another folder")


def write_failed(flag: str, path: str, exc: BaseException) -> OSError:
    """The one-line error of a write to `path` (given as `flag`) that failed midway.

    >>> print(write_failed("-o", "m.safetensors", OSError(28, "No space left on device")))
    cannot write -o m.safetensors: No space left on device
    >>> print(write_failed("-o", "/proc/m", RuntimeError("I/O error: Denied (os error 13) at")))
    cannot write -o /proc/m: Denied
    """
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    io = re.search(r"I/O error: (.+?) \(os error \d+\)", reason)  # safetensors' own wording
    return OSError(f"cannot write {flag} {path}: {' '.join((io[1] if io else reason).split())}")
