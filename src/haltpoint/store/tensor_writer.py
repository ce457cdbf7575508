"""Writing safetensors files: laid out as safetensors does, hashed as written, at disk speed.

Local files go through `direct_io.AlignedFileWriter` (large aligned writes, O_DIRECT where the
file system allows it, hashing on this thread while the previous chunk is written on another);
other storages get the same bytes through `Storage.open_write`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from haltpoint.errors import UnsupportedStateError
from haltpoint.store.direct_io import BOUNCE_BYTES, AlignedFileWriter
from haltpoint.store.hashing import StreamHasher, tensor_bytes
from haltpoint.store.storage import Storage, check_relpath
from haltpoint.store.tensor_file import _RANK, MAX_HEADER_BYTES, TensorRecord, dtype_code

__all__ = ["FilePlan", "plan_file", "prepare_tensor", "write_tensor_file"]


def prepare_tensor(key: object, t: object) -> torch.Tensor:
    """Check one entry to write and return it as a dense, contiguous CPU tensor.

    Raises:
        ValueError, TypeError: a bad name, not a tensor, or not on the CPU.
        UnsupportedStateError: a dtype or layout safetensors cannot store.
    """
    if not isinstance(key, str) or key == "__metadata__":
        raise ValueError(f"tensor names must be strings other than '__metadata__', got {key!r}")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"tensor name {key!r} is not valid UTF-8") from None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensors[{key!r}] must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(
            f"tensors[{key!r}] is on {t.device}; write_tensor_file takes CPU tensors only "
            "(stage it with .cpu() first)"
        )
    if t.layout != torch.strided:
        raise UnsupportedStateError(
            f"tensors[{key!r}] has layout {t.layout}; make it a dense tensor with .to_dense()"
        )
    try:
        dtype_code(t.dtype)
    except UnsupportedStateError as e:
        raise UnsupportedStateError(f"tensors[{key!r}]: {e}") from None
    return t.detach().resolve_conj().resolve_neg().contiguous()


@dataclass(frozen=True)
class FilePlan:
    """The layout of one safetensors file: its header bytes and the tensors in file order.

    >>> plan = plan_file({"b": torch.zeros(2), "a": torch.zeros(3, dtype=torch.int64)})
    >>> plan.order, plan.data_start % 8, plan.size - plan.data_start
    (['a', 'b'], 0, 32)
    """

    header: bytes  # the 8-byte length and the JSON header, padded to a multiple of 8
    order: list[str]
    spans: dict[str, tuple[int, int]]  # name -> (begin, end), relative to the data section

    @property
    def data_start(self) -> int:
        return len(self.header)

    @property
    def size(self) -> int:
        return self.data_start + (self.spans[self.order[-1]][1] if self.order else 0)


def plan_file(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> FilePlan:
    """Lay `tensors` out as `safetensors.torch.save_file` does (metadata keys sorted)."""
    order = sorted(tensors, key=lambda k: (_RANK[dtype_code(tensors[k].dtype)], k))
    header: dict[str, Any] = (
        {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    )
    spans: dict[str, tuple[int, int]] = {}
    begin = 0
    for key in order:
        t = tensors[key]
        end = begin + t.numel() * t.element_size()
        header[key] = {
            "dtype": dtype_code(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [begin, end],
        }
        spans[key] = (begin, end)
        begin = end
    blob = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    if len(blob) > MAX_HEADER_BYTES:
        raise ValueError(
            f"the header would be {len(blob)} bytes, over the {MAX_HEADER_BYTES}-byte limit of "
            "safetensors readers; split the tensors over several files"
        )
    return FilePlan(struct.pack("<Q", len(blob)) + blob, order, spans)


def _flat_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


def write_tensor_file(
    storage: Storage,
    rel: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
    hashes: Mapping[str, str] | None = None,
    direct: bool = True,
) -> dict[str, TensorRecord]:
    """Write `tensors` as the safetensors file `rel`, hashing each one as it is written.

    The bytes are those `safetensors.torch.save_file` writes for the same tensors; the file is
    durable (fsynced, and its folder too) when this returns, and removed if it raises.

    Args:
        hashes: digests already computed for some tensors (by dedup); those are not hashed again.
        direct: use O_DIRECT for local files where the file system allows it.

    Returns:
        A `TensorRecord` per tensor name, with absolute offsets and xxh3-128 hashes.

    Raises:
        ValueError, TypeError: a tensor not on the CPU; a name or metadata that is not a string.
        UnsupportedStateError: a dtype or layout safetensors cannot store.
    """
    check_relpath(rel)
    prepared = {key: prepare_tensor(key, t) for key, t in tensors.items()}
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError(f"metadata must map strings to strings, got {dict(metadata)!r}")
    try:
        plan = plan_file(prepared, metadata)
    except ValueError as e:
        raise ValueError(f"{rel!r}: {e}") from None
    known = dict(hashes or {})
    digests: dict[str, str] = {}
    local = storage.write_path(rel)
    if local is not None:
        with AlignedFileWriter(local, direct=direct) as out:
            out.write(torch.frombuffer(bytearray(plan.header), dtype=torch.uint8))
            for key in plan.order:
                digests[key] = _emit(prepared[key], known.get(key), out.write)
    else:
        with storage.open_write(rel) as f:
            f.write(plan.header)
            for key in plan.order:
                digests[key] = _emit(prepared[key], known.get(key), lambda b: f.write(b.numpy()))
    return {
        key: TensorRecord(
            rel,
            dtype_code(prepared[key].dtype),
            tuple(prepared[key].shape),
            plan.data_start + plan.spans[key][0],
            plan.spans[key][1] - plan.spans[key][0],
            digests[key],
        )
        for key in plan.order
    }


def _emit(t: torch.Tensor, digest: str | None, write: Any) -> str:
    """Hand the bytes of `t` to `write` chunk by chunk, hashing each unless `digest` is known."""
    flat = _flat_bytes(t)
    view = tensor_bytes(flat) if digest is None else None
    hasher = StreamHasher()
    for i in range(0, flat.numel(), BOUNCE_BYTES):
        if view is not None:
            hasher.update(view[i : i + BOUNCE_BYTES])
        write(flat[i : i + BOUNCE_BYTES])
    return digest if digest is not None else hasher.hexdigest()
