"""Load saved values (the output of `unflatten_state`) into live training objects."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from haltpoint.errors import StateMismatchError, first_line
from haltpoint.state._common import child_path, is_stateful, type_name, unwrap_module
from haltpoint.state.optimizer import (
    check_optimizer_fits,
    check_optimizer_state,
    check_scheduler_fits,
)
from haltpoint.state.tree import claimed_state
from haltpoint.stopping.early_stopping import EarlyStopping

__all__ = ["LoadReport", "check_claims", "load_into", "plan_load"]

_PREFIXES = ("module.", "_orig_mod.")
_STRICT_HINT = "pass strict=False to load what matches and get the rest in the returned report"

Apply = Callable[["LoadReport"], None]


@dataclass
class LoadReport:
    """What a non-strict `load_into` could not match, as dotted names.

    ``missing`` is in the target but not in the checkpoint (``"model.fc.bias"``, or a whole
    entry such as ``"scheduler"``: non-strict loads only); ``unexpected`` is in the checkpoint
    but not the target (a module key, non-strict; or a whole entry that was not asked for,
    such as ``"optimizer"`` when only the model is restored).

    >>> LoadReport(missing=["scheduler"], unexpected=[])
    LoadReport(missing=['scheduler'], unexpected=[])
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def load_into(
    state: MutableMapping[str, Any], saved: Mapping[str, Any], *, strict: bool = True
) -> LoadReport:
    """Load ``saved`` into the objects of ``state``.

    Stateful objects get ``load_state_dict``; modules are unwrapped (DDP, ``torch.compile``)
    and accept checkpoints whose keys carry ``module.`` / ``_orig_mod.`` prefixes. Tensors and
    numpy arrays are updated in place; plain values are replaced in ``state``. Names, module
    keys, shapes and dtypes (never converted), optimizer states (`state.optimizer`), tensor
    shapes and dtypes are all checked before anything loads; whatever an object's own
    ``load_state_dict`` raises after that is one `StateMismatchError` line. Where a module's
    keys differ, which of them match is torch's call (load hooks may rename keys): a strict
    mismatch torch then reports puts that module's values back before it is raised
    (docs/format.md, "Restore checks").

    Only the names in ``state`` are loaded: what ``saved`` holds beyond them (an optimizer
    when only the model is asked for) is listed in the report's ``unexpected``.

    Args:
        state: the live objects, by name.
        saved: saved values by name, as returned by `unflatten_state`.
        strict: if true, a name of ``state`` the checkpoint lacks, or a module key on one
            side only, is an error; if false it goes to the report.

    Raises:
        StateMismatchError: the two sides do not match (always for shapes and dtypes).

    >>> model = torch.nn.Linear(2, 1)
    >>> state = {"model": model, "epoch": 0}
    >>> saved = {"model": torch.nn.Linear(2, 1).state_dict(), "epoch": 7, "extra": 1}
    >>> load_into(state, saved, strict=False)
    LoadReport(missing=[], unexpected=['extra'])
    >>> state["epoch"], torch.equal(model.weight, saved["model"]["weight"])
    (7, True)
    """
    return plan_load(state, saved, strict=strict)()


def plan_load(
    state: MutableMapping[str, Any], saved: Mapping[str, Any], *, strict: bool = True
) -> Callable[[], LoadReport]:
    """Every check of `load_into` now; the returned function loads and gives the report.

    For loading something else in between (sharded state) only once this one is known to fit.
    """
    report = LoadReport(
        missing=_check_names(state, saved, strict),
        unexpected=[name for name in saved if name not in state],
    )
    plans = [
        (name, _plan(state, name, saved[name], strict))
        for name in list(state)
        if name in saved  # the checks, before anything is loaded
    ]

    def apply_all() -> LoadReport:
        for index, (_, apply) in enumerate(plans):
            try:
                apply(report)
            except StateMismatchError as exc:
                if index == 0:
                    raise
                done = ", ".join(repr(n) for n, _ in plans[:index])
                raise StateMismatchError(
                    f"{exc}; {done} already hold the checkpoint's values: build the objects "
                    "afresh before restoring again"
                ) from exc
        return report

    return apply_all


def check_claims(
    state: MutableMapping[str, Any],
    tree: Mapping[str, Any],
    claims: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    strict: bool = True,
) -> None:
    """The checks of `plan_load` that the shapes and dtypes of the saved tensors decide, made
    on what a checkpoint claims (its ``tree`` and the shape and dtype of each tensor, by key:
    `tree.claimed_state`) before any tensor is read, so one that cannot fit its live target
    is never read: the names (with ``strict``), each module's keys and tensors, an
    optimizer's structure, its groups and the shapes of its per-parameter state
    (`check_optimizer_fits`), top-level tensors and numpy arrays. A mismatch raises the
    `StateMismatchError` that `plan_load` raises for it once the tensors are read; what needs
    their values, and the other objects' checks, are left to `plan_load`, which runs every
    check again after reading.

    Raises:
        StateMismatchError: the claims do not fit ``state``.
        CorruptCheckpointError: an entry of ``tree`` that ``state`` names is malformed.

    >>> from haltpoint.state.tree import flatten_state
    >>> flat = flatten_state({"model": torch.nn.Linear(4, 1)})
    >>> claims = {k: (tuple(t.shape), t.dtype) for k, t in flat.tensors.items()}
    >>> check_claims({"model": torch.nn.Linear(2, 1)}, flat.tree, claims)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    haltpoint.errors.StateMismatchError: cannot load model.weight: the model has shape (1, 2), ...
    """
    _check_args(state, strict)
    claimed = claimed_state({name: tree[name] for name in state if name in tree}, claims)
    _check_names(state, claimed, strict)
    for name in list(state):
        if name not in claimed:
            continue
        target, value, path = state[name], claimed[name], child_path("state", name)
        if isinstance(target, nn.Module):
            _check_module(unwrap_module(target), name, value)
        elif is_stateful(target):  # in the order of `_plan`
            if isinstance(target, torch.optim.Optimizer):
                _check_optimizer_structure(target, path, value)
                check_optimizer_fits(target, value, path)
        elif isinstance(target, torch.Tensor):
            _check_array(path, target, value, torch.Tensor)
        elif isinstance(target, np.ndarray):
            _check_array(path, target, value, np.ndarray)


def _check_args(state: Any, strict: Any) -> None:
    if not isinstance(state, MutableMapping):
        raise TypeError(f"state must be a mutable mapping of names, got {type_name(state)}")
    if type(strict) is not bool:
        raise TypeError(f"strict must be True or False, got {strict!r}")


def _check_names(state: Any, saved: Any, strict: Any) -> list[str]:
    """The arguments' types, and the names of `state` that `saved` lacks (an error if strict)."""
    if not isinstance(state, MutableMapping):
        raise TypeError(f"state must be a mutable mapping of names, got {type_name(state)}")
    if not isinstance(saved, Mapping):
        raise TypeError(f"saved must be a mapping of names, got {type_name(saved)}")
    _check_args(state, strict)
    missing = [name for name in state if name not in saved]
    if strict and missing:
        raise StateMismatchError(
            "the checkpoint does not match the state: "
            + _listing(missing, [])
            + "; restore only the entries it holds, or pass strict=False to skip them"
        )
    return missing


def _listing(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append("missing from the checkpoint: " + ", ".join(map(repr, missing)))
    if unexpected:
        parts.append("in the checkpoint but not the state: " + ", ".join(map(repr, unexpected)))
    return "; ".join(parts)


def _plan(state: MutableMapping[str, Any], name: str, value: Any, strict: bool) -> Apply:
    target = state[name]
    path = child_path("state", name)
    if isinstance(target, nn.Module):
        return _plan_module(unwrap_module(target), name, value, strict)
    if is_stateful(target):
        if isinstance(target, torch.optim.Optimizer):
            _check_optimizer(target, path, value)
        elif isinstance(target, EarlyStopping):  # plain Python, cheap to copy
            _dry_run(target, path, value, copy.deepcopy)
        elif isinstance(target, torch.optim.lr_scheduler.LRScheduler) and type(
            target
        ).__module__.startswith("torch.optim."):  # another scheduler's state is its business
            check_scheduler_fits(target, value, path)
        return _plan_stateful(target, path, value)
    if isinstance(target, torch.Tensor):
        _check_array(path, target, value, torch.Tensor)

        def copy_tensor(report: LoadReport) -> None:
            with torch.no_grad():
                target.copy_(value)

        return copy_tensor
    if isinstance(target, np.ndarray):
        _check_array(path, target, value, np.ndarray)

        def copy_array(report: LoadReport) -> None:
            if target.flags.writeable:
                np.copyto(target, value)
            else:
                state[name] = value

        return copy_array

    def replace(report: LoadReport) -> None:
        state[name] = value

    return replace


def _check_array(path: str, target: Any, value: Any, cls: Any) -> None:
    if not isinstance(value, cls):
        raise StateMismatchError(
            f"cannot load into {path}: it is a {type_name(target)} but the checkpoint holds a "
            f"{type_name(value)}"
        )
    if tuple(target.shape) != tuple(value.shape) or target.dtype != value.dtype:
        raise StateMismatchError(
            f"cannot load into {path}: the state has shape {tuple(target.shape)} and dtype "
            f"{target.dtype}, the checkpoint shape {tuple(value.shape)} and dtype "
            f"{value.dtype}; make the target match the checkpoint"
        )


def _plan_stateful(target: Any, path: str, value: Any) -> Apply:
    def load(report: LoadReport) -> None:
        try:
            target.load_state_dict(value)
        except Exception as exc:  # its own code, given what the checkpoint holds
            raise StateMismatchError(
                f"cannot load {path} into a {type_name(target)}: {type(exc).__name__}: "
                f"{first_line(exc)}; was the checkpoint saved from a differently built object?"
            ) from exc

    return load


def _check_optimizer_structure(target: torch.optim.Optimizer, path: str, value: Any) -> None:
    try:
        check_optimizer_state(value)
    except ValueError as exc:
        raise StateMismatchError(f"cannot load {path} into a {type_name(target)}: {exc}") from None


def _check_optimizer(target: torch.optim.Optimizer, path: str, value: Any) -> None:
    _check_optimizer_structure(target, path, value)
    check_optimizer_fits(target, value, path)
    if type(target).load_state_dict is torch.optim.Optimizer.load_state_dict:
        loaded = _dry_run(target, path, value, copy.copy)
        groups = zip(target.param_groups, loaded.param_groups, strict=True)
        for i, (mine, theirs) in enumerate(groups):  # hyperparameters __setstate__ fills not
            lacking = sorted(set(target.defaults) & set(mine) - set(theirs))
            if lacking:
                raise StateMismatchError(
                    f"cannot load {path} into a {type_name(target)}: the checkpoint's param "
                    f"group {i} has no {', '.join(map(repr, lacking))}, which it needs; was it "
                    "saved from another kind of optimizer?"
                )


def _dry_run(target: Any, path: str, value: Any, duplicate: Callable[[Any], Any]) -> Any:
    """Load ``value`` into ``duplicate(target)``, so that what the object refuses is found
    before anything loads: a shallow copy of an optimizer (sharing its parameters, not its
    state or hooks; its ``__setstate__`` runs after the state was half replaced), a deep copy
    of a stopper (whose rules must match the saved ones). Returns the loaded copy."""
    copied = duplicate(target)
    try:
        copied.load_state_dict(value)
    except Exception as exc:  # torch's, or its subclass's, given what the checkpoint holds
        raise StateMismatchError(
            f"cannot load {path} into a {type_name(target)}: {type(exc).__name__}: "
            f"{first_line(exc)}; was the checkpoint saved from a differently built object?"
        ) from exc
    return copied


def _plan_module(module: nn.Module, name: str, value: Any, strict: bool) -> Apply:
    path = child_path("state", name)
    expected, state_dict = _check_module(module, name, value)
    keys_differ = list(expected) != [k for k in state_dict if k in expected] or any(
        k not in expected for k in state_dict
    )

    def load(report: LoadReport) -> None:
        # When the keys differ, which of them match is torch's call (load hooks and modules
        # such as BatchNorm rename or fill in keys): a strict mismatch torch reports puts the
        # module's own values back before it is raised, so nothing is left half loaded.
        before = _copy(expected) if strict and keys_differ else None
        try:
            result = module.load_state_dict(state_dict, strict=False)
        except Exception as exc:  # a load hook's, or torch's
            raise StateMismatchError(
                f"cannot load {path}: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        missing = [f"{name}.{k}" for k in result.missing_keys]
        unexpected = [f"{name}.{k}" for k in result.unexpected_keys]
        if strict and (missing or unexpected):
            if before is not None:
                module.load_state_dict(before)
            raise StateMismatchError(
                f"the checkpoint does not match {path}: {_listing(missing, unexpected)}; "
                f"{_STRICT_HINT}"
            )
        report.missing.extend(missing)
        report.unexpected.extend(unexpected)

    return load


def _check_module(
    module: nn.Module, name: str, value: Any
) -> tuple[dict[str, Any], OrderedDict[str, Any]]:
    """A module's saved state dict against the module (its type, keys, tensors' shapes and
    dtypes); the module's own state dict and the saved one with its prefixes stripped."""
    path = child_path("state", name)
    if not isinstance(value, Mapping):
        raise StateMismatchError(
            f"cannot load {path} into a {type_name(module)}: the checkpoint holds a "
            f"{type_name(value)}, not a state dict"
        )
    odd = [k for k in value if not isinstance(k, str)]
    if odd:  # torch meets it only after loading the keys before it
        raise StateMismatchError(
            f"cannot load {path}: the checkpoint has the key {odd[0]!r}, a "
            f"{type_name(odd[0])}; a module's keys are strings"[:300]
        )
    expected = module.state_dict()
    state_dict = _strip_prefixes(value, list(expected))
    _check_tensors(name, expected, state_dict)
    return expected, state_dict


def _copy(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    copied = OrderedDict(
        (k, v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in state_dict.items()
    )
    copied._metadata = getattr(state_dict, "_metadata", None)  # type: ignore[attr-defined]
    return copied


def _check_tensors(name: str, expected: Mapping[str, Any], state_dict: Mapping[str, Any]) -> None:
    """Types, shapes and dtypes, before anything is copied: torch would convert dtypes
    silently, and report a value that is no tensor only after loading the others."""
    untyped = [
        key
        for key, ours in expected.items()
        if isinstance(ours, torch.Tensor)
        and key in state_dict
        and not isinstance(state_dict[key], torch.Tensor)
    ]
    if untyped:
        key = untyped[0]
        raise StateMismatchError(
            f"cannot load {name}.{key}: the checkpoint holds a {type_name(state_dict[key])}, "
            "not a tensor"
        )
    wrong = [
        (key, ours, state_dict[key])
        for key, ours in expected.items()
        if isinstance(ours, torch.Tensor)
        and isinstance(state_dict.get(key), torch.Tensor)
        and (ours.shape != state_dict[key].shape or ours.dtype != state_dict[key].dtype)
    ]
    if not wrong:
        return
    key, ours, theirs = wrong[0]
    more = ""
    if len(wrong) > 1:
        others = ", ".join(f"{name}.{k}" for k, _, _ in wrong[1:6])
        more = f" ({len(wrong) - 1} more differ: {others}{', ...' * (len(wrong) > 6)})"
    if ours.shape != theirs.shape:
        raise StateMismatchError(
            f"cannot load {name}.{key}: the model has shape {tuple(ours.shape)}, the checkpoint "
            f"{tuple(theirs.shape)}{more}; build the model with the checkpoint's configuration"
        )
    raise StateMismatchError(
        f"cannot load {name}.{key}: the model holds {ours.dtype}, the checkpoint {theirs.dtype}"
        f"{more}; haltpoint does not convert: restore into a model of the checkpoint's dtype "
        f"(model.to({theirs.dtype})) and convert it after"
    )


def _strip_prefixes(state_dict: Mapping[str, Any], target_keys: list[str]) -> OrderedDict[str, Any]:
    """Drop the ``module.`` / ``_orig_mod.`` prefixes that every saved key has, as far as
    that makes the most keys match the target's; keep ``_metadata`` in step."""
    targets = set(target_keys)
    metadata = getattr(state_dict, "_metadata", None)
    stages: list[tuple[list[Any], str, Any]] = [(list(state_dict), "", metadata)]
    while True:
        keys, strip, meta = stages[-1]
        prefix = next(
            (
                p
                for p in _PREFIXES
                if keys and all(isinstance(k, str) and k.startswith(p) for k in keys)
            ),
            None,
        )
        if prefix is None:
            break
        stripped_meta = _strip_metadata(meta, prefix) if meta is not None else None
        stages.append(([k[len(prefix) :] for k in keys], strip + prefix, stripped_meta))
    # The least stripping among the stages that match the most target keys.
    keys, strip, meta = max(stages, key=lambda stage: len(targets.intersection(stage[0])))
    result = OrderedDict(zip(keys, state_dict.values(), strict=True))
    if meta is not None:
        result._metadata = OrderedDict(meta)  # type: ignore[attr-defined]
    return result


def _strip_metadata(metadata: OrderedDict[str, Any], prefix: str) -> OrderedDict[str, Any]:
    stripped: OrderedDict[str, Any] = OrderedDict()
    for key, value in metadata.items():
        if key == prefix[:-1]:
            stripped[""] = value
        elif key.startswith(prefix):
            stripped[key[len(prefix) :]] = value
    return stripped
