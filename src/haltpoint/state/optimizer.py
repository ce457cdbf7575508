"""Checks of a saved optimizer state dict: its own structure, and its fit to a live optimizer.

torch's `Optimizer.load_state_dict` trusts what it is given: a state keyed by a parameter that
is not there is kept as junk, a per-parameter state of the wrong shape or type is loaded and
fails at the next `step()`, and some failures come after the optimizer was half replaced. These
checks run before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from haltpoint.errors import StateMismatchError
from haltpoint.state._common import short_repr, type_name

__all__ = ["PARAM_SHAPED", "SCALARS", "check_optimizer_fits", "check_optimizer_state"]

PARAM_SHAPED = frozenset(
    {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg"}
    | {"acc_delta", "grad_avg", "sum", "ax", "prev", "step_size"}
)
"""Per-parameter state of torch's own optimizers that has the shape of its parameter."""
SCALARS = frozenset({"step", "eta", "mu", "mu_product"})
"""Per-parameter state of torch's own optimizers that is one number (a 0-d tensor, or a
Python number in checkpoints of older torch)."""


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
            if key != "params" and key in saved and not _same_kind(ours_value, saved[key]):
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


def _same_kind(ours: Any, theirs: Any) -> bool:
    """Whether a saved hyper-parameter has the type of the live one (bool, number, tuple)."""
    if isinstance(ours, bool):
        return isinstance(theirs, bool)
    if isinstance(ours, (int, float)):
        if isinstance(theirs, torch.Tensor):  # a tensor learning rate, say
            return theirs.dim() == 0
        return isinstance(theirs, (int, float)) and not isinstance(theirs, bool)
    if isinstance(ours, tuple):
        return isinstance(theirs, (tuple, list)) and len(theirs) == len(ours)
    return True


def _per_param_problem(key: str, item: Any, param: torch.Tensor) -> str | None:
    if key in PARAM_SHAPED:
        if not isinstance(item, torch.Tensor):
            return f"as a {type_name(item)}, not a tensor"
        if item.shape != param.shape:
            return f"of shape {tuple(item.shape)}, the parameter has shape {tuple(param.shape)}"
    if key in SCALARS:
        if isinstance(item, torch.Tensor):
            return None if item.dim() == 0 else f"of shape {tuple(item.shape)}, not one number"
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            return f"as a {type_name(item)}, not a number"
    return None
