"""DCP's pickles, read so that a crafted run directory runs no code.

`torch.distributed.checkpoint` reads a checkpoint's `.metadata` with a plain `pickle.load`
and the non-tensor values of its `.distcp` files with `torch.load(weights_only=False)`: a
manifest's xxh3 records are no signature, so a crafted sharded checkpoint would run its
payload there. `check_metadata` unpickles `.metadata` first with an unpickler that admits only
the classes DCP metadata is made of (and torch's sizes, dtypes and layouts); `SafeLoadPlanner`
reads every non-tensor value with `weights_only=True` before DCP does.
"""

from __future__ import annotations

import io
import pickle
from typing import IO, Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import ReadItem

from haltpoint.errors import CorruptCheckpointError

__all__ = ["METADATA_NAME", "SafeLoadPlanner", "check_metadata"]

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


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the globals in `_ALLOWED` (and torch dtypes); anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def check_metadata(file: IO[bytes], path: str) -> Metadata:
    """Unpickle DCP `.metadata` from `file` (named `path` in errors) with the restricted
    unpickler, before DCP reads it.

    Raises:
        CorruptCheckpointError: naming the file and what is wrong (a refused global, a file
            that is truncated or not DCP metadata).
    """
    try:
        metadata = _MetadataUnpickler(file).load()
    except Exception as exc:  # anything a crafted pickle raises is damage
        raise CorruptCheckpointError(
            f"{path} is not DCP metadata haltpoint can read safely: {type(exc).__name__}: {exc}",
            path=path,
        ) from exc
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpointError(
            f"{path} holds a {type(metadata).__name__}, not DCP metadata", path=path
        )
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading each non-tensor value with `weights_only=True`
    first: a value other than plain data (numbers, strings, containers, tensors) is refused."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as exc:  # anything a crafted pickle raises is damage
            raise CorruptCheckpointError(
                f"the DCP value {read_item.dest_index.fqn!r} is not plain data: "
                f"{type(exc).__name__}: {exc}".splitlines()[0]
            ) from exc
        value.seek(0)
        super().load_bytes(read_item, value)
