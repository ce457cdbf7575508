"""Checks of a saved optimizer state dict: its own structure, and its fit to a live optimizer;
and of a saved learning-rate scheduler's state against a live scheduler.

torch's `Optimizer.load_state_dict` trusts what it is given: a state keyed by a parameter that
is not there is kept as junk, a per-parameter state of the wrong shape or type is loaded and
fails at the next `step()`, and some failures come after the optimizer was half replaced. These
checks run before anything is loaded. torch's schedulers trust theirs even more: their
`load_state_dict` updates the object's `__dict__` with whatever it is given (its `optimizer`,
its `step` method), so a crafted one fails later, in the training loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from haltpoint.errors import StateMismatchError
from haltpoint.state._common import short_repr, type_name

__all__ = [
    "PARAM_SHAPED",
    "SCALARS",
    "check_optimizer_fits",
    "check_optimizer_state",
    "check_scheduler_fits",
]

PARAM_SHAPED = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg"}
    | {"acc_delta", "grad_avg", "sum", "ax", "prev", "step_size"}
)
"""Per-parameter state of torch's own optimizers that has the shape of its parameter."""
SCALARS = frozenset({"step", "eta", "mu", "mu_product"})
"""Per-parameter state of torch's own optimizers that is one number (a 0-d tensor, or a
Python number in checkpoints of older torch)."""
NUMBER_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64}
    | {torch.float16, torch.bfloat16, torch.float32, torch.float64}
)
"""The dtypes of a 0-d tensor that torch's optimizers compute with as one number: they load
a 0-d tensor of any dtype, and then their `step()` raised on a complex, bool, float8 or
wide unsigned one (`result type ComplexFloat can't be cast ...`, `"add_stub" not
implemented for 'Float8_e4m3fn'`)."""


def check_optimizer_state(value: Any) -> None:
    """Check that ``value`` is an optimizer state dict in torch's format, on its own.

    ``param_groups`` is a list of objects whose ``params`` are lists of distinct int ids;
    ``state`` maps some of those ids to objects.

    Raises:
        ValueError: naming what is malformed.

    >>> check_optimizer_state(torch.optim.SGD([torch.zeros(1)], lr=0.1).state_dict())
    >>> check_optimizer_state({"state": {5: {}}, "param_groups": [{"params": [0]}]})
    Traceback (most recent call last):
    ...
    ValueError: 'state' has the state of parameter 5, which no parameter group holds
    """
    groups = value.get("param_groups") if isinstance(value, Mapping) else None
    if not isinstance(groups, list):
        raise ValueError("the checkpoint holds no optimizer state dict (no 'param_groups' list)")
    ids: set[int] = set()
    for index, group in enumerate(groups):
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, list) or not all(type(p) is int for p in params):
            raise ValueError(f"'param_groups'[{index}] has no 'params' list of int ids")
        if ids.intersection(params) or len(set(params)) != len(params):
            raise ValueError(f"'param_groups'[{index}] repeats a parameter id")
        ids.update(params)
    state = value.get("state", {})
    if not isinstance(state, Mapping) or not all(isinstance(v, Mapping) for v in state.values()):
        raise ValueError("'state' is not an object of per-parameter objects")
    stray = [k for k in state if type(k) is not int or k not in ids]
    if stray:
        raise ValueError(
            f"'state' has the state of parameter {stray[0]!r}, which no parameter group holds"[:200]
        )


def check_optimizer_fits(
    target: torch.optim.Optimizer, value: Mapping[str, Any], path: str
) -> None:
    """Check a well-formed optimizer state dict (`check_optimizer_state`) against ``target``:
    the sizes of its parameter groups, the types of their numbers, and, for torch's own
    optimizers, the shapes and types of the per-parameter state.

    A meta tensor in ``value`` stands for a tensor not read yet (`tree.claimed_state`): its
    shape and dtype are checked, what needs its value (a step count; the kind of a tensor
    hyper-parameter, whose message shows it) is left to the check once it is read.

    Raises:
        StateMismatchError: naming the first thing that does not fit.
    """
    groups = value["param_groups"]
    ours = [len(g["params"]) for g in target.param_groups]
    theirs = [len(g["params"]) for g in groups]
    if ours != theirs:
        raise StateMismatchError(
            f"cannot load {path}: the optimizer has parameter groups of sizes {ours}, the "
            f"checkpoint {theirs}; build the optimizer over the same parameters in the same order"
        )
    for index, (live, saved) in enumerate(zip(target.param_groups, groups, strict=True)):
        for key, ours_value in live.items():
            if key == "params" or key not in saved or _holds_claim(saved[key]):
                continue
            if not _same_kind(ours_value, saved[key]):
                raise StateMismatchError(
                    f"cannot load {path}: parameter group {index} has {key}="
                    f"{short_repr(ours_value, 100)}, the checkpoint {key}="
                    f"{short_repr(saved[key], 100)}, a value of another type"
                )
    if not type(target).__module__.startswith("torch.optim."):
        return  # another optimizer's state is its own business
    params = {
        saved_id: param
        for live, saved in zip(target.param_groups, groups, strict=True)
        for saved_id, param in zip(saved["params"], live["params"], strict=True)
    }
    for saved_id, per_param in value.get("state", {}).items():
        for key, item in per_param.items():
            problem = _per_param_problem(key, item, params[saved_id])
            if problem is not None:
                raise StateMismatchError(
                    f"cannot load {path}: the state of parameter {saved_id} holds {key} "
                    f"{problem}; build the optimizer over the parameters it was saved with"
                )


def check_scheduler_fits(target: Any, value: Any, path: str) -> None:
    """Check a saved state of one of torch's learning-rate schedulers against ``target``,
    before its `load_state_dict` copies every key into the object's `__dict__`: no key names
    what is not state (its `optimizer`, which `state_dict()` leaves out, or a method or
    property of its class, which the key would shadow); each value the live scheduler's own
    state holds has the same kind in the checkpoint (a number a number, a bool a bool, a
    string a string, a list a list of the same length, item by item); and the schedulers of a
    `SequentialLR` or `ChainedScheduler` each fit theirs.

    Raises:
        StateMismatchError: naming the first key that does not fit.

    >>> opt = torch.optim.SGD([torch.zeros(1)], lr=0.1)
    >>> check_scheduler_fits(torch.optim.lr_scheduler.StepLR(opt, 2), {"last_epoch": "x"}, "s")
    Traceback (most recent call last):
    ...
    haltpoint.errors.StateMismatchError: cannot load s: the scheduler has last_epoch=0, the ...
    """
    if not isinstance(value, Mapping):
        raise StateMismatchError(
            f"cannot load {path}: the checkpoint holds a {type_name(value)}, not a scheduler's "
            "state dict"
        )
    live = target.state_dict()
    _check_same_kind_of_scheduler(target, live, value, path)
    for key, saved in value.items():
        attribute = getattr(type(target), key, None) if type(key) is str else None
        if key == "optimizer" or callable(attribute) or isinstance(attribute, property):
            what = "optimizer" if key == "optimizer" else "own attribute"
            raise StateMismatchError(
                f"cannot load {path}: the checkpoint's state has the key {short_repr(key)}, "
                f"which would replace the {type_name(target)}'s {what}, not set its state"
            )
        if type(key) is not str:
            raise StateMismatchError(
                f"cannot load {path}: the checkpoint's state has the key {short_repr(key)}, a "
                f"{type_name(key)}; a scheduler's keys are strings"
            )
        if key == "_schedulers" and isinstance(getattr(target, key, None), list):
            _check_schedulers(target._schedulers, saved, path)
        elif key in live and not _same_shape(live[key], saved):
            raise StateMismatchError(
                f"cannot load {path}: the scheduler has {key}={short_repr(live[key], 100)}, "
                f"the checkpoint {key}={short_repr(saved, 100)}, a value of another type or "
                "length"
            )


def _check_same_kind_of_scheduler(
    target: Any, live: Mapping[str, Any], value: Mapping[Any, Any], path: str
) -> None:
    """Refuse another scheduler's state: each side has settings the other lacks (a StepLR's
    `step_size` where a ReduceLROnPlateau has `factor`), which `load_state_dict` would copy in
    beside the live ones, leaving the live settings as they were and saying nothing. A key
    on one side only is a torch version's change, and loads."""
    ours = {key for key in live if not key.startswith("_")}
    theirs = {key for key in value if type(key) is str and not key.startswith("_")}
    if ours - theirs and theirs - ours:
        raise StateMismatchError(
            f"cannot load {path}: the checkpoint holds another kind of scheduler's state, "
            f"with {', '.join(sorted(theirs - ours))} where the {type_name(target)} has "
            f"{', '.join(sorted(ours - theirs))}; restore it into the scheduler it was saved from"
        )


def _check_schedulers(schedulers: list[Any], saved: Any, path: str) -> None:
    """The states of a `SequentialLR`'s or `ChainedScheduler`'s schedulers, each against its
    own."""
    if not isinstance(saved, list) or len(saved) != len(schedulers):
        raise StateMismatchError(
            f"cannot load {path}: the scheduler has {len(schedulers)} schedulers, the "
            f"checkpoint {short_repr(saved, 100)}"
        )
    for index, (inner, state) in enumerate(zip(schedulers, saved, strict=True)):
        check_scheduler_fits(inner, state, f"{path}, scheduler {index}")


def _same_shape(ours: Any, theirs: Any) -> bool:
    """`_same_kind`, and strings for strings, lists for lists of the same length item by
    item, mappings for mappings key by key (a scheduler's state)."""
    if isinstance(ours, str):
        return isinstance(theirs, str)
    if isinstance(ours, (list, tuple)):
        return (
            isinstance(theirs, (list, tuple))
            and len(theirs) == len(ours)
            and all(_same_shape(a, b) for a, b in zip(ours, theirs, strict=True))
        )
    if isinstance(ours, Mapping):
        return isinstance(theirs, Mapping) and all(
            _same_shape(v, theirs[k]) for k, v in ours.items() if k in theirs
        )
    return _same_kind(ours, theirs)


def _same_kind(ours: Any, theirs: Any) -> bool:
    """Whether a saved hyper-parameter has the type of the live one (bool, number, tuple); an
    int is a number within 64 bits (a tagged int may hold any, which torch's arithmetic on
    floats then cannot convert)."""
    if isinstance(ours, bool):
        return isinstance(theirs, bool)
    if isinstance(ours, (int, float)):
        if isinstance(theirs, torch.Tensor):  # a tensor learning rate, say
            return theirs.dim() == 0 and theirs.dtype in NUMBER_DTYPES
        if isinstance(theirs, int) and not isinstance(theirs, bool):
            return -(2**63) <= theirs < 2**63  # beyond: no float holds it (OverflowError)
        return isinstance(theirs, float)
    if isinstance(ours, tuple):  # betas: each item of its kind, not only as many
        return (
            isinstance(theirs, (tuple, list))
            and len(theirs) == len(ours)
            and all(_same_kind(a, b) for a, b in zip(ours, theirs, strict=True))
        )
    return True


def _holds_claim(value: Any) -> bool:
    """Whether a saved hyper-parameter is, or holds, a meta tensor (one not read yet)."""
    if isinstance(value, torch.Tensor):
        return value.is_meta
    return isinstance(value, (tuple, list)) and any(_holds_claim(v) for v in value)


def _per_param_problem(key: str, item: Any, param: torch.Tensor) -> str | None:
    if key in PARAM_SHAPED:
        if not isinstance(item, torch.Tensor):
            return f"as a {type_name(item)}, not a tensor"
        if item.shape != param.shape:
            return f"of shape {tuple(item.shape)}, the parameter has shape {tuple(param.shape)}"
    if key in SCALARS:
        if isinstance(item, torch.Tensor):
            if item.dim() != 0:
                return f"of shape {tuple(item.shape)}, not one number"
            if item.dtype not in NUMBER_DTYPES:
                return f"as a 0-d tensor of {item.dtype}, not a number torch's step() counts with"
            if item.is_meta:  # claimed, not read yet: its value is checked once read
                return None
            number = item.item()
        elif not isinstance(item, (int, float)) or isinstance(item, bool):
            return f"as a {type_name(item)}, not a number"
        else:
            number = item
        if key == "step" and not number >= 0:  # NaN included: every parameter became NaN
            return f"{short_repr(number, 40)}, not a count of steps >= 0"
    return None
