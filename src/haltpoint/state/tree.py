"""Flatten a training state into tensors plus a typed JSON tree, and back.

The tree has one entry per top-level name of the state::

    {"model": {"kind": "stateful", "type": "torch.nn.modules.linear.Linear",
               "container": "OrderedDict", "metadata": {"": {"version": 1}},
               "content": {"__hp__": "dict",  # keys out of sorted order: kept as pairs
                           "items": [["weight", {"__tensor__": "model.weight"}],
                                     ["bias", {"__tensor__": "model.bias"}]]}},
     "epoch": {"kind": "value", "type": "int", "content": 7}}

``kind`` is ``"stateful"`` (an object with ``state_dict()``; ``content`` is its encoded state
dict), ``"tensor"`` (a tensor or numpy array) or ``"value"`` (anything the codec encodes).
``type`` is informational. Tensors become ``{"__tensor__": key}`` references (numpy arrays
add ``"numpy": dtype``); the key is the dotted path of the tensor in the state, so the same
state gives the same keys on every save.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]

from haltpoint.errors import CorruptCheckpointError, UnsupportedStateError
from haltpoint.state._common import child_path, is_stateful, type_name, unwrap_module
from haltpoint.state.codec import TENSOR_TAG, decode_value, encode_value

__all__ = [
    "KINDS",
    "TENSOR_TAG",
    "FlatState",
    "check_tree",
    "claimed_state",
    "flatten_state",
    "referenced_tensors",
    "unflatten_state",
]

KINDS = ("stateful", "tensor", "value")
"""The kinds of tree entries."""
_NUMPY_KEY = "numpy"
_TAKEN = frozenset({"__metadata__"})  # reserved by the safetensors header


@dataclass(frozen=True)
class FlatState:
    """A state split into a strict-JSON ``tree`` and the ``tensors`` it references by key.

    >>> flat = flatten_state({"w": torch.ones(2), "epoch": 3})
    >>> flat.tree["w"]["content"], list(flat.tensors)
    ({'__tensor__': 'w'}, ['w'])
    """

    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def flatten_state(state: Mapping[str, Any]) -> FlatState:
    """Split ``state`` into a JSON tree and the tensors it holds, exactly as found.

    Modules are unwrapped from DDP/DataParallel and ``torch.compile`` first, so their keys
    carry no ``module.`` / ``_orig_mod.`` prefix. A tensor seen twice (tied weights, or the
    same view of one storage) is stored once and referenced twice.

    Raises:
        TypeError, ValueError: ``state`` is not a mapping with non-empty string names.
        UnsupportedStateError: a part of the state cannot be stored without pickling.

    >>> model = torch.nn.Linear(2, 1)
    >>> flat = flatten_state({"model": model, "epoch": 7})
    >>> sorted(flat.tensors), flat.tree["epoch"]
    (['model.bias', 'model.weight'], {'kind': 'value', 'type': 'int', 'content': 7})
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a mapping of names to objects, got {type_name(state)}; wrap the "
            'objects in a dict, e.g. {"model": model, "optimizer": optimizer}'
        )
    tensors = _Tensors()
    tree: dict[str, Any] = {}
    for name, obj in state.items():
        _check_name(name)
        path = child_path("state", name)
        hook = tensors.hook(name)
        if is_stateful(obj):
            target = unwrap_module(obj) if isinstance(obj, nn.Module) else obj
            tree[name] = _stateful_entry(target, target.state_dict(), path, hook)
        elif isinstance(obj, (torch.Tensor, np.ndarray)):
            tree[name] = {"kind": "tensor", "type": type_name(obj), "content": hook(obj, path, ())}
        else:
            content = encode_value(obj, path, on_tensor=hook)
            tree[name] = {"kind": "value", "type": type_name(obj), "content": content}
    return FlatState(tree=tree, tensors=tensors.tensors)


def unflatten_state(tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rebuild the saved values of a state from its ``tree`` and ``tensors``.

    Stateful entries come back as their state dicts (an ``OrderedDict`` with ``_metadata``
    for modules), tensors as the given tensor objects (one object per key, however often it
    is referenced), numpy arrays as arrays of their saved dtype, values as themselves.

    Raises:
        CorruptCheckpointError: the tree is malformed or references a missing tensor.

    >>> flat = flatten_state({"model": torch.nn.Linear(2, 1), "epoch": 7})
    >>> saved = unflatten_state(flat.tree, flat.tensors)
    >>> list(saved["model"]), saved["epoch"]
    (['weight', 'bias'], 7)
    """
    if not isinstance(tree, Mapping):
        raise CorruptCheckpointError(f"the state tree must be a JSON object, got {type_name(tree)}")
    resolver = _Resolver(tensors)
    return {name: _entry_value(name, entry, resolver) for name, entry in tree.items()}


def check_tree(tree: Mapping[str, Any], dtypes: Mapping[str, torch.dtype]) -> dict[str, Any]:
    """Check that `unflatten_state` can rebuild ``tree`` from tensors of these ``dtypes``
    (by key), without reading them: every field decodes, every reference names a tensor.

    Returns the saved values as `unflatten_state` would, with one placeholder object in
    place of every tensor and array (for checks of their structure).

    Raises:
        CorruptCheckpointError: naming the field that is malformed.

    >>> flat = flatten_state({"model": torch.nn.Linear(2, 1), "epoch": 7})
    >>> sorted(check_tree(flat.tree, {"model.weight": torch.float32, "model.bias": torch.float32}))
    ['epoch', 'model']
    >>> check_tree(flat.tree, {})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    haltpoint.errors.CorruptCheckpointError: the state tree references tensor 'model.weight' ...
    """
    if not isinstance(tree, Mapping):
        raise CorruptCheckpointError(f"the state tree must be a JSON object, got {type_name(tree)}")
    refs = _RefCheck(dtypes)
    return {name: _entry_value(name, entry, refs) for name, entry in tree.items()}


def claimed_state(
    tree: Mapping[str, Any], claims: Mapping[str, tuple[tuple[int, ...], torch.dtype]]
) -> dict[str, Any]:
    """The saved values `unflatten_state` would rebuild from ``tree``, before any tensor is
    read: in place of each tensor a meta tensor (no data) of the shape and dtype that
    ``claims`` (by key) says the checkpoint holds, in place of each numpy array a read-only
    one of that shape and dtype that takes no memory (a broadcast zero). For checking what a
    checkpoint claims against the live objects before reading it (`state.load.check_claims`).

    Raises:
        CorruptCheckpointError: as `unflatten_state`.

    >>> flat = flatten_state({"model": torch.nn.Linear(2, 1)})
    >>> claims = {k: (tuple(t.shape), t.dtype) for k, t in flat.tensors.items()}
    >>> claimed_state(flat.tree, claims)["model"]["weight"]
    tensor(..., device='meta', size=(1, 2))
    """
    if not isinstance(tree, Mapping):
        raise CorruptCheckpointError(f"the state tree must be a JSON object, got {type_name(tree)}")
    resolver = _Claims(claims)
    return {name: _entry_value(name, entry, resolver) for name, entry in tree.items()}


def referenced_tensors(value: Any) -> set[str]:
    """The tensor keys that a tree entry (JSON) references.

    >>> flat = flatten_state({"model": torch.nn.Linear(2, 1)})
    >>> sorted(referenced_tensors(flat.tree["model"]))
    ['model.bias', 'model.weight']
    """
    keys, stack = set(), [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict) and isinstance(node.get(TENSOR_TAG), str):
            keys.add(node[TENSOR_TAG])
        elif isinstance(node, (dict, list)):
            stack.extend(node.values() if isinstance(node, dict) else node)
    return keys


_ENTRY_FIELDS = frozenset({"kind", "type", "content", "container", "metadata"})


def _entry_value(name: str, entry: Any, resolver: Any) -> Any:
    """The saved value of one top-level entry of the tree, every field checked."""
    where = child_path("tree", name)
    if (
        not isinstance(entry, Mapping)
        or entry.get("kind") not in KINDS
        or "content" not in entry
        or not set(entry) <= _ENTRY_FIELDS
        or type(entry.get("type", "")) is not str
    ):
        raise CorruptCheckpointError(
            f"the state tree is malformed at {where}: expected an object with 'kind' (one "
            f"of {', '.join(KINDS)}) and 'content', and at most 'type' (a string), "
            "'container' and 'metadata' besides"
        )
    content_at = child_path(where, "content")
    value = decode_value(entry["content"], where=content_at, on_tensor=resolver)
    container = entry.get("container")
    if entry["kind"] == "tensor" and not isinstance(value, (torch.Tensor, np.ndarray, _Ref)):
        raise CorruptCheckpointError(
            f"the state tree is malformed at {content_at}: a tensor entry holds a "
            f"{type_name(value)}, not a tensor reference"
        )
    if container is None:
        if "metadata" in entry:
            raise CorruptCheckpointError(
                f"the state tree is malformed at {where}: 'metadata' without a container"
            )
        return value
    if container != "OrderedDict" or entry["kind"] != "stateful":
        raise CorruptCheckpointError(
            f"the state tree is malformed at {child_path(where, 'container')}: only a "
            f"stateful entry has a container, and only 'OrderedDict', got {container!r}"
        )
    if not isinstance(value, dict):
        raise CorruptCheckpointError(
            f"the state tree is malformed at {content_at}: an OrderedDict container "
            f"holds a {type_name(value)}"
        )
    value = OrderedDict(value)
    if "metadata" in entry:
        at = child_path(where, "metadata")
        value._metadata = _module_metadata(decode_value(entry["metadata"], where=at), at)  # type: ignore[attr-defined]
    return value


def _module_metadata(metadata: Any, where: str) -> OrderedDict[str, Any]:
    """A module state dict's `_metadata`: submodule prefix -> {"version": int or None}."""
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(
            f"the state tree is malformed at {where}: module metadata must be an object of "
            f"objects, got a {type_name(metadata)}"
        )
    for prefix, local in metadata.items():
        at = child_path(where, prefix)
        if type(prefix) is not str or not isinstance(local, dict):
            raise CorruptCheckpointError(
                f"the state tree is malformed at {at}: module metadata maps module names to "
                f"objects, got {type_name(prefix)} -> {type_name(local)}"
            )
        version = local.get("version")
        if not all(type(k) is str for k in local) or not (version is None or type(version) is int):
            raise CorruptCheckpointError(
                f"the state tree is malformed at {at}: module metadata holds string keys and "
                f"an int 'version', got {local!r}"[:300]
            )
    return OrderedDict(metadata)


def _check_name(name: Any) -> None:
    if type(name) is not str:
        raise TypeError(
            f"state names must be non-empty strings, got {name!r} ({type_name(name)}) as a key "
            "of state"
        )
    if not name:
        raise ValueError("state names must be non-empty strings, got '' as a key of state")


def _stateful_entry(target: Any, state_dict: Any, path: str, hook: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"kind": "stateful", "type": type_name(target)}
    content = state_dict
    if type(state_dict) is OrderedDict:
        entry["container"] = "OrderedDict"
        content = dict(state_dict)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            entry["metadata"] = encode_value(
                {k: dict(v) for k, v in metadata.items()}, child_path(path, "_metadata")
            )
    entry["content"] = encode_value(content, path, on_tensor=hook)
    return entry


def _check_tensor(tensor: torch.Tensor, path: str) -> None:
    if isinstance(tensor, UninitializedTensorMixin):
        why, hint = "an uninitialized (lazy) parameter", "run a forward pass to materialize it"
    elif tensor.is_nested:
        why, hint = "a nested tensor", "store its parts instead, e.g. `list(t.unbind())`"
    elif tensor.is_quantized:
        why, hint = "a quantized tensor", "dequantize it with `.dequantize()` before saving"
    elif tensor.layout != torch.strided:
        why, hint = f"a {tensor.layout} tensor", "make it dense with `.to_dense()` before saving"
    elif tensor.is_meta:
        why, hint = "a meta tensor (it has no data)", "materialize it on a real device first"
    elif type(tensor).__name__ == "DTensor":
        why = "a distributed tensor (DTensor)"
        hint = "save sharded state with torch.distributed.checkpoint, or gather it to a tensor"
    elif type(tensor) not in (torch.Tensor, nn.Parameter):
        why = f"a tensor subclass ({type_name(tensor)})"
        hint = "store `t.as_subclass(torch.Tensor)` if its data is the whole of its state"
    else:
        return
    raise UnsupportedStateError(f"cannot save {path}: it is {why}, which cannot be stored; {hint}")


def _array_to_tensor(array: np.ndarray, path: str) -> torch.Tensor:
    if array.dtype.kind not in "biufc" or array.dtype.hasobject:
        raise UnsupportedStateError(
            f"cannot save {path}: numpy arrays of dtype {array.dtype} cannot be stored without "
            "pickling; convert it to a numeric dtype (or a list of values)"
        )
    native = array.dtype.newbyteorder("=")
    if array.dtype != native or not array.flags.writeable or any(s < 0 for s in array.strides):
        array = np.array(array, dtype=native, order="C", copy=True)
    try:
        return torch.from_numpy(array)
    except TypeError as exc:
        raise UnsupportedStateError(
            f"cannot save {path}: numpy arrays of dtype {array.dtype} have no torch equivalent "
            f"({exc}); convert it to a supported dtype first"
        ) from None


def _view_identity(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return (
        tensor.device,
        storage.data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.is_conj(),
        tensor.is_neg(),
    )


class _Tensors:
    """Collects the tensors of a state under unique keys, one entry per distinct view."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.views: dict[tuple[Any, ...], str] = {}
        self.arrays: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}

    def hook(self, name: str) -> Any:
        def add(value: Any, path: str, parts: tuple[str, ...]) -> dict[str, Any]:
            return self.add(value, path, ".".join((name, *parts)))

        return add

    def add(self, value: Any, path: str, base: str) -> dict[str, Any]:
        if isinstance(value, np.ndarray):
            if id(value) in self.arrays:  # converting it again may copy it again
                return dict(self.arrays[id(value)][1])
            tensor = _array_to_tensor(value, path)
        else:
            _check_tensor(value, path)
            tensor = value
        identity = _view_identity(tensor)
        key = self.views.get(identity) if identity is not None else None
        if key is None:
            key = base
            suffix = 1
            while key in self.tensors or key in _TAKEN:
                suffix += 1
                key = f"{base}#{suffix}"
            self.tensors[key] = tensor
            if identity is not None:
                self.views[identity] = key
        ref: dict[str, Any] = {TENSOR_TAG: key}
        if isinstance(value, np.ndarray):
            ref[_NUMPY_KEY] = value.dtype.str
            self.arrays[id(value)] = (value, ref)  # the array is kept alive, so its id is too
        return dict(ref)


class _Resolver:
    """Resolves tensor references against the loaded tensors."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.arrays: dict[tuple[str, str], np.ndarray] = {}

    def __call__(self, ref: Mapping[str, Any], where: str) -> Any:
        key = _ref_key(ref, where, self.tensors)
        tensor = self.tensors[key]
        if _NUMPY_KEY not in ref:
            return tensor
        dtype = ref[_NUMPY_KEY]
        if (key, dtype) not in self.arrays:
            want = _numpy_dtype(dtype, tensor.dtype, key, where)
            array = tensor.detach().cpu().numpy()
            if want != array.dtype:
                array = array.astype(want)
            self.arrays[key, dtype] = array
        return self.arrays[key, dtype]


class _Claims:
    """Resolves tensor references to placeholders of the claimed shape and dtype (one object
    per key, as `_Resolver` gives one tensor per key)."""

    def __init__(self, claims: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.claims = claims
        self.made: dict[tuple[str, np.dtype[Any] | None], Any] = {}

    def __call__(self, ref: Mapping[str, Any], where: str) -> Any:
        key = _ref_key(ref, where, self.claims)
        shape, dtype = self.claims[key]
        want = None if _NUMPY_KEY not in ref else _numpy_dtype(ref[_NUMPY_KEY], dtype, key, where)
        made = self.made.get((key, want))
        if made is None:
            if want is None:
                made = torch.empty(shape, dtype=dtype, device="meta")
            else:
                made = np.broadcast_to(np.zeros((), dtype=want), shape)
            self.made[key, want] = made
        return made


class _Ref:
    """What `check_tree` decodes a tensor reference to."""


class _RefCheck:
    """Checks tensor references against the dtypes of the tensors, without their bytes."""

    def __init__(self, dtypes: Mapping[str, torch.dtype]) -> None:
        self.dtypes = dtypes
        self.ref = _Ref()

    def __call__(self, ref: Mapping[str, Any], where: str) -> _Ref:
        key = _ref_key(ref, where, self.dtypes)
        if _NUMPY_KEY in ref:
            _numpy_dtype(ref[_NUMPY_KEY], self.dtypes[key], key, where)
        return self.ref


def _ref_key(ref: Mapping[str, Any], where: str, tensors: Mapping[str, Any]) -> str:
    key = ref.get(TENSOR_TAG)
    if type(key) is not str or not set(ref) <= {TENSOR_TAG, _NUMPY_KEY}:
        raise CorruptCheckpointError(
            f"the state tree is malformed at {where}: bad tensor reference {dict(ref)!r}"[:300]
        )
    if key not in tensors:
        raise CorruptCheckpointError(
            f"the state tree references tensor {key!r} at {where}, but the checkpoint has "
            "no tensor of that name"
        )
    return key


def _numpy_dtype(name: Any, dtype: torch.dtype, key: str, where: str) -> np.dtype[Any]:
    """The numpy dtype a reference asks for, if a tensor of `dtype` can give it."""
    try:
        if type(name) is not str or len(name) > 8:
            raise ValueError("not a numpy dtype string")
        want = np.dtype(name)
        have = torch.empty(0, dtype=dtype).numpy().dtype
        if want.kind not in "biufc" or want.newbyteorder("=") != have:
            raise ValueError(f"the tensor holds {have}")
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError(
            f"the state tree is malformed at {where}: cannot make a numpy array of "
            f"dtype {name!r} from tensor {key!r} ({exc})"[:300]
        ) from None
    return want
