"""Stopping across trials: decide whether a trial of a search can still beat the best one so far.

This module knows nothing of Optuna; `haltpoint.integrations.optuna` adapts it. A curve is a
mapping from step (epoch) to the watched value. At the current trial's last step ``t`` it is
pruned when its best value so far is worse than the leading trial's best at ``t`` by more than
the leader's noise, by more than a share (``margin``) of the catch-up: the most any of its
neighbours (the trials whose best at ``t`` was within ``band`` of its own) caught up after
``t`` on a trial that was ahead of it at ``t``, or ``overall`` times the most any trial did
(how far ranks still move from where this trial stands: little where the curves run side by
side, much where they cross), by more than its own progress since step
``t // 2`` repeated for every doubling of ``t`` left to the longest trial (times ``trend``), and
by more than ``tolerance`` of the leader's value; and only when enough of the study has been
seen at ``t``: ``min_trials`` other trials reached ``t`` and a share ``min_share`` of them all
ran on to step ``2 t`` (or the longest trial's end), so that the later gains come from more
than a lucky few. The constants
were chosen by leave-one-problem-out on 24 DeepOBS sweeps over five trial orders
(`benchmarks/tuning.py`, docs/tuning.md).

>>> leader = {step: 1.0 / (step + 1) for step in range(10)}
>>> others = {0: leader, 1: {s: v + 0.01 for s, v in leader.items()}}
>>> two = PruneSettings(min_trials=2, min_share=0.0)
>>> judge(others, {0: 3.0, 1: 2.9, 2: 2.8}, settings=two).prune
True
>>> judge(others, {0: 1.0, 1: 0.5, 2: 0.34}, settings=two).prune
False
"""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

Curve = Mapping[int, float]

MODES = ("min", "max")


#: Other trials that must have reached the current step before anything is pruned.
MIN_TRIALS = 3
#: The first step at which a trial may be pruned (step 0 is often the untrained model).
MIN_STEP = 2
#: The share of the catch-up after the current step (a trial's later gain minus that of a
#: trial ahead of it then; the most by a neighbour, see `BAND`) that the gap must exceed.
MARGIN = 0.75
#: The gap must also exceed this share of the leader's value (near-ties are never pruned).
TOLERANCE = 0.0
#: The share of the other trials that must have run to twice the current step (or the end).
MIN_SHARE = 0.2
#: The gap must also exceed this multiple of the trial's own progress since half its steps,
#: once for every doubling of its steps left to the longest trial's last step.
TREND = 0.5
#: A trial's neighbours: the trials whose best at the step is within this share of its own.
BAND = 0.1
#: The share of the largest catch-up of any trial (not only of a neighbour) that also counts.
OVERALL = 0.5


@dataclass(frozen=True)
class PruneSettings:
    """The pruning rule's constants, in one place so that `benchmarks/tuning.py` can vary them.

    >>> PruneSettings().min_trials == MIN_TRIALS
    True
    """

    min_trials: int = MIN_TRIALS
    min_step: int = MIN_STEP
    margin: float = MARGIN
    tolerance: float = TOLERANCE
    min_share: float = MIN_SHARE
    trend: float = TREND
    band: float = BAND
    overall: float = OVERALL

    def __post_init__(self) -> None:
        for name in ("min_trials", "min_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        for name in ("margin", "tolerance", "min_share", "trend", "band", "overall"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"{name} must be a real number, got {value!r} ({type(value).__name__})"
                )
        if self.min_trials < 1:
            raise ValueError(f"min_trials must be >= 1, got {self.min_trials}")
        if self.min_step < 0:
            raise ValueError(f"min_step must be >= 0, got {self.min_step}")
        # margin, tolerance and trend multiply quantities that may be 0: inf x 0 is NaN
        if not 0 < self.margin < math.inf:
            raise ValueError(f"margin must be > 0 and finite, got {self.margin}")
        if not 0 <= self.tolerance < math.inf:
            raise ValueError(f"tolerance must be >= 0 and finite, got {self.tolerance}")
        if not 0 <= self.min_share <= 1:
            raise ValueError(f"min_share must be between 0 and 1, got {self.min_share}")
        if not 0 <= self.trend < math.inf:
            raise ValueError(f"trend must be >= 0 and finite, got {self.trend}")
        if not self.band >= 0:
            raise ValueError(f"band must be >= 0, got {self.band}")
        if not 0 <= self.overall <= 1:
            raise ValueError(f"overall must be between 0 and 1, got {self.overall}")


#: The settings `HaltpointPruner()` uses.
DEFAULT_SETTINGS = PruneSettings()


@dataclass(frozen=True)
class Verdict:
    """Whether to prune the current trial, and the sentence that says why."""

    prune: bool
    reason: str


def _checked(curve: object, name: str, number: object = None) -> Curve:
    """``curve`` itself when its steps are ints >= 0 and its values floats (what Optuna stores),
    else a copy with numpy integers, numpy scalars and 0-d tensors converted; a TypeError or
    ValueError naming the curve (``name``, ``others[number]``) and the step where it is neither."""
    where = name if number is None else f"{name}[{number!r}]"
    if not isinstance(curve, Mapping):
        raise TypeError(f"{where} must be a mapping of step to value, got {type(curve).__name__}")
    if not curve or (
        set(map(type, curve)) <= {int}
        and min(curve) >= 0
        and set(map(type, curve.values())) <= {float}
    ):
        return curve
    checked: dict[int, float] = {}
    for step, value in curve.items():
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(
                f"{where}: step {step!r} ({type(step).__name__}) is not an int; "
                "steps must be ints >= 0"
            )
        if step < 0:
            raise ValueError(f"{where}: step {step} is negative; steps must be ints >= 0")
        try:
            if isinstance(value, (str, bytes, bool)):
                raise TypeError
            checked[int(step)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{where}: the value at step {step} is {value!r} ({type(value).__name__}); "
                "values must be real numbers (float, int, a numpy scalar or a 0-d tensor)"
            ) from None
    return checked


def _last_finite(curve: Curve) -> int:
    """The last step of ``curve`` with a finite value (-1 if none): a NaN or infinite tail says
    nothing of what the trial would have reached, so it did not run on to those steps."""
    last = max(curve, default=-1)
    if last < 0 or math.isfinite(curve[last]):
        return last
    return max((s for s, v in curve.items() if math.isfinite(v)), default=-1)


def _best_up_to(curve: Curve, step: int, sign: float) -> float:
    """The best finite value of ``curve`` at steps <= ``step`` (signed so lower is better)."""
    values = [sign * v for s, v in curve.items() if s <= step and math.isfinite(v)]
    return min(values) if values else math.inf


def _noise(curve: Curve, step: int, sign: float) -> float:
    """Noise of ``curve`` up to ``step``: half the median absolute second difference."""
    values = [sign * curve[s] for s in sorted(curve) if s <= step and math.isfinite(curve[s])]
    bends = [abs(a - 2 * b + c) for a, b, c in zip(values, values[1:], values[2:], strict=False)]
    return statistics.median(bends) / 2 if bends else 0.0


def _catch_up(
    at_step: list[float], finals: list[float], near: float = math.nan, band: float = 0.0
) -> tuple[float, float | None]:
    """The most any trial gained after the step beyond what a trial ahead of it then gained,
    and the most any trial within ``band`` of ``near`` (relative) at the step did (None when no
    trial was that near).

    ``at_step[k]`` is trial k's best at the step, ``finals[k]`` its best at its last step
    (both signed so lower is better); 0 when no trial caught up on another.

    >>> _catch_up([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])  # side by side: ranks never move
    (0.0, None)
    >>> _catch_up([1.0, 2.0, 3.0], [0.9, 0.4, 2.5])  # trial 1 gained 1.6, trial 0 only 0.1
    (1.5, None)
    >>> _catch_up([1.0, 2.0, 3.0], [0.9, 0.4, 2.5], near=3.1, band=0.1)  # trial 2: 0.5 - 0.1
    (1.5, 0.4)
    """
    most, most_near, least_ahead = 0.0, None, math.inf
    for value, final in sorted(zip(at_step, finals, strict=True), key=lambda vf: vf[0]):
        gained = value - final
        caught = max(0.0, gained - least_ahead)
        most = max(most, caught)
        if abs(value - near) <= band * abs(near):
            most_near = max(caught, most_near or 0.0)
        least_ahead = min(least_ahead, gained)
    scale = max((abs(v) for v in at_step), default=0.0)

    def rounded(x: float) -> float:
        return x if x > 1e-12 * scale else 0.0  # rounding of curves that never cross

    return rounded(most), None if most_near is None else rounded(most_near)


def judge(
    others: Mapping[int, Curve],
    current: Curve,
    *,
    mode: str = "min",
    settings: PruneSettings = DEFAULT_SETTINGS,
    metric: str = "value",
) -> Verdict:
    """Prune ``current`` or not, given the other trials' curves (finished or running) by number.

    ``settings.min_trials`` other trials must have reached the current step ``t``, a share
    ``settings.min_share`` of all other trials must have reached ``min(2 t, longest)`` (the
    last step of the longest other trial) and the current trial must be at
    ``settings.min_step`` or later before anything is pruned; a trial whose latest value is NaN
    or infinite is pruned at once (NaN and infinite values of the other trials are skipped).
    Steps must be ints >= 0 and values real numbers (numpy scalars and 0-d tensors are
    converted); anything else is a TypeError or ValueError naming the curve and the step.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(settings, PruneSettings):
        raise TypeError(f"settings must be a PruneSettings, got {type(settings).__name__}")
    if not isinstance(others, Mapping):
        raise TypeError(
            f"others must be a mapping of trial number to curve, got {type(others).__name__}"
        )
    checked = {n: _checked(c, "others", n) for n, c in others.items()}
    return _judge(checked, _checked(current, "current"), mode, settings, metric)


def _judge(
    others: Mapping[int, Curve], current: Curve, mode: str, settings: PruneSettings, metric: str
) -> Verdict:
    """`judge` on arguments already checked (Optuna's intermediate values: int steps >= 0,
    float values)."""
    min_trials, min_step = settings.min_trials, settings.min_step
    if not current:
        return Verdict(False, "no value reported yet")
    sign = 1.0 if mode == "min" else -1.0
    step = max(current)
    if not math.isfinite(current[step]):
        return Verdict(True, f"at step {step} {metric} is {current[step]}: the trial diverged")
    if step < min_step:
        return Verdict(False, f"step {step} is before min_step {min_step}")
    ends = {n: _last_finite(c) for n, c in others.items()}
    names = [
        n
        for n, c in others.items()
        if ends[n] >= step and math.isfinite(_best_up_to(c, step, sign))
    ]
    peers = [others[n] for n in names]
    if len(peers) < min_trials:
        return Verdict(False, f"only {len(peers)} other trials reached step {step}")
    longest = max(ends.values())
    far = min(2 * step, longest)
    ran_on = sum(end >= far for end in ends.values())
    if ran_on < settings.min_share * len(others):
        return Verdict(
            False,
            f"only {ran_on} of {len(others)} other trials ran on to step {far} "
            f"(min_share {settings.min_share:g})",
        )
    mine = _best_up_to(current, step, sign)
    at_step = [_best_up_to(c, step, sign) for c in peers]
    lead = min(range(len(peers)), key=at_step.__getitem__)
    finals = [_best_up_to(c, max(c), sign) for c in peers]
    most, most_near = _catch_up(at_step, finals, mine, settings.band)
    gain = most if most_near is None else max(most_near, settings.overall * most)
    noise = _noise(peers[lead], step, sign)
    gap = mine - at_step[lead]
    best = sign * at_step[lead]
    progress = _best_up_to(current, step // 2, sign) - mine
    try:
        doublings = max(0.0, math.log2(max(longest, 1) / max(step, 1)))
    except OverflowError:  # a ratio of steps beyond a float (10**400 / 2): take logs first
        doublings = max(0.0, math.log2(max(longest, 1)) - math.log2(max(step, 1)))
    ahead = settings.trend * doublings * (progress if math.isfinite(progress) else 0.0)
    share = "" if settings.margin == 1 else f"{settings.margin:g} x "
    if most_near is None or settings.overall == 1:
        caught = "the most any trial caught up"
    elif most_near >= settings.overall * most:
        caught = f"the most a trial near it (within {settings.band:.0%}) at step {step} caught up"
    else:
        caught = f"{settings.overall:g} x the most any trial (none near it caught up more)"
    bound = max(settings.margin * gain, noise, settings.tolerance * abs(best), ahead)
    if gap > bound:
        return Verdict(
            True,
            f"at step {step} {metric} {sign * mine:.4g} is worse than leading trial "
            f"{names[lead]}'s {best:.4g} at the same step by {gap:.3g}, more than its noise "
            f"({noise:.2g}), more than {share}{caught} on one ahead "
            f"of it after step {step} ({gain:.3g}) and more than its own recent progress "
            f"projected to step {longest} ({ahead:.3g})",
        )
    return Verdict(
        False,
        f"at step {step} {metric} {sign * mine:.4g} is within {bound:.3g} "
        f"of the leading trial {names[lead]}'s {best:.4g}",
    )
