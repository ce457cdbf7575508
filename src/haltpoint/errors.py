"""Errors raised by haltpoint.

Bad arguments raise the built-in `ValueError` / `TypeError` naming the argument, the value and
what is allowed. Everything that goes wrong with a checkpoint on disk raises a subclass of
`CheckpointError`, whose message names the path and says what to do about it.
"""

from __future__ import annotations

import errno

from haltpoint._printable import printable

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "CorruptHistoryError",
    "HistoryNotWrittenError",
    "InsufficientSpaceError",
    "LinkedFileError",
    "LockedError",
    "NotRegularFileError",
    "StateMismatchError",
    "StepBehindError",
    "UnreadableCheckpointError",
    "UnsupportedStateError",
    "UnwritableRunError",
    "first_line",
    "not_damage",
    "unreadable",
]


class CheckpointError(Exception):
    """Base class of every checkpoint problem: the message names the path and the remedy.

    The message is one line whatever it quotes: a character that is not printable (a line
    break or a lone surrogate in a file name read from the run) is written as its escape.

    >>> str(CheckpointError("cannot read 'step-1/a\\nb': gone"))
    "cannot read 'step-1/a\\\\nb': gone"
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(printable(message))
        self.path = path


class CheckpointNotFoundError(CheckpointError):
    """The requested checkpoint (a step, "best" or "latest") does not exist or none is intact;
    or a run holds no history to read (no `history.jsonl`, an empty one, no metric values)."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint's manifest or tensor data is damaged: a hash, size or structure mismatch."""


class CorruptHistoryError(CheckpointError):
    """A run's `history.jsonl` cannot be read as a history: it is not a regular file (a
    folder, a FIFO, a device), is larger than any history haltpoint writes, cannot be read,
    or holds text of which no line is a record. It says nothing about the checkpoints, which
    never depend on the history (so it is not a `CorruptCheckpointError`)."""


class CheckpointExistsError(CheckpointError):
    """A checkpoint for this step is already committed; steps are never overwritten."""


class HistoryNotWrittenError(CheckpointError):
    """The checkpoint is committed (and pinned, if asked), but its line in `history.jsonl`
    could not be written (a full disk, say); the same `save` again writes the line."""


class LockedError(CheckpointError):
    """Another live process holds the writer lock of the run directory."""


class LinkedFileError(CheckpointError):
    """A file haltpoint would write inside the run directory (or a folder on its way) is a
    symbolic link; nothing was written through it."""


class NotRegularFileError(CorruptCheckpointError):
    """A file haltpoint would read or write in the run directory is a folder, a FIFO, a socket
    or a device; nothing was read from or written to it (reading a FIFO would wait forever)."""


class InsufficientSpaceError(CheckpointError):
    """The file system has less free space than the save needs."""


class StateMismatchError(CheckpointError):
    """The checkpoint and the objects to restore into do not match (missing or unexpected
    keys, wrong shapes) and loading is strict."""


class StepBehindError(CheckpointError):
    """`save` of a step older than the newest checkpoint on disk, or than this Checkpointer's
    last save or restore; nothing was written. After `restore(which=N)`, saves go on from N."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's file (or the run's `history.jsonl`) cannot be read for lack of
    permission or for an OS error that says nothing of its bytes (an I/O error, a timeout, a
    stale NFS handle, a lost connection: `not_damage`), or the run directory (or a step folder
    in it) cannot be listed for lack of permission or another OS error (a special file
    system): that is not damage, so nothing is quarantined or deleted because of it."""


class UnwritableRunError(CheckpointError):
    """A writer cannot be opened on the run directory: it (or its lock file) cannot be
    written, for lack of permission, on a read-only file system, or on one where files
    cannot be created (/proc), or for another OS error. Readers still can (`read_only=True`,
    the command line)."""


class UnsupportedStateError(TypeError):
    """A value in the state cannot be stored without pickling; the message names its path."""


def first_line(exc: BaseException) -> str:
    """The first line of `exc`'s message, stripped; "" when it has none.

    For errors from other libraries (torch, DCP, a pickle) whose messages run on for lines,
    so that haltpoint's own message stays one line.

    >>> first_line(RuntimeError("connection closed\\n  at gloo/transport.cc:154"))
    'connection closed'
    >>> first_line(RuntimeError())
    ''
    """
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


_NOT_DAMAGE = frozenset(
    getattr(errno, name)
    for name in (
        "EACCES", "EPERM", "EIO", "ENXIO", "ENODEV", "ETIMEDOUT", "ESTALE", "EAGAIN", "EINTR",
        "EBUSY", "ENOMEM", "ENOBUFS", "EMFILE", "ENFILE", "ENOLINK", "EREMOTEIO", "ECOMM",
        "ENOTCONN", "ECONNRESET", "ECONNABORTED", "ECONNREFUSED", "ENETDOWN", "ENETUNREACH",
        "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "ESHUTDOWN",
    )
    if hasattr(errno, name)
)  # fmt: skip


def not_damage(exc: BaseException) -> bool:
    """Whether `exc`, raised while reading a checkpoint's file, says nothing of its bytes: no
    permission, an I/O error of the disk or the network file system (EIO, a timeout, a stale
    NFS handle, a lost connection), too many open files. The same read may succeed later, so
    it is no proof of damage: nothing may be set aside or deleted because of it. A missing
    file, a folder or a link where a file should be, is damage.

    >>> not_damage(OSError(errno.EIO, "Input/output error")), not_damage(TimeoutError())
    (True, True)
    >>> not_damage(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    False
    """
    if isinstance(exc, (PermissionError, TimeoutError, ConnectionError, InterruptedError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _NOT_DAMAGE


def unreadable(where: str, exc: BaseException) -> UnreadableCheckpointError:
    """The error of a checkpoint file at `where` that cannot be read now, for a reason that
    is no damage (`not_damage`): it says why and what to fix, and that nothing was set aside.

    >>> print(unreadable("run/step-1/x", OSError(errno.EIO, "Input/output error")))
    cannot read run/step-1/x: Input/output error; check the disk or file system and run again \
(an unreadable checkpoint is not damage: nothing was set aside or deleted)
    """
    reason = getattr(exc, "strerror", None) or first_line(exc) or type(exc).__name__
    if isinstance(exc, PermissionError):
        why, fix = f"permission denied ({reason})", "fix its permissions"
    else:
        why, fix = reason, "check the disk or file system"
    return UnreadableCheckpointError(
        f"cannot read {where}: {why}; {fix} and run again (an unreadable checkpoint is not "
        "damage: nothing was set aside or deleted)",
        path=where,
    )
