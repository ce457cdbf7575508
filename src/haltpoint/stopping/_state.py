"""Checking and unpacking `EarlyStopping` state dicts: versioned, required keys checked."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from haltpoint.errors import StateMismatchError
from haltpoint.stopping.decision import Decision
from haltpoint.stopping.rules import Rule, StatefulRule

__all__ = ["STATE_KEYS", "STATE_VERSION", "SavedState", "load_rule_states", "parse_state"]

#: Version of the dict `EarlyStopping.state_dict()` returns.
STATE_VERSION = 1
STATE_KEYS = ("version", "evaluations", "best", "best_step", "wait", "last_decision", "rules")


@dataclass(frozen=True, slots=True)
class SavedState:
    """An `EarlyStopping` state, checked."""

    evaluations: int
    best: float | None
    best_step: int | None
    wait: int
    last_decision: Decision | None
    rules: list[Any]


def _count(state: Mapping[str, Any], key: str, allow_none: bool = False) -> Any:
    value = state[key]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"EarlyStopping state {key!r} must be an int >= 0; got {value!r}")
    return value


def parse_state(state: object, rules: Sequence[Rule], monitor: str | None, mode: str) -> SavedState:
    """Check a state dict against this version, these rules and the loading stopper's
    `monitor` and `mode`, and unpack it.

    Raises:
        TypeError: when `state` is not a mapping.
        ValueError: for a missing key, another version, a value of the wrong type, or a rule
            list that does not match `rules`.
        StateMismatchError: the state records another monitor or mode than `monitor`, `mode`.
    """
    if not isinstance(state, Mapping):
        raise TypeError(
            f"state must be a mapping from EarlyStopping.state_dict(); got {type(state).__name__}"
        )
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"EarlyStopping state is missing keys {missing}; it has {sorted(map(str, state))}. "
            "Pass the dict EarlyStopping.state_dict() returned"
        )
    if state["version"] != STATE_VERSION:
        raise ValueError(
            f"EarlyStopping state has version {state['version']!r}; this haltpoint reads "
            f"version {STATE_VERSION}. Upgrade haltpoint to read it"
        )
    _check_origin(state, monitor, mode)
    best = state["best"]
    if best is not None and (isinstance(best, bool) or not isinstance(best, (int, float))):
        raise ValueError(f"EarlyStopping state 'best' must be a number or None; got {best!r}")
    last = state["last_decision"]
    if last is not None and not isinstance(last, Mapping):
        raise ValueError(
            f"EarlyStopping state 'last_decision' must be a dict or None; got {last!r}"
        )
    rule_states = state["rules"]
    if not isinstance(rule_states, list) or len(rule_states) != len(rules):
        raise ValueError(
            f"EarlyStopping state 'rules' holds {rule_states!r}, which does not match this "
            f"stopper's {len(rules)} rules {list(rules)}; construct the stopper with the same "
            "rules, in the same order, as the run that saved it"
        )
    for i, (rule, rule_state) in enumerate(zip(rules, rule_states, strict=True)):
        if isinstance(rule, StatefulRule) != (rule_state is not None):
            raise ValueError(
                f"EarlyStopping state 'rules'[{i}] is {rule_state!r}, which does not fit rule "
                f"{rule!r}; construct the stopper with the same rules as the saved run"
            )
    return SavedState(
        evaluations=_count(state, "evaluations"),
        best=None if best is None else float(best),
        best_step=_count(state, "best_step", allow_none=True),
        wait=_count(state, "wait"),
        last_decision=None if last is None else Decision.from_dict(last),
        rules=rule_states,
    )


def _check_origin(state: Mapping[str, Any], monitor: str | None, mode: str) -> None:
    """Refuse a state recorded by a stopper of another monitor or mode. Both keys are
    optional: a state saved before they were recorded (an older haltpoint) is not checked."""
    saved_monitor, saved_mode = state.get("monitor", monitor), state.get("mode", mode)
    if saved_monitor is not None and not isinstance(saved_monitor, str):
        raise ValueError(
            f"EarlyStopping state 'monitor' must be a str or None; got {saved_monitor!r}"
        )
    if saved_mode not in ("min", "max"):
        raise ValueError(f"EarlyStopping state 'mode' must be 'min' or 'max'; got {saved_mode!r}")
    if (saved_monitor, saved_mode) != (monitor, mode):
        raise StateMismatchError(
            f"EarlyStopping state was saved by a stopper of monitor {saved_monitor!r} in mode "
            f"{saved_mode!r}, but this one has monitor {monitor!r} in mode {mode!r}; construct "
            "it with the monitor and mode of the run that saved the state, or do not load it "
            "(a new metric or direction starts afresh)"
        )


def rule_states(rules: Sequence[Rule]) -> list[Any]:
    """The state of each rule, None for rules without state."""
    return [rule.state_dict() if isinstance(rule, StatefulRule) else None for rule in rules]


def load_rule_states(rules: Sequence[Rule], states: Sequence[Any]) -> None:
    """Load each stateful rule's state (`parse_state` has matched them up)."""
    for rule, rule_state in zip(rules, states, strict=True):
        if isinstance(rule, StatefulRule):
            rule.load_state_dict(rule_state)
