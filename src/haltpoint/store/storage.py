"""The storage boundary: a run directory on the local disk or behind any fsspec URL.

Every path handed to a `Storage` is relative to the run directory and uses forward slashes;
absolute paths and `..` are refused, so nothing read from a manifest can point outside the run.
`LocalStorage` takes the fast direct path (os calls, fsync, atomic rename); `FsspecStorage`
serves `memory://`, `s3://`, `gs://` and every other fsspec protocol, where a single object
write is atomic and the manifest is simply written last.

Nothing is written through a symbolic link inside a local run directory: a file haltpoint
creates, truncates or appends to (tensor files, manifests and their temporary files, pin
markers, the lock, the history), and every folder between the run directory and it, must not
be a link (`LocalStorage.write_path` checks, and `open_unlinked` opens with O_NOFOLLOW), or
`LinkedFileError` is raised. The run directory itself may be a link.

Nothing but a regular file is opened either: every file haltpoint reads or writes in a local run
directory goes through `open_regular`, which never waits on a FIFO and refuses a folder, a FIFO,
a socket or a device with `NotRegularFileError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol

from haltpoint.errors import (
    CorruptCheckpointError,
    LinkedFileError,
    NotRegularFileError,
    UnwritableRunError,
    first_line,
)
from haltpoint.store.object_store import MAX_CONCURRENCY, PART_BYTES, MultipartWriter, is_s3

__all__ = [
    "FsspecStorage",
    "LocalStorage",
    "Storage",
    "check_one_name",
    "check_regular",
    "check_relpath",
    "dangling_link",
    "fsync_dir",
    "open_regular",
    "open_storage",
    "open_unlinked",
    "replace_file",
]

READ_BLOCK_BYTES = 64 << 20
"""Read-ahead of S3 files: a large sequential read costs one request per this many bytes."""


def check_relpath(rel: str) -> str:
    """Return `rel` normalised, or raise `CorruptCheckpointError` if it leaves the run directory
    (or names what no file system can: NUL, a lone surrogate).

    >>> check_relpath("step-000000001/data-0.safetensors")
    'step-000000001/data-0.safetensors'
    >>> check_relpath("../elsewhere")
    Traceback (most recent call last):
    ...
    haltpoint.errors.CorruptCheckpointError: path '../elsewhere' points outside ...
    """
    if not isinstance(rel, str) or not rel:
        raise CorruptCheckpointError(f"path {rel!r} is not a non-empty string")
    parts = rel.split("/")
    if (
        rel.startswith(("/", "\\"))
        or "\\" in rel
        or "\x00" in rel
        or (len(rel) > 1 and rel[1] == ":")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise CorruptCheckpointError(
            f"path {rel!r} points outside the run directory; a manifest may only name "
            "relative paths inside its run (the file was damaged or crafted)",
            path=rel,
        )
    try:
        os.fsencode(rel)
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no file has the name
        raise CorruptCheckpointError(
            f"path {rel!r} holds a character no file name can hold (a lone surrogate); a "
            "manifest names only files haltpoint wrote (the file was damaged or crafted)",
            path=rel,
        ) from None
    return rel


class Storage(Protocol):
    """What the format layer needs from a place to keep files."""

    url: str

    def local_path(self, rel: str) -> str | None:
        """The OS path of `rel` when the storage is a local disk, else None."""

    def write_path(self, rel: str) -> str | None:
        """The OS path for writing `rel` when the storage is a local disk, else None.

        Raises:
            LinkedFileError: `rel`, or a folder between the run directory and it, is a
                symbolic link.
        """

    def exists(self, rel: str) -> bool:
        """Whether `rel` exists (a link counts, not its target).

        Raises:
            OSError: it cannot be told (no permission, an I/O error): never False for a file
                that may be there, since writers check that they overwrite nothing.
        """

    def isdir(self, rel: str) -> bool: ...

    def is_folder(self, rel: str) -> bool:
        """Whether `rel` is a folder itself, not a symbolic link to one."""

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries directly under `rel`; empty if it does not exist."""

    def makedirs(self, rel: str) -> None: ...

    def size(self, rel: str) -> int: ...

    def stamp(self, rel: str) -> tuple[object, ...]:
        """What changes when the file is rewritten: its size and modification mark (on a
        local disk also its inode and change time, which a rewrite that keeps the
        modification time still moves)."""

    def open_write(self, rel: str) -> contextlib.AbstractContextManager[IO[bytes]]:
        """A binary file for writing `rel`; durable (flushed and fsynced) when the block exits
        cleanly, removed when it raises."""

    def open_read(self, rel: str) -> IO[bytes]: ...

    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        """The file's bytes; with `limit`, at most that many (the rest is never read)."""

    def publish(self, rel: str, data: bytes) -> None:
        """Write a small file atomically and durably: readers see all of it or nothing."""

    def publish_new(self, rel: str, data: bytes) -> None:
        """`publish`, only where no file is at `rel`: nothing is ever written over one.

        Raises:
            FileExistsError: a file is there (nothing was written).
        """

    def rename(self, rel: str, new: str) -> None:
        """Move the small file `rel` to the name `new` (in an existing folder), durably.

        Raises:
            FileExistsError: `new` exists (nothing is overwritten).
        """

    def remove(self, rel: str) -> None:
        """Delete a file; a missing file is not an error."""

    def remove_many(self, rels: list[str]) -> None:
        """Delete files (a folder among them goes whole) in as few requests as the storage
        allows; missing ones are not errors."""

    def rmtree(self, rel: str) -> None:
        """Delete a folder and everything in it; a missing folder is not an error."""

    def rmdir(self, rel: str) -> bool:
        """Delete a folder only if it is empty, and say whether it is gone: one that is not
        empty (a file created in it since it was listed) is left as it is, without an
        error; a missing one is gone."""

    def free_space(self) -> int | None:
        """Bytes free for new data, or None where the storage cannot tell."""


def _linked(path: str) -> LinkedFileError:
    return LinkedFileError(
        f"{path} is a symbolic link; haltpoint does not write through links (remove the link)",
        path=path,
    )


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"


def _not_regular(path: str, mode: int) -> NotRegularFileError:
    return NotRegularFileError(
        f"{path} is {_kind(mode)}, not a regular file; haltpoint reads and writes only the "
        "regular files a Checkpointer creates (move it out of the run directory)",
        path=path,
    )


def check_regular(path: str) -> None:
    """Raise `NotRegularFileError` if `path` exists and is not a regular file (nor a link).

    >>> check_regular("/")
    Traceback (most recent call last):
    ...
    haltpoint.errors.NotRegularFileError: / is a folder, not a regular file; ...
    """
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISLNK(info.st_mode):
            raise _not_regular(path, info.st_mode)


def check_one_name(path: str, info: os.stat_result, remedy: str) -> None:
    """Raise `LinkedFileError` if `info` (of the file at `path`) is a regular file with more
    names than `path` (hard links): a file haltpoint changes in place (the lock, the history)
    would change under its other names too, a checkpoint's tensor file among them.

    Raises:
        LinkedFileError: naming `path`, how many names it has, and `remedy`.
    """
    if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
        raise LinkedFileError(
            f"{path} has {info.st_nlink} names (hard links): haltpoint changes it in place, "
            f"which would change the same file under its other names (a checkpoint's tensor "
            f"file, a snapshot's copy) too, so nothing was written; {remedy}",
            path=path,
        )


def open_regular(path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """`os.open(path, flags, mode)` with O_CLOEXEC that hands back only a regular file: it
    never waits on a FIFO (it opens without blocking, then checks) and the descriptor it
    returns blocks as usual.

    Raises:
        NotRegularFileError: `path` is a folder, a FIFO, a socket or a device.
        OSError: as `os.open` raises it otherwise (a missing file, no permission).
    """
    nonblock = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | nonblock | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ENXIO, errno.ENODEV):  # a folder, FIFO, device
            raise
        try:
            found = os.stat(path).st_mode
        except OSError:
            raise exc from None
        if stat.S_ISREG(found):  # a regular file on a device that went away: not damage
            raise exc from None
        raise _not_regular(path, found) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode)
        if nonblock and not flags & nonblock:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def dangling_link(path: str) -> str:
    """What the symbolic link at `path`, which resolves to nothing, is: "a symbolic link
    that does not resolve (a loop, or to a missing target ...)"."""
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return f"a symbolic link that does not resolve (a loop, or to a missing target: {target})"


def open_unlinked(path: str, flags: int, mode: int = 0o644) -> int:
    """`open_regular(path, flags, mode)` with O_NOFOLLOW: a file descriptor for writing that
    never reaches through a symbolic link at `path`.

    Raises:
        LinkedFileError: `path` is a symbolic link.
        NotRegularFileError: `path` is a folder, a FIFO, a socket or a device.
    """
    try:
        return open_regular(path, flags | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EEXIST, errno.EMLINK) and os.path.islink(path):
            raise _linked(path) from None
        raise


def replace_file(path: str, write: Callable[[str], None]) -> None:
    """Make a new file at `path`: `write(tmp)` fills a fresh file next to it, which is then
    renamed over `path`.

    Whatever was at `path` (a hard link to a checkpoint's tensors, a symbolic link) loses its
    name and keeps its bytes: it is replaced, never written through. On any failure, Ctrl-C
    included, the fresh file is removed and `path` is left as it was.
    """
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    os.close(open_unlinked(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(path: str) -> None:
    """Make a directory's entries (new, renamed, removed files) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A run directory on a local file system, written with fsync and atomic renames.

    `create=False` (for readers) never creates the folder: a missing one reads as empty.
    A leading `~` or `~user` is the home folder, as in a shell (and in Lightning's and the
    Hugging Face Trainer's output paths), never a folder named `~` in the current one.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.url = self.root
        if create:
            if os.path.islink(self.root) and not os.path.exists(self.root):
                raise UnwritableRunError(
                    f"directory {self.root} is {dangling_link(self.root)}; pass a folder for "
                    "the run, or a link to one",
                    path=self.root,
                )
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                what = "a file, not a folder" if os.path.isfile(self.root) else "not a folder"
                raise UnwritableRunError(
                    f"directory {self.root} is {what}; pass a folder for the run (it is "
                    "created if missing)",
                    path=self.root,
                )
            os.makedirs(self.root, exist_ok=True)
        self._real_root = os.path.realpath(self.root)

    def _path(self, rel: str) -> str:
        if rel == "":
            return self.root
        return os.path.join(self.root, *check_relpath(rel).split("/"))

    def _followed(self, rel: str) -> str:
        """The path of `rel` for opening, refusing a symlink on the way below the run's root.

        haltpoint writes no links, so one inside the run is foreign: read through, a step
        whose tensors are a link to another step's would verify intact, and lose its bytes
        when retention removes the other step. (The run directory itself may be a link.)
        """
        path = self._path(rel)
        real = os.path.realpath(path)
        inside = self._real_root.rstrip(os.sep) + os.sep  # "/" for a run at the root
        if real != self._real_root and not real.startswith(inside):
            raise CorruptCheckpointError(
                f"{path} is a symlink to {real}, outside the run directory; haltpoint never "
                "reads or writes through links that leave the run (remove the link)",
                path=path,
            )
        try:
            return self.write_path(rel)
        except LinkedFileError as exc:
            raise CorruptCheckpointError(
                f"{exc.path} is a symbolic link inside the run directory; haltpoint writes "
                "none and never reads through one (remove the link)",
                path=exc.path,
            ) from None

    def local_path(self, rel: str) -> str | None:
        return self._followed(rel)

    def write_path(self, rel: str) -> str:
        path = self.root
        for part in check_relpath(rel).split("/") if rel else []:
            path = os.path.join(path, part)
            if os.path.islink(path):
                raise _linked(path)
        return path

    def _through_link(self, rel: str) -> bool:
        """Whether a folder between the run directory and `rel` is a symbolic link."""
        head = check_relpath(rel).rpartition("/")[0]
        try:
            self.write_path(head)
        except LinkedFileError:
            return True
        return False

    def exists(self, rel: str) -> bool:
        try:
            os.lstat(self._path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True  # any other OSError: it may be there (os.path.lexists says False)

    def isdir(self, rel: str) -> bool:
        return os.path.isdir(self._path(rel))

    def is_folder(self, rel: str) -> bool:
        path = self._path(rel)
        return os.path.isdir(path) and not os.path.islink(path)

    def listdir(self, rel: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._followed(rel)))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            if not rel:  # the run directory itself is a file (or a FIFO, a device): no run
                raise
            return []

    def makedirs(self, rel: str) -> None:
        path = self.write_path(rel)
        if not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            fsync_dir(os.path.dirname(path))

    def size(self, rel: str) -> int:
        return os.path.getsize(self._followed(rel))

    def stamp(self, rel: str) -> tuple[object, ...]:
        st = os.stat(self._followed(rel))
        # the change time too: a rewrite that sets the modification time back (`cp -p`,
        # `rsync -t --inplace`, `touch -r`) still moves it, and no program can set it
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        path = self.write_path(rel)
        fd = open_unlinked(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        f = os.fdopen(fd, "wb")
        try:
            yield f
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        f.close()
        fsync_dir(os.path.dirname(path))

    def open_read(self, rel: str) -> IO[bytes]:
        return os.fdopen(open_regular(self._followed(rel)), "rb")

    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        with self.open_read(rel) as f:
            return f.read(-1 if limit is None else limit)

    def publish(self, rel: str, data: bytes) -> None:
        path = self.write_path(rel)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        fd = open_unlinked(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(os.path.dirname(path))

    def publish_new(self, rel: str, data: bytes) -> None:
        """A look, then `publish`: the writer holds the flock, so nobody creates `rel` in
        between."""
        self.write_path(rel)  # a link there is LinkedFileError, not a file that exists
        if self.exists(rel):
            raise FileExistsError(f"{self._path(rel)} exists; haltpoint never writes over it")
        self.publish(rel, data)

    def rename(self, rel: str, new: str) -> None:
        """One atomic `os.rename` (the writer holds the lock: nobody creates `new` meanwhile)."""
        path, target = self.write_path(rel), self.write_path(new)
        if os.path.lexists(target):
            raise FileExistsError(f"{target} exists; haltpoint never renames over a file")
        os.rename(path, target)
        fsync_dir(os.path.dirname(target))
        fsync_dir(os.path.dirname(path))

    def remove(self, rel: str) -> None:
        """Delete a file (or a link, never its target); a missing file is not an error, and a
        file reached through a linked folder is not deleted (`rmtree` of the folder removes
        the link).

        Raises:
            NotRegularFileError: `rel` is a folder (nothing is deleted).
        """
        if self._through_link(rel):
            return
        path = self._path(rel)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except IsADirectoryError:  # a folder where haltpoint keeps a file: not its to delete
            raise _not_regular(path, os.lstat(path).st_mode) from None

    def remove_many(self, rels: list[str]) -> None:
        for rel in rels:
            if self._through_link(rel):
                continue
            path = self._path(rel)
            if os.path.isdir(path) and not os.path.islink(path):
                self.rmtree(rel)  # a folder where a file was expected: remove it whole
            else:
                self.remove(rel)

    def rmtree(self, rel: str) -> None:
        path = self._path(rel)
        if rel and self._through_link(rel):
            return
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=False)
        else:
            self.remove(rel)

    def rmdir(self, rel: str) -> bool:
        """`os.rmdir`: the kernel removes the folder only while it is empty, so a file created
        in it a moment before (a manifest another writer committed) is never deleted."""
        if not rel or self._through_link(rel):
            return False  # never the run itself, nor a folder reached through a link
        if not self.is_folder(rel):  # a link or a file at its name is not a folder of ours
            return not os.path.lexists(self._path(rel))
        try:
            os.rmdir(self._path(rel))
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return False
        return True

    def free_space(self) -> int | None:
        try:
            st = os.statvfs(self.root)
        except (AttributeError, OSError):  # pragma: no cover - Windows
            return None
        return st.f_bavail * st.f_frsize


_CLIENT_LIBRARIES = frozenset({"botocore", "aiobotocore", "aiohttp"})
"""Packages whose exceptions `store_error` turns into OS errors: those of S3's client."""

_DENIED_CODES = frozenset(
    {
        "AccessDenied", "AccountProblem", "AllAccessDisabled", "ExpiredToken",
        "InvalidAccessKeyId", "InvalidSecurity", "InvalidToken", "NotSignedUp",
        "RequestTimeTooSkewed", "SignatureDoesNotMatch", "TokenRefreshRequired",
    }
)  # fmt: skip


_LOST = getattr(errno, "ECONNRESET", errno.EIO)
_ERRNO = (
    (PermissionError, errno.EACCES),
    (FileNotFoundError, errno.ENOENT),
    (FileExistsError, errno.EEXIST),
    (TimeoutError, errno.ETIMEDOUT),
)
"""The errno of s3fs's errors that it makes without one (`PermissionError(message)`)."""


def _from_client_library(exc: BaseException) -> bool:
    return any(c.__module__.partition(".")[0] in _CLIENT_LIBRARIES for c in type(exc).__mro__)


def store_error(exc: BaseException) -> OSError | None:
    """The OS error that says what `exc`, an exception of the store's client library
    (botocore's, aiohttp's: raised as they are by s3fs), means; None for any other exception.

    No credentials (or none that can be fetched, or an expired token) is a `PermissionError`;
    a timeout a `TimeoutError`; an endpoint that cannot be reached, or a connection that
    closed, a `ConnectionError`; a reply with an error code (a `ClientError` s3fs passed on)
    by its code: a missing key or bucket `FileNotFoundError`, a refused request
    `PermissionError`, any other `OSError(EIO)`; any other error of the library an
    `OSError(EIO)`. All but a missing key are errors that say nothing of the bytes
    (`not_damage`). The message is the library's first line. botocore is imported only to
    classify an exception that came from it.

    >>> store_error(ValueError("not the store's")) is None
    True
    """
    if not _from_client_library(exc):
        return None
    text = first_line(exc) or type(exc).__name__
    module = type(exc).__module__.partition(".")[0]
    if module == "aiohttp":  # raised past aiobotocore: a dropped or timed-out connection
        timeout = isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__
        return TimeoutError(errno.ETIMEDOUT, text) if timeout else ConnectionError(_LOST, text)
    from botocore import exceptions as boto

    credentials = tuple(
        getattr(boto, name)
        for name in (
            "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
            "TokenRetrievalError", "NoAuthTokenError", "SSOError", "RefreshWithMFAUnsupportedError",
        )
        if hasattr(boto, name)
    )  # fmt: skip
    if isinstance(exc, credentials):
        return PermissionError(errno.EACCES, f"no usable credentials for the store: {text}")
    if isinstance(exc, (boto.ConnectTimeoutError, boto.ReadTimeoutError)):
        return TimeoutError(errno.ETIMEDOUT, text)
    if isinstance(exc, boto.ConnectionError):  # no connection: refused, no route, no name
        return ConnectionError(errno.ENOTCONN, text)
    if isinstance(exc, boto.HTTPClientError):  # a connection that closed mid-request
        return ConnectionError(_LOST, text)
    if isinstance(exc, boto.ClientError):
        error = (getattr(exc, "response", None) or {}).get("Error") or {}
        code = str(error.get("Code", ""))
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
            return FileNotFoundError(errno.ENOENT, text)
        if code in _DENIED_CODES or status in (401, 403):
            return PermissionError(errno.EACCES, text)
        return OSError(errno.EIO, text)
    return OSError(errno.EIO, text)


class _StoreErrors(contextlib.ContextDecorator):
    """Raise the exceptions of the store's client library as the OS errors `store_error`
    says (the original is their cause), and give s3fs's translations of a reply that have
    no errno one (its `PermissionError(message)`): the one place botocore's errors are
    translated, so that every caller's `except OSError` (and `not_damage`) sees them."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        translated = None if exc is None else store_error(exc)
        if translated is not None:
            raise translated from exc
        cause = None if exc is None else exc.__cause__
        if not isinstance(exc, OSError) or cause is None or not _from_client_library(cause):
            return
        text = exc.strerror or str(exc)  # s3fs's translation of the store's error reply
        code = str(((getattr(cause, "response", None) or {}).get("Error") or {}).get("Code"))
        kept = (FileNotFoundError, FileExistsError, PermissionError, TimeoutError)
        if not isinstance(exc, kept) and exc.errno != errno.ENOSYS and code != "InvalidRange":
            # a refused request (EINVAL for a code s3fs knows, say) says nothing of the bytes
            raise OSError(errno.EIO, text) from cause
        if exc.errno is None:  # s3fs's PermissionError(message): give it its errno
            number = next(n for k, n in _ERRNO if isinstance(exc, k))
            raise type(exc)(number, text) from cause


_store_errors = _StoreErrors()


class _ReadFile:
    """A file read from the store whose client library's exceptions are OS errors."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f

    def __enter__(self) -> _ReadFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @_store_errors
    def read(self, size: int = -1) -> bytes:
        return self._f.read(size)

    @_store_errors
    def readinto(self, buffer: Any) -> int:
        return self._f.readinto(buffer)  # type: ignore[attr-defined]

    @_store_errors
    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    @_store_errors
    def close(self) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


class FsspecStorage:
    """A run directory behind an fsspec URL (`memory://`, `s3://`, `gs://`, ...).

    Nothing is served from fsspec's listing cache (another process may have written since):
    every check asks the store. On S3, files are uploaded in parallel parts
    (`object_store.MultipartWriter`) and read with a large read-ahead block, so a big tensor
    file takes few requests; other protocols use their own `fs.open`.

    >>> storage = FsspecStorage("memory://doctest-fsspec/run")
    >>> storage.publish("step-000000001/manifest.json", b"{}")
    >>> storage.listdir(), storage.read_bytes("step-000000001/manifest.json")
    (['step-000000001'], b'{}')
    >>> storage.rmtree("")
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        part_bytes: int = PART_BYTES,
        max_concurrency: int = MAX_CONCURRENCY,
        read_block_bytes: int = READ_BLOCK_BYTES,
        create: bool = True,
    ) -> None:
        import fsspec

        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(url, **self.storage_options)
        self.root = root.rstrip("/")
        self.url = url
        self.part_bytes = part_bytes
        self.max_concurrency = max_concurrency
        self.read_block_bytes = read_block_bytes
        self._s3 = is_s3(self.fs)
        if not create:  # a reader writes nothing: a missing folder (or bucket) reads as empty
            return
        if self._s3:  # no folders to make; and s3fs's makedirs would create a missing bucket
            self._check_bucket()
        else:
            self.fs.makedirs(self.root, exist_ok=True)

    @_store_errors
    def _check_bucket(self) -> None:
        """Refuse a writer on a bucket that does not exist: haltpoint creates no buckets (a
        mistyped name would become a new bucket in the account)."""
        from fsspec.asyn import sync

        bucket = self.fs.split_path(self.root)[0]
        try:
            sync(self.fs.loop, self.fs._call_s3, "head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise UnwritableRunError(
                f"cannot write {self.url}: the bucket {bucket!r} does not exist (or these "
                "credentials cannot see it); haltpoint creates no buckets: create it, or check "
                "the URL",
                path=self.url,
            ) from None
        except OSError:  # no permission to ask (s3:ListBucket): the writes will say more
            pass

    def _path(self, rel: str) -> str:
        if rel == "":
            return self.root
        return posixpath.join(self.root, check_relpath(rel))

    def _fresh(self, rel: str) -> str:
        """The path of `rel`, with any cached listing of it and its parents dropped."""
        path = self._path(rel)
        self.fs.invalidate_cache(path)
        return path

    def local_path(self, rel: str) -> str | None:
        return None

    def write_path(self, rel: str) -> str | None:
        return None

    def fsspec_url(self, rel: str) -> str:
        """The full URL of `rel`, for another fsspec client (DCP's) with `storage_options`."""
        return str(self.fs.unstrip_protocol(self._path(rel)))

    @_store_errors
    def exists(self, rel: str) -> bool:
        try:  # not fs.exists, which says False for any error (a timeout, no permission)
            self.fs.info(self._fresh(rel))
        except FileNotFoundError:
            return False
        return True

    @_store_errors
    def isdir(self, rel: str) -> bool:
        return bool(self.fs.isdir(self._fresh(rel)))

    def is_folder(self, rel: str) -> bool:
        return self.isdir(rel)  # object stores have no links

    @_store_errors
    def listdir(self, rel: str = "") -> list[str]:
        path = self._path(rel)
        try:
            entries = self.fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = {posixpath.basename(str(e).rstrip("/")) for e in entries}
        names.discard("")
        return sorted(names)

    @_store_errors
    def makedirs(self, rel: str) -> None:
        self.fs.makedirs(self._path(rel), exist_ok=True)

    @_store_errors
    def size(self, rel: str) -> int:
        return int(self.fs.size(self._fresh(rel)))

    @_store_errors
    def stamp(self, rel: str) -> tuple[object, ...]:
        info = self.fs.info(self._fresh(rel))
        marks = ("ETag", "mtime", "LastModified", "created")
        return (info.get("size"), *(str(info.get(m)) for m in marks if m in info))

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[IO[bytes]]:
        with _store_errors:  # the upload's requests, and the writes that send its parts
            yield from self._open_write(rel)

    def _open_write(self, rel: str) -> Iterator[IO[bytes]]:
        path = self._path(rel)
        if self._s3:
            writer = MultipartWriter(
                self.fs, path, part_bytes=self.part_bytes, max_concurrency=self.max_concurrency
            )
            try:
                yield writer  # type: ignore[misc]
            except BaseException:
                writer.abort()  # nothing was published: no object to remove
                raise
            writer.close()
            return
        f = self.fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            f.discard()  # closing would publish the partial file
            self._delete([path])
            raise
        f.close()

    @_store_errors
    def open_read(self, rel: str) -> IO[bytes]:
        path = self._fresh(rel)
        if self._s3:
            f = self.fs.open(path, "rb", block_size=self.read_block_bytes, cache_type="readahead")
        else:
            f = self.fs.open(path, "rb")
        return _ReadFile(f)  # type: ignore[return-value]

    @_store_errors
    def read_bytes(self, rel: str, limit: int | None = None) -> bytes:
        return bytes(self.fs.cat_file(self._path(rel), end=limit))

    @_store_errors
    def publish(self, rel: str, data: bytes) -> None:
        """One object write (`PutObject` on S3): readers see all of it or nothing."""
        self.fs.pipe_file(self._path(rel), data)

    @_store_errors
    def publish_new(self, rel: str, data: bytes) -> None:
        """One conditional object write: on S3 a `PutObject` with `If-None-Match: *`, which
        the store refuses when the key exists, however many writers race (fsspec's
        `mode="create"`; on `memory://` an exclusive open). A store that does not implement
        the condition (`NotImplemented`) gets a look, then the write: without a lock two
        writers may then both write.

        Raises:
            FileExistsError: the object exists (nothing was written).
        """
        path = self._path(rel)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            if self.exists(rel):
                raise FileExistsError(
                    f"{self.url}/{rel} exists; haltpoint never writes over it"
                ) from None
            self.publish(rel, data)
        self.fs.invalidate_cache(path)

    @_store_errors
    def rename(self, rel: str, new: str) -> None:
        """Copy, read the copy back and compare, and only then delete the original.

        Object stores have no rename. A crash between the copy and the delete leaves both.

        Raises:
            OSError: the copy did not read back equal (it is removed; the original stays).
        """
        if self.exists(new):
            raise FileExistsError(f"{self.url}/{new} exists; haltpoint never renames over a file")
        data = self.read_bytes(rel)
        self.publish_new(new, data)
        if self.read_bytes(new) != data:
            self.remove(new)
            raise OSError(f"the copy of {self.url}/{rel} as {new} did not read back equal")
        self.remove(rel)

    @_store_errors
    def remove(self, rel: str) -> None:
        self._delete([self._path(rel)])

    @_store_errors
    def remove_many(self, rels: list[str]) -> None:
        """Delete these files by name: on S3 one `DeleteObjects` request per 1,000 of them.

        A folder among them (a `dcp/` left by an interrupted sharded save) is removed whole,
        as on a local disk, on a file system with real folders (memory://, SFTP, HDFS). On S3
        a folder is only a key prefix, which the removal of its step folder deletes
        (`rmtree`).
        """
        files, folders = [], []
        for rel in rels:
            path = self._path(rel)
            if not self._s3 and self.fs.isdir(path):
                folders.append(path)
            else:
                files.append(path)
        self._delete(files)
        for path in folders:
            self._delete_tree(path)

    @_store_errors
    def rmtree(self, rel: str) -> None:
        self._delete_tree(self._fresh(rel))

    @_store_errors
    def rmdir(self, rel: str) -> bool:
        """Delete what is left of the folder `rel` (an empty folder, a zero-byte folder
        marker) when it holds no file. An object store has no atomic "remove if empty":
        a file created between the look and the delete is deleted with it (best effort, as
        its lock is)."""
        path = self._fresh(rel)
        try:
            found = self.fs.find(path, withdirs=True, detail=True)
        except FileNotFoundError:
            return True
        marker = path.rstrip("/")
        if any(
            info.get("type") != "directory" and p.rstrip("/") != marker for p, info in found.items()
        ):
            return False
        self._delete_found(found)
        return True

    def _delete_tree(self, path: str) -> None:
        """Delete `path` and everything below it: one listing (`find`, which takes the path
        as a name), then `_delete_found`."""
        try:
            found = self.fs.find(path, withdirs=True, detail=True)
        except FileNotFoundError:
            return
        self._delete_found(found)

    def _delete_found(self, found: dict[str, Any]) -> None:
        """Delete what a `find(..., withdirs=True, detail=True)` listed: the files by name,
        then the folders left empty, deepest first. A bucket is never removed, only what is
        in it."""
        self._delete([p for p, info in found.items() if info.get("type") != "directory"])
        if self._s3:
            return  # a folder is a key prefix: gone with its keys
        folders = [p for p, info in found.items() if info.get("type") == "directory"]
        for folder in sorted(folders, key=len, reverse=True):
            if "/" in folder.strip("/"):  # never the top level (a bucket, a container)
                with contextlib.suppress(OSError):
                    self.fs.rmdir(folder)

    def _delete(self, paths: list[str]) -> None:
        """Delete files by their exact names; missing ones are not errors.

        Never `fs.rm`: fsspec expands a path holding `[`, `?` or `*` as a glob pattern, so
        the files of a run named `exp[12]` would be looked for, and deleted, in `exp1` and
        `exp2`. On S3 the keys go in `DeleteObjects` requests of 1,000; elsewhere one
        `rm_file` each.
        """
        if not paths:
            return
        if self._s3:
            self._delete_keys(paths)
        else:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)
        for path in paths:
            self.fs.invalidate_cache(path)

    def _delete_keys(self, paths: list[str]) -> None:
        from fsspec.asyn import sync

        by_bucket: dict[str, list[str]] = {}
        for path in paths:
            bucket, key, _ = self.fs.split_path(path)
            by_bucket.setdefault(bucket, []).append(key)
        for bucket, keys in by_bucket.items():
            for i in range(0, len(keys), 1000):
                objects = [{"Key": key} for key in keys[i : i + 1000]]
                reply = sync(
                    self.fs.loop,
                    self.fs._call_s3,
                    "delete_objects",
                    Bucket=bucket,
                    Delete={"Objects": objects, "Quiet": True},
                )
                errors = reply.get("Errors") or []
                if errors:  # S3 answers 200 and lists the keys it kept (s3fs drops them)
                    raise _refused_delete(bucket, errors)

    def free_space(self) -> int | None:
        return None


def _refused_delete(bucket: str, errors: list[dict[str, Any]]) -> OSError:
    """The error of a `DeleteObjects` reply that kept keys: the first one, and how many more.

    >>> exc = _refused_delete("b", [{"Key": "run/m", "Code": "AccessDenied", "Message": "no"}])
    >>> type(exc).__name__, str(exc)
    ('PermissionError', "[Errno 13] the store refused to delete it: AccessDenied (no): 's3://b/run/m'")
    """
    first = errors[0]
    code, message = str(first.get("Code", "an error")), str(first.get("Message", "")).strip()
    more = f"; {len(errors) - 1} more key(s) kept too" if len(errors) > 1 else ""
    text = f"the store refused to delete it: {code}" + (f" ({message})" if message else "") + more
    denied = code in ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "ExpiredToken")
    kind, number = (PermissionError, errno.EACCES) if denied else (OSError, errno.EIO)
    return kind(number, text, f"s3://{bucket}/{first.get('Key', '')}")


def open_storage(
    directory: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    *,
    create: bool = True,
) -> Storage:
    """A `LocalStorage` for a local path or `file://` URL, else an `FsspecStorage`; a folder
    is created unless `create` is False (readers never create anything; on S3 a writer
    creates no bucket either)."""
    if isinstance(directory, os.PathLike):
        directory = os.fspath(directory)
    if not isinstance(directory, str) or not directory:
        error = ValueError if directory == "" else TypeError  # the right type, but empty
        raise error(
            f"directory must be a local path or an fsspec URL such as 's3://bucket/run', "
            f"got {directory!r}"
        )
    if directory.startswith("file://"):
        directory = directory[len("file://") :]
    if "://" in directory:
        return FsspecStorage(directory, storage_options, create=create)
    if storage_options:
        raise ValueError(
            "storage_options only apply to fsspec URLs (s3://, gs://, memory://, ...), "
            f"but directory is the local path {directory!r}"
        )
    return LocalStorage(directory, create=create)
