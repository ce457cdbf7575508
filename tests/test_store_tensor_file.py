"""Tests for haltpoint.store.tensor_file: hand-written safetensors files, strict and verified."""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from haltpoint.errors import CorruptCheckpointError, UnsupportedStateError
from haltpoint.store.hashing import hash_bytes, tensor_bytes
from haltpoint.store.storage import FsspecStorage, LocalStorage, Storage
from haltpoint.store.tensor_file import (
    CHUNK,
    TensorRecord,
    dtype_code,
    read_header,
    torch_dtype,
)
from haltpoint.store.tensor_reader import index_tensor_file, read_tensors, verify_file
from haltpoint.store.tensor_writer import write_tensor_file

CODES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}
REL = "step-000000001/tensors.safetensors"


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random-looking tensor data of any dtype, built from random bytes."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, dtype and shape (NaN payloads included)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(tensor_bytes(a.contiguous())) == bytes(tensor_bytes(b.contiguous()))
    )


def mixed() -> dict[str, torch.Tensor]:
    tensors = {
        f"t.{code}": sample(dtype, (3, 5), i) for i, (code, dtype) in enumerate(CODES.items())
    }
    tensors.update(
        scalar=torch.tensor(3.5),
        empty=torch.empty(0, 7, dtype=torch.bfloat16),
        flag=torch.tensor(True),
        transposed=torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
        grad=torch.ones(2, requires_grad=True),
    )
    tensors["ünïcode name"] = torch.ones(1, dtype=torch.int16)
    return tensors


@pytest.fixture(params=["local", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "local":
        yield LocalStorage(tmp_path / "run")
    else:
        fs = FsspecStorage(f"memory://haltpoint-test-{uuid.uuid4().hex}")
        yield fs
        fs.rmtree("")


def file_bytes(storage: Storage, rel: str = REL) -> bytes:
    return storage.read_bytes(rel)


def put(storage: Storage, data: bytes, rel: str = REL) -> None:
    storage.makedirs(rel.rsplit("/", 1)[0])
    storage.publish(rel, data)


def written(storage: Storage, tensors: dict[str, torch.Tensor], **kw: object) -> dict:
    storage.makedirs(REL.rsplit("/", 1)[0])
    return write_tensor_file(storage, REL, tensors, **kw)  # type: ignore[arg-type]


# -- dtypes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "dtype"), list(CODES.items()))
def test_dtype_codes_round_trip(code: str, dtype: torch.dtype) -> None:
    assert dtype_code(dtype) == code
    assert torch_dtype(code) == dtype


@pytest.mark.parametrize(
    ("dtype", "match"),
    [
        (torch.complex128, r"view_as_real\(t\).*view_as_complex"),
        (torch.complex32, "view_as_real"),
        (torch.quint8, "convert it to one of the supported dtypes"),
        (torch.float4_e2m1fn_x2, "cannot store dtype torch.float4_e2m1fn_x2"),
    ],
    ids=str,
)
def test_unsupported_dtypes_say_what_to_do(dtype: torch.dtype, match: str) -> None:
    with pytest.raises(UnsupportedStateError, match=match):
        dtype_code(dtype)


@pytest.mark.parametrize("code", ["F4", "f32", "", "__metadata__"])
def test_unknown_codes_are_refused(code: str) -> None:
    with pytest.raises(ValueError, match="unknown safetensors dtype code"):
        torch_dtype(code)


# -- writing and reading ------------------------------------------------------------------------


def test_round_trip_every_dtype_and_shape(storage: Storage) -> None:
    tensors = mixed()
    records = written(storage, tensors, metadata={"step": "1"})
    assert set(records) == set(tensors)
    back = read_tensors(storage, records)
    for key, t in tensors.items():
        assert same(back[key], t.detach()), key
        rec = records[key]
        assert rec.file == REL and rec.dtype == dtype_code(t.dtype) and rec.shape == tuple(t.shape)
        assert rec.nbytes == t.numel() * t.element_size()
        assert rec.hash == hash_bytes(tensor_bytes(t.detach().contiguous()))
        assert file_bytes(storage)[rec.offset : rec.offset + rec.nbytes] == bytes(
            tensor_bytes(t.detach().contiguous())
        )


def test_layout_is_aligned_packed_and_safetensors_ordered(storage: Storage) -> None:
    records = written(storage, mixed())
    data = file_bytes(storage)
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0 and data[8 : 8 + n].rstrip(b" ").endswith(b"}")
    spans = sorted((r.offset, r.offset + r.nbytes) for r in records.values())
    assert spans[0][0] == 8 + n and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    for rec in records.values():
        assert rec.offset % torch_dtype(rec.dtype).itemsize == 0


def test_empty_file_and_empty_metadata(storage: Storage) -> None:
    assert written(storage, {}) == {}
    assert read_header(storage, REL) == {"__metadata__": {}}
    assert file_bytes(storage) == b"\x08" + b"\x00" * 7 + b"{}      "


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"ünï": "cödé"}])
def test_bytes_are_identical_to_safetensors_save_file(
    storage: Storage, metadata: dict[str, str] | None
) -> None:
    tensors = {k: v.detach().contiguous() for k, v in mixed().items()}
    written(storage, tensors, metadata=metadata)
    assert file_bytes(storage) == safetensors.torch.save(tensors, metadata=metadata)


def test_metadata_keys_are_sorted_so_files_are_deterministic(storage: Storage) -> None:
    metadata = {"z": "1", "a": "2", "ünï": "cödé", "m": ""}
    written(storage, {"w": torch.ones(2)}, metadata=metadata)
    first = file_bytes(storage)
    written(storage, {"w": torch.ones(2)}, metadata=dict(reversed(metadata.items())))
    assert file_bytes(storage) == first
    assert list(read_header(storage, REL)["__metadata__"].items()) == sorted(metadata.items())


def test_safe_open_reads_our_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    tensors = mixed()
    written(storage, tensors, metadata={"step": "1"})
    with safetensors.safe_open(str(tmp_path / REL), framework="pt") as f:
        assert f.metadata() == {"step": "1"}
        assert set(f.keys()) == set(tensors)
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            assert same(f.get_tensor(key), tensors[key].detach()), key
    loaded = safetensors.torch.load_file(str(tmp_path / REL))
    assert all(same(loaded[k], t.detach()) for k, t in tensors.items())


def test_safetensors_load_reads_our_files_from_any_storage(storage: Storage) -> None:
    # safetensors.torch.load (unlike safe_open) has no F8_E8M0 in its table in 0.8
    tensors = {k: v for k, v in mixed().items() if k != "t.F8_E8M0"}
    written(storage, tensors)
    loaded = safetensors.torch.load(file_bytes(storage))
    assert all(same(loaded[k], t.detach()) for k, t in tensors.items())


def test_we_read_files_written_by_safetensors(storage: Storage) -> None:
    tensors = {k: v.detach().contiguous() for k, v in mixed().items()}
    put(storage, safetensors.torch.save(tensors, metadata={"who": "safetensors"}))
    header = read_header(storage, REL)
    assert header.pop("__metadata__") == {"who": "safetensors"}
    data = file_bytes(storage)
    records = {
        key: TensorRecord(
            REL,
            info["dtype"],
            tuple(info["shape"]),
            info["offset"],
            info["nbytes"],
            hash_bytes(data[info["offset"] : info["offset"] + info["nbytes"]]),
        )
        for key, info in header.items()
    }
    back = read_tensors(storage, records)
    assert all(same(back[k], t) for k, t in tensors.items())
    assert index_tensor_file(storage, REL) == records


def test_large_tensor_crosses_chunk_boundaries(storage: Storage) -> None:
    big = sample(torch.float32, ((CHUNK * 2 + 12) // 4,), 7)
    records = written(storage, {"big": big, "small": torch.ones(3, dtype=torch.float16)})
    assert same(read_tensors(storage, records)["big"], big)
    assert verify_file(storage, records) == []


def test_read_tensors_groups_several_files_and_subsets(storage: Storage) -> None:
    storage.makedirs("a")
    storage.makedirs("b")
    ra = write_tensor_file(storage, "a/x.safetensors", {"w": torch.ones(4), "v": torch.zeros(2)})
    rb = write_tensor_file(storage, "b/y.safetensors", {"u": torch.arange(3)})
    back = read_tensors(storage, {"w": ra["w"], "u": rb["u"], "v": ra["v"]})
    assert list(back) == ["w", "u", "v"]  # the order asked for, whatever the layout
    assert same(back["w"], torch.ones(4)) and same(back["u"], torch.arange(3))


def test_read_tensors_returns_fresh_writable_tensors(storage: Storage) -> None:
    records = written(storage, {"w": torch.ones(4)})
    first = read_tensors(storage, records)["w"]
    first.add_(1)
    assert same(read_tensors(storage, records)["w"], torch.ones(4))


@pytest.mark.parametrize(
    ("tensors", "kwargs", "error", "match"),
    [
        ({"w": torch.ones(2, device="meta")}, {}, ValueError, r"CPU tensors only.*\.cpu\(\)"),
        ({"w": torch.ones(2, 2).to_sparse()}, {}, UnsupportedStateError, r"to_dense"),
        (
            {"w": torch.ones(2, dtype=torch.complex128)},
            {},
            UnsupportedStateError,
            r"\['w'\].*view_as_real",
        ),
        ({"__metadata__": torch.ones(2)}, {}, ValueError, "other than '__metadata__'"),
        ({"w": [1.0, 2.0]}, {}, TypeError, r"tensors\['w'\] must be a torch.Tensor"),
        ({"\ud800": torch.ones(1)}, {}, ValueError, "not valid UTF-8"),
        ({"w": torch.ones(1)}, {"metadata": {"a": 1}}, TypeError, "metadata must map strings"),
    ],
    ids=[
        "meta-device",
        "sparse",
        "complex128",
        "reserved-name",
        "not-a-tensor",
        "surrogate",
        "metadata",
    ],
)
def test_write_refuses_what_safetensors_cannot_hold(
    storage: Storage, tensors: dict, kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        written(storage, tensors, **kwargs)
    assert not storage.exists(REL)


def test_write_refuses_paths_outside_the_run(storage: Storage) -> None:
    with pytest.raises(CorruptCheckpointError, match="outside the run directory"):
        write_tensor_file(storage, "../x.safetensors", {"w": torch.ones(1)})


def test_conjugate_and_negative_views_are_written_resolved(storage: Storage) -> None:
    z = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    records = written(storage, {"conj": z.conj(), "neg": torch.ones(3)._neg_view()})
    back = read_tensors(storage, records)
    assert same(back["conj"], z.conj().resolve_conj())
    assert same(back["neg"], -torch.ones(3))


# -- damage -------------------------------------------------------------------------------------


def test_missing_file_is_corrupt_with_remedy(storage: Storage) -> None:
    records = written(storage, {"w": torch.ones(2)})
    storage.remove(REL)
    with pytest.raises(CorruptCheckpointError, match=rf"{REL}: tensor 'w'.*which=STEP") as info:
        read_tensors(storage, records)
    assert REL in str(info.value.path)
    assert verify_file(storage, records) == ["w"]


def _cut_points(records: dict[str, TensorRecord], size: int) -> list[int]:
    points = {0, 1, 7, 8, 9, size - 1}
    for rec in records.values():
        points |= {rec.offset - 1, rec.offset, rec.offset + 1, rec.offset + rec.nbytes - 1}
    return sorted(p for p in points if 0 <= p < size)


def test_truncation_at_every_interesting_point_is_corrupt(storage: Storage) -> None:
    tensors = {
        "a": sample(torch.float32, (4, 4)),
        "b": sample(torch.int8, (9,)),
        "c": torch.ones(1),
    }
    records = written(storage, tensors)
    data = file_bytes(storage)
    for cut in _cut_points(records, len(data)):
        put(storage, data[:cut])
        with pytest.raises(CorruptCheckpointError, match=r"too short|over the file|the file has"):
            read_header(storage, REL)
        # the header no longer describes the file: every tensor in it is damage to every
        # reader (a safetensors reader refuses the file), not only the ones cut off
        short = r"too short|over the file|the file has"
        with pytest.raises(CorruptCheckpointError, match=short):
            read_tensors(storage, records)
        with pytest.raises(CorruptCheckpointError, match=short):
            read_tensors(storage, records, verify=False)
        assert set(verify_file(storage, records)) == set(records)


def test_a_damaged_tensor_names_itself(storage: Storage) -> None:
    records = written(storage, {"a": torch.ones(8), "b": torch.zeros(8)})
    data = bytearray(file_bytes(storage))
    data[records["b"].offset + 3] ^= 0x10
    put(storage, bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'b'.*do not match.*haltpoint verify"):
        read_tensors(storage, records)
    assert same(read_tensors(storage, {"a": records["a"]})["a"], torch.ones(8))
    assert verify_file(storage, records) == ["b"]


_FLIP_TENSORS = {"w": sample(torch.float32, (6, 5), 1), "m": sample(torch.bfloat16, (7,), 2)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bit_flips_never_return_wrong_data(data: st.DataObject) -> None:
    storage = FsspecStorage(f"memory://haltpoint-flip-{uuid.uuid4().hex}")
    try:
        records = written(storage, _FLIP_TENSORS)
        raw = bytearray(file_bytes(storage))
        positions = data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=3))
        for bit in positions:
            raw[bit // 8] ^= 1 << (bit % 8)
        put(storage, bytes(raw))
        start = min(r.offset for r in records.values())
        try:
            back = read_tensors(storage, records, verify=True)
        except CorruptCheckpointError:
            back = None
        if back is not None:
            assert all(same(back[k], t) for k, t in _FLIP_TENSORS.items())
        changed = [b for b in set(positions) if positions.count(b) % 2]
        if any(bit // 8 >= start for bit in changed):
            assert back is None and verify_file(storage, records) != []
        with contextlib.suppress(CorruptCheckpointError):
            read_header(storage, REL)  # either parses or says the header is damaged
    finally:
        storage.rmtree("")


def header_file(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def entry(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": shape or [2], "data_offsets": offsets or [0, 8]}


HOSTILE = [
    ("too-short", b"\x01\x00", r"too short"),
    ("huge-length", header_file({}, length=2**63), r"declared header length \d+ is over"),
    ("over-100MB", header_file({}, length=100_000_001), r"declared header length"),
    ("length-past-end", header_file({}, length=64), r"over the file size"),
    ("not-utf8", header_file(b"{\xff\xfe}   "), r"not valid JSON"),
    ("not-json", header_file(b"{nope}"), r"not valid JSON"),
    ("not-object", header_file(b"[1, 2]  "), r"not valid JSON.*start with"),
    ("leading-space", header_file(b" {}"), r"start with"),
    ("nan", header_file(b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}'), r"NaN"),
    ("infinity", header_file(b'{"a":Infinity}'), r"Infinity"),
    ("float-overflow", header_file(b'{"a":1e999}'), r"overflows"),
    ("deep-nesting", header_file(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), r"recursion"),
    (
        "duplicate-key",
        header_file(
            b'{"a":'
            + json.dumps(entry()).encode() * 1
            + b',"a":'
            + json.dumps(entry()).encode()
            + b"}",
            b"\0" * 8,
        ),
        r"duplicate key 'a'",
    ),
    ("bad-metadata", header_file({"__metadata__": {"a": 1}}), r"__metadata__ is not"),
    ("entry-not-object", header_file({"a": [1]}), r"tensor 'a' needs exactly"),
    ("extra-field", header_file({"a": {**entry(), "x": 1}}, b"\0" * 8), r"needs exactly"),
    ("unknown-dtype", header_file({"a": entry("F4")}, b"\0" * 8), r"unknown dtype 'F4'"),
    ("bad-offsets", header_file({"a": entry(offsets=[0])}), r"is not \[begin, end\]"),
    (
        "bool-offsets",
        header_file({"a": {**entry(), "data_offsets": [False, 8]}}, b"\0" * 8),
        r"not \[begin",
    ),
    ("negative-dim", header_file({"a": entry(shape=[-2], offsets=[0, 8])}, b"\0" * 8), r"negative"),
    (
        "too-many-dims",
        header_file({"a": entry(shape=[1] * 65, offsets=[0, 4])}, b"\0" * 4),
        r"65 dimensions",
    ),
    (
        "absurd-empty",
        header_file({"a": entry(shape=[0, 2**40, 2**40], offsets=[0, 0])}),
        r"absurdly large",
    ),
    (
        "size-mismatch",
        header_file({"a": entry(shape=[3])}, b"\0" * 8),
        r"8 bytes do not match shape \[3\]",
    ),
    ("reversed", header_file({"a": entry(offsets=[8, 0])}, b"\0" * 8), r"do not match shape"),
    ("past-end", header_file({"a": entry(shape=[4], offsets=[0, 16])}, b"\0" * 8), r"end at byte"),
    (
        "gap",
        header_file({"a": entry(offsets=[0, 8]), "b": entry(offsets=[16, 24])}, b"\0" * 24),
        r"tensor 'b' at data offset 16 leaves a gap",
    ),
    (
        "overlap",
        header_file({"a": entry(offsets=[0, 8]), "b": entry(offsets=[4, 12])}, b"\0" * 12),
        r"overlaps",
    ),
    ("trailing-bytes", header_file({"a": entry()}, b"\0" * 9), r"end at byte \d+ but the file has"),
    ("missing-data", header_file({"a": entry()}, b"\0" * 7), r"end at byte \d+ but the file has"),
]


@pytest.mark.parametrize(("name", "data", "match"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_headers_are_refused(storage: Storage, name: str, data: bytes, match: str) -> None:
    put(storage, data)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        read_header(storage, REL)
    assert REL in str(info.value) and "haltpoint verify" in str(info.value)
    with pytest.raises(CorruptCheckpointError):
        index_tensor_file(storage, REL)


def test_valid_header_without_padding_is_accepted(storage: Storage) -> None:
    put(storage, header_file(b'{"a":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}', b"xyz"))
    header = read_header(storage, REL)
    assert header["a"] == {
        "dtype": "U8",
        "shape": [3],
        "data_offsets": [0, 3],
        "offset": 8 + 53,
        "nbytes": 3,
    }
    assert bytes(read_tensors(storage, index_tensor_file(storage, REL))["a"].numpy()) == b"xyz"


def test_read_header_of_missing_file(storage: Storage) -> None:
    with pytest.raises(CorruptCheckpointError, match=r"nowhere.safetensors.*which=STEP"):
        read_header(storage, "nowhere.safetensors")


GOOD = TensorRecord(REL, "F32", (2,), 64, 8, "0" * 32)
BAD_RECORDS: list[tuple[str, Callable[[dict], object], str]] = [
    ("absolute", lambda o: {**o, "file": "/etc/passwd"}, "outside the run directory"),
    ("dotdot", lambda o: {**o, "file": "a/../../x"}, "outside the run directory"),
    ("empty-file", lambda o: {**o, "file": ""}, "non-empty string"),
    ("dtype", lambda o: {**o, "dtype": "F128"}, "unknown dtype"),
    ("shape-type", lambda o: {**o, "shape": "2"}, "not a list of integers"),
    ("shape-bool", lambda o: {**o, "shape": [True, 8]}, "not a list of integers"),
    ("shape-neg", lambda o: {**o, "shape": [-2], "nbytes": -8}, "negative"),
    ("dims", lambda o: {**o, "shape": [1] * 65, "nbytes": 4}, "65 dimensions"),
    ("nbytes", lambda o: {**o, "nbytes": 9}, "do not match shape"),
    ("huge", lambda o: {**o, "shape": [2**47], "nbytes": 2**47 * 4}, "absurdly large"),
    ("offset", lambda o: {**o, "offset": 4}, "offset 4"),
    ("offset-float", lambda o: {**o, "offset": 64.0}, "offset 64.0"),
    ("hash", lambda o: {**o, "hash": "A" * 32}, "lowercase hex"),
    ("hash-len", lambda o: {**o, "hash": "0" * 31}, "lowercase hex"),
    ("missing", lambda o: {k: v for k, v in o.items() if k != "hash"}, "exactly the fields"),
    ("extra", lambda o: {**o, "x": 1}, "exactly the fields"),
    ("not-dict", lambda o: [o], "got list"),
]


@pytest.mark.parametrize(("name", "mutate", "match"), BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_tensor_record_from_json_validates(
    name: str, mutate: Callable[[dict], object], match: str
) -> None:
    assert TensorRecord.from_json(GOOD.to_json(), source="m") == GOOD
    with pytest.raises(CorruptCheckpointError, match=rf"^m: .*{match}"):
        TensorRecord.from_json(mutate(GOOD.to_json()), source="m")


def test_read_tensors_refuses_invalid_records(storage: Storage) -> None:
    written(storage, {"w": torch.ones(2)})
    hostile = {"w": TensorRecord("../../etc/passwd", "F32", (2,), 8, 8, "0" * 32)}
    with pytest.raises(CorruptCheckpointError, match="outside the run directory"):
        read_tensors(storage, hostile)
    huge = {"w": TensorRecord(REL, "F32", (2**40,), 64, 2**42, "0" * 32)}
    with pytest.raises(CorruptCheckpointError, match=r"the file's header says .*shape \[2\]"):
        read_tensors(storage, huge)  # refused before allocating 4 TiB
    assert verify_file(storage, {"a": hostile["w"], "b": huge["w"]}) == ["a", "b"]


def big_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {
        "big": torch.randn((1 << 20) // 4 * 5 + 3),  # several read chunks, odd tail
        "small": torch.randn(10),
        "big16": torch.randn((1 << 20) + 1).half(),
    }


def spy_open_flags(monkeypatch: pytest.MonkeyPatch, refuse_direct: bool = False) -> list[int]:
    import haltpoint.store.tensor_reader as reader

    flags_seen: list[int] = []
    real_open = reader.os.open
    direct = getattr(reader.os, "O_DIRECT", 0)

    def fake_open(path: str, flags: int, *args: object) -> int:
        flags_seen.append(flags)
        if refuse_direct and flags & direct:
            raise OSError(22, "Invalid argument (as on tmpfs)")
        return real_open(path, flags, *args)

    monkeypatch.setattr(reader.os, "open", fake_open)
    return flags_seen


@pytest.mark.parametrize("refuse_direct", [False, True])
def test_large_tensors_read_exactly_with_or_without_o_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse_direct: bool
) -> None:
    storage = LocalStorage(tmp_path)
    saved = big_tensors()
    records = write_tensor_file(storage, "t.safetensors", saved)
    flags = spy_open_flags(monkeypatch, refuse_direct)
    out = read_tensors(storage, records)
    direct = getattr(__import__("os"), "O_DIRECT", 0)
    assert any(f & direct for f in flags) == bool(direct)  # O_DIRECT was tried
    for key, value in saved.items():
        assert torch.equal(out[key], value), key
        out[key].add_(1)  # writable, private memory
    again = read_tensors(storage, records)
    assert torch.equal(again["big"], saved["big"])


def test_damage_inside_a_large_tensor_is_found(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    records = write_tensor_file(storage, "t.safetensors", big_tensors())
    rec = records["big16"]
    with open(tmp_path / "t.safetensors", "r+b") as f:
        f.seek(rec.offset + rec.nbytes - 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'big16'.*hash"):
        read_tensors(storage, records)
    assert verify_file(storage, records) == ["big16"]
