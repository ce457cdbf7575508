"""Safetensors files, written and read by hand: one pass, hashed as written, verified as read.

A file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape and
`data_offsets` relative to the data section; optional `"__metadata__"` of strings; padded with
spaces to a multiple of 8), then the raw bytes of each tensor back to back. Any safetensors
reader opens our files and we read theirs. Nothing read from disk is trusted: every length,
offset, shape and hash is checked, and damage raises `CorruptCheckpointError`.

This module is the format both sides share (dtypes, `TensorRecord`, the header and its
parser); `tensor_writer` writes files and `tensor_reader` reads and verifies them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import IO, Any

import torch

from haltpoint.errors import CorruptCheckpointError, UnsupportedStateError
from haltpoint.store.hashing import HASH_HEX_LENGTH
from haltpoint.store.storage import Storage, check_relpath

__all__ = [
    "MAX_HEADER_BYTES",
    "REMEDY",
    "TensorRecord",
    "dtype_code",
    "read_header",
    "strict_loads",
    "torch_dtype",
]

MAX_HEADER_BYTES = 100_000_000  # the limit of the reference safetensors reader
MAX_DIMS = 64
MAX_NBYTES = 2**48
CHUNK = 8 << 20  # bytes hashed and written (or read and hashed) per step, while still in cache
REMEDY = (
    "the checkpoint is damaged; restore an earlier one with which=STEP or run `haltpoint verify`"
)

# In the order safetensors lays tensors out (then by name), which keeps each one aligned.
_DTYPES: dict[str, torch.dtype] = {
    "U64": torch.uint64,
    "I64": torch.int64,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F32": torch.float32,
    "U32": torch.uint32,
    "I32": torch.int32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "U16": torch.uint16,
    "I16": torch.int16,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_ITEMSIZE = {code: dtype.itemsize for code, dtype in _DTYPES.items()}
_RANK = {code: rank for rank, code in enumerate(_DTYPES)}


class _Damage(ValueError):
    """Internal: what is wrong with bytes read from disk; becomes a CorruptCheckpointError."""


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype (`torch.bfloat16` -> `"BF16"`).

    Raises:
        UnsupportedStateError: safetensors has no code for `dtype`; the message says what to do.
    """
    if dtype in _CODES:
        return _CODES[dtype]
    if dtype in (torch.complex128, torch.complex32):
        hint = (
            "store torch.view_as_real(t) (a real tensor with a trailing dimension of 2) and "
            "rebuild it with torch.view_as_complex after loading"
        )
    else:
        hint = f"convert it to one of the supported dtypes ({', '.join(sorted(_DTYPES))})"
    raise UnsupportedStateError(f"safetensors cannot store dtype {dtype}; {hint}")


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (`"BF16"` -> `torch.bfloat16`).

    Raises:
        ValueError: `code` is not a dtype code haltpoint supports.
    """
    if isinstance(code, str) and code in _DTYPES:
        return _DTYPES[code]
    raise ValueError(f"unknown safetensors dtype code {code!r}; supported: {sorted(_DTYPES)}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_layout(dtype: object, shape: object, nbytes: object) -> None:
    """Raise `_Damage` unless (dtype, shape, nbytes) describes a plausible tensor."""
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise _Damage(f"unknown dtype {dtype!r}")
    if not isinstance(shape, tuple) or not all(_is_int(d) for d in shape):
        raise _Damage(f"shape {shape!r} is not a list of integers")
    if len(shape) > MAX_DIMS:
        raise _Damage(f"shape has {len(shape)} dimensions (at most {MAX_DIMS})")
    if any(d < 0 for d in shape) or math.prod(max(d, 1) for d in shape) > MAX_NBYTES:
        raise _Damage(f"shape {list(shape)} has a negative or absurdly large dimension")
    if not _is_int(nbytes) or nbytes != math.prod(shape) * _ITEMSIZE[dtype]:
        raise _Damage(f"{nbytes!r} bytes do not match shape {list(shape)} of dtype {dtype}")
    if nbytes > MAX_NBYTES:
        raise _Damage(f"{nbytes} bytes is absurdly large (at most 2**48)")


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives: its file (relative to the run), layout, byte range and hash.

    Construction does not validate (writers build records from real tensors); `from_json`
    validates everything read back.

    >>> rec = TensorRecord("step-000000001/tensors.safetensors", "F32", (2, 3), 64, 24, "0" * 32)
    >>> TensorRecord.from_json(rec.to_json(), source="manifest.json") == rec
    True
    """

    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    hash: str

    def __post_init__(self) -> None:
        if isinstance(self.shape, list):
            object.__setattr__(self, "shape", tuple(self.shape))

    def validate(self) -> None:
        """Raise `CorruptCheckpointError` unless every field is well-formed and consistent."""
        try:
            check_relpath(self.file)
            _check_layout(self.dtype, self.shape, self.nbytes)
            if not (_is_int(self.offset) and 8 <= self.offset <= 2**62):
                raise _Damage(f"offset {self.offset!r} is not an integer from 8 to 2**62")
            if not (
                isinstance(self.hash, str)
                and len(self.hash) == HASH_HEX_LENGTH
                and all(c in "0123456789abcdef" for c in self.hash)
            ):
                raise _Damage(f"hash {self.hash!r} is not {HASH_HEX_LENGTH} lowercase hex digits")
        except (_Damage, CorruptCheckpointError) as e:
            raise CorruptCheckpointError(
                f"invalid tensor record: {e}", path=str(self.file)
            ) from None

    def to_json(self) -> dict[str, Any]:
        """The record as a strict-JSON object (its form in the manifest)."""
        return {
            "file": self.file,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "hash": self.hash,
        }

    @classmethod
    def from_json(cls, obj: Any, *, source: str) -> TensorRecord:
        """Parse and validate a record read from `source`; `CorruptCheckpointError` if bad."""
        fields = ["file", "dtype", "shape", "offset", "nbytes", "hash"]
        try:
            if not isinstance(obj, dict) or sorted(obj) != sorted(fields):
                got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise _Damage(f"a tensor record needs exactly the fields {fields}, got {got}")
            shape = obj["shape"]
            record = cls(**{**obj, "shape": tuple(shape) if isinstance(shape, list) else shape})
            record.validate()
        except (_Damage, CorruptCheckpointError) as e:
            raise CorruptCheckpointError(f"{source}: {e}; {REMEDY}", path=source) from None
        return record


def _corrupt(storage: Storage, rel: str, problem: object) -> CorruptCheckpointError:
    where = f"{storage.url.rstrip('/')}/{rel}"
    return CorruptCheckpointError(f"{where}: {problem}; {REMEDY}", path=where)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} overflows a float")
    return value


def strict_loads(text: str | bytes) -> Any:
    """`json.loads` refusing duplicate keys, NaN/Infinity and numbers that overflow a float.

    Raises ValueError (RecursionError for absurd nesting) on anything that is not strict JSON.
    """
    return json.loads(
        text,
        object_pairs_hook=_reject_duplicates,
        parse_constant=_reject_constant,
        parse_float=_finite_float,
    )


def _parse_header(f: IO[bytes], size: int) -> dict[str, Any]:
    prefix = f.read(8)
    if len(prefix) < 8:
        raise _Damage(f"the file is {size} bytes, too short to be a safetensors file")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise _Damage(f"declared header length {n} is over the file size {size} or 100 MB")
    blob = f.read(n)
    if len(blob) != n:
        raise _Damage("the file ended inside its header")
    try:
        if not blob.startswith(b"{"):
            raise ValueError("it does not start with '{'")
        header = strict_loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise _Damage(f"the header is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _Damage("the header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Damage("__metadata__ is not an object of strings")
    entries: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if not isinstance(info, dict) or sorted(info) != ["data_offsets", "dtype", "shape"]:
            raise _Damage(f"tensor {key!r} needs exactly the fields dtype, shape, data_offsets")
        offsets = info["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise _Damage(f"tensor {key!r}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        shape = tuple(info["shape"]) if isinstance(info["shape"], list) else info["shape"]
        try:
            _check_layout(info["dtype"], shape, end - begin)
        except _Damage as e:
            raise _Damage(f"tensor {key!r}: {e}") from None
        info.update(offset=8 + n + begin, nbytes=end - begin)
        entries.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(entries):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise _Damage(f"tensor {key!r} at data offset {begin} {what}")
        position = end
    if 8 + n + position != size:
        raise _Damage(f"the tensors end at byte {8 + n + position} but the file has {size}")
    return {"__metadata__": meta, **header}


def read_header(storage: Storage, rel: str) -> dict[str, Any]:
    """Read and validate the header of the safetensors file `rel`, as strictly as safetensors.

    Returns:
        `"__metadata__"` (a dict of strings, empty when the file has none) and, per tensor
        name, `{"dtype", "shape", "data_offsets"}` as in the file plus the absolute `"offset"`
        and the `"nbytes"` of its data.

    Raises:
        CorruptCheckpointError: the file is missing or unreadable; its declared header length
            is over 100 MB or the file size; the header is not UTF-8 JSON, has duplicate keys,
            NaN, unknown dtypes or shapes that disagree with byte counts; or the data offsets
            overlap, leave gaps or do not end exactly at the end of the file.
    """
    try:
        return _read_header(storage, rel)
    except (OSError, _Damage) as e:
        raise _corrupt(storage, rel, e) from None


def _read_header(storage: Storage, rel: str) -> dict[str, Any]:
    """`read_header`, raising the OSError or `_Damage` itself (for callers that name more)."""
    size = storage.size(rel)
    with storage.open_read(rel) as f:
        return _parse_header(f, size)
