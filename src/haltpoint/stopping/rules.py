"""Extra stopping criteria as small rule objects: `Target`, `Divergence`, `TimeBudget`.

A rule is any object with `check(observation) -> Stop | None` (the `Rule` protocol). A rule
that keeps state between evaluations also has `state_dict()` / `load_state_dict()` (the
`StatefulRule` protocol); `EarlyStopping` saves and restores it with its own state.
Prechelt's criteria live in `haltpoint.stopping.prechelt`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from haltpoint.stopping._text import fmt, label
from haltpoint.stopping.decision import StopReason
from haltpoint.stopping.inputs import json_number, read_metric, real_number, shown
from haltpoint.stopping.modes import Mode

__all__ = [
    "Divergence",
    "Observation",
    "Rule",
    "StatefulRule",
    "Stop",
    "Target",
    "TimeBudget",
    "check_number",
    "is_better",
]


def is_better(a: float, b: float, mode: Mode) -> bool:
    """Whether `a` is strictly better than `b` in `mode` (no delta).

    Example:
        >>> is_better(1.0, 2.0, "min"), is_better(1.0, 2.0, "max")
        (True, False)
    """
    return a < b if mode == "min" else a > b


def check_number(value: object, name: str, *, positive: bool = False) -> float:
    """Validate a finite real configuration number (a NumPy scalar too, not a bool) and
    return it as a float.

    Raises:
        TypeError: when `value` is not a real number.
        ValueError: when it is not finite, or not > 0 with `positive=True`.

    Example:
        >>> check_number(3, "seconds", positive=True)
        3.0
    """
    number = real_number(value)
    if number is None:
        raise TypeError(f"{name} must be a number; got {type(value).__name__} {shown(value)}")
    if not math.isfinite(number) or (positive and number <= 0):
        allowed = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {allowed}; got {name}={shown(value)}")
    return number


@dataclass(frozen=True, slots=True)
class Observation:
    """What a rule sees at one evaluation, after the stopper updated its best and wait.

    Attributes:
        step: index of this evaluation.
        value: the monitored value (may be non-finite when `check_finite=False`).
        metrics: the mapping passed to `step()`, or `{monitor: value}` for a plain number.
        monitor: the monitored metric's name, or None.
        mode: `"min"` or `"max"`.
        best: the best finite value so far (this one included), or None.
        best_step: index of the best evaluation, or None.
        improved: whether this evaluation became the new best.
        wait: evaluations since the best one.

    Example:
        >>> obs = Observation(3, 0.4, {"val_loss": 0.4, "train_loss": 0.3}, "val_loss", "min",
        ...                   0.35, 1, False, 2)
        >>> obs.metric("train_loss", "ProgressQuotient")
        0.3
    """

    step: int
    value: float
    metrics: Mapping[str, object]
    monitor: str | None
    mode: Mode
    best: float | None
    best_step: int | None
    improved: bool
    wait: int

    @property
    def name(self) -> str:
        """The monitored value's name for messages."""
        return label(self.monitor)

    def metric(self, key: str, needed_by: str) -> float:
        """Read another metric passed to `step()`; the error names the keys that were there.

        Raises:
            ValueError: when `key` is missing.
            TypeError: when its value is not a number.
        """
        return read_metric(self.metrics, key, needed_by)


@dataclass(frozen=True, slots=True)
class Stop:
    """A rule's verdict that training should stop, with a sentence a person can act on.

    Example:
        >>> Stop("budget spent", StopReason.TIME_BUDGET).code.value
        'time_budget'
    """

    message: str
    code: StopReason = StopReason.RULE


@runtime_checkable
class Rule(Protocol):
    """A stopping criterion: return a `Stop` to end training, or None to go on.

    `check` is called at every evaluation, warmup included (so stateful rules see every
    value); during warmup its verdict is ignored.

    Example:
        >>> class Plateau:
        ...     def check(self, obs: Observation) -> Stop | None:
        ...         return Stop("flat") if obs.wait >= 2 else None
        >>> isinstance(Plateau(), Rule)
        True
    """

    def check(self, obs: Observation) -> Stop | None:
        """Decide on one evaluation."""
        ...


@runtime_checkable
class StatefulRule(Rule, Protocol):
    """A rule with state to save and restore: JSON-able values only, no configuration.

    Example:
        >>> isinstance(TimeBudget(60.0), StatefulRule), isinstance(Target(0.1), StatefulRule)
        (True, False)
    """

    def state_dict(self) -> dict[str, Any]:
        """Return the rule's state."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the rule's state."""
        ...


@dataclass(frozen=True, slots=True)
class Target:
    """Stop once the monitored value reaches `value` (at or below it for "min", at or above
    for "max").

    Example:
        >>> from haltpoint import EarlyStopping
        >>> stopper = EarlyStopping("val_loss", patience=5, rules=[Target(0.1)])
        >>> [bool(stopper.step(v)) for v in (0.5, 0.2, 0.1)]
        [False, False, True]
    """

    value: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", check_number(self.value, "Target value"))

    def check(self, obs: Observation) -> Stop | None:
        """Stop when `obs.value` is at the target or better."""
        if obs.value == self.value or is_better(obs.value, self.value, obs.mode):
            return Stop(
                f"{obs.name} reached the target {fmt(self.value)} with {fmt(obs.value)} at "
                f"evaluation {obs.step}",
                StopReason.TARGET,
            )
        return None


@dataclass(frozen=True, slots=True)
class Divergence:
    """Stop once the monitored value is strictly worse than `threshold` (above it for "min").

    Example:
        >>> from haltpoint import EarlyStopping
        >>> stopper = EarlyStopping("val_loss", patience=5, rules=[Divergence(10.0)])
        >>> [bool(stopper.step(v)) for v in (2.0, 10.0, 12.0)]
        [False, False, True]
    """

    threshold: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_number(self.threshold, "Divergence threshold"))

    def check(self, obs: Observation) -> Stop | None:
        """Stop when `obs.value` is worse than the threshold."""
        if is_better(self.threshold, obs.value, obs.mode):
            side = "above" if obs.mode == "min" else "below"
            return Stop(
                f"{obs.name} = {fmt(obs.value)} at evaluation {obs.step} is {side} the divergence "
                f"threshold {fmt(self.threshold)}; training has diverged: lower the learning "
                "rate or check the data",
                StopReason.DIVERGENCE,
            )
        return None


class TimeBudget:
    """Stop at the first evaluation after `seconds` of wall-clock time, counted across resumes.

    The clock starts when the rule is created; the elapsed time is part of its state, so a
    resumed run goes on counting from where the saved one was (the time between the save and
    the restart is not counted).

    Args:
        seconds: the budget, > 0.
        clock: a monotonic clock in seconds (tests pass a fake one).

    Example:
        >>> now = [0.0]
        >>> budget = TimeBudget(60.0, clock=lambda: now[0])
        >>> now[0] = 61.0
        >>> budget.elapsed
        61.0
    """

    def __init__(self, seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = check_number(seconds, "seconds", positive=True)
        self._clock = clock
        self._origin = clock()
        self._before = 0.0

    @property
    def elapsed(self) -> float:
        """Seconds counted so far, previous runs included."""
        return self._before + (self._clock() - self._origin)

    def check(self, obs: Observation) -> Stop | None:
        """Stop when the elapsed time reaches the budget."""
        elapsed = self.elapsed
        if elapsed >= self.seconds:
            return Stop(
                f"the time budget of {self.seconds:g} s is spent ({elapsed:.1f} s elapsed, "
                f"counted across resumes) at evaluation {obs.step}; to train longer, raise the "
                "budget and, resuming this run, call stopper.clear_stop() after the restore (a "
                "stopped run stays stopped)",
                StopReason.TIME_BUDGET,
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        """Return `{"elapsed": seconds so far}`."""
        return {"elapsed": self.elapsed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on counting from the saved elapsed time.

        Raises:
            ValueError: when `elapsed` is missing or not a finite number >= 0.
        """
        elapsed = json_number(state.get("elapsed")) if isinstance(state, Mapping) else None
        if elapsed is None or not (math.isfinite(elapsed) and elapsed >= 0):
            raise ValueError(
                "TimeBudget state needs 'elapsed', a finite number of seconds >= 0; got "
                f"{shown(state)}"
            )
        self._before = elapsed
        self._origin = self._clock()

    def __repr__(self) -> str:
        return f"TimeBudget(seconds={self.seconds:g})"
