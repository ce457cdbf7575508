"""Reading safetensors files: every byte range checked against its hash, at the disk's speed.

Local files are read by an I/O thread (two reads in flight) while the calling thread hashes
the chunk before: reading and verifying overlap. A tensor of at least `DIRECT_MIN_BYTES` that
gets fresh memory is read with O_DIRECT into its own page-aligned anonymous mapping, which the
kernel faults in while it transfers (no page-cache copy, no separate pre-fault pass); where
the file system refuses O_DIRECT the same reads are buffered. Tensors filled in place
(`into=`), small ones and other storages are read as before, through ordinary reads.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import torch

from haltpoint.errors import (
    CorruptCheckpointError,
    UnreadableCheckpointError,
    not_damage,
    unreadable,
)
from haltpoint.store.hashing import StreamHasher, tensor_bytes
from haltpoint.store.storage import Storage, check_relpath, open_regular
from haltpoint.store.tensor_file import (
    _DTYPES,
    CHUNK,
    TensorRecord,
    _corrupt,
    _Damage,
    _parse_header,
    read_header,
)

__all__ = [
    "DIRECT_MIN_BYTES",
    "check_header_entry",
    "check_headers",
    "index_tensor_file",
    "read_tensors",
    "tensor_damage",
    "verify_file",
    "verify_tensors",
]

DIRECT_MIN_BYTES = 1 << 20
"""Tensors this large, read into fresh memory from a local file, are read with O_DIRECT."""
_ALIGN = 4096
_READ_CHUNK = 16 << 20
_READERS = 2
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def index_tensor_file(storage: Storage, rel: str) -> dict[str, TensorRecord]:
    """Records for an existing safetensors file (ours or anyone's), hashing its data.

    Raises:
        CorruptCheckpointError: the header is invalid or the file cannot be read.
    """
    header = read_header(storage, rel)
    header.pop("__metadata__")
    records: dict[str, TensorRecord] = {}
    buf = bytearray(CHUNK)
    try:
        with storage.open_read(rel) as f:
            for key, info in header.items():
                hasher = StreamHasher()
                for chunk in _stream(f, info["offset"], info["nbytes"], buf):
                    hasher.update(chunk)
                offset, nbytes, digest = info["offset"], info["nbytes"], hasher.hexdigest()
                shape = tuple(info["shape"])
                records[key] = TensorRecord(rel, info["dtype"], shape, offset, nbytes, digest)
    except (OSError, EOFError) as e:
        raise _corrupt(storage, rel, f"cannot read the file ({e})") from None
    return records


def check_header_entry(header: Mapping[str, Any], key: str, rec: TensorRecord) -> None:
    """Check that the file's own safetensors header (`read_header`) agrees with `rec`.

    The hash protects the bytes haltpoint reads; this protects what the file says to any
    other safetensors reader (and what `export` copies): a manifest record whose dtype, shape
    or byte range differs from its file's header is damage, whatever the bytes hash to.

    Raises:
        ValueError (the internal `_Damage`): the header has no entry `key`, or its dtype, shape
            or byte range differ; callers turn it into a `CorruptCheckpointError`.
    """
    entry = header.get(key) if key != "__metadata__" else None
    if entry is None:
        raise _Damage(f"the file's header has no tensor {key!r}")
    theirs = (entry["dtype"], tuple(entry["shape"]), entry["offset"], entry["nbytes"])
    ours = (rec.dtype, tuple(rec.shape), rec.offset, rec.nbytes)
    if theirs != ours:
        what = "dtype {}, shape {}, bytes {}+{}"
        raise _Damage(
            f"the manifest records {what.format(ours[0], list(ours[1]), *ours[2:])} but the "
            f"file's header says {what.format(theirs[0], list(theirs[1]), *theirs[2:])}"
        )


def _check_records(header: Mapping[str, Any], items: list[tuple[str, TensorRecord]]) -> None:
    """Validate each record and `check_header_entry` it; `_TensorDamage` names the first bad."""
    for key, rec in items:
        try:
            rec.validate()
            check_header_entry(header, key, rec)
        except (ValueError, CorruptCheckpointError) as e:
            raise _TensorDamage(key, e) from None


def _readinto(f: IO[bytes], view: memoryview) -> None:
    """Fill `view` from `f`; EOFError if the file ends first."""
    filled = 0
    while filled < len(view):
        got = f.readinto(view[filled:])  # type: ignore[attr-defined]
        if not got:
            raise EOFError(f"the file ended {len(view) - filled} bytes early")
        filled += got


def _stream(f: IO[bytes], offset: int, nbytes: int, buf: bytearray) -> Iterator[memoryview]:
    """The bytes [offset, offset + nbytes) of `f`, in chunks read into the reusable `buf`."""
    f.seek(offset)
    view = memoryview(buf)
    for i in range(0, nbytes, len(buf)):
        chunk = view[: min(len(buf), nbytes - i)]
        _readinto(f, chunk)
        yield chunk


def _unreadable(storage: Storage, rel: str, exc: BaseException) -> UnreadableCheckpointError:
    """The error of a file that cannot be read now, for a reason that is no damage
    (`not_damage`: no permission, an I/O error, a timeout)."""
    return unreadable(f"{storage.url.rstrip('/')}/{rel}", exc)


def _open(storage: Storage, rel: str) -> IO[bytes]:
    local = storage.local_path(rel)
    if local is None:
        return storage.open_read(rel)
    return os.fdopen(open_regular(local), "rb", buffering=0)


def _by_file(records: Mapping[str, TensorRecord]) -> dict[str, list[tuple[str, TensorRecord]]]:
    groups: dict[str, list[tuple[str, TensorRecord]]] = defaultdict(list)
    for key, rec in records.items():
        groups[rec.file].append((key, rec))
    return {file: sorted(items, key=lambda kr: kr[1].offset) for file, items in groups.items()}


def _in_place(key: str, rec: TensorRecord, into: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """`into[key]` when it can take the bytes of `rec` in place, else None."""
    t = into.get(key)
    if (
        t is not None
        and t.device.type == "cpu"
        and t.dtype == _DTYPES[rec.dtype]
        and tuple(t.shape) == rec.shape
        and t.is_contiguous()
        and t.layout == torch.strided
        and not (t.is_conj() or t.is_neg())
    ):
        return t.detach()
    return None


def _check(rec: TensorRecord, size: int) -> None:
    rec.validate()
    if size < rec.offset + rec.nbytes:
        raise _Damage(f"needs bytes up to {rec.offset + rec.nbytes}, the file has {size}")


def _check_hash(rec: TensorRecord, hasher: StreamHasher) -> None:
    if hasher.hexdigest() != rec.hash:
        end = rec.offset + rec.nbytes
        raise _Damage(f"bytes {rec.offset}-{end} do not match the tensor's hash")


def _read_one(
    f: IO[bytes],
    size: int,
    key: str,
    rec: TensorRecord,
    verify: bool,
    into: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    _check(rec, size)
    target = _in_place(key, rec, into)
    if target is None:
        target = torch.empty(rec.shape, dtype=_DTYPES[rec.dtype])
    view = tensor_bytes(target)
    hasher = StreamHasher()
    f.seek(rec.offset)
    for i in range(0, rec.nbytes, CHUNK):
        chunk = view[i : i + CHUNK]
        _readinto(f, chunk)
        if verify:
            hasher.update(chunk)
    if verify:
        _check_hash(rec, hasher)
    return target


class _TensorDamage(Exception):
    """Internal: `cause` happened while reading tensor `key`."""

    def __init__(self, key: str, cause: BaseException) -> None:
        super().__init__(key, cause)
        self.key, self.cause = key, cause


@dataclass
class _Job:
    """One read: fill `view` from the file at `offset`; `need` bytes must arrive."""

    view: memoryview
    offset: int
    need: int
    direct: bool
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _reopen_direct(fd: int) -> int:
    """A second, O_DIRECT descriptor of the file `fd` holds, or -1 where there is none.

    Opened through `/proc/self/fd`, never by the file's name again: a name swapped since
    `open_regular` checked it (for a FIFO, whose open would wait forever, or a link out of
    the run) is not reached. -1 where O_DIRECT or /proc is missing, or the file refuses it.
    """
    if not _O_DIRECT:
        return -1
    try:
        direct = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | _O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return -1
    ours, theirs = os.fstat(fd), os.fstat(direct)
    if (ours.st_dev, ours.st_ino) != (theirs.st_dev, theirs.st_ino):  # not Linux's /proc
        os.close(direct)
        return -1
    return direct


class _LocalReader:
    """Reads of one local file, done in order by I/O threads; the caller waits job by job."""

    def __init__(self, path: str) -> None:
        self._fd = open_regular(path)
        self._direct_fd = _reopen_direct(self._fd)
        self._todo: queue.Queue[_Job | None] = queue.Queue()
        self._cancel = False
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(_READERS)]
        for thread in self._threads:
            thread.start()

    @property
    def direct(self) -> bool:
        return self._direct_fd >= 0

    def submit(self, job: _Job) -> _Job:
        self._todo.put(job)
        return job

    def close(self) -> None:
        self._cancel = True
        for _ in self._threads:
            self._todo.put(None)
        for thread in self._threads:
            thread.join()
        os.close(self._fd)
        if self._direct_fd >= 0:
            os.close(self._direct_fd)

    def _run(self) -> None:
        while (job := self._todo.get()) is not None:
            if not self._cancel:
                try:
                    self._read(job)
                except BaseException as exc:  # handed to the calling thread
                    job.error = exc
            job.done.set()

    def _read(self, job: _Job) -> None:
        got, direct = 0, job.direct and self._direct_fd >= 0
        while got < job.need:
            try:
                fd = self._direct_fd if direct else self._fd
                n = os.preadv(fd, [job.view[got:]], job.offset + got)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                direct = False  # O_DIRECT refused for this read: the same bytes, buffered
                continue
            if not n:
                raise EOFError(f"the file ended {job.need - got} bytes early")
            got += n


def _fresh_aligned(rec: TensorRecord, pad: int) -> tuple[torch.Tensor, memoryview]:
    """A tensor for `rec` at byte `pad` of a new page-aligned mapping, and the whole mapping."""
    length = -(pad + rec.nbytes) % _ALIGN + pad + rec.nbytes
    region = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    flat = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive
    dtype = _DTYPES[rec.dtype]
    return flat[pad : pad + rec.nbytes].view(dtype).view(rec.shape), flat.numpy().data


def _read_local(
    path: str,
    size: int,
    items: list[tuple[str, TensorRecord]],
    verify: bool,
    into: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    reader = _LocalReader(path)
    try:
        plans = []
        for key, rec in items:  # check every record and queue every read before waiting
            try:
                _check(rec, size)
            except (_Damage, CorruptCheckpointError) as e:
                raise _TensorDamage(key, e) from None
            plans.append((key, rec, _queue_reads(reader, key, rec, into)))
        for key, rec, (target, jobs) in plans:
            hasher = StreamHasher()
            for job, hashed in jobs:
                job.done.wait()
                if job.error is not None:
                    raise _TensorDamage(key, job.error)
                if verify:
                    hasher.update(hashed)
            if verify:
                try:
                    _check_hash(rec, hasher)
                except _Damage as e:
                    raise _TensorDamage(key, e) from None
            out[key] = target
    finally:
        reader.close()
    return out


def _queue_reads(
    reader: _LocalReader, key: str, rec: TensorRecord, into: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, list[tuple[_Job, memoryview]]]:
    """Choose where `rec` is read to, queue its reads; each with the bytes it brings to hash."""
    target = _in_place(key, rec, into)
    pad = rec.offset % _ALIGN
    itemsize = _DTYPES[rec.dtype].itemsize
    if target is None and reader.direct and rec.nbytes >= DIRECT_MIN_BYTES and not pad % itemsize:
        target, whole = _fresh_aligned(rec, pad)
        jobs = []
        for i in range(0, len(whole), _READ_CHUNK):
            view = whole[i : i + _READ_CHUNK]
            need = min(len(view), pad + rec.nbytes - i)
            job = reader.submit(_Job(view, rec.offset - pad + i, need, direct=True))
            jobs.append((job, whole[max(i, pad) : i + need]))
        return target, jobs
    if target is None:
        target = torch.empty(rec.shape, dtype=_DTYPES[rec.dtype])
    view = tensor_bytes(target)
    jobs = []
    for i in range(0, rec.nbytes, _READ_CHUNK):
        chunk = view[i : i + _READ_CHUNK]
        jobs.append((reader.submit(_Job(chunk, rec.offset + i, len(chunk), False)), chunk))
    return target, jobs


def read_tensors(
    storage: Storage,
    records: Mapping[str, TensorRecord],
    *,
    verify: bool = True,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Read the tensors named by `records` into fresh CPU tensors, checking each hash.

    Each file is opened once and each tensor read straight into its own memory. With
    `verify=False` hashes are not checked (sizes still are): only for data verified before.
    With `into`, a tensor of `into` that matches its record (CPU, dtype, shape, contiguous) is
    filled in place and returned instead of a new one: no allocation, no second copy. Such
    targets may hold partly read data if this raises; keep them only if it returns.

    Raises:
        CorruptCheckpointError: a file is missing, unreadable or too short, its safetensors
            header is invalid or disagrees with a record (`check_header_entry`), or a tensor's
            bytes do not match its hash; the message names the file, the tensor and the remedy.
    """
    out: dict[str, torch.Tensor] = {}
    into = into or {}
    for file, items in _by_file(records).items():
        key = items[0][0]
        try:
            check_relpath(file)
            size = storage.size(file)
            local = storage.local_path(file)
            if local is not None:
                with os.fdopen(open_regular(local), "rb") as f:
                    _check_records(_parse_header(f, size), items)
                out.update(_read_local(local, size, items, verify, into))
                continue
            with storage.open_read(file) as f:  # one handle: its read-ahead holds the header
                _check_records(_parse_header(f, size), items)
                for key, rec in items:
                    out[key] = _read_one(f, size, key, rec, verify, into)
        except (_TensorDamage, OSError, EOFError, _Damage, CorruptCheckpointError) as e:
            raise _read_error(storage, file, key, e) from None
    return {key: out[key] for key in records}


def check_headers(storage: Storage, records: Mapping[str, TensorRecord]) -> None:
    """What `read_tensors` checks of `records` before it reads any tensor's bytes: each file's
    safetensors header, and that it agrees with each record (`check_header_entry`), whose
    byte range then lies inside the file. So what the records claim (dtype, shape, size)
    is what their files say, and can be checked against what they will be loaded into
    before any memory is taken for them.

    Raises:
        CorruptCheckpointError, UnreadableCheckpointError: as `read_tensors` says them.
    """
    for file, items in _by_file(records).items():
        try:
            check_relpath(file)
            size = storage.size(file)
            with _open(storage, file) as f:
                _check_records(_parse_header(f, size), items)
        except (_TensorDamage, OSError, EOFError, _Damage, CorruptCheckpointError) as e:
            raise _read_error(storage, file, items[0][0], e) from None


def verify_tensors(storage: Storage, records: Mapping[str, TensorRecord]) -> None:
    """Check `records` as `read_tensors` does (header, byte range, hash), without keeping
    their bytes: `tensor_damage` streams them through one fixed-size buffer, so memory stays
    bounded for any size. For tensors that must be intact but are not needed in memory.

    Raises:
        CorruptCheckpointError: naming the first damaged tensor, as `read_tensors` would.
        UnreadableCheckpointError: a file cannot be read now (not damage).
    """
    bad = tensor_damage(storage, records)
    if bad:
        key, cause = next(iter(bad.items()))
        raise _corrupt(storage, records[key].file, f"tensor {key!r}: {cause}")


def _read_error(storage: Storage, file: str, key: str, exc: BaseException) -> Exception:
    """The error `read_tensors` raises for `exc`, met reading `file` (at tensor `key`)."""
    if isinstance(exc, _TensorDamage):
        if not_damage(exc.cause):  # an I/O error while the data was read
            return _unreadable(storage, file, exc.cause)
        return _corrupt(storage, file, f"tensor {exc.key!r}: {_cause(exc.cause)}")
    if not_damage(exc):  # no permission, EIO, ...: no fall-back, nothing set aside
        return _unreadable(storage, file, exc)
    return _corrupt(storage, file, f"tensor {key!r}: {_cause(exc)}")


def verify_file(storage: Storage, records: Mapping[str, TensorRecord]) -> list[str]:
    """The sorted names of the tensors whose bytes are missing or do not match their hash, or
    whose record disagrees with their file's safetensors header (`check_header_entry`).

    Streams the data through one fixed-size buffer, so memory stays bounded for any file size.
    """
    return sorted(tensor_damage(storage, records))


def _cause(exc: BaseException) -> str:
    """What went wrong, for a message that names the file already."""
    if isinstance(exc, FileNotFoundError):
        return "the file is missing"
    if isinstance(exc, OSError) and exc.strerror:
        return f"the file cannot be read ({exc.strerror})"  # without the errno and the path
    return str(exc)


def tensor_damage(storage: Storage, records: Mapping[str, TensorRecord]) -> dict[str, str]:
    """What is wrong with each damaged tensor of `records`, by name: its file is missing or
    unreadable or its header invalid ("No such file or directory"), its record disagrees
    with the header, its bytes end early, or they do not match its hash ("bytes 128-640 do
    not match the tensor's hash"), as `read_tensors` would say. Empty when all are intact.

    Streams the data through one fixed-size buffer, so memory stays bounded for any file size.

    Raises:
        UnreadableCheckpointError: a file cannot be read for lack of permission (not damage).
    """
    bad: dict[str, str] = {}
    buf = bytearray(CHUNK)
    for file, items in _by_file(records).items():
        try:
            check_relpath(file)
            size = storage.size(file)
            f = _open(storage, file)
            try:
                header = _parse_header(f, size)
            except BaseException:
                f.close()
                raise
        except (OSError, _Damage, CorruptCheckpointError) as exc:
            if not_damage(exc):  # no permission, EIO, ...: nothing may be set aside for it
                raise _unreadable(storage, file, exc) from None
            bad.update((key, _cause(exc)) for key, _ in items)
            continue
        with f:
            for key, rec in items:
                hasher = StreamHasher()
                try:
                    rec.validate()
                    check_header_entry(header, key, rec)
                    for chunk in _stream(f, rec.offset, rec.nbytes, buf):
                        hasher.update(chunk)
                    _check_hash(rec, hasher)
                except (OSError, EOFError, _Damage, CorruptCheckpointError) as exc:
                    if not_damage(exc):
                        raise _unreadable(storage, file, exc) from None
                    bad[key] = _cause(exc)
    return bad
