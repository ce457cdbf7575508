"""The run directory: where checkpoints live, how they are committed, found and removed.

Layout (see docs/format.md)::

    run/
      .haltpoint.lock              the writer lock
      history.jsonl                one line per save
      step-000000012/
        manifest.json              the commit marker: present and valid iff the checkpoint exists
        tensors.safetensors        tensor data (a plain safetensors file)
        pinned                     present when the user pinned the checkpoint
        dcp/                       sharded state, written by torch.distributed.checkpoint
                                   (only when the manifest's extra has "sharded")
      quarantine/
        step-000000015-1.json      a damaged checkpoint's manifest, set aside by the writer

A manifest may reference tensor files of other checkpoints (unchanged tensors are not written
twice), so a checkpoint is removed by deleting its manifest first and then only the files that
no kept (or quarantined) manifest references.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from haltpoint.errors import (
    CheckpointError,
    CheckpointExistsError,
    CorruptCheckpointError,
    UnreadableCheckpointError,
    not_damage,
)
from haltpoint.state.tree import check_tree
from haltpoint.store.background import warn_user
from haltpoint.store.history import HISTORY_NAME
from haltpoint.store.lock import LOCK_NAME
from haltpoint.store.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    DamagedManifestError,
    Manifest,
)
from haltpoint.store.quarantine import (
    QUARANTINE_DIR,
    Quarantined,
    list_quarantined,
    move_to_quarantine,
)
from haltpoint.store.storage import Storage
from haltpoint.store.tensor_file import torch_dtype

__all__ = [
    "DCP_NAME",
    "PINNED_NAME",
    "ROOT_TEMP_OF",
    "SHARDED_KEY",
    "STEP_NAMES",
    "STEP_TEMP_OF",
    "TENSORS_NAME",
    "Entry",
    "RunDirectory",
    "ShardFile",
    "ShardedRecord",
    "checkpoint_dirname",
    "checkpoint_nbytes",
    "dcp_folder",
    "is_own_step_name",
    "is_sharded",
    "is_temp_name",
    "is_tensors_name",
    "parse_step",
    "tensors_name",
]

TENSORS_NAME = "tensors.safetensors"
PINNED_NAME = "pinned"
DCP_NAME = "dcp"
SHARDED_KEY = "sharded"  # the manifest's `extra` key of a checkpoint with a DCP folder
# 9 to 19 digits: a step is below 2**63, and a longer name (an object store's keys have no
# length limit) would cost int() a ValueError past 4,300 digits, failing every read of the run
_DIR_PATTERN = re.compile(r"step-([0-9]{9,19})")


# the names haltpoint writes into a run: clean-up deletes these and nothing else
STEP_NAMES = frozenset({TENSORS_NAME, DCP_NAME, MANIFEST_NAME, PINNED_NAME})
"""What a step folder of haltpoint's holds (and the numbered tensor files, `tensors_name`)."""
_NUMBERED_TENSORS = re.compile(r"tensors-[1-9][0-9]*\.safetensors", re.ASCII)


def tensors_name(n: int) -> str:
    """The name of the `n`-th tensor file a step's folder got: a step saved again while its
    folder still holds an older one (that newer or quarantined manifests reference, or an
    interrupted save left) writes the first name not taken.

    >>> tensors_name(0), tensors_name(2)
    ('tensors.safetensors', 'tensors-2.safetensors')
    """
    return TENSORS_NAME if n == 0 else f"tensors-{n}.safetensors"


def is_tensors_name(name: str) -> bool:
    """Whether `name` is one `tensors_name` gives (ASCII digits, no leading zero).

    >>> is_tensors_name("tensors-12.safetensors"), is_tensors_name("tensors-01.safetensors")
    (True, False)
    """
    return name == TENSORS_NAME or _NUMBERED_TENSORS.fullmatch(name) is not None


def is_own_step_name(name: str) -> bool:
    """Whether `name` is a name haltpoint writes in a step folder (`STEP_NAMES`, or a numbered
    tensor file)."""
    return name in STEP_NAMES or is_tensors_name(name)


STEP_TEMP_OF = frozenset({MANIFEST_NAME, PINNED_NAME})
"""The step-folder files written through a temporary file (`is_temp_name`)."""
ROOT_TEMP_OF = frozenset({HISTORY_NAME, LOCK_NAME})
"""The run-root files written through a temporary file (`is_temp_name`)."""
_TEMP_PATTERN = re.compile(r"(.+)\.[0-9a-f]{8}\.tmp")  # fullmatch: `$` matches before a "\n"


def is_temp_name(name: str, of: frozenset[str]) -> bool:
    """Whether `name` is a temporary file `Storage.publish` writes for one of `of`
    (`{name}.{8 hex digits}.tmp`); any other `.tmp` file is not haltpoint's.

    >>> own = frozenset({"manifest.json"})
    >>> is_temp_name("manifest.json.0a1b2c3d.tmp", own), is_temp_name("notes.tmp", own)
    (True, False)
    >>> is_temp_name("manifest.json.0a1b2c3d.tmp\\n", own)  # a name haltpoint never writes
    False
    """
    match = _TEMP_PATTERN.fullmatch(name)
    return match is not None and match.group(1) in of


def checkpoint_dirname(step: int) -> str:
    """The folder name of the checkpoint for `step`.

    >>> checkpoint_dirname(12)
    'step-000000012'
    """
    return f"step-{step:09d}"


def _check_tensor_files(manifest: Manifest) -> None:
    """Every tensor lives where haltpoint writes tensors: a tensor file (`is_tensors_name`)
    of the folder of this step or of an earlier one (dedup refers back, never ahead). Any
    other file (a DCP shard, the history, the lock, a newer step's tensors) is refused, so
    that no file a writer's clean-up may remove is ever part of an intact checkpoint."""
    for key, record in manifest.tensors.items():
        folder, _, name = record.file.partition("/")
        owner = parse_step(folder)
        if owner is None or owner > manifest.step or not is_tensors_name(name):
            raise CorruptCheckpointError(
                f"tensor {key!r} lives in {record.file!r}, which is not a tensor file of the "
                f"folder of step {manifest.step} or of an earlier one"
            )


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name, exactly as `checkpoint_dirname` writes it, or
    None for anything else (a name with more zeros, or other digits, would alias a step).

    >>> parse_step("step-000000012"), parse_step("step-0000000012"), parse_step("history.jsonl")
    (12, None, None)
    >>> parse_step("step-" + "9" * 5000), parse_step("step-000000012\\n")
    (None, None)
    """
    match = _DIR_PATTERN.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    return step if checkpoint_dirname(step) == name else None


def dcp_folder(dirname: str) -> str:
    """The `torch.distributed.checkpoint` folder of a checkpoint folder, relative to the run.

    >>> dcp_folder("step-000000012")
    'step-000000012/dcp'
    """
    return f"{dirname}/{DCP_NAME}"


def is_sharded(manifest: Manifest) -> bool:
    """Whether the checkpoint also has a `dcp/` folder of sharded state."""
    return SHARDED_KEY in manifest.extra


@dataclass(frozen=True)
class ShardFile:
    """One DCP file of a sharded checkpoint, as its manifest records it."""

    size: int
    xxh3_128: str


@dataclass(frozen=True)
class ShardedRecord:
    """A manifest's `extra["sharded"]`: the entries of `state` saved with DCP, and its files.

    >>> record = ShardedRecord.parse(
    ...     {"world_size": 2, "entries": ["train"],
    ...      "files": {".metadata": {"size": 10, "xxh3_128": "ab"}}}, where="step-000000003")
    >>> record.entries, record.nbytes, record.world_size
    (('train',), 10, 2)
    """

    entries: tuple[str, ...]
    files: Mapping[str, ShardFile]  # plain file names inside the checkpoint's `dcp/` folder
    world_size: int | None  # the ranks that saved it; None when the record does not say

    @property
    def nbytes(self) -> int:
        """The bytes of all DCP files."""
        return sum(f.size for f in self.files.values())

    @classmethod
    def from_manifest(cls, manifest: Manifest, where: str) -> ShardedRecord | None:
        """The manifest's sharded record, or None when the checkpoint has no sharded state.

        Raises:
            CorruptCheckpointError: the record is malformed (see `parse`).
        """
        if SHARDED_KEY not in manifest.extra:
            return None
        return cls.parse(manifest.extra[SHARDED_KEY], where)

    @classmethod
    def parse(cls, record: Any, where: str) -> ShardedRecord:
        """Check and parse a sharded record (`where` names its checkpoint in errors).

        Raises:
            CorruptCheckpointError: "{where}: malformed sharded record in the manifest: "
                and what is wrong (a missing field, a wrong type, a file name that is not a
                plain name inside `dcp/`, a size or hash that is missing).
        """

        def malformed(problem: str) -> CorruptCheckpointError:
            return CorruptCheckpointError(
                f"{where}: malformed sharded record in the manifest: {problem}", path=where
            )

        if not isinstance(record, dict):
            raise malformed(f"expected a JSON object, got {type(record).__name__}")
        entries = record.get("entries")
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise malformed(f"'entries' must be a list of names, got {entries!r}")
        world_size = record.get("world_size")
        if world_size is not None and (type(world_size) is not int or world_size < 1):
            raise malformed(f"'world_size' must be a positive int, got {world_size!r}")
        files = record.get("files")
        if not isinstance(files, dict):
            raise malformed(f"'files' must be an object of file records, got {files!r}")
        parsed: dict[str, ShardFile] = {}
        for name, file in files.items():
            if not _plain_name(name):
                raise malformed(f"file {name!r} is not a plain file name inside dcp/")
            size = file.get("size") if isinstance(file, dict) else None
            digest = file.get("xxh3_128") if isinstance(file, dict) else None
            if type(size) is not int or size < 0 or not isinstance(digest, str):
                raise malformed(
                    f"file {name!r} needs a size (an int >= 0) and an xxh3_128 (a str), "
                    f"got {file!r}"
                )
            parsed[name] = ShardFile(size, digest)
        return cls(tuple(entries), parsed, world_size)


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")


def checkpoint_nbytes(manifest: Manifest) -> int:
    """The bytes a checkpoint references: its tensors and, when sharded, its DCP files.

    A malformed sharded record counts no DCP bytes: sizes are for listing, and `restore` or
    `haltpoint verify` report the record as damaged.
    """
    try:
        record = ShardedRecord.from_manifest(manifest, checkpoint_dirname(manifest.step))
    except CorruptCheckpointError:
        return manifest.nbytes
    return manifest.nbytes + (record.nbytes if record is not None else 0)


@dataclass(frozen=True)
class Entry:
    """One checkpoint folder as found on disk: committed when `manifest` is set; `removed`
    when its manifest was listed but gone by the time it was read (retention or `gc` of a
    writer removed it meanwhile: not damage). `error` says why a folder that may hold a
    checkpoint is none: a `CorruptCheckpointError` (damage), or an
    `UnreadableCheckpointError` (the folder cannot be listed, for lack of permission or
    another OS error, or its manifest cannot be read for lack of permission: not damage,
    and never removed, since it cannot be verified)."""

    step: int
    dirname: str
    manifest: Manifest | None
    error: CheckpointError | None
    pinned: bool
    removed: bool = False

    @property
    def committed(self) -> bool:
        return self.manifest is not None

    @property
    def sequence(self) -> int | None:
        """Its manifest's place in commit order (`Manifest.sequence`); None without one."""
        return None if self.manifest is None else self.manifest.sequence


class RunDirectory:
    """Reads and changes the checkpoints of one run directory through a `Storage`.

    The directory is the only source of truth: every answer is derived from what is on disk.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def scan(self) -> list[Entry]:
        """Every checkpoint folder, oldest step first; damaged manifests carry their error.

        A folder gone by the time it is listed is left out, and one that cannot be looked up
        (a stale handle, an I/O error) is unreadable; a manifest gone by the time it is read is
        `removed` (a writer's retention raced this reader), not damaged.
        """
        entries = []
        for name in self._list_root():
            step = parse_step(name)
            if step is None:
                continue
            if not self.storage.isdir(name):  # a file, gone, or it cannot be looked up
                try:
                    self.storage.exists(name)  # raises when it cannot be told
                except OSError as exc:  # an I/O error, a stale handle: it may hold one
                    entries.append(Entry(step, name, None, self._unreadable(name, exc), False))
                continue
            manifest, error = None, None
            try:
                children = self.storage.listdir(name)
            except CorruptCheckpointError as exc:  # a symlink out of the run
                entries.append(Entry(step, name, None, exc, False))
                continue
            except OSError as exc:  # chmod 000, an I/O error: it may hold a checkpoint
                entries.append(Entry(step, name, None, self._unreadable(name, exc), False))
                continue
            if not children and not self.storage.isdir(name):
                continue  # removed while listing
            if MANIFEST_NAME in children:
                try:
                    manifest = self.read_manifest(name)
                    if manifest.step != step:
                        raise CorruptCheckpointError(
                            f"manifest {self._where(name)} says step {manifest.step} but lives in "
                            f"the folder of step {step}; the folder was renamed or damaged",
                            path=self._where(name),
                        )
                except (CorruptCheckpointError, UnreadableCheckpointError) as exc:
                    if not self.removed(name):
                        manifest, error = None, exc
                    else:
                        entries.append(Entry(step, name, None, None, False, removed=True))
                        continue
            entries.append(Entry(step, name, manifest, error, PINNED_NAME in children))
        return sorted(entries, key=lambda e: e.step)

    def committed(self) -> list[Entry]:
        """The committed checkpoints, oldest step first; damaged manifests are warned about."""
        result = []
        for entry in self.scan():
            if entry.error is not None:
                warn_user(str(entry.error))
            elif entry.committed:
                result.append(entry)
        return result

    def removed(self, dirname: str) -> bool:
        """Whether the checkpoint folder `dirname` has no manifest now: one a reader had
        found, then failed to read, was removed meanwhile (by a writer's retention or `gc`).

        Told from the folder's listing, not a lookup by name: in a folder that may be listed
        but not searched (read permission without execute) every lookup fails, as if the
        manifest were gone, and an unreadable checkpoint would pass for a removed one. On an
        object store (no such folders) a listing may lag (an eventually consistent store, a
        cache in front of it) and still show a manifest just deleted: one it shows is looked
        up by its key too.
        """
        rel = f"{dirname}/{MANIFEST_NAME}"
        try:
            if MANIFEST_NAME not in self.storage.listdir(dirname):
                return True
            if self.storage.local_path(rel) is not None:
                return False  # a local folder: a lookup may fail where its listing does not
            return not self.storage.exists(rel)
        except (OSError, CorruptCheckpointError):  # it cannot be told: not known to be gone
            return False

    def read_manifest(self, dirname: str) -> Manifest:
        """The manifest of a checkpoint folder, decoded and with its state tree checked.

        Raises:
            UnreadableCheckpointError: no permission to read it, or an OS error that is no
                damage (`not_damage`: an I/O error, a timeout).
            CorruptCheckpointError: unreadable otherwise, over the limits, damaged, or
                malformed (naming the field).
        """
        rel, where = f"{dirname}/{MANIFEST_NAME}", self._where(dirname)
        try:
            data = self.storage.read_bytes(rel, MAX_MANIFEST_BYTES + 1)  # larger: refused unread
        except OSError as exc:
            if not_damage(exc):  # no permission, an I/O error, a timeout: not damage
                raise self._unreadable(dirname, exc) from None
            raise CorruptCheckpointError(f"cannot read {where}: {exc}", path=where) from exc
        manifest = Manifest.decode(data, source=where)
        try:
            dtypes = {key: torch_dtype(r.dtype) for key, r in manifest.tensors.items()}
            check_tree(manifest.tree, dtypes)
            _check_tensor_files(manifest)
        except CorruptCheckpointError as exc:
            raise DamagedManifestError(f"manifest {where}: {exc}", path=where) from None
        return manifest

    def new_dirname(self, step: int) -> str:
        """The folder for a new checkpoint of `step`; `CheckpointExistsError` if it is taken,
        `LinkedFileError` if the folder or its manifest is a symbolic link."""
        dirname = checkpoint_dirname(step)
        self.storage.write_path(f"{dirname}/{MANIFEST_NAME}")
        if self.holds(f"{dirname}/{MANIFEST_NAME}"):
            raise CheckpointExistsError(
                f"a checkpoint for step {step} already exists in {self.storage.url}; steps are "
                "never overwritten: save under a new step, or remove it with `haltpoint gc`",
                path=f"{self.storage.url}/{dirname}",
            )
        return dirname

    def holds(self, rel: str) -> bool:
        """Whether the run holds a file (or anything) at `rel`, for a writer about to create
        one there.

        Raises:
            UnreadableCheckpointError: it cannot be told (no permission, an I/O error): a
                checkpoint may be there, and nothing is ever written over one.
        """
        try:
            return self.storage.exists(rel)
        except OSError as exc:
            where = f"{self.storage.url.rstrip('/')}/{rel}"
            raise UnreadableCheckpointError(
                f"cannot tell whether {where} exists ({exc.strerror or exc}); a checkpoint "
                "there is never overwritten, so nothing was written: check the disk or the "
                "folder's permissions, or save under a new step",
                path=where,
            ) from None

    def commit(self, manifest: Manifest) -> str:
        """Publish `manifest` atomically: from this moment the checkpoint exists.

        Only where no manifest is (`Storage.publish_new`): on an object store, which has no
        lock a second writer must respect, a checkpoint committed there since `new_dirname`
        looked is never written over.

        Raises:
            CheckpointExistsError: a manifest of that step is there now; nothing was written.
        """
        dirname = checkpoint_dirname(manifest.step)
        try:
            self.storage.publish_new(f"{dirname}/{MANIFEST_NAME}", manifest.encode())
        except FileExistsError:
            where = f"{self.storage.url.rstrip('/')}/{dirname}"
            raise CheckpointExistsError(
                f"a checkpoint for step {manifest.step} was committed in {where} by another "
                "writer while this one saved it; nothing was written over it: stop the other "
                "writer of the run, then save under a new step",
                path=where,
            ) from None
        return dirname

    def quarantine(self, entry: Entry) -> str:
        """Set a damaged checkpoint aside: its manifest moves to `quarantine/` (see
        `store.quarantine`), its pin marker goes, its data stays; return the new name.

        From then on the step is free to be saved again. Only the writer may call this.
        """
        rel = move_to_quarantine(self.storage, entry.dirname)
        if entry.pinned:
            self.storage.remove(f"{entry.dirname}/{PINNED_NAME}")
        return rel

    def quarantined(self) -> list[Quarantined]:
        """The quarantined manifests, by step.

        Raises:
            UnreadableCheckpointError: the quarantine folder cannot be listed (an OS error).
        """
        try:
            return list_quarantined(self.storage)
        except OSError as exc:
            raise self._unlisted(QUARANTINE_DIR, exc) from None

    def clear_dcp_folder(self, step: int) -> None:
        """Remove what an interrupted sharded save of `step` left in its `dcp/` folder.

        Raises:
            CheckpointExistsError: a quarantined manifest of `step` has its shards there.
        """
        held = [q.path for q in self.quarantined() if q.step == step]
        if held and self.storage.listdir(dcp_folder(checkpoint_dirname(step))):
            raise CheckpointExistsError(
                f"the dcp/ folder of step {step} in {self.storage.url} holds the shards of the "
                f"quarantined checkpoint {held[-1]}; move or delete them to save step {step} "
                "again, or save under a new step",
                path=f"{self.storage.url}/{checkpoint_dirname(step)}",
            )
        self.storage.rmtree(dcp_folder(checkpoint_dirname(step)))

    def set_pinned(self, step: int, pinned: bool) -> None:
        rel = f"{checkpoint_dirname(step)}/{PINNED_NAME}"
        if pinned:
            self.storage.publish(rel, b"")
        else:
            self.storage.remove(rel)

    def remove(self, entries: Iterable[Entry], kept: Iterable[Manifest]) -> None:
        """Remove checkpoints: manifests first (uncommit), then files nothing kept references.

        The quarantine is read first: one that cannot be read stops before anything goes.
        """
        held = self.quarantined()  # empty when there is none; collect_garbage lists the root
        self.storage.remove_many([f"{entry.dirname}/{MANIFEST_NAME}" for entry in entries])
        self.collect_garbage(kept, held)

    def collect_garbage(
        self, kept: Iterable[Manifest], held: list[Quarantined] | None = None
    ) -> list[str]:
        """Delete files no kept manifest references, and folders left empty; return them.

        Only the writer may call this: it also removes the leftovers of an interrupted save.
        While any checkpoint folder holds a manifest that is not among `kept` (one that
        could not be read or decoded: unreadable, damaged, or of a newer format), nothing is
        deleted, with a warning: that manifest may reference any file. Quarantined manifests
        count as kept (`held`: as `remove` read them); one that does not decode keeps its own
        step's folder whole.
        Each step folder is looked at again before the files go: one that holds a manifest
        by then, outside `kept` (another writer committed it meanwhile: its lock file was
        deleted by hand, or an object store's lock let it in), is left as it is, with a
        warning. A folder then goes only while it is empty (`Storage.rmdir`), never whole, so
        a manifest committed after that look is not deleted either (its checkpoint may have
        lost files, and is then reported damaged, not gone).
        The files go in one `Storage.remove_many` (one request per 1,000 files on S3), then
        each `dcp/` by `Storage.rmtree`, then the folders left empty.
        """
        top = self._list_root()
        if held is None:
            held = self.quarantined() if QUARANTINE_DIR in top else []
        kept = list(kept)
        kept_dirs = {checkpoint_dirname(m.step) for m in kept}
        kept += [q.manifest for q in held if q.manifest is not None]
        whole = {checkpoint_dirname(q.step) for q in held if q.manifest is None}
        unknown = [
            name
            for name in top
            if parse_step(name) is not None
            and name not in kept_dirs
            and (self._may_hold_manifest(name) or self._unlistable(name))
        ]
        if unknown:
            warn_user(
                f"{self.storage.url}: deleted no leftover files, since the manifest of "
                f"{', '.join(unknown)} could not be read (unreadable, damaged or of a newer "
                "format) and may reference them; fix or remove it, and the next writer "
                "cleans up"
            )
            return []
        referenced = set().union(*(m.files() for m in kept))
        referenced |= {dcp_folder(checkpoint_dirname(m.step)) for m in kept if is_sharded(m)}
        live_dirs = kept_dirs | {name.split("/", 1)[0] for name in referenced}
        root_files: list[str] = []
        # a step folder, its files, its `dcp/` (removed whole), whether the folder goes too
        planned: list[tuple[str, list[str], list[str], bool]] = []
        links: list[str] = []
        for name in top:
            if is_temp_name(name, ROOT_TEMP_OF):
                if not self.storage.is_folder(name):  # a folder of that name is not haltpoint's
                    root_files.append(name)
                continue
            if parse_step(name) is None or name in whole or not self.storage.isdir(name):
                continue
            try:
                children = self.storage.listdir(name)
            except CorruptCheckpointError:  # a symlink out of the run: remove the link only
                self.storage.rmtree(name)
                links.append(name)
                continue
            except OSError:  # cannot be listed: a kept checkpoint's folder, left as it is
                continue
            live = name in live_dirs
            foreign = False
            files: list[str] = []
            trees: list[str] = []
            for child in children:
                rel = f"{name}/{child}"
                unwanted = is_temp_name(child, STEP_TEMP_OF) or (
                    is_own_step_name(child)
                    and not (live and (child in (MANIFEST_NAME, PINNED_NAME) or rel in referenced))
                )
                if unwanted and child == DCP_NAME:
                    trees.append(rel)  # by its files' names: on S3 a folder is a key prefix
                elif unwanted and not self.storage.is_folder(rel):
                    files.append(rel)
                elif unwanted or not is_own_step_name(child):  # not haltpoint's: never deleted
                    foreign = True  # (a folder at one of its file names is not either)
            if files or trees or not (live or foreign):
                planned.append((name, files, trees, not live and not foreign))
        going = []
        for name, files, trees, goes in planned:
            if name not in kept_dirs and self._may_hold_manifest(name):
                warn_user(
                    f"{self.storage.url}: left {name} as it is: a manifest was committed there "
                    "while clean-up ran, so another writer may be using the run (stop it; "
                    "the next writer cleans up)"
                )
                continue
            going.append((name, files, trees, goes))
        files = [*root_files, *(rel for _, rels, _, _ in going for rel in rels)]
        self.storage.remove_many(files)  # one request per 1,000 files on S3
        removed = [*links, *files]
        for name, _, trees, goes in going:
            for tree in trees:
                self.storage.rmtree(tree)
            removed += trees
            # only while empty: never a file created in it meanwhile
            if goes and self.storage.rmdir(name):
                removed.append(name)
        return removed

    def _may_hold_manifest(self, dirname: str) -> bool:
        """Whether the folder `dirname` has a manifest, or may have one (it cannot be told)."""
        try:
            return self.storage.exists(f"{dirname}/{MANIFEST_NAME}")
        except OSError:  # no permission, an I/O error: it may hold any manifest
            return True

    def _unlistable(self, dirname: str) -> bool:
        """Whether the folder `dirname` cannot be listed for lack of permission: it may hold
        a manifest that references any file."""
        try:
            self.storage.listdir(dirname)
        except OSError:  # no permission, an I/O error: it may hold any manifest
            return True
        except CorruptCheckpointError:  # a symlink out of the run: clean-up removes the link
            return False
        return False

    def _unreadable(self, dirname: str, exc: OSError) -> UnreadableCheckpointError:
        where = f"{self.storage.url.rstrip('/')}/{dirname}"
        if isinstance(exc, PermissionError):
            why, fix = f"permission denied ({exc.strerror})", "fix its permissions to use it"
        else:
            why, fix = exc.strerror or str(exc), "check the disk or file system to use it"
        return UnreadableCheckpointError(
            f"cannot read the checkpoint {where}: {why}; it is skipped, not damage: nothing is "
            f"set aside or deleted because of it ({fix})",
            path=where,
        )

    def _list_root(self) -> list[str]:
        """The names in the run directory.

        Raises:
            UnreadableCheckpointError: it cannot be listed (an OS error: no permission, a
                special file system, a failing disk).
        """
        try:
            return self.storage.listdir()
        except OSError as exc:
            raise self._unlisted("", exc) from None

    def _unlisted(self, rel: str, exc: OSError) -> UnreadableCheckpointError:
        where = f"{self.storage.url.rstrip('/')}/{rel}".rstrip("/")
        if not rel and isinstance(exc, NotADirectoryError):  # a reader opened on a file
            return UnreadableCheckpointError(
                f"cannot list {where}: it is a file, not a folder, so it holds no checkpoint; "
                "pass the run directory a Checkpointer wrote (it holds step-* folders and "
                "history.jsonl)",
                path=where,
            )
        return UnreadableCheckpointError(
            f"cannot list {where}: {exc.strerror or exc}; no checkpoint in it can be read, "
            "and nothing was set aside or deleted (pass a run directory on a file system "
            "haltpoint can read, or fix its permissions)",
            path=where,
        )

    def remove_superseded(self, dirname: str) -> list[str]:
        """Delete the tensor files of checkpoint folder `dirname` that no manifest of the run
        references (committed or quarantined); return them.

        The writer calls it once it has committed and verified a save of that step under a
        fresh tensor file name. Nothing is deleted while any manifest cannot be read (it may
        reference them), nor while a quarantined manifest of this step does not decode.
        """
        entries = self.scan()
        held = self.quarantined()
        if any(e.error is not None for e in entries) or any(
            q.manifest is None and checkpoint_dirname(q.step) == dirname for q in held
        ):
            return []
        manifests = [e.manifest for e in entries if e.manifest is not None]
        manifests += [q.manifest for q in held if q.manifest is not None]
        referenced = set().union(*(m.files() for m in manifests))
        stale = [
            rel
            for rel in (f"{dirname}/{name}" for name in self.storage.listdir(dirname))
            if is_tensors_name(rel.rsplit("/", 1)[1])
            and rel not in referenced
            and not self.storage.is_folder(rel)
        ]
        self.storage.remove_many(stale)
        return stale

    def remove_uncommitted(self, dirname: str) -> list[str]:
        """Delete what a save of the step of `dirname`, killed before its commit, left in that
        folder: its tensor files that no manifest references (`remove_superseded`) and the
        temporary files of its manifest or pin marker; return them.

        For a writer about to save into a folder that holds no manifest (`new_dirname`), as
        `haltpoint import` does, which cleans up nothing else: run again after a kill, it
        would otherwise leave the killed import's tensor file there beside its own.
        """
        temps = [
            rel
            for rel in (f"{dirname}/{name}" for name in self.storage.listdir(dirname))
            if is_temp_name(rel.rsplit("/", 1)[1], STEP_TEMP_OF) and not self.storage.is_folder(rel)
        ]
        self.storage.remove_many(temps)
        return self.remove_superseded(dirname) + temps

    def _where(self, dirname: str) -> str:
        return f"{self.storage.url.rstrip('/')}/{dirname}/{MANIFEST_NAME}"
