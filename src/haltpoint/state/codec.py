"""Typed JSON for the non-tensor leaves of a state: nothing is pickled, ever.

`encode_value` turns a value into strict JSON (``json.dumps(..., allow_nan=False)`` works on
it) and `decode_value` brings back a value of exactly the same types. Plain JSON stays plain
(``{"lr": 0.1, "betas": ...}``); everything JSON cannot say is a *tagged object*, a dict whose
``"__hp__"`` key names the type:

=========================  ====================================================
value                      encoded as
=========================  ====================================================
nan, inf, -inf             ``{"__hp__": "float", "v": "nan"}``
int beyond 64 bits         ``{"__hp__": "int", "v": "0x..."}``
complex                    ``{"__hp__": "complex", "v": [re, im]}``
tuple, set, frozenset      ``{"__hp__": "tuple", "items": [...]}`` (sets sorted)
dict, non-str or reserved  ``{"__hp__": "dict", "items": [[key, value], ...]}``
keys, or keys out of       (in the dict's own order)
sorted order; OrderedDict  ``{"__hp__": "OrderedDict", "items": [...]}``
collections.Counter        ``{"__hp__": "Counter", "items": [...]}`` (MultiStepLR's milestones)
bytes, bytearray           ``{"__hp__": "bytes", "b64": "..."}``
torch.dtype/device/Size    ``{"__hp__": "torch.dtype", "v": "float32"}``
numpy scalar               ``{"__hp__": "numpy", "dtype": "float32", "v": 1.5}``
=========================  ====================================================

A dict whose keys are not in sorted order is tagged so that it comes back in its own order
(the manifest sorts the keys of plain JSON objects; `Adam`'s ``step, exp_avg, exp_avg_sq``
must not become ``exp_avg, exp_avg_sq, step``). Manifests written before that decode as ever,
in sorted order.

Tensors and numpy arrays are not encoded here: `haltpoint.state.tree.flatten_state` passes an
``on_tensor`` hook that swaps them for ``{"__tensor__": key}`` references. Anything else
(functions, enums, arbitrary objects) raises `UnsupportedStateError` naming its path.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import math
import re
import types
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import numpy as np
import torch

from haltpoint.errors import CorruptCheckpointError, UnsupportedStateError, first_line
from haltpoint.state._common import child_path, is_stateful, type_name

__all__ = ["MAX_SHARED_HASH", "TAG", "TENSOR_TAG", "decode_value", "encode_value"]

TAG = "__hp__"
"""The key that marks a tagged object in the encoded JSON."""
TENSOR_TAG = "__tensor__"
"""The key of a tensor reference, ``{"__tensor__": key}``, written by `flatten_state`."""

_RESERVED = frozenset({TAG, TENSOR_TAG})
_INT_LIMIT = 2**63
MAX_SHARED_HASH = 16
"""The most keys of one decoded set or dict that may share a hash (a real state's share none,
or a few: -1 and -2, ints that differ by 2**61 - 1)."""
MAX_DEPTH = 64
"""The deepest nesting of containers `decode_value` accepts (real states nest under 10)."""
_SAVE_DEPTH = MAX_DEPTH - 4
"""The deepest nesting `encode_value` writes: room above for the manifest's tree and below for
a tagged leaf, so that whatever is saved can be read back."""
_DEVICE = re.compile(r"[a-z][a-z0-9_]{0,31}(:[0-9]{1,4})?")
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if type(v) is torch.dtype}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_NUMPY_SCALARS = frozenset(
    {
        "bool",
        *("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
        *("float16", "float32", "float64", "complex64", "complex128"),
    }
)
_SUPPORTED = (
    "bool, int, float, complex, str, None, bytes, bytearray, list, tuple, dict, set, "
    "frozenset, OrderedDict, Counter, torch.dtype, torch.device, torch.Size or a numpy scalar"
)

TensorHook = Callable[[Any, str, tuple[str, ...]], dict[str, Any]]
"""Called as ``hook(tensor_or_array, path, parts)``; returns the JSON that replaces it."""
RefHook = Callable[[Mapping[str, Any], str], Any]
"""Called as ``hook(reference, where)`` for each ``{"__tensor__": ...}`` object."""


def encode_value(value: Any, path: str, *, on_tensor: TensorHook | None = None) -> Any:
    """Encode ``value`` as strict JSON that `decode_value` turns back into an equal value.

    Args:
        value: the value; nested containers are encoded recursively.
        path: where ``value`` sits in the state, for error messages (``'state["epoch"]'``).
        on_tensor: replaces tensors and numpy arrays; without it they are refused.

    Raises:
        UnsupportedStateError: a part of ``value`` cannot be stored without pickling; the
            message names its path, its type and what to do.

    >>> encode_value({"best": float("inf"), "betas": (0.9, 0.999)}, 'state["opt"]')
    {'best': {'__hp__': 'float', 'v': 'inf'}, 'betas': {'__hp__': 'tuple', 'items': [0.9, 0.999]}}
    """
    return _Encoder(on_tensor).encode(value, path, ())


def decode_value(obj: Any, *, where: str = "value", on_tensor: RefHook | None = None) -> Any:
    """Turn JSON written by `encode_value` back into the original value.

    Args:
        obj: parsed JSON.
        where: the location of ``obj``, for error messages.
        on_tensor: resolves ``{"__tensor__": key}`` references; without it they are refused.

    Raises:
        CorruptCheckpointError: ``obj`` is not something `encode_value` writes.

    >>> decode_value({"betas": {"__hp__": "tuple", "items": [0.9, 0.999]}})
    {'betas': (0.9, 0.999)}
    """
    return _Decoder(on_tensor).decode(obj, where)


def _refuse(value: Any, path: str, hint: str) -> NoReturn:
    raise UnsupportedStateError(
        f"cannot save {path}: a value of type {type_name(value)!r} cannot be stored without "
        f"pickling; {hint}"
    )


def _hint(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return "store its `.value` (or `.name`) instead and rebuild the member when loading"
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return "store `tuple(value)` or `value._asdict()` instead"
    if isinstance(value, dict):
        return "convert it to a plain dict with `dict(value)`"
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        return "functions cannot be saved: leave it out of the state and rebuild it in code"
    if is_stateful(value):
        return (
            "objects with state_dict() are saved only at the top level of the state: give it "
            'its own name, e.g. state["name"] = obj'
        )
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return "tensors and arrays are stored by flatten_state, not by encode_value"
    return (
        f"convert it to a supported value ({_SUPPORTED}, a tensor or a numpy array), or give "
        "it state_dict() and load_state_dict() methods and put it at the top level of the state"
    )


class _Encoder:
    def __init__(self, on_tensor: TensorHook | None, outer: int = 0) -> None:
        self.on_tensor = on_tensor
        self.active: set[int] = set()  # ids of the containers being encoded, to catch cycles
        self.outer = outer  # containers around the value, encoded by another _Encoder

    @property
    def depth(self) -> int:
        """The containers being encoded around the current value, the outer ones included."""
        return self.outer + len(self.active)

    def encode(self, value: Any, path: str, parts: tuple[str, ...]) -> Any:
        cls = type(value)
        if value is None or cls is bool or cls is str:
            return value
        if cls is int:
            return value if -_INT_LIMIT < value < _INT_LIMIT else {TAG: "int", "v": hex(value)}
        if cls is float:
            return _encode_float(value)
        if cls is complex:
            return {TAG: "complex", "v": [_encode_float(value.real), _encode_float(value.imag)]}
        if isinstance(value, (torch.Tensor, np.ndarray)) and self.on_tensor is not None:
            return self.on_tensor(value, path, parts)
        if cls is torch.dtype:
            return {TAG: "torch.dtype", "v": str(value).removeprefix("torch.")}
        if cls is torch.device:
            return {TAG: "torch.device", "v": str(value)}
        if cls is torch.Size:
            return {TAG: "torch.Size", "items": list(value)}
        if cls is bytes or cls is bytearray:
            return {TAG: cls.__name__, "b64": base64.b64encode(value).decode("ascii")}
        if isinstance(value, np.generic) and value.dtype.name in _NUMPY_SCALARS:
            item = self.encode(value.item(), path, parts)
            return {TAG: "numpy", "dtype": value.dtype.name, "v": item}
        if cls in (list, tuple, dict, OrderedDict, Counter, set, frozenset):
            if id(value) in self.active:
                raise UnsupportedStateError(
                    f"cannot save {path}: it contains itself (a reference cycle), which JSON "
                    "cannot represent; break the cycle before saving"
                )
            if self.depth >= _SAVE_DEPTH:
                raise UnsupportedStateError(
                    f"cannot save {path}: containers nest deeper than {_SAVE_DEPTH} levels, "
                    "more than a checkpoint reads back; flatten the structure before saving"
                )
            self.active.add(id(value))
            try:
                return self._container(value, path, parts)
            finally:
                self.active.discard(id(value))
        _refuse(value, path, _hint(value))

    def _container(self, value: Any, path: str, parts: tuple[str, ...]) -> Any:
        cls = type(value)
        if cls is list or cls is tuple:
            items = [
                self.encode(item, child_path(path, i), (*parts, str(i)))
                for i, item in enumerate(value)
            ]
            return items if cls is list else {TAG: "tuple", "items": items}
        if cls is set or cls is frozenset:
            encoder = _Encoder(None, self.depth)
            elements = [encoder.encode(item, f"an element of {path}", ()) for item in value]
            elements.sort(key=lambda e: json.dumps(e, sort_keys=True))
            return {TAG: cls.__name__, "items": elements}
        plain = (
            cls is dict
            and all(type(k) is str and k not in _RESERVED for k in value)
            and list(value) == sorted(value)  # the manifest sorts plain keys: keep the order
        )
        if plain:
            return {k: self.encode(v, child_path(path, k), (*parts, k)) for k, v in value.items()}
        keys = _Encoder(None, self.depth)
        pairs = [
            [
                keys.encode(k, f"the key {child_path('', k)[1:-1]} of {path}", ()),
                self.encode(v, child_path(path, k), (*parts, str(k))),
            ]
            for k, v in value.items()
        ]
        return {TAG: cls.__name__, "items": pairs}


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return value
    return {TAG: "float", "v": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}


class _Decoder:
    def __init__(self, on_tensor: RefHook | None) -> None:
        self.on_tensor = on_tensor
        self.depth = 0

    def decode(self, obj: Any, where: str) -> Any:
        if type(obj) is int and not -_INT_LIMIT < obj < _INT_LIMIT:
            _corrupt(
                where,
                f"an int of {obj.bit_length()} bits written plain (ints beyond 64 bits are tagged)",
            )
        if obj is None or type(obj) in (bool, int, float, str):
            return obj
        if self.depth >= MAX_DEPTH:
            _corrupt(where, f"containers nest deeper than {MAX_DEPTH} levels")
        self.depth += 1
        try:
            return self._container(obj, where)
        finally:
            self.depth -= 1

    def _container(self, obj: Any, where: str) -> Any:
        cls = type(obj)
        if cls is list:
            return [self.decode(item, child_path(where, i)) for i, item in enumerate(obj)]
        if cls is not dict:
            _corrupt(where, f"a {type_name(obj)} is not JSON")
        if TAG in obj:
            return self._tagged(obj, where)
        if TENSOR_TAG in obj:
            if self.on_tensor is None:
                _corrupt(where, "a tensor reference can only be decoded by unflatten_state")
            return self.on_tensor(obj, where)
        return {k: self.decode(v, child_path(where, k)) for k, v in obj.items()}

    def _tagged(self, obj: dict[str, Any], where: str) -> Any:
        tag = obj[TAG]
        if type(tag) is not str:
            _corrupt(where, f"the tag of {_short(obj)} is not a string")
        fields = {"numpy": {"dtype", "v"}, "bytes": {"b64"}, "bytearray": {"b64"}}.get(
            tag, {"items"} if tag in _ITEM_TAGS else {"v"}
        )
        if set(obj) != {TAG, *fields} or (tag not in _SCALAR_TAGS and tag not in _ITEM_TAGS):
            _corrupt(where, f"unknown or malformed tagged object {_short(obj)}")
        try:
            if tag in _ITEM_TAGS:
                return self._items(tag, obj["items"], where)
            return _SCALAR_TAGS[tag](self, obj, where)
        except (TypeError, ValueError, KeyError, AttributeError, binascii.Error) as exc:
            _corrupt(where, f"cannot decode {_short(obj)}: {exc}")

    def _items(self, tag: str, items: Any, where: str) -> Any:
        if type(items) is not list:
            raise TypeError("'items' must be a list")
        if tag == "tuple":
            return tuple(self.decode(item, child_path(where, i)) for i, item in enumerate(items))
        if tag == "torch.Size":
            return torch.Size([_int64(item) for item in items])
        if tag in ("set", "frozenset"):
            decoded = [self.decode(item, where) for item in items]
            _check_hashes(decoded)
            return set(decoded) if tag == "set" else frozenset(decoded)
        pairs = []
        for pair in items:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("each item of a dict must be a [key, value] pair")
            key = self.decode(pair[0], where)
            pairs.append((key, self.decode(pair[1], child_path(where, key))))
        _check_hashes([key for key, _ in pairs])
        if tag == "Counter":
            return Counter(dict(pairs))  # from a mapping: Counter(pairs) would count them
        return dict(pairs) if tag == "dict" else OrderedDict(pairs)


def _check_hashes(keys: list[Any]) -> None:
    """ValueError when more than `MAX_SHARED_HASH` of `keys` share one hash: a set or dict of
    them would take time quadratic in their number to build (ints and tuples hash alike on
    every run, so a crafted manifest can make them collide; no saved state does)."""
    shared = max(Counter(map(hash, keys)).values(), default=0)
    if shared > MAX_SHARED_HASH:
        raise ValueError(f"{shared} of its {len(keys)} keys share one hash (crafted to collide)")


def _int64(value: Any) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an int, got {type_name(value)}")
    if not -_INT_LIMIT <= value < _INT_LIMIT:
        raise ValueError(f"{value} does not fit in 64 bits")
    return value


def _decode_float(_: _Decoder, obj: dict[str, Any], where: str) -> float:
    return _NONFINITE[obj["v"]]


def _decode_int(_: _Decoder, obj: dict[str, Any], where: str) -> int:
    text = obj["v"]
    if type(text) is not str:
        raise TypeError(f"expected a hex string, got {type_name(text)}")
    return int(text, 16)


def _decode_complex(decoder: _Decoder, obj: dict[str, Any], where: str) -> complex:
    real, imag = (decoder.decode(part, where) for part in obj["v"])
    if type(real) is not float or type(imag) is not float:
        raise TypeError("the parts of a complex must be floats")
    return complex(real, imag)


def _decode_bytes(_: _Decoder, obj: dict[str, Any], where: str) -> bytes | bytearray:
    data = base64.b64decode(obj["b64"], validate=True)
    return data if obj[TAG] == "bytes" else bytearray(data)


def _decode_dtype(_: _Decoder, obj: dict[str, Any], where: str) -> torch.dtype:
    name = obj["v"]
    if type(name) is not str or name not in _DTYPES:
        raise ValueError(f"{_short(name)} is not the name of a torch dtype")
    return _DTYPES[name]


def _decode_device(_: _Decoder, obj: dict[str, Any], where: str) -> torch.device:
    text = obj["v"]
    if type(text) is not str or not _DEVICE.fullmatch(text):
        raise ValueError(f"{_short(text)} is not a device string such as 'cpu' or 'cuda:0'")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(first_line(exc)) from None
    if str(device) != text:  # torch keeps an index in 8 bits: "cuda:256" would be cuda:0
        raise ValueError(f"{text!r} names a device index torch cannot hold (it reads {device})")
    return device


def _decode_numpy(decoder: _Decoder, obj: dict[str, Any], where: str) -> np.generic:
    name = obj["dtype"]
    if type(name) is not str or name not in _NUMPY_SCALARS:
        raise ValueError(f"unsupported numpy scalar type {_short(name)}")
    dtype = np.dtype(name)
    value = decoder.decode(obj["v"], child_path(where, "v"))
    _check_numpy(dtype, value)
    result: np.generic = dtype.type(value)
    return result


def _check_numpy(dtype: np.dtype[Any], value: Any) -> None:
    """ValueError/TypeError unless `value` is what `encode_value` writes for `dtype`."""
    want = {"b": bool, "i": int, "u": int, "f": float, "c": complex}[dtype.kind]
    if type(value) is not want:
        raise TypeError(f"a numpy {dtype.name} holds a {want.__name__}, not a {type_name(value)}")
    if isinstance(value, int) and not isinstance(value, bool):
        info = np.iinfo(dtype)
        if not info.min <= value <= info.max:
            raise ValueError(f"{value} is outside the range of {dtype.name}"[:200])
    elif isinstance(value, (float, complex)):
        limit = float(np.finfo(dtype).max)
        parts = (value.real, value.imag)
        if any(math.isfinite(p) and abs(p) > limit for p in parts):
            raise ValueError(f"{value} is outside the range of {dtype.name}")


_ITEM_TAGS = frozenset(
    ["tuple", "set", "frozenset", "dict", "OrderedDict", "Counter", "torch.Size"]
)
_SCALAR_TAGS: dict[str, Callable[[_Decoder, dict[str, Any], str], Any]] = {
    "float": _decode_float,
    "int": _decode_int,
    "complex": _decode_complex,
    "bytes": _decode_bytes,
    "bytearray": _decode_bytes,
    "torch.dtype": _decode_dtype,
    "torch.device": _decode_device,
    "numpy": _decode_numpy,
}


def _short(obj: Any) -> str:
    text = json.dumps(obj, default=repr)
    return text if len(text) <= 80 else text[:77] + "..."


def _corrupt(where: str, why: str) -> NoReturn:
    raise CorruptCheckpointError(f"the state tree is malformed at {where}: {why}")
