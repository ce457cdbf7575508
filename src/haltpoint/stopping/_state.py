"""Checking and unpacking `EarlyStopping` state dicts: versioned, required keys checked."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from haltpoint.errors import StateMismatchError
from haltpoint.stopping.decision import Decision
from haltpoint.stopping.inputs import json_number, shown
from haltpoint.stopping.rules import Rule, StatefulRule

__all__ = ["STATE_KEYS", "STATE_VERSION", "SavedState", "load_rule_states", "parse_state"]

#: Version of the dict `EarlyStopping.state_dict()` returns.
STATE_VERSION = 1
STATE_KEYS = ("version", "evaluations", "best", "best_step", "wait", "last_decision", "rules")
MAX_EVALUATIONS = 2**53
"""The most evaluations a state may count: indices beyond are not exact as floats."""


@dataclass(frozen=True, slots=True)
class SavedState:
    """An `EarlyStopping` state, checked."""

    evaluations: int
    best: float | None
    best_step: int | None
    wait: int
    last_decision: Decision | None
    rules: list[Any]


def _bad(key: str, allowed: str, value: object) -> ValueError:
    return ValueError(f"EarlyStopping state {key!r} must be {allowed}; got {shown(value)}")


def _count(state: Mapping[str, Any], key: str, top: int, allowed: str) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise _bad(key, allowed, value)
    return value


def _decision_part(state: Mapping[str, Any]) -> tuple[int, float | None, int | None, int]:
    """`evaluations`, `best`, `best_step` and `wait`, each checked, and checked against each
    other as `step()` keeps them: the best is an evaluation so far, the wait counts those
    after it (all of them while there is no best)."""
    evaluations = _count(state, "evaluations", MAX_EVALUATIONS, "an int from 0 to 2**53")
    best, best_step = state["best"], state["best_step"]
    if best is not None:
        number = json_number(best)
        if number is None or not math.isfinite(number):
            raise _bad("best", "a finite number or None", best)
        best = number
    if best_step is not None:
        so_far = f"the state's 'evaluations' is {evaluations}"
        allowed = (
            f"None ({so_far})"
            if evaluations == 0
            else f"an int from 0 to {evaluations - 1} (an evaluation so far: {so_far}) or None"
        )
        best_step = _count(state, "best_step", evaluations - 1, allowed)
    if (best is None) != (best_step is None):
        raise ValueError(
            f"EarlyStopping state 'best' and 'best_step' must both be None (no finite value "
            f"yet) or both set; got best={shown(best)}, best_step={shown(best_step)}"
        )
    expected = evaluations if best_step is None else evaluations - 1 - best_step
    wait = state["wait"]
    if isinstance(wait, bool) or not isinstance(wait, int) or wait != expected:
        since = f"the evaluations since the best one: 'evaluations' {evaluations}, 'best_step' "
        raise _bad("wait", f"an int, {expected} ({since}{shown(best_step)})", wait)
    return evaluations, best, best_step, wait


def _last_decision(
    last: object, evaluations: int, best: float | None, best_step: int | None, wait: int
) -> Decision | None:
    """The decision of the latest evaluation, checked, and checked against the state; None
    when the state records none (before the first evaluation, or saved by a version that did
    not record it: no stop then)."""
    if evaluations == 0:
        if last is not None:
            raise _bad("last_decision", "None before the first evaluation", last)
        return None
    if last is None:
        return None
    try:
        decision = Decision.from_dict(last, name="'last_decision'")  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"EarlyStopping state {exc}") from None
    step = evaluations - 1
    for key, value, want in (
        ("step", decision.step, step),
        ("best", decision.best, best),
        ("best_step", decision.best_step, best_step),
        ("wait", decision.wait, wait),
        ("improved", decision.improved, best_step == step),
    ):
        if value != want:
            raise ValueError(
                f"EarlyStopping state 'last_decision'[{key!r}] must be {shown(want)}, as the "
                f"state's 'evaluations', 'best', 'best_step' and 'wait' say; got {shown(value)}"
            )
    return decision


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
    version = state["version"]
    if type(version) is not int or version != STATE_VERSION:
        raise ValueError(
            f"EarlyStopping state has version {shown(version)}; this haltpoint reads "
            f"version {STATE_VERSION}. Upgrade haltpoint to read it"
        )
    _check_origin(state, monitor, mode)
    evaluations, best, best_step, wait = _decision_part(state)
    last = _last_decision(state["last_decision"], evaluations, best, best_step, wait)
    rule_states = state["rules"]
    if not isinstance(rule_states, list) or len(rule_states) != len(rules):
        raise ValueError(
            f"EarlyStopping state 'rules' holds {shown(rule_states)}, which does not match this "
            f"stopper's {len(rules)} rules {list(rules)}; construct the stopper with the same "
            "rules, in the same order, as the run that saved it"
        )
    for i, (rule, rule_state) in enumerate(zip(rules, rule_states, strict=True)):
        if isinstance(rule, StatefulRule) != (rule_state is not None):
            raise ValueError(
                f"EarlyStopping state 'rules'[{i}] is {shown(rule_state)}, which does not fit rule "
                f"{rule!r}; construct the stopper with the same rules as the saved run"
            )
    return SavedState(
        evaluations=evaluations,
        best=best,
        best_step=best_step,
        wait=wait,
        last_decision=last,
        rules=rule_states,
    )


def _check_origin(state: Mapping[str, Any], monitor: str | None, mode: str) -> None:
    """Refuse a state recorded by a stopper of another monitor or mode. Both keys are
    optional: a state saved before they were recorded (an older haltpoint) is not checked."""
    saved_monitor, saved_mode = state.get("monitor", monitor), state.get("mode", mode)
    if saved_monitor is not None and not isinstance(saved_monitor, str):
        raise ValueError(
            f"EarlyStopping state 'monitor' must be a str or None; got {shown(saved_monitor)}"
        )
    if saved_mode not in ("min", "max"):
        raise _bad("mode", "'min' or 'max'", saved_mode)
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
    """Load each stateful rule's state (`parse_state` has matched them up).

    Raises:
        ValueError: a rule refused its state (naming the rule's place in 'rules').
    """
    for i, (rule, rule_state) in enumerate(zip(rules, states, strict=True)):
        if isinstance(rule, StatefulRule):
            try:
                rule.load_state_dict(rule_state)
            except ValueError as exc:
                raise ValueError(f"EarlyStopping state 'rules'[{i}]: {exc}") from None
