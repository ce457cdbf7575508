"""DCP's pickles, read so that a crafted run directory runs no code.

`torch.distributed.checkpoint` reads a checkpoint's `.metadata` with a plain `pickle.load`
and the non-tensor values of its `.distcp` files with `torch.load(weights_only=False)`: a
manifest's xxh3 records are no signature, so a crafted sharded checkpoint would run its
payload there. `check_metadata` unpickles `.metadata` with a pure-Python unpickler that admits
only the classes DCP metadata is made of (and torch's sizes, dtypes and layouts), sets on them
only the fields they have (BUILD), and checks that every storage record points into a file the
manifest hashed; `SafeReader` hands DCP that metadata instead of letting it read the file again,
and refuses rank-local `__N.metadata`; `SafeLoadPlanner` reads every non-tensor value with
`weights_only=True` before DCP does.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pickle
import reprlib
import types
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import IO, Any, ClassVar

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorProperties
from torch.distributed.checkpoint.planner import ReadItem

from haltpoint.errors import CorruptCheckpointError, first_line
from haltpoint.state.codec import MAX_SHARED_HASH

__all__ = ["METADATA_NAME", "SafeLoadPlanner", "check_metadata", "safe_reader"]

METADATA_NAME = ".metadata"

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a dict lookup by name: how layouts pickle
    "torch": {"Size"},  # and every torch dtype
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


# The classes whose instances a metadata pickle may fill in (BUILD), and with what.
_BUILDABLE = {
    cls: frozenset(f.name for f in dataclasses.fields(cls))
    for cls in (
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata,
        Metadata,
        dcp_metadata.MetadataIndex,
        StorageMeta,
        dcp_metadata.TensorStorageMetadata,
        _StorageInfo,
    )
}
_PROPERTIES_STATE = (torch.dtype, torch.layout, bool, dcp_metadata._MEM_FORMAT_ENCODING, bool)


def _ordered_dict(*args: Any) -> OrderedDict[Any, Any]:
    """`collections.OrderedDict` as a metadata pickle may call it: with no arguments (its
    items come by SETITEMS, where their hashes are checked), as `pickle` writes it."""
    if args:
        raise pickle.UnpicklingError("refused OrderedDict built from arguments")
    return OrderedDict()


_ATOMS: tuple[type, ...] = (str, bytes, float, bool, type(None), type, torch.dtype, torch.layout)
_ATOMS += (enum.Enum, types.FunctionType, types.BuiltinFunctionType)


def _bounded(value: Any) -> bool:
    """Whether `value` may be referenced again from the memo: a leaf whose hash, repr and
    equality cost a bounded time (strings and bytes cache their hash), or a `torch.Size` or
    `TensorProperties` of such leaves. A shared list, dict or tuple lets a 1 KB pickle be a
    list of two references to a list of two references ... 60 levels down: 2**60 elements to
    any repr, hash or walk (DCP metadata shares only strings, classes, dtypes, layouts and
    memory formats: measured)."""
    if isinstance(value, _ATOMS):
        return True
    if type(value) is int:
        return value.bit_length() <= 64
    if type(value) is torch.Size:
        return len(value) <= 64
    return type(value) is TensorProperties  # its state is checked to hold leaves (BUILD)


def _shared_only_if_bounded(load_get: Callable[[Any], None]) -> Callable[[Any], None]:
    """A memo fetch (GET, BINGET, LONG_BINGET) that refuses a second reference to anything
    but a bounded leaf (`_bounded`), so that what the pickle builds is a tree."""

    def load(self: Any) -> None:
        load_get(self)
        if not _bounded(self.stack[-1]):
            raise pickle.UnpicklingError(
                f"refused a second reference to a {type(self.stack[-1]).__qualname__} (DCP "
                "metadata shares none, and shared containers can expand exponentially)"
            )

    return load


class _MetadataUnpickler(pickle._Unpickler):
    """Pure Python, so that BUILD can be checked too: resolves only the globals in
    `_ALLOWED` (and torch dtypes), sets on an object only the fields its class has, builds no
    set, and no dict whose keys were crafted to share a hash."""

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self._hashes: dict[int, Counter[int]] = {}  # by id of the dict being filled

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return _ordered_dict
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        found = vars(torch).get(name) if module == "torch" else None  # no lazy import
        if isinstance(found, torch.dtype):
            return found
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def load_build(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        _check_build(stack[-2], stack[-1])
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]

    dispatch[pickle.BUILD[0]] = load_build

    def _set(self, target: Any, pairs: list[Any]) -> None:
        """Set `pairs` (key, value, key, value, ...) on a dict, refusing more than
        `MAX_SHARED_HASH` keys of one hash (ints and tuples hash alike on every run, so a
        crafted pickle can make thousands collide, and building the dict is then quadratic;
        DCP's keys are strings and `MetadataIndex`es)."""
        if type(target) not in (dict, OrderedDict):
            raise pickle.UnpicklingError(f"refused to set items on a {type(target).__qualname__}")
        counts = self._hashes.setdefault(id(target), Counter())
        for key, value in zip(pairs[::2], pairs[1::2], strict=True):
            shared = counts[hash(key)] = counts[hash(key)] + 1
            if shared > MAX_SHARED_HASH:
                raise pickle.UnpicklingError(
                    f"refused a dict with more than {MAX_SHARED_HASH} keys that share one "
                    "hash (crafted to collide)"
                )
            target[key] = value

    def load_setitem(self) -> None:
        stack = self.stack  # type: ignore[attr-defined]
        value, key = stack.pop(), stack.pop()
        self._set(stack[-1], [key, value])

    def load_setitems(self) -> None:
        items = self.pop_mark()  # type: ignore[attr-defined]
        self._set(self.stack[-1], items)  # type: ignore[attr-defined]

    def load_refused_set(self) -> None:
        raise pickle.UnpicklingError("refused a set: DCP metadata holds none")

    def load_refused_dup(self) -> None:
        raise pickle.UnpicklingError("refused DUP: pickle writes none, and it shares objects")

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.DUP[0]] = load_refused_dup
    for _opcode in (pickle.GET, pickle.BINGET, pickle.LONG_BINGET):
        dispatch[_opcode[0]] = _shared_only_if_bounded(pickle._Unpickler.dispatch[_opcode[0]])
    for _opcode in (pickle.EMPTY_SET, pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_opcode[0]] = load_refused_set
    del _opcode


def _check_build(inst: Any, state: Any) -> None:
    """UnpicklingError unless BUILD would set only the fields of an instance of a DCP class
    (never an attribute of a class, function or anything shared)."""
    cls = type(inst)
    if cls is TensorProperties:
        if not (
            type(state) is tuple
            and len(state) == len(_PROPERTIES_STATE)
            and all(isinstance(v, t) for v, t in zip(state, _PROPERTIES_STATE, strict=True))
        ):
            raise pickle.UnpicklingError(f"refused state {_short(state)} for TensorProperties")
        return
    fields = _BUILDABLE.get(cls)
    if fields is None:
        raise pickle.UnpicklingError(f"refused to set attributes on a {cls.__qualname__}")
    if type(state) is not dict or not all(type(k) is str and k in fields for k in state):
        raise pickle.UnpicklingError(f"refused state {_short(state)} for {cls.__qualname__}")


_REPR = reprlib.Repr()  # a few levels and items of each container: bounded work
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 60, 60


def _short(value: Any) -> str:
    """A bounded repr of what a crafted pickle built (a few levels and items of it)."""
    try:
        text = _REPR.repr(value)
    except Exception as exc:  # a repr of the value's own that fails
        text = f"<a {type(value).__qualname__} ({type(exc).__name__} in its repr)>"
    return text if len(text) <= 80 else text[:77] + "..."


def check_metadata(file: IO[bytes], path: str, files: Mapping[str, Any] | None = None) -> Metadata:
    """Unpickle DCP `.metadata` from `file` (named `path` in errors) with the restricted
    unpickler, before DCP reads it.

    Args:
        files: the DCP files the manifest hashed, by name, each with a `size`: every storage
            record of the metadata must lie inside one of them (None: not checked).

    Raises:
        CorruptCheckpointError: naming the file and what is wrong (a refused global or
            state, a file that is truncated or not DCP metadata, a storage record pointing
            outside the files the manifest hashed).
    """
    try:
        metadata = _MetadataUnpickler(file).load()
    except Exception as exc:  # anything a crafted pickle raises is damage
        raise CorruptCheckpointError(
            f"{path} is not DCP metadata haltpoint can read safely: {type(exc).__name__}: "
            f"{first_line(exc)}",
            path=path,
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(
            f"{path} holds a {type(metadata).__name__}, not DCP metadata", path=path
        )
    if files is not None:
        _check_storage(metadata, path, files)
    return metadata


def _check_storage(metadata: Metadata, path: str, files: Mapping[str, Any]) -> None:
    """Every storage record names a data file the manifest hashed, and a range inside it."""
    records = metadata.storage_data
    if not isinstance(records, dict):
        raise CorruptCheckpointError(f"{path}: its storage records are not a dict", path=path)
    for index, info in records.items():
        name = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        record = files.get(name) if type(name) is str and name != METADATA_NAME else None
        if (
            type(info) is not _StorageInfo
            or record is None
            or type(offset) is not int
            or type(length) is not int
            or not 0 <= offset <= offset + length <= record.size
        ):
            raise CorruptCheckpointError(
                f"{path}: the storage record of {getattr(index, 'fqn', index)!r} points at "
                f"{_short(name)} bytes {offset!r}+{length!r}, not inside a DCP file the "
                "manifest hashed",
                path=path,
            )


def safe_reader(reader: Any, read: Callable[[], Metadata]) -> Any:
    """`reader` (DCP's file system or fsspec reader) made to return the metadata `read`
    gives (checked by `check_metadata`) instead of unpickling `.metadata` itself, and to
    refuse rank-local `__N.metadata`."""

    def read_metadata(*args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CorruptCheckpointError(
                f"refused to read rank-local DCP metadata (__{kwargs['rank']}{METADATA_NAME}): "
                f"haltpoint reads only the global {METADATA_NAME} its manifest hashed"
            )
        metadata = read()
        if metadata.storage_meta is None:  # as DCP's own reader does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = reader.load_id
        return metadata

    reader.read_metadata = read_metadata
    return reader


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading each non-tensor value with `weights_only=True`
    first: a value other than plain data (numbers, strings, containers, tensors) is refused."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            plain = torch.load(value, weights_only=True)
        except Exception as exc:  # anything a crafted pickle raises is damage
            raise CorruptCheckpointError(
                f"the DCP value {fqn!r} is not plain data: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        size = expanded_size(plain, MAX_EXPANDED)
        if size > MAX_EXPANDED:
            raise CorruptCheckpointError(
                f"the DCP value {fqn!r} shares its containers so that it stands for more than "
                f"{MAX_EXPANDED:,} values (or holds itself): any walk of it would not end"
            )
        value.seek(0)
        super().load_bytes(read_item, value)


#: The most values a non-tensor DCP value may stand for, its shared parts counted each time.
MAX_EXPANDED = 10**7


def expanded_size(value: Any, limit: int) -> int:
    """How many values `value` stands for, a container shared by reference counted at each
    place it appears (what a walk, a copy or a repr visits), in time linear in the distinct
    objects; more than `limit` (or a container holding itself) gives `limit + 1`.

    A pickle shares by memo references: 1 KB of lists of two references to the list below,
    60 levels deep, stands for 2**60 values.

    >>> shared = [1, 2]
    >>> expanded_size([shared, shared], 100)
    7
    >>> nested = []
    >>> for _ in range(60):
    ...     nested = [nested, nested]
    >>> expanded_size(nested, 10**7)
    10000001
    """
    sizes: dict[int, int] = {}  # of each container done, by id
    open_ids: set[int] = set()  # containers whose parts are still being counted
    pending: list[tuple[Any, list[Any] | None]] = [(value, None)]  # parts: once opened
    while pending:
        node, parts = pending.pop()
        key = id(node)
        if parts is None:  # first reached
            if not isinstance(node, (dict, list, tuple)) or key in sizes:
                continue
            if key in open_ids:
                return limit + 1  # a container holding itself
            parts = [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)
            open_ids.add(key)
            pending.append((node, parts))
            pending.extend((part, None) for part in parts)
            continue
        open_ids.discard(key)  # every part counted: its size
        total = 1 + sum(sizes.get(id(part), 1) for part in parts)
        if total > limit:
            return limit + 1
        sizes[key] = total
    return sizes.get(id(value), 1)
