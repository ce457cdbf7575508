"""Prechelt's stopping criteria GL, PQ and UP ("Early Stopping — But When?", 1998).

Each is a rule object for `EarlyStopping(rules=[...])`. GL and PQ are defined on errors, so
they need `mode="min"`; UP works in either mode ("worse" is higher for "min").
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from haltpoint.stopping._text import evaluations, fmt
from haltpoint.stopping.arguments import check_count
from haltpoint.stopping.decision import StopReason
from haltpoint.stopping.inputs import json_number, shown
from haltpoint.stopping.rules import Observation, Stop, check_number, is_better

__all__ = [
    "ConsecutiveIncreases",
    "GeneralizationLoss",
    "ProgressQuotient",
    "generalization_loss",
    "training_progress",
]


def generalization_loss(value: float, best: float) -> float:
    """GL in percent: how far `value` is above the lowest error `best`, relative to `|best|`.

    Prechelt's `100 * (E_va / E_opt - 1)`, written so that it stays right for `best <= 0`.

    Example:
        >>> generalization_loss(1.1, 1.0)  # doctest: +ELLIPSIS
        10.000...
    """
    if best == 0:
        return math.inf if value > 0 else 0.0
    return 100.0 * (value - best) / abs(best)


def training_progress(strip: list[float]) -> float:
    """P_k in per mille: how much the mean training error of a strip exceeds its minimum.

    Example:
        >>> training_progress([1.0, 1.0, 1.0])
        0.0
    """
    lowest = min(strip)
    mean = sum(strip) / len(strip)
    if lowest == 0:
        return math.inf if mean > 0 else 0.0
    return 1000.0 * (mean - lowest) / abs(lowest)


def _check_at_least_one(value: object, name: str, what: str) -> int:
    """An int >= 1 (a NumPy integer too, not a bool) as an int."""
    count = check_count(value, name, minimum=1, what=what)
    assert count is not None  # None is refused without allow_none
    return count


def _check_strip(strip: object) -> int:
    return _check_at_least_one(strip, "strip", "evaluations per strip")


def _needs_min(rule: str, obs: Observation) -> None:
    if obs.mode != "min":
        raise ValueError(
            f"{rule} is defined on errors and needs mode='min'; {obs.name} is watched with "
            f"mode={obs.mode!r}. Watch a loss, or use ConsecutiveIncreases or Divergence"
        )


class GeneralizationLoss:
    """Prechelt's GL_alpha: stop when the value is more than `alpha` percent above the best.

    Args:
        alpha: the allowed generalization loss in percent, > 0 (Prechelt used 1 to 5).

    Example:
        >>> from haltpoint import EarlyStopping
        >>> stopper = EarlyStopping("val_loss", patience=100, rules=[GeneralizationLoss(5.0)])
        >>> [bool(stopper.step(v)) for v in (1.0, 0.8, 0.83, 0.85)]
        [False, False, False, True]
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = check_number(alpha, "alpha", positive=True)

    def check(self, obs: Observation) -> Stop | None:
        """Stop when GL(t) > alpha."""
        _needs_min("GeneralizationLoss", obs)
        if obs.best is None or not math.isfinite(obs.value):
            return None
        gl = generalization_loss(obs.value, obs.best)
        if gl > self.alpha:
            return Stop(
                f"generalization loss GL = {gl:.2f}% exceeds alpha = {self.alpha:g}%: "
                f"{obs.name} = {fmt(obs.value)} at evaluation {obs.step} is that far above its "
                f"best {fmt(obs.best)} at evaluation {obs.best_step}",
                StopReason.GENERALIZATION_LOSS,
            )
        return None

    def __repr__(self) -> str:
        return f"GeneralizationLoss(alpha={self.alpha:g})"


class ProgressQuotient:
    """Prechelt's PQ_alpha: at the end of each strip, stop when GL / P_k > alpha.

    P_k measures training progress: how much the mean training loss over the last `strip`
    evaluations exceeds the lowest of them (per mille). The training loss is read from the
    mapping passed to `step()` under `train_key`.

    Args:
        alpha: the allowed quotient, > 0 (Prechelt used 0.5 to 3).
        train_key: the training loss's key in the metrics mapping.
        strip: evaluations per strip (Prechelt's k, 5).

    Example:
        >>> from haltpoint import EarlyStopping
        >>> stopper = EarlyStopping("val", patience=100, rules=[ProgressQuotient(1.0, strip=2)])
        >>> [bool(stopper.step({"val": v, "train_loss": t}))
        ...  for v, t in [(1.0, 1.0), (0.8, 0.9), (0.85, 0.899), (0.86, 0.898)]]
        [False, False, False, True]
    """

    def __init__(self, alpha: float, *, train_key: str = "train_loss", strip: int = 5) -> None:
        self.alpha = check_number(alpha, "alpha", positive=True)
        if not isinstance(train_key, str):
            raise TypeError(
                f"train_key must be a str; got {type(train_key).__name__} {train_key!r}"
            )
        self.train_key = train_key
        self.strip = _check_strip(strip)
        self._train: deque[float] = deque(maxlen=self.strip)

    def check(self, obs: Observation) -> Stop | None:
        """Record the training loss; at strip ends, stop when GL / P_k > alpha."""
        _needs_min("ProgressQuotient", obs)
        self._train.append(obs.metric(self.train_key, "ProgressQuotient train_key"))
        if (obs.step + 1) % self.strip or len(self._train) < self.strip:
            return None
        if obs.best is None or not math.isfinite(obs.value):
            return None
        gl = generalization_loss(obs.value, obs.best)
        progress = training_progress(list(self._train))
        if not (gl > 0 and math.isfinite(progress)):
            return None
        quotient = gl / progress if progress > 0 else math.inf
        if quotient > self.alpha:
            return Stop(
                f"progress quotient GL/P = {quotient:.3g} exceeds alpha = {self.alpha:g} at "
                f"evaluation {obs.step}: {obs.name} is {gl:.2f}% above its best "
                f"{fmt(obs.best)} while {self.train_key} progresses little: its mean over the "
                f"last {evaluations(self.strip)} is only {progress:.3g} per mille above its "
                "minimum",
                StopReason.PROGRESS_QUOTIENT,
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        """Return the training losses of the current strip."""
        return {"train": list(self._train)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the training losses of the current strip.

        Raises:
            ValueError: when `train` is missing or not a list of numbers.
        """
        train = state.get("train") if isinstance(state, Mapping) else None
        numbers = [json_number(x) for x in train] if isinstance(train, list) else [None]
        if len(numbers) > self.strip or any(x is None for x in numbers):
            raise ValueError(
                f"ProgressQuotient state needs 'train', a list of at most {self.strip} numbers "
                f"(one strip); got {shown(state)}"
            )
        self._train = deque((x for x in numbers if x is not None), maxlen=self.strip)

    def __repr__(self) -> str:
        return (
            f"ProgressQuotient(alpha={self.alpha:g}, train_key={self.train_key!r}, "
            f"strip={self.strip})"
        )


class ConsecutiveIncreases:
    """Prechelt's UP_s: stop when the value got worse at the end of `s` successive strips.

    At the end of each strip of `strip` evaluations the value is compared with the value at
    the end of the previous strip; `s` worse comparisons in a row stop the run.

    Args:
        s: successive worse strips needed, >= 1.
        strip: evaluations per strip (Prechelt's k, 5).

    Example:
        >>> from haltpoint import EarlyStopping
        >>> stopper = EarlyStopping("val_loss", patience=100,
        ...                         rules=[ConsecutiveIncreases(2, strip=1)])
        >>> [bool(stopper.step(v)) for v in (1.0, 0.5, 0.6, 0.7)]
        [False, False, False, True]
    """

    def __init__(self, s: int, *, strip: int = 5) -> None:
        self.s = _check_at_least_one(s, "s", "successive worse strips")
        self.strip = _check_strip(strip)
        self._previous: float | None = None
        self._count = 0

    def check(self, obs: Observation) -> Stop | None:
        """At strip ends, count successive worsenings; stop when the count reaches s."""
        if (obs.step + 1) % self.strip:
            return None
        previous, self._previous = self._previous, obs.value
        if previous is None:
            return None
        self._count = self._count + 1 if is_better(previous, obs.value, obs.mode) else 0
        if self._count >= self.s:
            return Stop(
                f"{obs.name} got worse at the end of {self._count} successive strips of "
                f"{evaluations(self.strip)} (UP{self.s}), to {fmt(obs.value)} at evaluation "
                f"{obs.step}; best {fmt(obs.best)} at evaluation {obs.best_step}",
                StopReason.CONSECUTIVE_INCREASES,
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        """Return the value at the last strip end and the count of worse strips."""
        return {"previous": self._previous, "count": self._count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the value at the last strip end and the count.

        Raises:
            ValueError: when keys are missing or of the wrong type.
        """
        ok = isinstance(state, Mapping) and {"previous", "count"} <= set(state)
        if ok:
            previous, count = state["previous"], state["count"]
            ok = (previous is None or json_number(previous) is not None) and (
                isinstance(count, int) and not isinstance(count, bool) and count >= 0
            )
        if not ok:
            raise ValueError(
                "ConsecutiveIncreases state needs 'previous' (a number or None) and 'count' "
                f"(an int >= 0); got {shown(state)}"
            )
        self._previous = None if state["previous"] is None else json_number(state["previous"])
        self._count = state["count"]

    def __repr__(self) -> str:
        return f"ConsecutiveIncreases(s={self.s}, strip={self.strip})"
