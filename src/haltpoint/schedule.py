"""When `Checkpointer.maybe_save` saves: measures costs and asks an interval policy.

The decision is `haltpoint.policies.interval`'s; this piece holds the clock and the
measurements (step time, how long `save` blocked the loop, how long the background write
took) and the two triggers that always go through: a preemption signal, and an improvement of
the monitored metric over the best value seen by `maybe_save`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping

from haltpoint.policies.interval import Costs, IntervalPolicy, Progress

__all__ = ["SaveSchedule"]

_WINDOW = 5
"""How many recent saves the cost estimate (their median) is taken over."""


class SaveSchedule:
    """Decides, step by step, whether a save is due, and records what saves cost.

    Args:
        policy: the interval policy (`policies.interval.parse_every`).
        monitor: the metric whose improvement always saves (None: none does).
        mode: "min" or "max".
        clock: seconds, monotonic (`time.monotonic`; a fake one in tests).

    >>> from haltpoint.policies.interval import EverySteps
    >>> schedule = SaveSchedule(EverySteps(2), monitor=None, mode="min")
    >>> schedule.decide(1, {}, None) is None
    True
    >>> schedule.decide(2, {}, None)["reason"]
    'every 2 steps: step 2 is a multiple of 2'
    """

    def __init__(
        self,
        policy: IntervalPolicy,
        *,
        monitor: str | None,
        mode: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.monitor = monitor
        self.mode = mode
        self._clock = clock
        self._start = clock()
        self._last: tuple[int, float] | None = None  # (step, time) of the last save
        self._first_step: int | None = None
        self._best: float | None = None
        self._blocked: deque[float] = deque(maxlen=_WINDOW)
        self._writes: deque[float] = deque(maxlen=_WINDOW)
        self._steps: deque[float] = deque(maxlen=_WINDOW)
        self._previous_call: tuple[int, float] | None = None

    def costs(self) -> Costs:
        """The medians of the recent measurements."""
        if not self._blocked:
            return Costs(step_seconds=_median(self._steps))
        return Costs(
            blocked_seconds=_median(self._blocked),
            write_seconds=_median(self._writes),
            step_seconds=_median(self._steps),
            measured=True,
        )

    def decide(
        self, step: int, metrics: Mapping[str, float], preempted: str | None
    ) -> dict[str, str] | None:
        """`{"policy": ..., "reason": ...}` when a save is due at `step`, else None."""
        now = self._clock()
        if self._previous_call is not None and step > self._previous_call[0]:
            elapsed = now - self._previous_call[1]
            self._steps.append(elapsed / (step - self._previous_call[0]))
        self._previous_call = (step, now)
        if self._first_step is None:
            self._first_step = step
        if preempted is not None:
            return {"policy": "preemption", "reason": f"{preempted} received: save before exit"}
        improved = self._improved(metrics)
        if improved is not None:
            return {"policy": "improvement", "reason": improved}
        # before any save, the first step seen counts: every=N saves it when it is a multiple
        last_step, last_time = self._last or (self._first_step - 1, self._start)
        saved_before = self._last is not None
        progress = Progress(step - last_step, now - last_time, saved_before, step=step)
        reason = self.policy.due(progress, self.costs())
        return None if reason is None else {"policy": self.policy.describe(), "reason": reason}

    def saved(self, step: int, blocked_seconds: float, write_seconds: float | None) -> None:
        """Record a save of `step` that blocked the loop `blocked_seconds` (and, when known,
        the previous background write's duration)."""
        self._last = (step, self._clock())
        self._blocked.append(blocked_seconds)
        if write_seconds is not None:
            self._writes.append(write_seconds)

    def _improved(self, metrics: Mapping[str, float]) -> str | None:
        if self.monitor is None or self.monitor not in metrics:
            return None
        value = metrics[self.monitor]
        if not math.isfinite(value):
            return None
        best = self._best
        better = best is None or (value < best if self.mode == "min" else value > best)
        if not better:
            return None
        self._best = value
        was = "" if best is None else f" from {best:.6g}"
        return f"{self.monitor} improved to {value:.6g}{was}"


def _median(values: deque[float]) -> float:
    return statistics.median(values) if values else 0.0
