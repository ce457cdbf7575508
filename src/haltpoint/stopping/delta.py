"""How much better counts as better: an absolute `min_delta` or a `RelativeDelta` of `|best|`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from haltpoint.stopping.inputs import real_number, shown
from haltpoint.stopping.modes import Mode

__all__ = ["Delta", "RelativeDelta", "beats", "by_more_than", "check_delta", "describe_delta"]


@dataclass(frozen=True, slots=True)
class RelativeDelta:
    """A minimum improvement that is a fraction of `|best|`, right for negative metrics too.

    With `RelativeDelta(0.01)` a value improves on `best` when it is better by more than
    `0.01 * abs(best)`: for a loss at -2.0 that means below -2.02 (PyTorch's
    `ReduceLROnPlateau` computes `best * (1 - 0.01)` = -1.98 there, which is worse).

    Example:
        >>> RelativeDelta(0.01).threshold(-2.0)
        0.02
    """

    fraction: float

    def __post_init__(self) -> None:
        fraction = real_number(self.fraction)
        if fraction is None:
            raise TypeError(
                f"RelativeDelta fraction must be a float; got {type(self.fraction).__name__} "
                f"{shown(self.fraction)}"
            )
        if not (math.isfinite(fraction) and fraction >= 0):
            raise ValueError(
                "RelativeDelta fraction must be a finite number >= 0 (0.01 means 1% of |best|); "
                f"got {shown(self.fraction)}"
            )
        object.__setattr__(self, "fraction", fraction)  # a plain float, as from a NumPy scalar

    def threshold(self, best: float) -> float:
        """Return the absolute improvement needed over `best`."""
        return self.fraction * abs(best)


Delta = float | RelativeDelta


def check_delta(min_delta: object) -> Delta:
    """Validate `min_delta`: a finite float >= 0 or a `RelativeDelta`.

    Raises:
        TypeError: when it is neither a number nor a `RelativeDelta`.
        ValueError: when it is negative or not finite.

    Example:
        >>> check_delta(0)
        0.0
    """
    if isinstance(min_delta, RelativeDelta):
        return min_delta
    number = real_number(min_delta)
    if number is None:
        raise TypeError(
            "min_delta must be a float >= 0 or a RelativeDelta (e.g. RelativeDelta(0.01)); "
            f"got {type(min_delta).__name__} {shown(min_delta)}"
        )
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(
            f"min_delta must be a finite number >= 0; got min_delta={shown(min_delta)}. "
            "(Keras silently takes its absolute value; haltpoint refuses it)"
        )
    return number


def beats(value: float, reference: float, mode: Mode, min_delta: Delta) -> bool:
    """Whether `value` improves on `reference` by strictly more than `min_delta`.

    The arithmetic is Lightning's and Keras's (`value + delta < reference` for "min",
    `value - delta > reference` for "max") so that ties round the same way.

    Example:
        >>> beats(0.9, 1.0, "min", 0.1), beats(0.89, 1.0, "min", 0.1)
        (False, True)
    """
    delta = min_delta if type(min_delta) is float else min_delta.threshold(reference)  # type: ignore[union-attr]
    if mode == "min":
        return value + delta < reference
    return value - delta > reference


def describe_delta(min_delta: Delta) -> str:
    """Say `min_delta` in words for messages: ``"0.001"`` or ``"1% of |best|"``.

    Example:
        >>> describe_delta(RelativeDelta(0.01))
        '1% of |best|'
    """
    if isinstance(min_delta, RelativeDelta):
        return f"{min_delta.fraction * 100:g}% of |best|"
    return f"{min_delta:g}"


def by_more_than(min_delta: Delta) -> str:
    """The clause for messages: ``" by more than 0.001"``, or nothing when `min_delta` is 0.

    Example:
        >>> by_more_than(0.001), by_more_than(0.0), by_more_than(RelativeDelta(0.01))
        (' by more than 0.001', '', ' by more than 1% of |best|')
    """
    if describe_delta(min_delta) in ("0", "0% of |best|"):
        return ""
    return f" by more than {describe_delta(min_delta)}"
