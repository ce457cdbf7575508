"""Tests of haltpoint.state.tree: flattening a state into tensors plus a JSON tree, and back."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from haltpoint.errors import CorruptCheckpointError, UnsupportedStateError
from haltpoint.state.codec import TAG, decode_value
from haltpoint.state.tree import TENSOR_TAG, FlatState, flatten_state, unflatten_state
from test_state_codec import assert_same


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc(x)))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight


def round_trip(flat: FlatState) -> dict[str, Any]:
    """Unflatten after the tree went through strict JSON text."""
    tree = json.loads(json.dumps(flat.tree, allow_nan=False))
    return unflatten_state(tree, flat.tensors)


def content_keys(entry: dict[str, Any]) -> list[str]:
    """The keys of a tree entry's content, in their saved order (plain or as pairs)."""
    content = entry["content"]
    return [k for k, _ in content["items"]] if TAG in content else list(content)


def test_tree_layout_for_each_kind() -> None:
    model = nn.Linear(2, 1)
    flat = flatten_state({"model": model, "w": torch.zeros(2), "epoch": 7, "a": np.ones(2)})
    assert flat.tree["model"] == {
        "kind": "stateful",
        "type": "torch.nn.modules.linear.Linear",
        "container": "OrderedDict",
        "metadata": {"": {"version": 1}},
        "content": {  # out of sorted order: pairs, so that the order survives the manifest
            TAG: "dict",
            "items": [
                ["weight", {TENSOR_TAG: "model.weight"}],
                ["bias", {TENSOR_TAG: "model.bias"}],
            ],
        },
    }
    assert flat.tree["w"] == {
        "kind": "tensor",
        "type": "torch.Tensor",
        "content": {TENSOR_TAG: "w"},
    }
    assert flat.tree["epoch"] == {"kind": "value", "type": "int", "content": 7}
    assert flat.tree["a"] == {
        "kind": "tensor",
        "type": "numpy.ndarray",
        "content": {TENSOR_TAG: "a", "numpy": "<f8"},
    }
    json.dumps(flat.tree, allow_nan=False)


def test_optimizer_keys_are_readable_and_stable() -> None:
    model = Net()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    first = flatten_state({"model": model, "optimizer": opt})
    assert "model.fc.weight" in first.tensors
    assert "model.norm.num_batches_tracked" in first.tensors
    assert "optimizer.state.0.exp_avg" in first.tensors
    assert "optimizer.state.5.step" in first.tensors
    opt.step()
    second = flatten_state({"model": model, "optimizer": opt})
    assert list(second.tensors) == list(first.tensors)
    assert second.tree.keys() == first.tree.keys()
    assert second.tree["model"] == first.tree["model"]


def test_tensors_are_reported_exactly_as_found() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    transposed = base.t()
    half = torch.ones(2, dtype=torch.float16)
    flat = flatten_state({"t": transposed, "h": half})
    assert flat.tensors["t"] is transposed
    assert not flat.tensors["t"].is_contiguous()
    assert flat.tensors["h"] is half


def test_tied_weights_are_stored_once_and_come_back_tied() -> None:
    model = Tied()
    flat = flatten_state({"model": model})
    assert list(flat.tensors) == ["model.embed.weight"]
    assert flat.tree["model"]["content"]["out.weight"] == {TENSOR_TAG: "model.embed.weight"}
    saved = round_trip(flat)
    assert saved["model"]["out.weight"] is saved["model"]["embed.weight"]
    fresh = Tied()
    fresh.load_state_dict(saved["model"])
    assert torch.equal(fresh.out.weight, model.embed.weight)
    assert fresh.out.weight is fresh.embed.weight


def test_the_same_tensor_object_twice_is_stored_once() -> None:
    t = torch.randn(3)
    flat = flatten_state({"a": t, "b": {"again": t, "view": t.detach()}})
    assert list(flat.tensors) == ["a"]
    saved = round_trip(flat)
    assert saved["b"]["again"] is saved["a"]
    assert saved["b"]["view"] is saved["a"]


def test_distinct_views_of_one_storage_are_stored_separately() -> None:
    base = torch.arange(10.0)
    views = {
        "base": base,
        "tail": base[2:],
        "strided": base[::2],
        "shape": base.view(2, 5),
        "bits": base.view(torch.int32),
    }
    flat = flatten_state(views)
    assert list(flat.tensors) == list(views)
    saved = round_trip(flat)
    for name, view in views.items():
        assert_same(saved[name], view, name)


def test_conjugate_view_is_not_merged_with_its_base() -> None:
    z = torch.tensor([1 + 2j, 3 - 1j])
    flat = flatten_state({"z": z, "conj": z.conj()})
    assert list(flat.tensors) == ["z", "conj"]
    assert flat.tensors["conj"].is_conj()


def test_empty_tensors_are_not_merged() -> None:
    flat = flatten_state({"a": torch.empty(0), "b": torch.empty(0)})
    assert list(flat.tensors) == ["a", "b"]


def test_key_collisions_resolve_deterministically() -> None:
    state = {"a.b": torch.zeros(1), "a": {"b": torch.ones(1)}, "c": {"d": [torch.ones(2)]}}
    flat = flatten_state(state)
    assert list(flat.tensors) == ["a.b", "a.b#2", "c.d.0"]
    assert flat.tree["a"]["content"] == {"b": {TENSOR_TAG: "a.b#2"}}
    assert list(flatten_state(state).tensors) == list(flat.tensors)
    assert torch.equal(round_trip(flat)["a"]["b"], torch.ones(1))


def test_safetensors_reserved_name_is_avoided() -> None:
    flat = flatten_state({"__metadata__": torch.zeros(1)})
    assert list(flat.tensors) == ["__metadata__#2"]


NUMPY_ARRAYS = {
    "float32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "bool": np.array([True, False]),
    "uint32": np.arange(4, dtype=np.uint32),
    "uint64": np.array([2**64 - 1], dtype=np.uint64),
    "complex": np.array([1 + 1j], dtype=np.complex128),
    "big_endian": np.arange(3, dtype=">f4"),
    "reversed": np.arange(5)[::-1],
    "scalar": np.array(3.5),
    "readonly": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
    "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
}


@pytest.mark.parametrize("name", list(NUMPY_ARRAYS))
def test_numpy_arrays_come_back_as_arrays_of_the_same_dtype(name: str) -> None:
    array = NUMPY_ARRAYS[name]
    saved = round_trip(flatten_state({"x": array, "nested": {"y": [array]}}))
    assert_same(saved["x"], array)
    assert saved["nested"]["y"][0] is saved["x"]


def test_numpy_array_aliased_by_a_tensor_is_stored_once() -> None:
    array = np.arange(4.0)
    flat = flatten_state({"array": array, "tensor": torch.from_numpy(array)})
    assert list(flat.tensors) == ["array"]
    saved = round_trip(flat)
    assert isinstance(saved["array"], np.ndarray)
    assert isinstance(saved["tensor"], torch.Tensor)


def test_numpy_arrays_without_a_numeric_dtype_are_refused() -> None:
    with pytest.raises(UnsupportedStateError, match=r'state\["x"\]: numpy arrays of dtype object'):
        flatten_state({"x": np.array([object()])})
    with pytest.raises(UnsupportedStateError, match="dtype <U1 cannot be stored"):
        flatten_state({"x": np.array(["a"])})
    with pytest.raises(UnsupportedStateError, match="float128 have no torch equivalent"):
        flatten_state({"x": np.zeros(2, dtype=np.longdouble)})


def test_module_metadata_and_container_come_back() -> None:
    model = Net()
    saved = round_trip(flatten_state({"model": model}))
    assert_same(saved["model"], model.state_dict())
    assert saved["model"]._metadata == model.state_dict()._metadata


def test_plain_dict_state_dicts_stay_plain() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    flat = flatten_state({"optimizer": opt})
    assert "container" not in flat.tree["optimizer"]
    assert flat.tree["optimizer"]["content"][TAG] == "dict"  # "state" before "param_groups"
    saved = round_trip(flat)["optimizer"]
    assert_same(saved, opt.state_dict())
    assert list(saved) == ["state", "param_groups"]
    assert list(saved["param_groups"][0]) == list(opt.state_dict()["param_groups"][0])


def test_duck_typed_stateful_objects() -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 3

        def state_dict(self) -> dict[str, Any]:
            return {"n": self.n, "history": (1.5, float("nan"))}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.n = state["n"]

    flat = flatten_state({"counter": Counter()})
    assert flat.tree["counter"]["kind"] == "stateful"
    assert flat.tree["counter"]["type"].endswith("Counter")
    assert_same(round_trip(flat)["counter"], {"n": 3, "history": (1.5, float("nan"))})


def test_data_parallel_wrapper_is_unwrapped() -> None:
    model = Net()
    flat = flatten_state({"model": nn.DataParallel(model)})
    assert flat.tree["model"]["type"] == "test_state_tree.Net"
    assert all(k.startswith("model.") and "module" not in k for k in flat.tensors)
    assert content_keys(flat.tree["model"]) == list(model.state_dict())


def test_torch_compile_wrapper_is_unwrapped() -> None:
    model = Net()
    compiled = torch.compile(model)  # building the wrapper compiles nothing
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    flat = flatten_state({"model": compiled})
    assert content_keys(flat.tree["model"]) == list(model.state_dict())
    assert "model.fc.weight" in flat.tensors
    assert decode_value(flat.tree["model"]["metadata"]) == {
        k: dict(v) for k, v in model.state_dict()._metadata.items()
    }


def test_distributed_data_parallel_wrapper_is_unwrapped(tmp_path: Path) -> None:
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        model = Net()
        ddp = nn.parallel.DistributedDataParallel(nn.parallel.DistributedDataParallel(model))
        flat = flatten_state({"model": ddp})
    finally:
        dist.destroy_process_group()
    assert content_keys(flat.tree["model"]) == list(model.state_dict())


# -- argument errors and refusals ------------------------------------------------------------


def test_state_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="state must be a mapping of names to objects, got list"):
        flatten_state([nn.Linear(1, 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        (3, TypeError, r"state names must be non-empty strings, got 3 \(int\)"),
        (("a",), TypeError, r"got \('a',\) \(tuple\)"),
        ("", ValueError, "state names must be non-empty strings, got ''"),
    ],
)
def test_state_names_must_be_non_empty_strings(
    name: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        flatten_state({name: 1})


def _sparse_csr() -> torch.Tensor:
    return torch.eye(3).to_sparse_csr()


REFUSED_TENSORS = [
    (lambda: torch.eye(3).to_sparse(), r"a torch\.sparse_coo tensor.*`\.to_dense\(\)`"),
    (_sparse_csr, r"a torch\.sparse_csr tensor.*`\.to_dense\(\)`"),
    (
        lambda: torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8),
        r"a quantized tensor.*`\.dequantize\(\)`",
    ),
    (lambda: torch.empty(2, device="meta"), "a meta tensor.*materialize it"),
    (
        lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        r"a nested tensor.*unbind\(\)",
    ),
    (lambda: nn.LazyLinear(2).weight, r"an uninitialized \(lazy\) parameter.*forward pass"),
]


@pytest.mark.filterwarnings("ignore:.*(beta|deprecated|prototype):UserWarning")
@pytest.mark.parametrize(("make", "message"), REFUSED_TENSORS)
def test_unsupported_tensors_are_refused_with_their_path(make: Any, message: str) -> None:
    state = {"optimizer": {"state": {0: {"exp_avg": make()}}}}
    with pytest.raises(
        UnsupportedStateError,
        match=r'cannot save state\["optimizer"\]\["state"\]\[0\]\["exp_avg"\]: it is ' + message,
    ):
        flatten_state(state)


def test_tensor_subclasses_are_refused() -> None:
    class Tagged(torch.Tensor):
        pass

    tensor = torch.ones(2).as_subclass(Tagged)
    with pytest.raises(UnsupportedStateError, match=r"tensor subclass .*Tagged.*as_subclass"):
        flatten_state({"t": tensor})
    assert flatten_state({"p": nn.Parameter(torch.ones(2))}).tree["p"]["kind"] == "tensor"


def test_refusal_inside_an_optimizer_names_the_param_group() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    opt.param_groups[0]["foo"] = lambda epoch: epoch
    with pytest.raises(
        UnsupportedStateError,
        match=r'cannot save state\["optimizer"\]\["param_groups"\]\[0\]\["foo"\]: a value of '
        r"type 'function'.*rebuild it in code",
    ):
        flatten_state({"optimizer": opt})


def test_stateful_objects_nested_in_values_are_refused() -> None:
    with pytest.raises(UnsupportedStateError, match=r'state\["models"\]\[0\].*its own name'):
        flatten_state({"models": [nn.Linear(1, 1)]})


# -- unflatten errors ------------------------------------------------------------------------


def test_missing_tensor_is_a_corrupt_checkpoint() -> None:
    flat = flatten_state({"model": nn.Linear(1, 1)})
    tensors = dict(flat.tensors)
    del tensors["model.bias"]
    with pytest.raises(
        CorruptCheckpointError,
        match=r"references tensor 'model.bias' at tree\[\"model\"\]\[\"content\"\]\[\"bias\"\]",
    ):
        unflatten_state(flat.tree, tensors)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ([], "the state tree must be a JSON object, got list"),
        ({"a": 1}, r"malformed at tree\[\"a\"\]: expected an object with 'kind'"),
        ({"a": {"kind": "weird", "content": 1}}, "expected an object with 'kind'"),
        ({"a": {"kind": "value"}}, "and 'content'"),
        ({"a": {"kind": "tensor", "content": {TENSOR_TAG: 3}}}, "bad tensor reference"),
        ({"a": {"kind": "tensor", "content": {TENSOR_TAG: "t", "x": 1}}}, "bad tensor reference"),
        (
            {"a": {"kind": "tensor", "content": {TENSOR_TAG: "t", "numpy": "object"}}},
            "cannot make a numpy array of dtype 'object'.*the tensor holds float32",
        ),
        (
            {"a": {"kind": "stateful", "container": "OrderedDict", "content": [1]}},
            "an OrderedDict container holds a list",
        ),
    ],
)
def test_malformed_trees_are_corrupt_checkpoints(tree: Any, message: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=message):
        unflatten_state(tree, {"t": torch.ones(1)})


def test_unflatten_returns_ordered_dict_only_for_ordered_containers() -> None:
    flat = flatten_state({"model": nn.Linear(1, 1), "d": {"x": 1}})
    saved = unflatten_state(flat.tree, flat.tensors)
    assert type(saved["model"]) is OrderedDict
    assert type(saved["d"]) is dict
