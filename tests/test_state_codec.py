"""Tests of haltpoint.state.codec: typed JSON for the non-tensor leaves of a state.

`assert_same` lives here and is imported by the other state tests.
"""

from __future__ import annotations

import collections
import enum
import json
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from typing import Any

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from haltpoint.errors import CorruptCheckpointError, UnsupportedStateError
from haltpoint.state.codec import TAG, TENSOR_TAG, decode_value, encode_value
from haltpoint.state.tree import flatten_state, unflatten_state


def assert_same(actual: Any, expected: Any, path: str = "value") -> None:
    """Assert equal values of identical types, recursively; nan equals nan, -0.0 is not 0.0."""
    assert type(actual) is type(expected), f"{path}: {type(actual)} is not {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype, path
        assert actual.device == expected.device, path
        assert torch.equal(actual, expected), path
    elif isinstance(expected, np.ndarray):
        assert actual.dtype == expected.dtype, path
        np.testing.assert_array_equal(actual, expected, err_msg=path)
    elif isinstance(expected, (float, np.floating)):
        _assert_same_float(float(actual), float(expected), path)
    elif isinstance(expected, (complex, np.complexfloating)):
        _assert_same_float(actual.real, expected.real, path + ".real")
        _assert_same_float(actual.imag, expected.imag, path + ".imag")
    elif isinstance(expected, Mapping):
        assert len(actual) == len(expected), path
        for (ka, va), (ke, ve) in zip(actual.items(), expected.items(), strict=True):
            assert_same(ka, ke, f"{path} key")
            assert_same(va, ve, f"{path}[{ke!r}]")
        assert getattr(actual, "_metadata", None) == getattr(expected, "_metadata", None), path
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, path


def _assert_same_float(actual: float, expected: float, path: str) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), path
    else:
        assert actual == expected, path
        assert math.copysign(1, actual) == math.copysign(1, expected), f"{path}: sign of zero"


def through_json(value: Any) -> Any:
    """Encode, write strict JSON text, read it back and decode."""
    text = json.dumps(encode_value(value, "state"), allow_nan=False)
    return decode_value(json.loads(text))


# -- round trips -----------------------------------------------------------------------------

CASES: list[Any] = [
    None,
    True,
    False,
    0,
    -7,
    2**63 - 1,
    -(2**63) + 1,
    2**63,
    -(2**63),
    10**5000,  # beyond Python's 4300-digit int/str conversion limit
    1.5,
    0.1,
    -0.0,
    0.0,
    float("nan"),
    float("inf"),
    float("-inf"),
    5e-324,
    1.7976931348623157e308,
    complex(1, -0.0),
    complex(float("nan"), float("inf")),
    "",
    "naïve \u2603 \x00",
    b"",
    b"\x00\xff binary",
    bytearray(b"\x01\x02"),
    [],
    (),
    (1,),
    [1, (2.5, "x"), [None]],
    {},
    {"lr": 0.1, "betas": (0.9, 0.999), "amsgrad": False, "foreach": None},
    {0: {"step": 3}, 1: {"step": 4}},
    {(1, "a"): "tuple key", frozenset({1}): "frozenset key", None: 0, 2.5: "float key"},
    {1: "int", "1": "str"},
    {TAG: "not a tag", "x": 1},
    {TENSOR_TAG: "not a tensor", "y": [1]},
    {"nested": {TAG: {TAG: 1}}},
    OrderedDict([("b", 1), ("a", 2)]),
    {"od": OrderedDict([(3, "x")])},
    Counter({30: 1, 60: 2}),  # MultiStepLR's milestones
    {"milestones": Counter()},
    {3, 1, 2},
    frozenset({"b", "a"}),
    {(1, 2), "x", None, b"y", 3},
    set(),
    torch.float32,
    torch.bfloat16,
    torch.uint32,
    torch.complex64,
    torch.device("cpu"),
    torch.device("cuda", 1),
    torch.device("meta"),
    torch.Size([2, 3]),
    torch.Size([]),
    np.float32(1.1),
    np.float16(-0.0),
    np.float64("nan"),
    np.int8(-5),
    np.uint64(2**64 - 1),
    np.int64(-(2**63)),
    np.bool_(True),
    np.complex64(1 - 2j),
    np.uint16(7),
]


def _case_id(value: Any) -> str:
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**20 else "big"
    return f"{type(value).__name__}:{text}"[:60]


@pytest.mark.parametrize("value", CASES, ids=_case_id)
def test_round_trip_preserves_value_and_type(value: Any) -> None:
    assert_same(through_json(value), value)


def test_plain_json_stays_plain() -> None:
    value = {"lr": 0.1, "name": "adam", "none": None, "on": True, "steps": [1, 2]}  # sorted
    assert encode_value(value, "state") == value


def test_key_order_survives_a_writer_that_sorts_keys() -> None:
    value = {"step": 3, "exp_avg": [0.5], "nested": {"lr": 0.1, "betas": (0.9, 0.99)}}
    text = json.dumps(encode_value(value, "state"), sort_keys=True)  # as the manifest does
    decoded = decode_value(json.loads(text))
    assert list(decoded) == ["step", "exp_avg", "nested"]
    assert list(decoded["nested"]) == ["lr", "betas"]
    assert_same(decoded, value)


def test_plain_objects_written_sorted_still_decode() -> None:
    assert list(decode_value({"a": 1, "b": 2})) == ["a", "b"]  # manifests before the order


def test_tags_read_as_documented() -> None:
    assert encode_value((1, 2), "s") == {TAG: "tuple", "items": [1, 2]}
    assert encode_value(float("-inf"), "s") == {TAG: "float", "v": "-inf"}
    assert encode_value(2**64, "s") == {TAG: "int", "v": "0x10000000000000000"}
    assert encode_value(b"hi", "s") == {TAG: "bytes", "b64": "aGk="}
    assert encode_value({2: "x"}, "s") == {TAG: "dict", "items": [[2, "x"]]}
    assert encode_value(torch.float16, "s") == {TAG: "torch.dtype", "v": "float16"}
    assert encode_value(np.float32(2.5), "s") == {TAG: "numpy", "dtype": "float32", "v": 2.5}
    assert encode_value({3, 1}, "s") == {TAG: "set", "items": [1, 3]}


def test_sets_encode_deterministically() -> None:
    a = encode_value({"b", 1, (2, 3), None}, "s")
    b = encode_value({None, (2, 3), 1, "b"}, "s")
    assert json.dumps(a) == json.dumps(b)


# -- hypothesis property ---------------------------------------------------------------------

NUMPY_DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]
NUMPY_DTYPES += ["float16", "float32", "float64", "complex64", "complex128"]
numpy_scalars = st.sampled_from(NUMPY_DTYPES).flatmap(
    lambda name: hnp.from_dtype(np.dtype(name)).map(np.dtype(name).type)
)
hashables = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=5,
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats()
    | st.complex_numbers()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.binary(max_size=8).map(bytearray)
    | st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.uint8])
    | st.sampled_from([torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda")])
    | st.lists(st.integers(0, 9), max_size=4).map(torch.Size)
    | numpy_scalars
)
str_keys = st.text(max_size=6) | st.sampled_from([TAG, TENSOR_TAG])


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(str_keys, inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.dictionaries(str_keys, inner, max_size=4).map(lambda d: OrderedDict(d))
        | st.dictionaries(hashables, inner, max_size=4).map(Counter)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
    )


values = st.recursive(leaves, containers, max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(values)
def test_round_trip_property(value: Any) -> None:
    encoded = encode_value(value, "state")
    text = json.dumps(encoded, allow_nan=False)
    assert json.loads(text) == encoded  # only JSON types: no tuples, no non-string keys
    assert_same(decode_value(json.loads(text)), value)


# -- refusals --------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 1


Point = collections.namedtuple("Point", "x y")


class Thing:
    pass


def named_function() -> None:
    pass


REFUSALS = [
    (lambda: 1, "function", "rebuild it in code"),
    (named_function, "function", "rebuild it in code"),
    (Thing(), "test_state_codec.Thing", "convert it to a supported value"),
    (Color.RED, "test_state_codec.Color", r"store its `\.value`"),
    (Level.LOW, "test_state_codec.Level", r"store its `\.value`"),
    (Point(1, 2), "test_state_codec.Point", r"_asdict\(\)"),
    (collections.defaultdict(int), "collections.defaultdict", r"`dict\(value\)`"),
    (torch.ones(1), "torch.Tensor", "stored by flatten_state"),
    (np.zeros(2), "numpy.ndarray", "stored by flatten_state"),
    (torch.nn.Linear(1, 1), "torch.nn.modules.linear.Linear", "its own name"),
    (np.longdouble(1), "numpy.longdouble", "convert it to a supported value"),
    (np.datetime64("2020-01-01"), "numpy.datetime64", "convert it to a supported value"),
    (np.str_("x"), "numpy.str_", "convert it to a supported value"),
    (iter([]), "list_iterator", "convert it to a supported value"),
]


@pytest.mark.parametrize(("value", "type_name", "hint"), REFUSALS)
def test_refusal_names_path_type_and_remedy(value: Any, type_name: str, hint: str) -> None:
    state = {"optimizer": {"param_groups": [{"lr": 0.1, "foo": value}]}}
    with pytest.raises(UnsupportedStateError) as info:
        encode_value(state, "state")
    message = str(info.value)
    assert 'cannot save state["optimizer"]["param_groups"][0]["foo"]' in message
    assert f"{type_name!r}" in message
    with pytest.raises(UnsupportedStateError, match=hint):
        encode_value(value, "s")


def test_refusal_inside_a_set_and_a_dict_key() -> None:
    with pytest.raises(UnsupportedStateError, match=r"an element of state\[\"s\"\].*Color"):
        encode_value({"s": {Color.RED}}, "state")
    with pytest.raises(UnsupportedStateError, match=r"the key .* of state\[\"d\"\].*Color"):
        encode_value({"d": {Color.RED: 1}}, "state")


def test_refuses_reference_cycles() -> None:
    loop: list[Any] = [1]
    loop.append({"again": loop})
    with pytest.raises(UnsupportedStateError, match=r'state\[1\]\["again"\]: it contains itself'):
        encode_value(loop, "state")


def test_shared_subvalues_are_not_cycles() -> None:
    shared = [1, 2]
    assert through_json({"a": shared, "b": shared}) == {"a": [1, 2], "b": [1, 2]}


def test_tensor_hook_replaces_tensors_and_arrays() -> None:
    seen: list[tuple[str, tuple[str, ...]]] = []

    def hook(value: Any, path: str, parts: tuple[str, ...]) -> dict[str, Any]:
        seen.append((path, parts))
        return {TENSOR_TAG: ".".join(parts)}

    value = {"state": {0: {"exp_avg": torch.ones(1)}}, "x": [np.ones(1)]}
    encoded = encode_value(value, "state", on_tensor=hook)
    assert seen == [
        ('state["state"][0]["exp_avg"]', ("state", "0", "exp_avg")),
        ('state["x"][0]', ("x", "0")),
    ]
    decoded = decode_value(encoded, on_tensor=lambda ref, where: ref[TENSOR_TAG])
    assert decoded == {"state": {0: {"exp_avg": "state.0.exp_avg"}}, "x": ["x.0"]}


# -- malformed input -------------------------------------------------------------------------

MALFORMED = [
    ({TAG: "nope", "v": 1}, "unknown or malformed tagged object"),
    ({TAG: "tuple", "items": [], "extra": 1}, "unknown or malformed"),
    ({TAG: "tuple", "items": "abc"}, "'items' must be a list"),
    ({TAG: "float", "v": "huge"}, "cannot decode"),
    ({TAG: "int", "v": "zz"}, "cannot decode"),
    ({TAG: "bytes", "b64": "***"}, "cannot decode"),
    ({TAG: "torch.dtype", "v": "nn"}, "cannot decode"),
    ({TAG: "torch.dtype", "v": "ones"}, "is not the name of a torch dtype"),
    ({TAG: "torch.device", "v": "cuda:256"}, "index torch cannot hold \\(it reads cuda:0\\)"),
    ({TAG: "torch.device", "v": "cuda:9999"}, "index torch cannot hold \\(it reads cuda:15\\)"),
    ({TAG: "torch.device", "v": "cuda:128"}, "index torch cannot hold"),
    ({TAG: "numpy", "dtype": "object", "v": 1}, "unsupported numpy scalar"),
    ({TAG: "dict", "items": [[1]]}, r"\[key, value\] pair"),
    ({TAG: "dict", "items": [[[1], 2]]}, "cannot decode"),
    ({TAG: "torch.Size", "items": [1.5]}, "expected an int"),
    ({TAG: "complex", "v": ["a", 1.0]}, "the parts of a complex must be floats"),
    ({TAG: ["x"], "v": 1}, "is not a string"),
    ({TENSOR_TAG: "w"}, "only be decoded by unflatten_state"),
    ((1, 2), "tuple is not JSON"),
]


@pytest.mark.parametrize(("obj", "message"), MALFORMED)
def test_malformed_input_is_a_corrupt_checkpoint(obj: Any, message: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=message):
        decode_value({"a": [obj]}, where="tree")


def test_malformed_input_names_its_location() -> None:
    with pytest.raises(CorruptCheckpointError, match=r'malformed at tree\["a"\]\[0\]'):
        decode_value({"a": [{TAG: "nope", "v": 1}]}, where="tree")


def _nested(kind: str, depth: int, leaf: Any) -> Any:
    if kind == "dict-key":  # keys are encoded by an encoder of their own
        return {_nested("tuple", depth - 1, leaf): 0}
    value = leaf
    for _ in range(depth):
        value = {
            "dict": lambda v: {"a": v},
            "list": lambda v: [v],
            "tuple": lambda v: (v,),
            "OrderedDict": lambda v: OrderedDict(b=v),
            "frozenset": lambda v: frozenset([v]),
        }[kind](value)
    return value


@pytest.mark.parametrize("kind", ["dict", "list", "tuple", "OrderedDict", "dict-key", "frozenset"])
def test_what_saves_at_any_depth_reads_back_and_deeper_is_refused_in_one_line(kind: str) -> None:
    """A state nested 500 deep used to fail with a RecursionError traceback; one just under the
    reader's limit must not be written and then refused at every restore."""
    leaves = [1, math.inf, torch.ones(1)] if kind not in ("dict-key", "frozenset") else [1, 2.5]
    for leaf in leaves:
        saved = 0
        for depth in [*range(50, 70), 500]:
            state = {"entry": _nested(kind, depth, leaf)}
            try:
                flat = flatten_state(state)
            except UnsupportedStateError as exc:
                assert "containers nest deeper than 60 levels" in str(exc)
                assert "\n" not in str(exc)
                continue
            back = unflatten_state(json.loads(json.dumps(flat.tree)), flat.tensors)
            assert repr(back) == repr(state)
            saved = depth
        assert 55 <= saved < 70  # refused only near the limit
