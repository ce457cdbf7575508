"""One writer per run directory: the `.haltpoint.lock` file.

On a local disk the lock is an exclusive `flock` on `.haltpoint.lock`; the kernel drops it when
the holding process exits or is killed, so a lock can never go stale. The file also holds the
holder's `{"pid", "host", "since"}` as JSON, for error messages and `haltpoint gc`. Readers
never take the lock: any number of them may open a run while one writer holds it.

Behind fsspec (object stores have no `flock`) the lock is a lock file naming the holder,
created only where none is (`Storage.publish_new`: on S3 a `PutObject` with
`If-None-Match: *`, so of two writers starting in the same instant the store refuses the
second), refused while its holder is on another host or is a live process on this one, and
taken over (with a warning: deleted, then created again) when it names a dead process on this
host. What it cannot do: two processes on one host taking over the same dead holder's lock in
the same instant may both succeed (the lock file names the last one, so the other's `check`
fails at its every commit), a holder that died on another host keeps the run locked until its
lock file is deleted by hand, and a store that ignores `If-None-Match` (some S3-compatible
servers) lets two writers starting in the same instant both in.

Concurrency: a `WriterLock` object is not thread-safe. A child made by `os.fork` does not
inherit the lock: in the child the lock object simply lets go of its copy of the file.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import time
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from haltpoint.errors import LockedError, UnwritableRunError
from haltpoint.store.background import warn_user
from haltpoint.store.storage import Storage, check_one_name, open_regular, open_unlinked

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the best-effort protocol is used instead
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "LockHolder", "WriterLock", "read_holder"]

LOCK_NAME = ".haltpoint.lock"

# A writer that has just taken the flock writes its record a moment later, and `read_holder`
# probes with a brief shared lock: retry for this long before calling the lock busy.
_BUSY_GRACE_S = 0.25
_POLL_S = 0.01
#: The most of a lock file read: a holder record is under 200 bytes; more is not one.
_RECORD_LIMIT = 4096
#: Process ids are C ints (pid_t): `os.kill` raises OverflowError beyond them.
_PID_LIMIT = 2**31


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run's writer lock: a process id, a host name and when it took the lock.

    >>> LockHolder(pid=1234, host="gpu-3", since=1795559465.0).describe()
    'process 1234 on host gpu-3 since 2026-11-24 22:31:05 UTC'
    """

    pid: int
    host: str
    since: float

    def describe(self) -> str:
        """The holder in words, for error messages."""
        if self.pid <= 0:
            return "an unidentified process (the lock file holds no readable record)"
        try:
            when = datetime.datetime.fromtimestamp(self.since, tz=datetime.timezone.utc)
            since = when.strftime("%Y-%m-%d %H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):
            since = f"time {self.since!r}"
        return f"process {self.pid} on host {self.host} since {since}"

    def is_this_process(self) -> bool:
        """Whether the holder is the calling process."""
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def to_json(self) -> bytes:
        """The record written into the lock file."""
        return json.dumps({"pid": self.pid, "host": self.host, "since": self.since}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LockHolder | None:
        """The holder recorded in `data`, or None when it holds no valid record: a pid that
        is no process id (an int in [1, 2**31), what `os.kill` takes), or a host name with a
        control character or a lone surrogate (it would break the one line naming it).

        >>> LockHolder.from_json(b'{"pid": 1e0, "host": "h", "since": 0}') is None
        True
        >>> [LockHolder.from_json(b'{"pid": %d, "host": "h", "since": 0}' % p) for p in (0, 2**31)]
        [None, None]
        >>> LockHolder.from_json(b'{"pid": 7, "host": "a\\nb", "since": 0}') is None
        True
        """
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):  # garbage, or nesting deeper than the parser's stack
            return None
        if not isinstance(value, dict):
            return None
        pid, host, since = value.get("pid"), value.get("host"), value.get("since")
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < _PID_LIMIT:
            return None
        if not isinstance(host, str) or not host.isprintable():
            return None
        if not isinstance(since, (int, float)):
            return None
        if isinstance(since, bool) or not math.isfinite(since):
            return None
        return cls(pid, host, float(since))


_UNKNOWN = LockHolder(pid=0, host="", since=0.0)


def _me() -> LockHolder:
    return LockHolder(os.getpid(), socket.gethostname(), time.time())


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (True when that cannot be told)."""
    if pid <= 0 or os.name == "nt":  # on Windows os.kill(pid, 0) would send CTRL_C_EVENT
        return pid > 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _lock_path(storage: Storage) -> str:
    return f"{storage.url.rstrip('/')}/{LOCK_NAME}"


def _locked_error(storage: Storage, holder: LockHolder) -> LockedError:
    path = storage.local_path(LOCK_NAME) or _lock_path(storage)
    who = holder.describe()
    if holder.is_this_process():
        who += " (this very process: close the other Checkpointer or WriterLock first)"
    return LockedError(
        f"run directory {storage.url} is locked by {who}; only one writer may use a run. "
        "Stop that process, or open the run read-only: readers are always allowed; "
        f"if it is dead on another host, delete {path}",
        path=path,
    )


def _took_over_warning(storage: Storage, previous: LockHolder) -> None:
    warn_user(  # at the user's line that opened the writer, however deep the lock is taken
        f"taking over the writer lock of {storage.url}: its previous holder, "
        f"{previous.describe()}, is gone without releasing it (it crashed or was killed)"
    )


def _flock(fd: int, operation: int, path: str) -> None:
    """`fcntl.flock`, with a file system that has no file locks said in one line.

    Raises:
        BlockingIOError: another process holds the lock (`LOCK_NB`).
        UnwritableRunError: `flock` fails otherwise (NFS without a lock daemon: ENOLCK;
            Lustre without `-o flock`: ENOSYS; some FUSE file systems: EOPNOTSUPP): no
            writer could tell whether another one runs.
    """
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        raise
    except OSError as exc:
        raise UnwritableRunError(
            f"cannot lock {path}: {exc.strerror or exc}; its file system does not support "
            "file locks (flock), which keep a second writer out of a run, so no writer may "
            "use it and no checkpoint was changed: put the run on a file system that has them (a "
            "local disk, NFS with its lock service), or open it with read_only=True (or the "
            "haltpoint command) to restore and list",
            path=path,
        ) from None


def _read_fd(fd: int) -> bytes:
    size = min(os.fstat(fd).st_size, _RECORD_LIMIT)
    return os.pread(fd, size, 0) if size else b""


def _check_one_name(fd: int, path: str) -> None:
    """Refuse a lock file that is also another file (a hard link: a checkpoint's tensor file
    under the lock's name would be truncated); the flock taken on it is dropped, its bytes
    untouched."""
    try:
        check_one_name(
            path,
            os.fstat(fd),
            "delete it while no writer runs (the next writer creates a lock file of its own)",
        )
    except BaseException:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        raise


def _release_local(fd: int) -> None:
    """Clear the holder record, drop the flock, close the file (the finalizer of a lock)."""
    try:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _release_remote(storage: Storage, me: LockHolder) -> None:
    """Delete the lock file if it still names `me`; warn if the store refuses (the error the
    writer is leaving on, if any, is the one to see)."""
    try:
        if LockHolder.from_json(storage.read_bytes(LOCK_NAME, _RECORD_LIMIT)) == me:
            storage.remove(LOCK_NAME)
    except FileNotFoundError:
        pass
    except OSError as exc:
        warn_user(
            f"could not delete the writer lock file {_lock_path(storage)} ({exc.strerror or exc}); "
            f"it names {me.describe()}, which writes no more: once that process has exited a "
            "writer on this host takes it over, one on another host is refused until it is "
            "deleted by hand"
        )


_HELD: weakref.WeakSet[WriterLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_HELD):
        lock._let_go_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class WriterLock:
    """The writer lock of one run directory; a second writer is refused with `LockedError`.

    Two `WriterLock`s on the same directory are refused even inside one process. The lock is
    released by `release()`, by leaving a `with` block, when the object is garbage-collected
    (so keep a reference for as long as you write), and on a local disk by the kernel when the
    process dies.

    >>> import tempfile
    >>> from haltpoint.store.storage import LocalStorage
    >>> tmp = tempfile.TemporaryDirectory()
    >>> storage = LocalStorage(tmp.name)
    >>> with WriterLock(storage):
    ...     read_holder(storage).is_this_process()
    True
    >>> read_holder(storage) is None
    True
    >>> tmp.cleanup()
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> None:
        """Take the lock, or raise `LockedError` naming the holder and the remedy.

        Warns when taking over from a holder that died without releasing the lock.

        Raises:
            LockedError: another writer (or another `WriterLock` of this process) holds it.
            UnwritableRunError: the run's file system has no file locks (`flock` fails).
            RuntimeError: this object already holds it.
        """
        if self.held:
            raise RuntimeError(
                f"this WriterLock already holds {_lock_path(self.storage)}; release() it first"
            )
        path = self.storage.write_path(LOCK_NAME)
        if path is not None and fcntl is not None:
            fd = self._acquire_local(path)
            self._finalizer = weakref.finalize(self, _release_local, fd)
        else:
            me = self._acquire_remote()
            self._finalizer = weakref.finalize(self, _release_remote, self.storage, me)
        _HELD.add(self)

    def _acquire_local(self, path: str) -> int:
        deadline = time.monotonic() + _BUSY_GRACE_S
        while True:
            fd = open_unlinked(path, os.O_RDWR | os.O_CREAT)
            try:
                _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path)
            except BlockingIOError:
                try:
                    holder = LockHolder.from_json(_read_fd(fd))
                finally:
                    os.close(fd)
                if time.monotonic() >= deadline:
                    raise _locked_error(self.storage, holder or _UNKNOWN) from None
                time.sleep(_POLL_S)
                continue
            except BaseException:
                os.close(fd)
                raise
            _check_one_name(fd, path)  # before the record is truncated
            try:
                # Someone may have deleted the file between our open and our flock.
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    previous = LockHolder.from_json(_read_fd(fd))
                    if previous is not None:
                        _took_over_warning(self.storage, previous)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, _me().to_json(), 0)
                    os.fsync(fd)
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                _release_local(fd)
                raise
            os.close(fd)

    def _acquire_remote(self) -> LockHolder:
        storage = self.storage
        data: bytes | None = None
        with contextlib.suppress(FileNotFoundError):
            data = storage.read_bytes(LOCK_NAME, _RECORD_LIMIT)
        if data is not None:
            holder = LockHolder.from_json(data)
            if holder is None:
                raise _locked_error(storage, _UNKNOWN)
            if holder.host != socket.gethostname() or _pid_alive(holder.pid):
                raise _locked_error(storage, holder)
            _took_over_warning(storage, holder)
            storage.remove(LOCK_NAME)
        me = _me()
        try:  # refused by the store where a lock file is there (S3: If-None-Match)
            storage.publish_new(LOCK_NAME, me.to_json())
        except FileExistsError:  # another writer created one since we looked
            data = None
            with contextlib.suppress(FileNotFoundError):
                data = storage.read_bytes(LOCK_NAME, _RECORD_LIMIT)
            raise _locked_error(
                storage, (data and LockHolder.from_json(data)) or _UNKNOWN
            ) from None
        winner = LockHolder.from_json(storage.read_bytes(LOCK_NAME, _RECORD_LIMIT))
        if winner != me:  # another writer published in the same instant and won
            raise _locked_error(storage, winner or _UNKNOWN)
        return me

    def check(self) -> None:
        """Raise `LockedError` unless the run's lock file is still the one this object holds:
        deleted or replaced meanwhile (by hand, a clean-up script), it lets another writer
        take a lock of its own, so a writer calls this before it commits.

        Raises:
            LockedError: the lock file at the run's path is gone, another file, or (behind
                fsspec) names another holder; or this object does not hold the lock.
        """
        finalizer = self._finalizer
        peeked = finalizer.peek() if finalizer is not None else None
        ours = False
        if peeked is not None:
            _, release, args, _ = peeked
            with contextlib.suppress(FileNotFoundError):
                if release is _release_local:
                    path = self.storage.write_path(LOCK_NAME)
                    ours = path is not None and os.path.samestat(os.fstat(args[0]), os.stat(path))
                else:
                    data = self.storage.read_bytes(LOCK_NAME, _RECORD_LIMIT)
                    ours = LockHolder.from_json(data) == args[1]
        if not ours:
            path = self.storage.local_path(LOCK_NAME) or _lock_path(self.storage)
            raise LockedError(
                f"the writer lock file {path} was deleted or replaced while process "
                f"{os.getpid()} held it, so another writer may be using {self.storage.url}; "
                "nothing was committed, moved or removed: stop every other writer of the run, "
                "then open it again (never delete the lock file of a live writer)",
                path=path,
            )

    def release(self) -> None:
        """Let go of the lock; does nothing when it is not held."""
        finalizer, self._finalizer = self._finalizer, None
        _HELD.discard(self)
        if finalizer is not None:
            finalizer()

    def _let_go_after_fork(self) -> None:
        """In a forked child: forget the parent's lock without releasing it."""
        finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None and finalizer.alive:
            detached = finalizer.detach()
            if detached is not None and detached[1] is _release_local:
                with contextlib.suppress(OSError):
                    os.close(detached[2][0])

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"WriterLock({self.storage.url!r}, held={self.held})"


def read_holder(storage: Storage) -> LockHolder | None:
    """Who holds the writer lock of `storage` now; None when it is free or its holder is dead.

    On a local disk this probes the flock with a brief shared lock on a separate file
    descriptor, never disturbing the holder. Behind fsspec it reads the lock file and treats a
    dead process on this host as no holder. A lock held by a process whose record cannot be
    read is reported as an unidentified holder (pid 0), never as free.

    Raises:
        UnwritableRunError: the run's file system has no file locks (`flock` fails).
    """
    path = storage.local_path(LOCK_NAME)
    if path is not None and fcntl is not None:
        return _read_holder_local(path)
    try:
        data = storage.read_bytes(LOCK_NAME, _RECORD_LIMIT)
    except FileNotFoundError:
        return None
    holder = LockHolder.from_json(data)
    if holder is None:
        return _UNKNOWN
    if holder.host == socket.gethostname() and not _pid_alive(holder.pid):
        return None
    return holder


def _read_holder_local(path: str) -> LockHolder | None:
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None
    try:
        try:
            _flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, path)
        except BlockingIOError:
            pass  # a writer holds it
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        deadline = time.monotonic() + _BUSY_GRACE_S
        while True:  # the holder writes its record just after taking the lock
            holder = LockHolder.from_json(_read_fd(fd))
            if holder is not None:
                return holder
            if time.monotonic() >= deadline:
                return _UNKNOWN
            time.sleep(_POLL_S)
    finally:
        os.close(fd)
