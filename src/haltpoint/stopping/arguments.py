"""Checking `EarlyStopping`'s constructor arguments: each error names the argument and what
is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from haltpoint.stopping.inputs import real_number, shown, whole_number
from haltpoint.stopping.rules import Rule

__all__ = ["check_baseline", "check_count", "check_flag", "check_monitor", "check_rules"]


def check_monitor(monitor: object) -> str | None:
    """A metric name (a non-empty str) or None.

    >>> check_monitor("val_loss")
    'val_loss'
    """
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise TypeError(
            f"monitor must be a metric name (a non-empty str) or None; got "
            f"{type(monitor).__name__} {monitor!r}"
        )
    return monitor


def check_flag(value: object, name: str) -> bool:
    """A bool (not a truthy stand-in)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {value!r}")
    return value


def check_baseline(baseline: object) -> float | None:
    """A finite number (a NumPy scalar too) as a float, or None.

    >>> check_baseline(1), check_baseline(None)
    (1.0, None)
    """
    if baseline is None:
        return None
    number = real_number(baseline)
    if number is None:
        raise TypeError(
            f"baseline must be a number or None; got {type(baseline).__name__} {shown(baseline)}"
        )
    if not math.isfinite(number):
        raise ValueError(f"baseline must be finite; got baseline={shown(baseline)}")
    return number


def check_count(
    value: object, name: str, allow_none: bool = False, *, minimum: int = 0, what: str = ""
) -> int | None:
    """An int >= `minimum` (a NumPy integer too, not a bool) as an int, or None when
    `allow_none`; `what` says in the message what the count counts.

    >>> check_count(3, "patience")
    3
    """
    if value is None and allow_none:
        return None
    count = whole_number(value)
    allowed = f"an int >= {minimum}" + (f" ({what})" if what else "")
    if count is None:
        extra = " or None" if allow_none else ""
        raise TypeError(
            f"{name} must be {allowed}{extra}; got {type(value).__name__} {shown(value)}"
        )
    if count < minimum:
        raise ValueError(f"{name} must be {allowed}; got {name}={shown(value)}")
    return count


def check_rules(rules: object) -> tuple[Rule, ...]:
    """A list (any iterable but a str or mapping) of objects with a `check` method."""
    if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, Iterable):
        raise TypeError(
            "rules must be a list of rule objects (e.g. [Target(0.1), Divergence(10.0)]); "
            f"got {type(rules).__name__} {rules!r}"
        )
    checked = tuple(rules)
    for i, rule in enumerate(checked):
        if not callable(getattr(rule, "check", None)):
            raise TypeError(
                f"rules[{i}] must have a check(observation) method (the Rule protocol); got "
                f"{type(rule).__name__} {rule!r}"
            )
    return checked
