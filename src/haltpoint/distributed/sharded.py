"""Sharded state (FSDP2 / DTensor) in a checkpoint, through `torch.distributed.checkpoint`.

`Checkpointer.save` sends here the entries of `state` whose state dict holds `DTensor`
shards; every rank writes its shards with DCP into `step-N/dcp/`, and the rest of the state
goes into the checkpoint's own files and manifest as always. The manifest, written by rank 0
once every rank's files are durable, is the commit marker; it records every DCP file's size
and xxh3-128 under `extra["sharded"]` (parsed by `store.run_dir.ShardedRecord`). See
docs/distributed.md, "Sharded state".

This module holds the pieces: which entries are sharded (`split_sharded`), writing and
hashing the shards (`write_shards`), checking them against the manifest (`verify_shards`)
and loading them onto any world size (`plan_shards`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from haltpoint.distributed import collectives
from haltpoint.distributed.ranks import Replicas, initialized
from haltpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    StateMismatchError,
    UnreadableCheckpointError,
    first_line,
    not_damage,
    unreadable,
)
from haltpoint.state._common import is_stateful
from haltpoint.store.hashing import StreamHasher
from haltpoint.store.run_dir import ShardFile
from haltpoint.store.storage import FsspecStorage, Storage

E = TypeVar("E", bound=CheckpointError)

__all__ = [
    "ShardLoad",
    "ShardedState",
    "plan_shards",
    "split_sharded",
    "verify_shards",
    "write_shards",
]

_CHUNK = 8 << 20


def _dtensor_class() -> type | None:
    """`DTensor` (public in torch.distributed.tensor since torch 2.5, before in `_tensor`)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.5
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _holds_dtensor(value: Any, dtensor: type) -> bool:
    if isinstance(value, dtensor):
        return True
    if isinstance(value, Mapping):
        return any(_holds_dtensor(v, dtensor) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_dtensor(v, dtensor) for v in value)
    return False


def split_sharded(state: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """(the state dicts of the entries holding DTensor shards, the other entries).

    Without an initialized process group no DTensor can exist and nothing is inspected.

    Raises:
        TypeError: an optimizer holds DTensor state directly. A fresh optimizer has no state
            for DCP to load into, so its restore would silently load nothing; save
            `ShardedState(model, optimizer)` instead.
    """
    dtensor = _dtensor_class() if initialized() is not None else None
    if dtensor is None or not isinstance(state, Mapping):
        return {}, state
    shards: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for name, value in state.items():
        target = value.state_dict() if is_stateful(value) else value
        if not _holds_dtensor(target, dtensor):
            rest[name] = value
        elif isinstance(value, torch.optim.Optimizer):
            raise TypeError(
                f"state[{name!r}] is an optimizer holding DTensor state: a fresh optimizer has "
                "no state for torch.distributed.checkpoint to load into. Save the model and its "
                "optimizer as one entry, haltpoint.ShardedState(model, optimizer)"
            )
        else:
            shards[name] = target
    return shards, rest


def _file_record(storage: Storage, rel: str) -> dict[str, Any]:
    hasher = StreamHasher()
    with storage.open_read(rel) as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return {"size": hasher.nbytes, "xxh3_128": hasher.hexdigest()}


def _where(storage: Storage, rel: str) -> str:
    """`rel`'s local path, or its URL on an object store."""
    return storage.local_path(rel) or f"{storage.url}/{rel}"


def _dcp_io(storage: Storage, folder: str, write: bool) -> Any:
    """DCP's writer (or reader) for `folder` of `storage`: its file system one on a local
    disk, its fsspec one (with the run's storage options) behind a URL."""
    import torch.distributed.checkpoint as dcp

    local = storage.write_path(folder) if write else storage.local_path(folder)
    if local is not None:
        return (
            dcp.FileSystemWriter(local, sync_files=True) if write else dcp.FileSystemReader(local)
        )
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    assert isinstance(storage, FsspecStorage)
    url, options = storage.fsspec_url(folder), storage.storage_options
    return FsspecWriter(url, sync_files=True, **options) if write else FsspecReader(url, **options)


def write_shards(
    storage: Storage, folder: str, shards: dict[str, Any], rank: int, process_group: Any = None
) -> dict[str, dict[str, Any]]:
    """Write this rank's part of `shards` with DCP into `folder` of `storage`; hash its files.

    On a local disk the files are fsync'ed; behind a URL each is an object once its upload
    completes. The hashes are of the bytes read back from where they are stored. Every rank
    of `process_group` (None: the default group) calls it: DCP's collectives run there.
    Returns the size and xxh3-128 of the files this rank wrote (rank 0 also DCP's
    `.metadata`).

    The ranks agree that each made its DCP writer before any enters DCP's collective save:
    a rank that failed to make it (its mount not writable, a bad storage option) raises on
    every rank at once, instead of leaving the others in DCP's collectives until the process
    group's timeout.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    writer = collectives.all_succeed(
        _ranks_of(process_group),
        lambda: _dcp_io(storage, folder, True),
        f"making DCP's writer for {_where(storage, folder)}",
    )
    try:
        dcp.save(shards, storage_writer=writer, process_group=process_group)
    except CheckpointException as exc:  # a BaseException: it would pass `except Exception`
        raise _dcp_error(CheckpointError, "save", _where(storage, folder), exc) from exc
    mine = sorted(
        name
        for name in storage.listdir(folder)
        if name.startswith(f"__{rank}_") or (rank == 0 and name == ".metadata")
    )
    return {name: _file_record(storage, f"{folder}/{name}") for name in mine}


def _ranks_of(process_group: Any) -> Replicas | None:
    """The ranks of `process_group` (None: the default group), or None for fewer than 2."""
    dist = initialized()
    if dist is None or dist.get_world_size(process_group) < 2:
        return None
    return Replicas(dist.get_rank(process_group), dist.get_world_size(process_group), process_group)


def verify_shards(
    storage: Storage,
    folder: str,
    files: Mapping[str, ShardFile],
    hashed: Mapping[str, ShardFile] | None = None,
) -> None:
    """Check every DCP file's size and xxh3-128 against the manifest's records, and DCP's
    `.metadata` (when among `files`) with the restricted unpickler (`check_metadata`): its
    storage records must lie inside `hashed` (every DCP file of the manifest; default `files`).

    Raises:
        CorruptCheckpointError: naming the first file missing, of the wrong size or hash,
            or metadata that is refused.
        UnreadableCheckpointError: a file cannot be read for a reason that is no damage
            (`not_damage`: no permission, EIO, a timeout).
    """
    from haltpoint.distributed.safe_metadata import METADATA_NAME

    for name, record in sorted(files.items()):
        rel = f"{folder}/{name}"
        path = _where(storage, rel)
        try:
            size = storage.size(rel)
        except OSError as exc:
            raise _read_failed(path, exc) from exc
        if size != record.size:
            raise CorruptCheckpointError(
                f"{path} has {size} bytes, the manifest says {record.size}: the "
                "sharded checkpoint is damaged",
                path=path,
            )
        try:
            digest = _file_record(storage, rel)["xxh3_128"]
        except OSError as exc:
            raise _read_failed(path, exc) from exc
        if digest != record.xxh3_128:
            raise CorruptCheckpointError(
                f"{path}: xxh3-128 {digest} differs from the manifest's "
                f"{record.xxh3_128}: the sharded checkpoint is damaged",
                path=path,
            )
    if METADATA_NAME in files:
        _check_metadata(storage, folder, files if hashed is None else hashed)


def _check_metadata(storage: Storage, folder: str, files: Mapping[str, ShardFile]) -> Any:
    """DCP's `.metadata` in `folder`, unpickled by `check_metadata`, its storage records
    inside `files` (the DCP files the manifest hashed)."""
    from haltpoint.distributed.safe_metadata import METADATA_NAME, check_metadata

    rel = f"{folder}/{METADATA_NAME}"
    path = _where(storage, rel)
    try:
        with storage.open_read(rel) as f:
            return check_metadata(f, path, files)
    except OSError as exc:
        raise _read_failed(path, exc) from exc


def _read_failed(path: str, exc: OSError) -> CheckpointError:
    """The error of a DCP file that could not be read: damage (a missing file), or, for an
    OS error that says nothing of its bytes (`not_damage`: no permission, EIO, a timeout),
    `UnreadableCheckpointError`, for which nothing is set aside or deleted."""
    if not_damage(exc):
        return unreadable(path, exc)
    return CorruptCheckpointError(f"{path}: {exc}", path=path)


def plan_shards(
    storage: Storage,
    folder: str,
    entries: Mapping[str, Any],
    files: Mapping[str, ShardFile],
    strict: bool = True,
) -> ShardLoad:
    """Check that the DCP checkpoint in `folder` of `storage` fits `entries`; the returned
    function loads it into them, resharding to this world size, and returns the values of
    `entries` that the checkpoint does not hold (dotted, as DCP names them), which a
    non-`strict` load leaves as they were.

    The checks read only the checked `.metadata`: every tensor of `entries` must have the
    checkpoint's (global) shape and dtype (DCP would convert dtypes silently, haltpoint never
    does, as for its own entries), and with `strict` the checkpoint must hold every value.
    Under a process group every rank checks before any rank loads (DCP's load is collective:
    a rank that failed its check alone would leave the others in it).

    Objects with `load_state_dict` get their own state dict filled by DCP (FSDP2 modules
    their shards, plain modules the full tensors); tensors are filled in place. Into objects
    holding DTensors every rank of the process group loads together; into objects holding
    none, and without a process group, DCP reads everything in this process (`no_dist`), so
    one rank may restore alone into an unsharded model. DCP reads no pickle unchecked: it gets
    the `.metadata` that `check_metadata` unpickled (its storage records inside `files`, the
    DCP files the manifest hashed) and no rank-local one (`safe_reader`), and reads
    non-tensor values through `SafeLoadPlanner`.

    Raises:
        StateMismatchError: `entries` do not fit the checkpoint.
        CorruptCheckpointError: the metadata or a value is refused, or (from the returned
            function) DCP fails to load (its `CheckpointException`, translated).
        CheckpointError: (from the returned function) DCP's collectives failed.
    """
    metadata = _check_metadata(storage, folder, files)  # a clear error before DCP starts
    targets = {n: v.state_dict() if is_stateful(v) else v for n, v in entries.items()}
    missing = _check_fit(targets, metadata, strict)
    dtensor = _dtensor_class()
    alone = initialized() is None or dtensor is None or not _holds_dtensor(targets, dtensor)

    def load() -> list[str]:
        _dcp_load(storage, folder, files, targets, strict, alone)
        for name, value in entries.items():
            if is_stateful(value):
                value.load_state_dict(targets[name])
            elif isinstance(value, torch.Tensor) and targets[name] is not value:
                value.copy_(targets[name])
        return missing

    return ShardLoad(load, together=not alone)


class ShardLoad:
    """`plan_shards`' load: calling it loads; `together` says whether DCP loads with every
    rank (a collective: every rank must load the same way) or in this process alone."""

    def __init__(self, load: Callable[[], list[str]], *, together: bool) -> None:
        self._load = load
        self.together = together

    def __call__(self) -> list[str]:
        return self._load()


def _dcp_load(
    storage: Storage,
    folder: str,
    files: Mapping[str, ShardFile],
    targets: dict[str, Any],
    strict: bool,
    alone: bool,
) -> None:
    """`dcp.load` of `folder` into `targets` (in this process alone, or with every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from haltpoint.distributed.safe_metadata import SafeLoadPlanner, safe_reader

    reader = safe_reader(
        _dcp_io(storage, folder, False), lambda: _check_metadata(storage, folder, files)
    )
    where = _where(storage, folder)
    try:
        dcp.load(
            targets,
            storage_reader=reader,
            planner=SafeLoadPlanner(allow_partial_load=not strict),
            no_dist=alone,
        )
    except CheckpointException as exc:
        raise _dcp_error(CorruptCheckpointError, "load", where, exc) from exc
    except RuntimeError as exc:  # gloo / NCCL: a peer closed the connection or timed out
        raise CheckpointError(
            f"{where}: DCP's collectives failed while loading ({first_line(exc)}): every "
            "rank must restore sharded state into sharded objects together, a read-only "
            "Checkpointer's included, or a rank died; the sharded entries may already hold "
            "part of the checkpoint: build them afresh before restoring again",
            path=where,
        ) from exc


def _check_fit(targets: dict[str, Any], metadata: Any, strict: bool) -> list[str]:
    """The values of `targets` (by DCP's dotted names) that `metadata` does not hold.

    Raises:
        StateMismatchError: a tensor whose global shape or dtype differs from the
            checkpoint's, a tensor where the checkpoint holds another value, or (`strict`)
            a value the checkpoint does not hold.
    """
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    flat, _ = flatten_state_dict(targets)
    saved = metadata.state_dict_metadata
    missing = [fqn for fqn in flat if fqn not in saved]
    wrong: list[str] = []
    for fqn, value in flat.items():
        record = saved.get(fqn)
        if record is None or not isinstance(value, torch.Tensor):
            continue
        if not isinstance(record, TensorStorageMetadata):
            wrong.append(f"{fqn}: the state holds a tensor, the checkpoint another value")
        elif tuple(record.size) != tuple(value.shape) or record.properties.dtype != value.dtype:
            wrong.append(
                f"{fqn}: the state has shape {tuple(value.shape)} and dtype {value.dtype}, "
                f"the checkpoint shape {tuple(record.size)} and dtype "
                f"{record.properties.dtype}"
            )
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise StateMismatchError(
            f"cannot load the sharded state: {wrong[0]}{more}; haltpoint does not convert "
            "dtypes or reshape: build the model (and optimizer) as they were saved, then "
            "restore"
        )
    if strict and missing:
        names = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise StateMismatchError(
            f"the sharded checkpoint does not hold {names}; restore only the entries it "
            "holds, or pass strict=False to skip them"
        )
    return missing


def _dcp_error(kind: type[E], doing: str, folder: str, exc: Any) -> CheckpointError:
    """DCP's `CheckpointException` (a BaseException holding every failed rank's exception)
    as one line of `kind`; a refusal of ours raised inside DCP keeps its own message. A full
    disk is `InsufficientSpaceError`, and a read that fails for a reason that is no damage
    (`not_damage`: EIO, no permission, a timeout) `UnreadableCheckpointError`, as for the
    checkpoint's other files."""
    failures = sorted(exc.failures.items())
    if not failures:
        return kind(f"{folder}: DCP failed to {doing}: {exc}", path=folder)
    rank, (cause, _trace) = failures[0]
    # DCP loads in place, each rank as its reads arrive: some may hold part of it by now
    partial = (
        "; the sharded entries may already hold part of the checkpoint on some ranks: build "
        "them afresh before restoring again"
        if doing == "load"
        else ""
    )
    if isinstance(cause, CheckpointError):
        return kind(f"{folder}: {cause}{partial}", path=folder)
    message = (
        f"{folder}: DCP failed to {doing} on rank {rank}: {type(cause).__name__}: "
        f"{first_line(cause)}{partial}"
    )
    if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpaceError(
            f"{message}; free space and save again (nothing was committed)", path=folder
        )
    if doing == "load" and not_damage(cause):
        return UnreadableCheckpointError(
            f"{message}; check the disk or file system and restore again (an unreadable "
            "checkpoint is not damage: nothing was set aside or deleted)",
            path=folder,
        )
    return kind(message, path=folder)


class ShardedState:
    """A model and its optimizers, in the form `torch.distributed.checkpoint` can reshard.

    Save it as one entry of `Checkpointer.save`'s state (`{"train": ShardedState(model,
    optimizer), "epoch": epoch}`) when the model is sharded (FSDP2 `fully_shard`). Its state
    dict comes from `torch.distributed.checkpoint.state_dict.get_state_dict`: parameter
    names instead of optimizer indices, and optimizer state created even before the first
    step, so a restore onto another world size, or into an unsharded model, fills every
    value. `load_state_dict` goes through `set_state_dict`.
    """

    def __init__(self, model: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for optimizer in optimizers:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizers must be torch.optim.Optimizer, got {type(optimizer).__name__}"
                )
        self.model = model
        self.optimizers = optimizers

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.optimizers)
        return {"model": model, "optim": optim} if self.optimizers else {"model": model}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizers,
            model_state_dict=state["model"],
            optim_state_dict=state.get("optim", {}),
        )
