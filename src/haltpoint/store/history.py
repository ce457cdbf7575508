"""`history.jsonl`: one strict-JSON line per evaluation (step, time, metrics, decision).

Lines are strict JSON (RFC 8259), so any reader (`jq`, pandas, a browser) can open the file.
JSON has no NaN or infinity, so a non-finite float is written as one of the strings `"NaN"`,
`"Infinity"` or `"-Infinity"`, and `read_history` turns those three strings back into floats
wherever they appear as a value. They are therefore reserved: a record whose string value is
exactly one of them reads back as a float.

Every line ends with a `"checksum"` key: the xxh3-128 of the line's JSON without it (as
`encode_record` writes it), so a flipped bit anywhere in a record is detected. `read_history`
skips a line whose checksum fails with a warning naming its line number, and reads on. Lines
without a checksum (written by an older haltpoint) are read as they are, but only before the
first checksummed line: after it, a line without one is damage and skipped with a warning.

A crash can tear the last line: an append writes its line and newline at once, so a torn one
is a fragment after the last newline. `read_history` ignores such a fragment silently (the
record was never completely written) and skips any other invalid line, the last complete one
included, with a warning naming its line number. `append_history` drops such a fragment
only when it is what a torn append of haltpoint's leaves (it starts as a record line does,
is not one, and is short); any other text after the last newline is kept and the new
record starts on a fresh line, so an append never deletes what it did not write.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import stat
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from haltpoint.errors import (
    CheckpointError,
    CorruptHistoryError,
    UnreadableCheckpointError,
    not_damage,
)
from haltpoint.store.hashing import hash_bytes
from haltpoint.store.manifest import MAX_TIME, Manifest
from haltpoint.store.storage import (
    Storage,
    check_one_name,
    check_regular,
    fsync_dir,
    open_unlinked,
)

__all__ = [
    "HISTORY_NAME",
    "HISTORY_READ_LIMIT",
    "append_history",
    "decode_record",
    "encode_record",
    "is_checked_record",
    "parse_history",
    "read_history",
    "read_history_bytes",
    "read_history_file",
    "recover_history",
    "save_record",
]

HISTORY_NAME = "history.jsonl"
CHECKSUM_KEY = "checksum"

_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return "NaN"
        if math.isinf(number):
            return "Infinity" if number > 0 else "-Infinity"
        return number
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"history record key {key!r} at {where} is a {type(key).__name__}; "
                    "keys must be strings"
                )
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    item = getattr(value, "item", None)
    if callable(item):  # a NumPy scalar or a one-element tensor
        with contextlib.suppress(Exception):
            plain = item()
            if plain is None or isinstance(plain, (bool, int, float, str)):
                return _to_json(plain, where)
    raise TypeError(
        f"history record value at {where} is a {type(value).__name__} ({value!r}); "
        "allowed: None, bool, int, float, str, and lists and mappings of them "
        "(convert tensors with .item())"
    )


def _from_json(value: Any) -> Any:
    if isinstance(value, str):
        return _NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


class _ChecksumError(ValueError):
    """A history line that parses but whose checksum is missing or does not match."""


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One history line (with its newline) for `record`; non-finite floats become strings, and
    the line ends with the checksum of everything before it.

    >>> encode_record({"step": 3, "metrics": {"loss": float("nan"), "acc": 0.5}})[:44]
    b'{"step":3,"metrics":{"loss":"NaN","acc":0.5}'

    Raises:
        TypeError: a value is not JSON-representable; the message names where it is.
        ValueError: `record` uses the reserved top-level key "checksum".
    """
    if not isinstance(record, Mapping):
        raise TypeError(f"record must be a mapping, got {type(record).__name__}")
    if CHECKSUM_KEY in record:
        raise ValueError(f"a history record must not use the reserved key {CHECKSUM_KEY!r}")
    body = _to_json(record, "record")
    body[CHECKSUM_KEY] = hash_bytes(_dumps(body))  # _to_json returns a fresh dict
    return _dumps(body) + b"\n"


def decode_record(line: bytes | str) -> dict[str, Any]:
    """The record stored in one history line, its checksum verified and removed.

    A line without a checksum (an older haltpoint's) is read as it is.

    >>> decode_record(encode_record({"step": 3, "metrics": {"loss": float("-inf")}}))
    {'step': 3, 'metrics': {'loss': -inf}}

    Raises:
        ValueError: the line is not a JSON object, or its checksum does not match.
    """
    return _decode(line, checked=False)[0]


def is_checked_record(line: bytes | str) -> bool:
    """Whether `line` is a history record carrying a checksum that verifies (what only
    haltpoint writes), as opposed to another tool's JSON line or a damaged one.

    >>> is_checked_record(encode_record({"step": 1})), is_checked_record('{"step": 1}')
    (True, False)
    """
    try:
        return _decode(line, checked=True)[1]
    except ValueError:  # not JSON, no checksum, a failing checksum, or nested too deep
        return False


def _decode(line: bytes | str, *, checked: bool) -> tuple[dict[str, Any], bool]:
    """The record of `line` and whether it had a checksum; `checked`: it must have one."""
    try:
        return _decode_nested(line, checked=checked)
    except RecursionError:  # json and _from_json recurse once per level
        raise ValueError("it nests containers deeper than Python can read") from None


def _decode_nested(line: bytes | str, *, checked: bool) -> tuple[dict[str, Any], bool]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError(f"a history line must hold a JSON object, got {type(value).__name__}")
    has_checksum = CHECKSUM_KEY in value
    if has_checksum:
        recorded = value.pop(CHECKSUM_KEY)
        if recorded != hash_bytes(_dumps(value)):
            raise _ChecksumError("its checksum does not match its content (damaged)")
    elif checked:
        raise _ChecksumError("it has no checksum, although earlier lines have one (damaged)")
    decoded: dict[str, Any] = _from_json(value)
    return decoded, has_checksum


def parse_history(data: bytes, source: str) -> list[dict[str, Any]]:
    """The records of the bytes of a history file named `source` in warnings, in order.

    A torn last line (text after the last newline that is not a record) is ignored silently;
    any other line that is not a record, or whose checksum fails, is skipped with a warning
    naming its line number.
    """
    lines = data.split(b"\n")
    torn = len(lines) - 1  # the text after the last newline, if any
    records: list[dict[str, Any]] = []
    checked = False  # from the first checksummed line on, every line must have one
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record, has_checksum = _decode(line, checked=checked)
            records.append(record)
            checked = checked or has_checksum
        except _ChecksumError as err:
            checked = True
            _warn(f"{source}: line {index + 1} is skipped: {err}")
        except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError included
            if index != torn:
                _warn(
                    f"{source}: line {index + 1} is not a valid record ({err}); skipped it "
                    "(a write torn by a crash, or an edit by hand)"
                )
    return records


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


TORN_LINE_LIMIT = 1 << 20
"""The longest text after the last newline that an append may drop as its own torn line."""

_RECORD_START = b'{"step":'


def _is_torn_append(tail: bytes) -> bool:
    """Whether `tail`, the text after a history file's last newline, is the fragment of an
    append haltpoint tore: short, starting as every record line does, and not a record.

    Anything else there (a complete record, another tool's text, a line too long) is kept,
    and the next append starts on a fresh line after it.

    >>> _is_torn_append(b'{"step":3,"metr'), _is_torn_append(encode_record({"step": 3})[:-1])
    (True, False)
    >>> _is_torn_append(b"written by another tool")
    False
    """
    if len(tail) > TORN_LINE_LIMIT or not tail.startswith(_RECORD_START):
        return False
    try:
        _decode(tail, checked=False)
    except ValueError:
        return True
    return False


def _tail_start(fd: int, size: int) -> int | None:
    """Where the text after the last newline starts, or None when it is longer than
    `TORN_LINE_LIMIT` (only that much of the file's end is read)."""
    start = max(0, size - TORN_LINE_LIMIT - 1)
    chunk = os.pread(fd, size - start, start)
    newline = chunk.rfind(b"\n")
    if newline >= 0:
        return start + newline + 1
    return 0 if start == 0 else None


_OWN_HISTORY = (
    "give it a file of its own (cp history.jsonl h.tmp && mv h.tmp history.jsonl), then "
    "open the run again"
)


def _append_local(path: str, line: bytes) -> None:
    created = not os.path.exists(path)
    fd = open_unlinked(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        info = os.fstat(fd)
        check_one_name(path, info, _OWN_HISTORY)
        size = info.st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            start = _tail_start(fd, size)
            if start is not None and _is_torn_append(os.pread(fd, size - start, start)):
                os.ftruncate(fd, start)  # drop the fragment of a torn append
            else:
                line = b"\n" + line  # keep what is there; start on a fresh line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(os.path.dirname(path))


def save_record(
    step: int, time: float, metrics: Mapping[str, float], state: Mapping[str, Any]
) -> dict[str, Any]:
    """The history line of a save: its step, time and metrics, and under "stopper" the
    decision of the first entry of `state` with a `last_decision` that has `to_dict()`.

    >>> save_record(3, 1700000000.0, {"loss": 0.5}, {"model": object()})
    {'step': 3, 'time': 1700000000.0, 'metrics': {'loss': 0.5}}
    """
    record: dict[str, Any] = {"step": step, "time": time, "metrics": dict(metrics)}
    for name, value in state.items():
        decision = getattr(value, "last_decision", None)
        if decision is not None and hasattr(decision, "to_dict"):
            record["stopper"] = {"name": name, **decision.to_dict()}
            break
    return record


def check_appendable(storage: Storage) -> None:
    """Refuse a `history.jsonl` that `append_history` could not write, before anything is
    saved: a symbolic link (`LinkedFileError`), or a folder, FIFO, socket or device
    (`NotRegularFileError`)."""
    path = storage.write_path(HISTORY_NAME)
    if path is not None:
        check_regular(path)
        with contextlib.suppress(FileNotFoundError):
            check_one_name(path, os.lstat(path), _OWN_HISTORY)


_TAIL_READ = 2 * TORN_LINE_LIMIT + 2  # holds a whole line of any length an append tears


def _last_record(storage: Storage) -> tuple[dict[str, Any], list[bytes]] | None:
    """The history's last save line (an int step and a metrics mapping; `{}` when there is
    no history, or only blank text or the fragment of a torn first append), with the lines
    read before it (undecoded), or None when that cannot be told: the history cannot be
    read, or its end holds no such line (another tool's file, damage). On a local disk only
    its end is read, so a writer's open stays fast however long the run."""
    try:
        local = storage.local_path(HISTORY_NAME)
        if local is None:
            data = read_history_bytes(storage)
            whole = True
        else:
            data = read_history_file(local, tail=_TAIL_READ)
            whole = len(data) < _TAIL_READ
    except FileNotFoundError:
        return {}, []
    except CheckpointError:
        return None
    if data is None:
        return {}, []
    start = data.rfind(b"\n") + 1
    if start < len(data) and (start or whole) and _is_torn_append(data[start:]):
        data = data[:start]  # a torn append of ours (the next append drops it): no line
    if not data.strip():
        return ({}, []) if whole else None
    lines = data.split(b"\n")
    if not whole:
        lines = lines[1:]  # the first may be the end of a line that began before the read
    for n in range(len(lines) - 1, -1, -1):
        record = _save_line(lines[n])
        if record is not None:
            return record, lines[:n]
    return None


def _save_line(line: bytes) -> dict[str, Any] | None:
    """The save's record on `line`, or None (blank, torn, damaged, not a save's)."""
    try:
        record = decode_record(line) if line.strip() else None
    except ValueError:  # a torn or damaged line
        return None
    if (  # a save's line: another tool's {"step": ...} lines have no metrics mapping
        record is not None
        and type(record.get("step")) is int
        and isinstance(record.get("metrics"), dict)
    ):
        return record
    return None


def _committed_after(
    manifests: Iterable[Manifest], last: Mapping[str, Any], before: Iterable[bytes] = ()
) -> list[Manifest]:
    """The manifests committed after the save whose history line is `last`, oldest first.

    A save's manifest and its line carry the same step and time: when that manifest is still
    on disk, the ones of a later commit sequence are those whose lines are missing (a clock
    that ran ahead for earlier saves, a resume on another machine, does not bring theirs
    back). Else (retention removed it) those of a later sequence than the newest manifest
    whose line is among the lines `before` it (read from the end of the history), so a
    clock that jumped back before the lost saves does not hide theirs either; when none is
    there, those of a later time. After a rewind (a restore of an earlier step, then saves
    from it), the old run's later steps still on disk are earlier saves, not lost lines.
    A line without a finite time (not haltpoint's) falls back to the steps after its step.
    """
    manifests = list(manifests)
    when = last.get("time")
    # not math.isfinite: an int of hundreds of digits (a crafted line) overflows a float
    if (
        isinstance(when, (int, float))
        and not isinstance(when, bool)
        and -math.inf < when < math.inf
    ):
        own = [m.sequence for m in manifests if m.step == last.get("step") and m.time == when]
        if (len(own) != 1 or own[0] is None) and isinstance(when, float) and 0 <= when <= MAX_TIME:
            own = _newest_lined(manifests, before)  # a time a manifest may hold
        if len(own) == 1 and own[0] is not None:
            after = [m for m in manifests if m.sequence is not None and m.sequence > own[0]]
        else:
            after = [m for m in manifests if m.time > when]
    else:
        after = [m for m in manifests if "step" not in last or m.step > last["step"]]
    return sorted(after, key=_commit_order)


def _newest_lined(manifests: list[Manifest], lines: Iterable[bytes]) -> list[int | None]:
    """`[sequence]` of the newest manifest (by commit sequence) whose save's line is among
    `lines` (the same step and time), or `[]` when none is; read only when the last line's
    own manifest is gone."""
    lined: set[tuple[int, float]] = set()
    for line in lines:
        record = _save_line(line)
        when = None if record is None else record.get("time")
        if isinstance(when, float) or (type(when) is int and abs(when) < 2**53):
            lined.add((record["step"], float(when)))  # type: ignore[index]
    found = [m.sequence for m in manifests if m.sequence is not None and (m.step, m.time) in lined]
    return [max(found)] if found else []


def _commit_order(manifest: Manifest) -> tuple[int, float, int]:
    """Sorts manifests as they were committed (one of an older haltpoint, without a
    sequence, before every one with)."""
    sequence = manifest.sequence
    return (-1 if sequence is None else sequence, manifest.time, manifest.step)


def recover_history(storage: Storage, manifests: Iterable[Manifest]) -> list[int]:
    """Append the lines of the saves committed after the history's last line, from their
    manifests (step, time, metrics; the stopper's decision is not in a manifest), and return
    their steps. A writer killed between a commit and its history line, or one whose append
    failed and that was never saved again, lost those lines; a writer that opens the run
    writes them back, so plots and `replay` see every saved evaluation.

    A history that cannot be read (unreadable, damaged, another tool's file) is left as it
    is, and so is the rest when an append fails (a full disk): the next save's own append
    says what is wrong, and nothing is guessed here.
    """
    found = _last_record(storage)
    if found is None:
        return []
    last, before = found
    written = []
    for manifest in _committed_after(manifests, last, before):
        record = {"step": manifest.step, "time": manifest.time, "metrics": manifest.metrics}
        try:
            append_history(storage, record)
        except (OSError, CheckpointError):  # a full disk: the next save's append says so
            break
        written.append(manifest.step)
    return written


def append_history(storage: Storage, record: Mapping[str, Any]) -> None:
    """Append `record` as one line of `history.jsonl`, durably.

    On a local disk the line is appended in one write, then flushed and fsynced; elsewhere
    (fsspec) the object is read and rewritten whole, since object stores cannot append. The
    fragment of an append torn by a crash (a last line without its newline that starts as a
    record does, is not one, and is at most `TORN_LINE_LIMIT` bytes) is dropped first, so it
    never turns into a bad line in the middle of the file; any other text after the last
    newline is kept, and the record goes on a fresh line after it.

    Raises:
        TypeError: `record` holds a value that JSON cannot represent.
    """
    line = encode_record(record)
    path = storage.write_path(HISTORY_NAME)
    if path is not None:
        _append_local(path, line)
        return
    old = b""
    with contextlib.suppress(FileNotFoundError):
        old = storage.read_bytes(HISTORY_NAME)
    start = old.rfind(b"\n") + 1
    if start < len(old):  # the text after the last newline
        if _is_torn_append(old[start:]):
            old = old[:start]  # drop the fragment of a torn append
        else:
            old += b"\n"  # keep what is there; start on a fresh line
    storage.publish(HISTORY_NAME, old + line)


def read_history(storage: Storage) -> list[dict[str, Any]]:
    """Every record of `history.jsonl` in order; `[]` when the file does not exist.

    A torn last line (a crash mid-append: no newline at its end) is ignored silently; any
    other invalid line, or one whose checksum fails, is skipped with a warning that names its
    line number (`parse_history`).

    >>> from haltpoint.store.storage import FsspecStorage
    >>> storage = FsspecStorage("memory://doctest-history")
    >>> append_history(storage, {"step": 1, "metrics": {"loss": float("inf")}})
    >>> read_history(storage)
    [{'step': 1, 'metrics': {'loss': inf}}]
    >>> storage.rmtree("")

    Raises:
        CorruptHistoryError: the history is no regular file, is larger than
            `HISTORY_READ_LIMIT`, or cannot be read (`read_history_bytes`).
        UnreadableCheckpointError: it cannot be read for lack of permission, or for an OS
            error that is no damage (`not_damage`: EIO, a timeout).
        CorruptCheckpointError: it is a symlink that leads out of the run directory.
    """
    data = read_history_bytes(storage)
    if data is None:
        return []
    return parse_history(data, f"{storage.url}/{HISTORY_NAME}")


HISTORY_READ_LIMIT = 1 << 30
"""The largest history file read (1 GiB, millions of lines); a larger one is refused."""


def read_history_bytes(storage: Storage) -> bytes | None:
    """The bytes of the run's `history.jsonl`, or None when it does not exist.

    On a local disk the file is opened without blocking and must be a regular file, so that
    a FIFO or a device planted under its name can neither hang the reader nor feed it
    without end.

    Raises:
        CorruptHistoryError: it is a folder or another non-regular file, larger than
            `HISTORY_READ_LIMIT`, or reading it fails (the message names the file and why).
        UnreadableCheckpointError: it cannot be read for lack of permission, or for an OS
            error that is no damage (`not_damage`: EIO, a timeout).
        CorruptCheckpointError: it is a symlink that leads out of the run directory.
    """
    source = f"{storage.url}/{HISTORY_NAME}"
    try:
        local = storage.local_path(HISTORY_NAME)
        if local is not None:
            return read_history_file(local, source)
        data = storage.read_bytes(HISTORY_NAME, HISTORY_READ_LIMIT + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _read_failed(source, exc) from None
    if len(data) > HISTORY_READ_LIMIT:
        raise _too_large(source)
    return data


def read_history_file(path: str, source: str | None = None, *, tail: int | None = None) -> bytes:
    """The bytes of the local history file `path` (`source` names it in errors; default
    `path`), checked as `read_history_bytes` checks a run's; with `tail`, only its last
    `tail` bytes (any size of file then).

    Raises:
        FileNotFoundError: `path` does not exist.
        CorruptHistoryError: it is no regular file, too large, or reading it fails.
        UnreadableCheckpointError: it cannot be read for lack of permission, or for an OS
            error that is no damage (`not_damage`: EIO, a timeout).
    """
    source = path if source is None else source
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _read_failed(source, exc) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise CorruptHistoryError(
                f"{source} is a folder, not a history file; a Checkpointer writes "
                "history.jsonl as a file (move the folder away)",
                path=source,
            )
        if not stat.S_ISREG(info.st_mode):
            raise CorruptHistoryError(
                f"{source} is not a regular file (a FIFO, a socket or a device); haltpoint "
                "reads only the regular file a Checkpointer writes",
                path=source,
            )
        if tail is not None:
            start = max(0, info.st_size - tail)
            return os.pread(fd, info.st_size - start, start)
        if info.st_size > HISTORY_READ_LIMIT:
            raise _too_large(source)
        chunks, left = [], HISTORY_READ_LIMIT + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise _read_failed(source, exc) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > HISTORY_READ_LIMIT:  # it grew while being read
        raise _too_large(source)
    return data


def _too_large(source: str) -> CorruptHistoryError:
    return CorruptHistoryError(
        f"{source} is larger than {HISTORY_READ_LIMIT:,} bytes, more than any history "
        "a Checkpointer writes; it is not read",
        path=source,
    )


def _read_failed(source: str, exc: OSError) -> CheckpointError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, PermissionError):
        return UnreadableCheckpointError(
            f"cannot read {source}: {reason}; this is not damage: give this user read "
            "permission on it",
            path=source,
        )
    if not_damage(exc):  # an I/O error, a timeout, a stale NFS handle: it may pass
        return UnreadableCheckpointError(
            f"cannot read {source}: {reason}; this is not damage: check the disk or file "
            "system and run again",
            path=source,
        )
    if isinstance(exc, IsADirectoryError):
        return CorruptHistoryError(
            f"{source} is a folder, not a history file; a Checkpointer writes history.jsonl "
            "as a file (move the folder away)",
            path=source,
        )
    return CorruptHistoryError(f"cannot read {source}: {reason}", path=source)
