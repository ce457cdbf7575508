"""Pure decisions about when to save: every N steps, every T of wall time, or "auto".

A policy sees where the run stands (`Progress`: steps and seconds since the last save) and what
saves have cost so far (`Costs`), and answers with the reason to save now, or None. Nothing
here reads a clock or a disk; `haltpoint.schedule` measures and asks.

"auto" picks the interval from the Young/Daly formula, interval = sqrt(2 x C x MTBF), where C
is the training time one save costs (the time `save` blocks the loop). That interval minimises
save overhead (C / interval) plus expected lost work (interval / 2 / MTBF, plus the write
time, which does not depend on the interval). It is then kept within the overhead budget
(interval >= C / overhead) and never shorter than one background write (a save sooner than
that would wait for the previous write, which costs more blocked time).

>>> policy = parse_every("auto", overhead=0.02, mtbf=86400.0)
>>> round(policy.interval_seconds(Costs(blocked_seconds=0.5, write_seconds=2.0)))
294
>>> parse_every(100).due(Progress(steps=100, seconds=5.0, step=300), Costs())
'every 100 steps: step 300 is a multiple of 100'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

__all__ = [
    "DEFAULT_MTBF_SECONDS",
    "DEFAULT_OVERHEAD",
    "Auto",
    "Costs",
    "EverySteps",
    "EveryTime",
    "IntervalPolicy",
    "Progress",
    "parse_duration",
    "parse_every",
    "young_daly",
]

DEFAULT_OVERHEAD = 0.02
"""The share of training time `every="auto"` may spend blocked in saves."""

DEFAULT_MTBF_SECONDS = 24 * 3600.0
"""The mean time between failures `every="auto"` assumes when none is given: one a day (a job
on a few nodes of a shared cluster, preemptions included). Give your own with `mtbf=`."""

_ALLOWED = (
    'an int number of steps (every=100), a duration ("30s", "10min", "2h" or a '
    'datetime.timedelta), or "auto"'
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|sec|min|m|h)\s*$", re.ASCII)
_UNIT_SECONDS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Progress:
    """Where the run stands since the last save (or since the start, before any)."""

    steps: int
    seconds: float
    saved_before: bool = True
    step: int | None = None
    """The step now; None: counted from step 0 (the same as `steps`)."""


@dataclass(frozen=True)
class Costs:
    """What saves cost, as measured (seconds; 0 when nothing was measured yet)."""

    blocked_seconds: float = 0.0
    write_seconds: float = 0.0
    step_seconds: float = 0.0
    measured: bool = False


class IntervalPolicy(Protocol):
    """Says whether to save now, and why."""

    def due(self, progress: Progress, costs: Costs) -> str | None:
        """The reason to save now, or None."""

    def describe(self) -> str:
        """The policy in a few words, e.g. "every 100 steps"."""


@dataclass(frozen=True)
class EverySteps:
    """Save at the steps that are multiples of `steps` (`step % steps == 0`), as Lightning's
    `every_n_train_steps` and Orbax's `save_interval_steps` do, so a resumed run keeps the
    same grid; where calls skip a multiple, at the first step past it.

    >>> EverySteps(5).due(Progress(steps=4, seconds=0.0, step=12), Costs())
    'every 5 steps: step 12 passed step 10 since the last save'
    """

    steps: int

    def due(self, progress: Progress, costs: Costs) -> str | None:
        step = progress.steps if progress.step is None else progress.step
        last = step - progress.steps
        if progress.steps <= 0 or step // self.steps <= last // self.steps:
            return None
        if step % self.steps == 0:
            return f"{self.describe()}: step {step} is a multiple of {self.steps}"
        grid = step // self.steps * self.steps
        return f"{self.describe()}: step {step} passed step {grid} since the last save"

    def describe(self) -> str:
        return f"every {self.steps} steps"


@dataclass(frozen=True)
class EveryTime:
    """Save once `seconds` of wall time have passed since the last save."""

    seconds: float

    def due(self, progress: Progress, costs: Costs) -> str | None:
        if progress.seconds < self.seconds:
            return None
        return f"{self.describe()}: {_seconds_text(progress.seconds)} since the last save"

    def describe(self) -> str:
        return f"every {_seconds_text(self.seconds)}"


def young_daly(cost_seconds: float, mtbf_seconds: float) -> float:
    """The interval that minimises save overhead plus lost work: sqrt(2 x cost x MTBF).

    >>> young_daly(2.0, 3600.0)
    120.0
    """
    return math.sqrt(2.0 * max(cost_seconds, 0.0) * mtbf_seconds)


@dataclass(frozen=True)
class Auto:
    """Save at the Young/Daly interval for the measured costs, within the overhead budget.

    The first call saves (there is nothing measured to decide from yet).
    """

    overhead: float = DEFAULT_OVERHEAD
    mtbf_seconds: float = DEFAULT_MTBF_SECONDS

    def interval_seconds(self, costs: Costs) -> float:
        """max(Young/Daly, blocked / overhead, one write, one step)."""
        return max(
            young_daly(costs.blocked_seconds, self.mtbf_seconds),
            costs.blocked_seconds / self.overhead,
            costs.write_seconds,
            costs.step_seconds,
        )

    def due(self, progress: Progress, costs: Costs) -> str | None:
        if not progress.saved_before:
            return "auto: the first save, to measure what a save costs"
        if not costs.measured:
            return None
        interval = self.interval_seconds(costs)
        if progress.seconds < interval:
            return None
        return (
            f"auto: {_seconds_text(progress.seconds)} since the last save >= interval "
            f"{_seconds_text(interval)} (Young/Daly with save cost "
            f"{_seconds_text(costs.blocked_seconds)}, MTBF {_seconds_text(self.mtbf_seconds)}; "
            f"overhead <= {self.overhead:g})"
        )

    def describe(self) -> str:
        return f'every="auto" (overhead {self.overhead:g}, MTBF {_seconds_text(self.mtbf_seconds)})'


def parse_duration(value: object, name: str) -> float:
    """Seconds from a positive number, a `timedelta` or a string such as "10min" or "2h".

    >>> parse_duration("1.5h", "mtbf"), parse_duration(timedelta(minutes=2), "every")
    (5400.0, 120.0)
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ValueError(
            f'{name} must be a duration: seconds, a string such as "30s", "10min" or "2h", '
            f"or a datetime.timedelta; got {value!r}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name} must be a positive duration, got {value!r}")
    return seconds


def parse_every(
    every: object, *, overhead: float | None = None, mtbf: object = None
) -> IntervalPolicy:
    """The policy `Checkpointer(every=...)` stands for.

    Raises:
        ValueError/TypeError: a value `every`, `overhead` or `mtbf` cannot take, naming the
            argument and the forms allowed.
    """
    if every == "auto":
        return Auto(
            overhead=DEFAULT_OVERHEAD if overhead is None else _check_overhead(overhead),
            mtbf_seconds=DEFAULT_MTBF_SECONDS if mtbf is None else parse_duration(mtbf, "mtbf"),
        )
    if overhead is not None or mtbf is not None:
        raise ValueError(
            f'overhead and mtbf apply to every="auto" only; got every={every!r} '
            f"with overhead={overhead!r}, mtbf={mtbf!r}"
        )
    if isinstance(every, int) and not isinstance(every, bool):
        if every <= 0:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        return EverySteps(every)
    if isinstance(every, (str, timedelta)):
        try:
            return EveryTime(parse_duration(every, "every"))
        except ValueError:
            raise ValueError(f"every must be {_ALLOWED}; got {every!r}") from None
    raise TypeError(f"every must be {_ALLOWED}; got {type(every).__name__} {every!r}")


def _check_overhead(overhead: object) -> float:
    if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not 0 < overhead < 1:
        raise ValueError(
            f"overhead must be a fraction of training time between 0 and 1 (e.g. 0.02), "
            f"got {overhead!r}"
        )
    return float(overhead)


def _seconds_text(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g}h"
    if seconds >= 60:
        return f"{seconds / 60:.3g}min"
    return f"{seconds:.3g}s"
