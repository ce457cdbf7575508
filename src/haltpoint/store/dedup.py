"""Dedup: tensors that did not change since the newest kept checkpoint are referenced, not
written again.

A staged tensor is unchanged when the newest committed manifest has a record for the same
key with the same dtype and shape and the same xxh3-128 hash of its bytes. Its record is
reused as is (it may point into an older checkpoint folder); retention keeps every file that
a kept manifest references. Hashing runs on the background writer, never on the training
thread, at xxh3 speed (~20 GB/s per core).

The manifest's hash says what the bytes were when they were written, not what the disk holds
now: before a record is referenced for the first time in a writer session, `ReferenceCheck`
reads its bytes back and hashes them. A record whose bytes no longer match (bit rot, a file
truncated or replaced) is not referenced; the tensor is written afresh into the new
checkpoint's own file, and the damaged file is left as it is (older manifests reference it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from haltpoint.errors import (
    CorruptCheckpointError,
    UnreadableCheckpointError,
    UnsupportedStateError,
)
from haltpoint.store.background import warn_user
from haltpoint.store.hashing import StreamHasher, tensor_bytes
from haltpoint.store.manifest import Manifest
from haltpoint.store.storage import Storage
from haltpoint.store.tensor_file import TensorRecord, dtype_code
from haltpoint.store.tensor_reader import verify_file

__all__ = ["MIN_DEDUP_BYTES", "DedupPlan", "ReferenceCheck", "hash_tensor", "plan_dedup"]

MIN_DEDUP_BYTES = 1 << 20
"""Smaller tensors are always written: cheap to write again, and never the reason an old file
(perhaps mostly dead weight) is kept alive."""
_CHUNK = 16 << 20


def hash_tensor(t: torch.Tensor) -> str:
    """The xxh3-128 hex digest of the bytes of a CPU tensor (made contiguous first).

    >>> hash_tensor(torch.zeros(0)) == hash_tensor(torch.zeros(0, dtype=torch.int8))
    True
    """
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    hasher = StreamHasher()
    if t.numel():
        view = tensor_bytes(t)
        for i in range(0, len(view), _CHUNK):
            hasher.update(view[i : i + _CHUNK])
    return hasher.hexdigest()


@dataclass
class DedupPlan:
    """Which tensors to write, which records to reuse, and the hashes already computed.

    >>> plan = plan_dedup({"w": torch.ones(2)}, None)
    >>> plan.changed, plan.reused, plan.hashes
    (['w'], {}, {})
    """

    changed: list[str]
    reused: dict[str, TensorRecord] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def reused_nbytes(self) -> int:
        """Bytes not written because they are referenced from older files."""
        return sum(r.nbytes for r in self.reused.values())


class ReferenceCheck:
    """The byte ranges of existing files that this writer session has read back and found
    intact, so that each is read once per session, not once per save.

    A file's ranges are trusted again only while its `Storage.stamp` (size, modification
    time; on a local disk also inode and change time) stays the same; a rewritten file is
    read again, one whose modification time was set back too.

    >>> import tempfile
    >>> from haltpoint.store.storage import LocalStorage
    >>> from haltpoint.store.tensor_writer import write_tensor_file
    >>> storage = LocalStorage(tempfile.mkdtemp())
    >>> records = write_tensor_file(storage, "a.safetensors", {"w": torch.ones(4)})
    >>> check = ReferenceCheck(storage)
    >>> check.intact(records), check.intact(records), check.bytes_read  # read once
    ({'w'}, {'w'}, 16)
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.bytes_read = 0
        """Bytes read back and hashed so far (the cost of the check)."""
        self._good: dict[str, tuple[tuple[object, ...], set[tuple[int, int, str]]]] = {}
        self._warned: set[str] = set()

    def intact(self, records: Mapping[str, TensorRecord]) -> set[str]:
        """The names in `records` whose bytes on disk match their hash; warns once per file
        about the others (missing, too short or changed bytes)."""
        by_file: dict[str, dict[str, TensorRecord]] = defaultdict(dict)
        for key, record in records.items():
            by_file[record.file][key] = record
        good: set[str] = set()
        for file, items in by_file.items():
            try:
                stamp = self.storage.stamp(file)
            except (OSError, CorruptCheckpointError):
                self._warn(file, sorted(items))
                continue
            known = self._good.get(file)
            if known is None or known[0] != stamp:
                known = self._good[file] = (stamp, set())
            todo = {k: r for k, r in items.items() if _span(r) not in known[1]}
            try:
                bad = set(verify_file(self.storage, todo)) if todo else set()
            except UnreadableCheckpointError as exc:  # no permission, EIO: not known intact
                self._warn(file, sorted(items), exc)
                continue
            self.bytes_read += sum(r.nbytes for r in todo.values())
            for key, record in items.items():
                if key not in bad:
                    known[1].add(_span(record))
                    good.add(key)
            if bad:
                self._warn(file, sorted(bad))
        return good

    def _warn(
        self, file: str, keys: list[str], unreadable: UnreadableCheckpointError | None = None
    ) -> None:
        if file in self._warned:
            return
        self._warned.add(file)
        names = ", ".join(repr(k) for k in keys)
        if unreadable is not None:  # it says which file, why, and that it is no damage
            warn_user(
                f"{unreadable}; so the bytes of {names} were written afresh instead of "
                "referenced, and the file was left as it is"
            )
            return
        warn_user(
            f"{self.storage.url.rstrip('/')}/{file}: the bytes of {names} are missing or do not "
            "match the hash their manifest records (bit rot, or the file was changed); wrote "
            "them afresh instead of referencing them, and left the file as it is (older "
            "checkpoints reference it: `haltpoint verify` names the damaged ones)"
        )


def _span(record: TensorRecord) -> tuple[int, int, str]:
    return (record.offset, record.nbytes, record.hash)


def plan_dedup(
    tensors: Mapping[str, torch.Tensor],
    previous: Manifest | None,
    check: ReferenceCheck | None = None,
) -> DedupPlan:
    """Compare `tensors` (CPU tensors) with the records of `previous`, the newest kept manifest.

    Only tensors of at least `MIN_DEDUP_BYTES` that have a candidate (same key, dtype and
    shape) are hashed here; the others are hashed while they are written. With `check`, a
    candidate is referenced only if its bytes on disk still match its hash (read back once per
    writer session); without, the records are trusted as they are.
    """
    plan = DedupPlan(changed=[])
    if previous is None:
        plan.changed = list(tensors)
        return plan
    candidates: dict[str, TensorRecord] = {}
    for key, t in tensors.items():
        record = previous.tensors.get(key)
        small = t.numel() * t.element_size() < MIN_DEDUP_BYTES
        if small or record is None or not _same_layout(record, t):
            plan.changed.append(key)
            continue
        digest = hash_tensor(t)
        plan.hashes[key] = digest
        if digest == record.hash:
            candidates[key] = record
        else:
            plan.changed.append(key)
    good = set(candidates) if check is None else check.intact(candidates)
    for key, record in candidates.items():
        if key in good:
            plan.reused[key] = record
        else:
            plan.changed.append(key)
    return plan


def _same_layout(record: TensorRecord, t: torch.Tensor) -> bool:
    try:
        code = dtype_code(t.dtype)
    except UnsupportedStateError:  # refused by the writer, with its message
        return False
    return record.dtype == code and record.shape == tuple(t.shape)
