"""Free space: refuse a save that cannot fit, and say so plainly when the disk fills up (or,
opening a writer, when the run directory cannot be written at all)."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from haltpoint.errors import InsufficientSpaceError, UnwritableRunError
from haltpoint.store.lock import LOCK_NAME
from haltpoint.store.storage import Storage, open_unlinked

__all__ = [
    "SLACK_BYTES",
    "check_creatable",
    "check_free_space",
    "full_disk_on_open",
    "translate_full_disk",
    "unwritable_on_open",
]

SLACK_BYTES = 1 << 20
"""Room kept for the manifest, headers, history and block rounding on top of tensor data."""


def _remedy(step: int, needed: int, free: int | None, url: str) -> str:
    have = "an unknown amount" if free is None else f"{free:,} bytes"
    return (
        f"saving step {step} needs about {needed:,} bytes in {url} but {have} are free; "
        "free some space (or lower keep_last / keep_best) and save again: every earlier "
        "checkpoint is intact"
    )


def check_free_space(storage: Storage, step: int, needed: int) -> None:
    """Raise `InsufficientSpaceError` before writing when the storage reports too little room.

    Storage that cannot tell (object stores) is not checked.

    >>> from haltpoint.store.storage import FsspecStorage
    >>> check_free_space(FsspecStorage("memory://doctest-space"), 0, 10**15)
    """
    free = storage.free_space()
    total = needed + SLACK_BYTES
    if free is not None and total > free:
        raise InsufficientSpaceError(_remedy(step, total, free, storage.url), path=storage.url)


@contextmanager
def translate_full_disk(storage: Storage, step: int, needed: int) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into `InsufficientSpaceError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        message = _remedy(step, needed + SLACK_BYTES, storage.free_space(), storage.url)
        raise InsufficientSpaceError(message, path=storage.url) from exc


@contextmanager
def full_disk_on_open(url: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised while opening a writer (its folder, its lock) into
    `InsufficientSpaceError`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise InsufficientSpaceError(
            f"cannot open {url} for writing: the disk is full ({exc.strerror}); free some "
            "space and open it again: every checkpoint in it is intact",
            path=url,
        ) from exc


@contextmanager
def unwritable_on_open(url: str) -> Iterator[None]:
    """Turn an OS error raised while opening a writer (its folder, its lock file, the
    clean-up) into `UnwritableRunError`, naming the directory and the reader's way in:
    EACCES/EPERM/EROFS, or any other (a special file system such as /proc, where files
    cannot be created; an I/O error). A full disk is left to `full_disk_on_open`, and an
    error haltpoint raised itself with its own message (no errno) goes through as it is."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None or exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # haltpoint's own (a file where the run's folder goes), or a full disk
        where = f" ({exc.filename})" if exc.filename else ""
        denied = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        fix = "fix its permissions" if denied else "pick a folder on an ordinary file system"
        if "://" in url and not isinstance(exc, FileNotFoundError):  # an object store's error
            fix = "check the credentials" if denied else "check the store's endpoint and network"
        raise UnwritableRunError(
            f"cannot write {url}: {exc.strerror or exc}{where}; a writer needs to create its "
            f"lock file and checkpoints there: {fix}, or open it with read_only=True (or the "
            "haltpoint command) to restore and list",
            path=url,
        ) from exc


def check_creatable(storage: Storage) -> None:
    """Create and delete a file in a local run directory, so that a writer on a folder where
    nothing can be created fails at open, not at its first save (a lock file left writable
    in a read-only run is taken like any other). The file is named as a temporary of the
    lock, which clean-up removes should a crash leave it. Object stores are not probed: the
    lock is written there as an object.

    Raises:
        OSError: as creating the file raises it (`unwritable_on_open` turns permission
            errors into `UnwritableRunError`).
    """
    lock = storage.write_path(LOCK_NAME)
    if lock is None:
        return
    probe = f"{lock}.{uuid.uuid4().hex[:8]}.tmp"
    os.close(open_unlinked(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    os.unlink(probe)
