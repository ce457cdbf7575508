"""What one evaluation decided: `Decision`, and why a run stopped: `StopReason`."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from haltpoint.stopping.inputs import json_number, shown

__all__ = ["Decision", "StopReason"]


class StopReason(str, enum.Enum):
    """Why a run stopped; the value is the stable string written to histories and state.

    Example:
        >>> StopReason("patience") is StopReason.PATIENCE
        True
    """

    PATIENCE = "patience"
    BASELINE = "baseline"
    NON_FINITE = "non_finite"
    TARGET = "target"
    DIVERGENCE = "divergence"
    TIME_BUDGET = "time_budget"
    GENERALIZATION_LOSS = "generalization_loss"
    PROGRESS_QUOTIENT = "progress_quotient"
    CONSECUTIVE_INCREASES = "consecutive_increases"
    RULE = "rule"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one `EarlyStopping.step`; truthy exactly when training should stop.

    Attributes:
        stop: whether training should stop now.
        improved: whether this evaluation became the new best.
        step: index of this evaluation (0 for the first one the stopper saw).
        value: the monitored value of this evaluation.
        best: the best finite value so far, or None before the first finite value.
        best_step: index of the evaluation that holds `best`, or None.
        wait: evaluations since the best one (0 when this one improved).
        code: the `StopReason` when `stop`, else None.
        reason: a sentence saying why training stops, else None.

    Example:
        >>> d = Decision(stop=False, improved=True, step=0, value=0.5, best=0.5, best_step=0,
        ...              wait=0)
        >>> bool(d), d.to_dict()["best"]
        (False, 0.5)
    """

    stop: bool
    improved: bool
    step: int
    value: float
    best: float | None
    best_step: int | None
    wait: int
    code: StopReason | None = None
    reason: str | None = None

    def __bool__(self) -> bool:
        return self.stop

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (floats may be inf or nan; `code` is its string value)."""
        return {
            "stop": self.stop,
            "improved": self.improved,
            "step": self.step,
            "value": self.value,
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "code": None if self.code is None else self.code.value,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "decision") -> Decision:
        """Rebuild a decision from `to_dict()` output, every field checked.

        Args:
            data: the dict.
            name: what to call it in error messages.

        Raises:
            ValueError: when `data` is not a dict, lacks keys, or a field is not what a
                decision holds (naming it: `decision['code'] must be ...`), e.g. a stop without
                a reason, or a `code` that is not a `StopReason` value.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{name} must be a dict from Decision.to_dict(); got {shown(data)}")
        missing = [k for k in _KEYS if k not in data]
        if missing:
            raise ValueError(
                f"{name} dict is missing keys {missing}; it has {sorted(map(str, data))}; "
                "pass the output of Decision.to_dict()"
            )

        def bad(key: str, allowed: str) -> ValueError:
            return ValueError(f"{name}[{key!r}] must be {allowed}; got {shown(data[key])}")

        for key in ("stop", "improved"):
            if not isinstance(data[key], bool):
                raise bad(key, "a bool")
        for key in ("step", "wait", "best_step"):
            count = data[key]
            if key == "best_step" and count is None:
                continue
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise bad(key, "an int >= 0" + (" or None" if key == "best_step" else ""))
        value = json_number(data["value"])
        if value is None:
            raise bad("value", "a number")
        best = None if data["best"] is None else json_number(data["best"])
        if data["best"] is not None and (best is None or not math.isfinite(best)):
            raise bad("best", "a finite number or None")
        code, reason = data["code"], data["reason"]
        if data["stop"]:
            if not isinstance(code, str) or code not in _CODES:
                raise bad("code", f"a stop reason when it stops, one of {sorted(_CODES)}")
            if not isinstance(reason, str):
                raise bad("reason", "a str (the sentence saying why) when it stops")
        elif code is not None or reason is not None:
            raise bad("code" if code is not None else "reason", "None when it does not stop")
        return cls(
            stop=data["stop"],
            improved=data["improved"],
            step=data["step"],
            value=value,
            best=best,
            best_step=data["best_step"],
            wait=data["wait"],
            code=None if code is None else StopReason(code),
            reason=reason,
        )


_KEYS = ("stop", "improved", "step", "value", "best", "best_step", "wait", "code", "reason")
_CODES = frozenset(r.value for r in StopReason)
