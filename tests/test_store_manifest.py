"""Tests for haltpoint.store.manifest: canonical, checksummed, strictly decoded manifests."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import haltpoint.store.manifest as manifest_module
from haltpoint.errors import CorruptCheckpointError
from haltpoint.store.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    RANKING_KEY,
    SEQUENCE_KEY,
    Manifest,
    Ranking,
    next_sequence,
)
from haltpoint.store.tensor_file import TensorRecord

FILE = "step-000000007/tensors.safetensors"


def record(**changes: Any) -> TensorRecord:
    fields: dict[str, Any] = dict(file=FILE, dtype="F32", shape=(2, 3), offset=128, nbytes=24)
    fields["hash"] = "0123456789abcdef" * 2
    return TensorRecord(**{**fields, **changes})


def make(**changes: Any) -> Manifest:
    fields: dict[str, Any] = dict(
        step=7,
        time=1700000000.5,
        metrics={"val_loss": 0.25, "epoch": 7, "diverged": math.nan, "peak": -math.inf},
        tree={"model": {"w": {"$tensor": "model.w"}}, "lr": [0.1, None, True, "adam"]},
        tensors={"model.w": record(), "model.b": record(shape=(6,), offset=152)},
        versions={"haltpoint": "0.1.0", "torch": "2.13.0", "python": "3.11.9"},
        extra={"note": "ünïcode", "tags": ["a", "b"]},
    )
    return Manifest(**{**fields, **changes})


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def seal(body: dict[str, Any]) -> bytes:
    """What a (possibly malicious) writer that knows the format would produce for `body`."""
    checksum = xxhash.xxh3_128_hexdigest(canonical(body))
    return canonical({**body, "checksum": checksum}) + b"\n"


def body() -> dict[str, Any]:
    obj = json.loads(make().encode())
    del obj["checksum"]
    return obj  # type: ignore[no-any-return]


def same(a: Manifest, b: Manifest) -> bool:
    """Equality that treats NaN metrics as equal to themselves."""
    return a.encode() == b.encode() and a.tensors == b.tensors and a.tree == b.tree


# -- encoding ---------------------------------------------------------------------------------


def test_round_trip_and_sample() -> None:
    m = make()
    data = m.encode()
    back = Manifest.decode(data, source="run/step-000000007")
    assert same(back, m)
    assert back.metrics["epoch"] == 7 and isinstance(back.metrics["epoch"], int)
    assert math.isnan(back.metrics["diverged"]) and back.metrics["peak"] == -math.inf
    assert back.tensors["model.b"] == record(shape=(6,), offset=152)
    assert MANIFEST_NAME == "manifest.json" and back.format_version == FORMAT_VERSION == 1


def test_encoding_is_canonical_strict_ascii_json() -> None:
    data = make().encode()
    assert data.endswith(b"}\n") and data.count(b"\n") == 1 and data.isascii()
    obj = json.loads(data, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert list(obj) == sorted(obj)
    assert obj["metrics"]["diverged"] == {"$float": "nan"}
    assert obj["metrics"]["peak"] == {"$float": "-inf"}
    assert obj["checksum"] == xxhash.xxh3_128_hexdigest(
        canonical({k: v for k, v in obj.items() if k != "checksum"})
    )
    assert data == seal(body())


def test_encoding_does_not_depend_on_dict_order() -> None:
    m = make()
    shuffled = make(
        metrics=dict(reversed(m.metrics.items())),
        tensors=dict(reversed(m.tensors.items())),
        versions=dict(reversed(m.versions.items())),
    )
    assert shuffled.encode() == m.encode()


def test_checksum_is_the_recorded_one_and_tells_checkpoints_apart() -> None:
    """What the ranks of a restore compare (a run directory on each node's own disk)."""
    m = make()
    assert m.checksum == json.loads(m.encode())["checksum"]
    assert Manifest.decode(m.encode(), source="run/step-000000007").checksum == m.checksum
    assert make(time=m.time + 1).checksum != m.checksum


def test_nbytes_and_files() -> None:
    m = make(tensors={"a": record(), "b": record(file="step-000000001/x.safetensors")})
    assert m.nbytes == 48
    assert m.files() == {FILE, "step-000000001/x.safetensors"}
    assert make(tensors={}).nbytes == 0 and make(tensors={}).files() == set()


def test_int_time_is_stored_as_float() -> None:
    back = Manifest.decode(make(time=1700000000).encode(), source="s")
    assert back.time == 1700000000.0 and isinstance(back.time, float)


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"step": -1}, ValueError, "step must be a non-negative int"),
        ({"step": True}, ValueError, r"step must be a non-negative int below 2\*\*63, got True"),
        ({"step": 2**63}, ValueError, r"below 2\*\*63, got 9223372036854775808"),
        ({"step": 1.0}, ValueError, "step must be"),
        ({"time": math.nan}, ValueError, "time must be finite"),
        ({"time": "now"}, TypeError, "time must be a unix time"),
        ({"metrics": {"acc": True}}, TypeError, r"metrics\['acc'\] must be an int or float"),
        ({"metrics": {"acc": "0.9"}}, TypeError, r"metrics\['acc'\].*str"),
        ({"metrics": {1: 0.5}}, TypeError, "metrics must be a dict with str keys"),
        ({"tree": {"a": (1, 2)}}, TypeError, r"tree\['a'\] is a tuple"),
        ({"tree": {"a": [{"b": math.inf}]}}, ValueError, r"tree\['a'\]\[0\]\['b'\] is inf"),
        ({"tree": {"a": {1: 2}}}, TypeError, r"tree\['a'\] has the key 1"),
        ({"tree": {"a": b"x"}}, TypeError, r"tree\['a'\] is a bytes"),
        ({"extra": {"x": object()}}, TypeError, r"extra\['x'\] is a object"),
        ({"tree": [1]}, TypeError, "tree must be a dict"),
        ({"tensors": {"w": {"file": FILE}}}, TypeError, r"tensors\['w'\] is not a TensorRecord"),
        ({"versions": {"torch": 2}}, TypeError, "versions must map names to version strings"),
        ({"format_version": 0}, ValueError, "format_version must be a positive int"),
    ],
)
def test_encode_refuses_what_strict_json_cannot_hold(
    changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make(**changes).encode()


def test_numpy_scalars_are_accepted_as_metrics() -> None:
    metrics = {"loss": np.float32(0.5), "count": np.int64(3), "bad": np.float64("nan")}
    back = Manifest.decode(make(metrics=metrics).encode(), source="s")
    assert back.metrics["loss"] == 0.5 and type(back.metrics["loss"]) is float
    assert back.metrics["count"] == 3 and type(back.metrics["count"]) is int
    assert math.isnan(back.metrics["bad"])


# -- decoding damage --------------------------------------------------------------------------


def mutated(**fields: Any) -> bytes:
    return seal({**body(), **fields})


def without(name: str) -> bytes:
    return seal({k: v for k, v in body().items() if k != name})


def with_record(**fields: Any) -> bytes:
    b = body()
    b["tensors"]["model.w"].update(fields)
    return seal(b)


GOOD = make().encode()
DAMAGED: list[tuple[str, bytes, str]] = [
    ("empty", b"", r"not valid strict JSON"),
    ("not-utf8", b'{"a":"\xff"}', r"not valid strict JSON.*utf-8"),
    ("not-json", b"{", r"not valid strict JSON"),
    ("not-object", b"[]", r"top level is not a JSON object"),
    ("nan-literal", GOOD.replace(b'"step":7', b'"step":NaN'), r"constant NaN"),
    ("overflow", GOOD.replace(b'"step":7', b'"step":1e999'), r"overflows"),
    ("huge-int", GOOD.replace(b'"step":7', b'"step":' + b"9" * 5000), r"not valid strict JSON"),
    ("duplicate", GOOD.replace(b'"step":7', b'"step":7,"step":8'), r"duplicate key 'step'"),
    ("nested-dup", GOOD.replace(b'{"note"', b'{"note":1,"note"'), r"duplicate key 'note'"),
    ("no-checksum", canonical(body()), r"checksum field is missing"),
    ("bad-checksum", GOOD.replace(GOOD[13:45], b"0" * 32), r"checksum mismatch"),
    ("edited", GOOD.replace(b'"step":7', b'"step":8'), r"checksum mismatch"),
    ("pretty", json.dumps(json.loads(GOOD), indent=1, sort_keys=True).encode(), r"canonical"),
    ("no-newline", GOOD[:-1], r"not in canonical form"),
    ("crlf", GOOD[:-1] + b"\r\n", r"not in canonical form"),
    ("missing-field", without("versions"), r"missing \['versions'\]"),
    ("extra-field", mutated(owner="x"), r"unexpected \['owner'\]"),
    ("step-negative", mutated(step=-1), r"step -1 is not an int in \[0, 2\*\*63\)"),
    ("step-bool", mutated(step=True), r"step True is not"),
    ("step-float", mutated(step=7.0), r"step 7.0 is not"),
    ("step-string", mutated(step="7"), r"step '7' is not"),
    ("time-string", mutated(time="noon"), r"time 'noon' is not a unix time"),
    ("version-string", mutated(format_version="1"), r"format_version '1' is not"),
    ("version-zero", mutated(format_version=0), r"format_version 0 is not"),
    ("metrics-list", mutated(metrics=[1]), r"metrics is not a JSON object"),
    ("metric-string", mutated(metrics={"a": "1"}), r"metric 'a': '1' is not a number"),
    ("metric-bool", mutated(metrics={"a": False}), r"metric 'a': False"),
    ("metric-bad-tag", mutated(metrics={"a": {"$float": "NaN"}}), r"metric 'a'"),
    ("metric-extra-tag", mutated(metrics={"a": {"$float": "inf", "x": 1}}), r"metric 'a'"),
    ("tree-list", mutated(tree=[]), r"tree is not a JSON object"),
    ("tensors-list", mutated(tensors=[]), r"tensors is not a JSON object"),
    ("versions-int", mutated(versions={"torch": 2}), r"versions holds a value"),
    ("extra-null", mutated(extra=None), r"extra is not a JSON object"),
    ("record-absolute", with_record(file="/etc/passwd"), r"tensor 'model.w'.*outside the run"),
    ("record-dotdot", with_record(file="a/../../b"), r"outside the run directory"),
    ("record-backslash", with_record(file="a\\..\\b"), r"outside the run directory"),
    ("record-negative", with_record(shape=[-2, -3]), r"negative"),
    ("record-dims", with_record(shape=[1] * 65, nbytes=4), r"65 dimensions"),
    ("record-nbytes", with_record(nbytes=25), r"25 bytes do not match shape \[2, 3\]"),
    ("record-huge", with_record(shape=[2**47], nbytes=2**49), r"absurdly large"),
    ("record-dtype", with_record(dtype="F128"), r"unknown dtype 'F128'"),
    ("record-hash", with_record(hash="xyz"), r"lowercase hex"),
    ("record-fields", with_record(crc=1), r"exactly the fields"),
]


@pytest.mark.parametrize(("name", "data", "match"), DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_manifests_are_refused(name: str, data: bytes, match: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        Manifest.decode(data, source="run/step-000000007")
    assert info.value.path == "run/step-000000007"
    assert "manifest run/step-000000007" in str(info.value)
    assert "which=STEP" in str(info.value)


def test_newer_format_says_to_upgrade() -> None:
    newer = mutated(format_version=FORMAT_VERSION + 1, new_field={"x": 1})
    with pytest.raises(CorruptCheckpointError, match=r"newer haltpoint; upgrade haltpoint") as info:
        Manifest.decode(newer, source="s")
    assert "damaged" not in str(info.value)
    flipped = newer.replace(b'"step":7', b'"step":6')
    with pytest.raises(CorruptCheckpointError, match=r"\(or the manifest is damaged\); upgrade"):
        Manifest.decode(flipped, source="s")


def test_oversized_manifests_are_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert manifest_module.MAX_MANIFEST_BYTES == 64 << 20
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", len(GOOD) - 1)
    with pytest.raises(CorruptCheckpointError, match=rf"{len(GOOD)} bytes is over the"):
        Manifest.decode(GOOD, source="s")


def test_deep_nesting_is_refused() -> None:
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(CorruptCheckpointError, match="recursion"):
        Manifest.decode(deep, source="s")


def test_decode_takes_bytes_like_only() -> None:
    assert same(Manifest.decode(memoryview(GOOD), source="s"), make())
    assert same(Manifest.decode(bytearray(GOOD), source="s"), make())
    with pytest.raises(TypeError, match="data must be bytes, got str"):
        Manifest.decode(GOOD.decode(), source="s")  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_bit_flip_is_detected(data: st.DataObject) -> None:
    bits = data.draw(st.sets(st.integers(0, len(GOOD) * 8 - 1), min_size=1, max_size=4))
    damaged = bytearray(GOOD)
    for bit in bits:
        damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptCheckpointError):
        Manifest.decode(bytes(damaged), source="s")


@settings(deadline=None)
@given(st.integers(0, len(GOOD) - 1))
def test_any_truncation_is_detected(cut: int) -> None:
    with pytest.raises(CorruptCheckpointError):
        Manifest.decode(GOOD[:cut], source="s")


# -- hypothesis round trip --------------------------------------------------------------------

json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=16,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
metric_values = st.integers(-(2**60), 2**60) | st.floats()  # NaN and +-inf included
dtypes = st.sampled_from(["F32", "BF16", "U8", "BOOL", "F8_E4M3", "I64", "C64"])
itemsize = {"F32": 4, "BF16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "I64": 8, "C64": 8}


@st.composite
def records(draw: Callable[..., Any]) -> TensorRecord:
    dtype = draw(dtypes)
    shape = tuple(draw(st.lists(st.integers(0, 64), max_size=4)))
    nbytes = math.prod(shape) * itemsize[dtype]
    folder = draw(st.integers(0, 10**9 - 1))
    return TensorRecord(
        file=f"step-{folder:09d}/{draw(st.sampled_from(['tensors', 'shard-0']))}.safetensors",
        dtype=dtype,
        shape=shape,
        offset=draw(st.integers(8, 2**40)),
        nbytes=nbytes,
        hash=draw(st.text("0123456789abcdef", min_size=32, max_size=32)),
    )


# `extra` is free JSON except for its "ranking" key, which is the writer's monitor and mode,
# and its "sequence" key, the commit order (Hypothesis draws the keys from the module's own
# string constants): any other value under them is refused, so the strategy draws a well-formed
# value there or none.
rankings = st.fixed_dictionaries(
    {
        "monitor": st.none() | st.text(min_size=1, max_size=8),
        "mode": st.sampled_from(["min", "max"]),
    }
)
extras = st.builds(
    lambda free, ranking, sequence: (
        {k: v for k, v in free.items() if k not in (RANKING_KEY, SEQUENCE_KEY)}
        | ({} if ranking is None else {RANKING_KEY: ranking})
        | ({} if sequence is None else {SEQUENCE_KEY: sequence})
    ),
    json_objects,
    st.none() | rankings,
    st.none() | st.integers(0, 2**63 - 1),
)

manifests = st.builds(
    Manifest,
    step=st.integers(0, 2**62),
    time=st.floats(0, 4e9),
    metrics=st.dictionaries(st.text(max_size=10), metric_values, max_size=5),
    tree=json_objects,
    tensors=st.dictionaries(st.text(min_size=1, max_size=10), records(), max_size=5),
    versions=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    extra=extras,
)


@settings(max_examples=200, deadline=None)
@given(manifests)
def test_hypothesis_round_trip(m: Manifest) -> None:
    data = m.encode()
    back = Manifest.decode(data, source="s")
    assert back.encode() == data
    assert (back.step, back.time, back.tree, back.extra) == (m.step, m.time, m.tree, m.extra)
    assert back.tensors == m.tensors and back.versions == m.versions
    assert set(back.metrics) == set(m.metrics)
    for key, value in m.metrics.items():
        assert back.metrics[key] == value or (math.isnan(value) and math.isnan(back.metrics[key]))
    assert back.nbytes == m.nbytes and back.files() == m.files()


# -- the writer's ranking ---------------------------------------------------------------------


def test_the_ranking_is_read_from_extra_and_absent_in_older_manifests() -> None:
    assert Manifest.decode(GOOD, source="m").ranking is None  # an older haltpoint's manifest
    recorded = make(extra={"ranking": {"monitor": "val_acc", "mode": "max"}}).encode()
    assert Manifest.decode(recorded, source="m").ranking == Ranking("val_acc", "max")
    unranked = make(extra={"ranking": {"monitor": None, "mode": "min"}}).encode()
    assert Manifest.decode(unranked, source="m").ranking == Ranking(None, "min")


@pytest.mark.parametrize(
    "ranking",
    [
        {"monitor": "val_loss"},
        {"monitor": "val_loss", "mode": "auto"},
        {"monitor": "", "mode": "min"},
        {"monitor": 3, "mode": "min"},
        {"monitor": "val_loss", "mode": "min", "other": 1},
        ["val_loss", "min"],
    ],
)
def test_a_malformed_ranking_is_a_damaged_manifest(ranking: object) -> None:
    data = mutated(extra={"ranking": ranking})
    with pytest.raises(CorruptCheckpointError, match=r"extra\['ranking'\] needs a monitor"):
        Manifest.decode(data, source="m")


# -- the commit order --------------------------------------------------------------------------


def test_the_sequence_is_read_from_extra_and_absent_in_older_manifests() -> None:
    assert Manifest.decode(GOOD, source="m").sequence is None  # an older haltpoint's manifest
    for sequence in (0, 41, 2**63 - 1):
        data = make(extra={SEQUENCE_KEY: sequence}).encode()
        assert Manifest.decode(data, source="m").sequence == sequence


BAD_SEQUENCES = [-1, 2**63, True, False, 3.0, "3", None, [3], {"n": 3}]


@pytest.mark.parametrize("sequence", BAD_SEQUENCES, ids=repr)
def test_a_malformed_sequence_is_a_damaged_manifest(sequence: object) -> None:
    data = mutated(extra={SEQUENCE_KEY: sequence})
    with pytest.raises(
        manifest_module.DamagedManifestError,
        match=r"^manifest m: extra\['sequence'\] must be an int in \[0, 2\*\*63\)",
    ):
        Manifest.decode(data, source="m")


@pytest.mark.parametrize("sequence", BAD_SEQUENCES, ids=repr)
def test_encode_refuses_a_malformed_sequence(sequence: object) -> None:
    with pytest.raises(ValueError, match=r"extra\['sequence'\] must be an int"):
        make(extra={SEQUENCE_KEY: sequence}).encode()


@pytest.mark.parametrize(
    ("sequences", "expected"),
    [
        ([], 0),  # a fresh run
        ([None, None], 0),  # an older haltpoint's run: the first recorded one is 0
        ([0, 1, 2], 3),
        ([None, 4, 1], 5),  # one more than the highest, whatever the step order
    ],
)
def test_next_sequence_is_one_more_than_the_highest_recorded(
    sequences: list[int | None], expected: int
) -> None:
    manifests = [
        make(step=i, extra={} if s is None else {SEQUENCE_KEY: s}) for i, s in enumerate(sequences)
    ]
    assert next_sequence(manifests) == expected


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("MAX_MANIFEST_CONTAINERS", "JSON containers is over the limit of 5"),
        ("MAX_MANIFEST_VALUES", "JSON values is over the limit of 5"),
    ],
)
def test_element_counts_are_refused_before_parsing(
    monkeypatch: pytest.MonkeyPatch, limit: str, message: str
) -> None:
    monkeypatch.setattr(manifest_module, limit, 5)

    def never(text: Any) -> Any:
        raise AssertionError("parsed")

    monkeypatch.setattr(manifest_module, "strict_loads", never)
    with pytest.raises(CorruptCheckpointError, match=message):
        Manifest.decode(GOOD, source="s")


def test_the_limits_hold_a_checkpoint_of_200_000_tensors() -> None:
    per_tensor = (310, 6.3, 11.7)  # bytes, containers, commas: measured, docs/format.md
    limits = (
        manifest_module.MAX_MANIFEST_BYTES,
        manifest_module.MAX_MANIFEST_CONTAINERS,
        manifest_module.MAX_MANIFEST_VALUES,
    )
    assert all(limit >= 200_000 * need for limit, need in zip(limits, per_tensor, strict=True))
