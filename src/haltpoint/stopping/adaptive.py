"""The default stopping rule: stop when the trend says waiting longer will not pay.

`EarlyStopping(mode=...)` with no `patience` uses `TrendRule`. Every wait in it is a share of
the run: of `horizon` (the planned number of evaluations) when it is given, else of the
evaluations so far. Once the evaluations without a new best reach `WAIT_SHARE` of that
(and at least `MIN_POINTS`, the fewest values whose fit says anything about the noise), it
fits a straight line to the recent values (the last `WINDOW` of the run, at least
`MIN_WINDOW` and at most `MAX_WINDOW` values) and projects the best the run could still reach
over a look-ahead of `LOOKAHEAD` times the evaluations so far (never past the horizon),
optimistically: the slope one standard error steeper (never rising) and one lucky draw of the
noise measured in that window (`NOISE_K` residual standard deviations times
`sqrt(2 ln lookahead)`, the expected best of that many draws). When even that projection beats
the best by no more than `TOLERANCE` of `|best|`, the run stops. A run that looks diverged
(its fitted level worse than the best by more than `|best|`) waits `DIVERGED_FACTOR` times
as long, because runs that spike often recover, and is projected on the log scale when its
values are positive: a run hundreds of times above its best whose noise is as large as its
level is judged by how many orders of magnitude it must still fall, not by a linear fit whose
noise alone would reach the best. Both rules have a fast lane: after a shorter wait
(`FAST_SHARE` of the run; open once `FAST_OPEN` times that has passed since the start, so that
a warm-up whose loss rises is not taken for a run past its best) it stops when even a far more
optimistic projection (`FAST_NOISE_K` lucky draws, the slope `FAST_SLOPE_Z` standard errors
steeper) cannot beat the best, the evidence that the run is past its best being then
overwhelming. Without a horizon the lane is open only to a run that drifts from its best
rather than swings: its fitted level within `FAST_CALM` of its progress (its first value less
its best) above the best, as when a model overfits; this lets a run whose best comes after
its midpoint stop at all. Told the horizon, the rule plans with its own constants
(`PLANNED_SETTINGS`), and its fast lane is open to any run (a diverged one is not held
longer there). Whatever the
waits and the projection say, the rule never stops a run that is still clearly improving: while
the window's fitted slope is more than `DESCENT_Z` standard errors below 0 and, kept up over
the look-ahead, would gain more than `TOLERANCE` (the descent guard; `math.inf` turns it off,
as the planned rule has it). Both sets are
chosen by leave-one-problem-out cross-validation on DeepOBS curves of 20 to 351 evaluations
(`benchmarks/stopping_tuning.py`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from haltpoint.stopping.decision import StopReason
from haltpoint.stopping.inputs import json_number, shown, whole_number

__all__ = [
    "DEFAULT_SETTINGS",
    "DESCENT_Z",
    "DIVERGED_FACTOR",
    "FAST_CALM",
    "FAST_NOISE_K",
    "FAST_OPEN",
    "FAST_SHARE",
    "FAST_SLOPE_Z",
    "LOOKAHEAD",
    "MAX_WINDOW",
    "MIN_POINTS",
    "MIN_WINDOW",
    "NOISE_K",
    "PLANNED_SETTINGS",
    "SLOPE_Z",
    "TOLERANCE",
    "WAIT_SHARE",
    "WINDOW",
    "Projection",
    "TrendCheck",
    "TrendRule",
    "TrendSettings",
    "check_horizon",
    "describe_default_rule",
    "diverged",
    "fit_line",
    "window_size",
]

#: Least wait without a new best, as a share of the run (the horizon, else evaluations so far).
WAIT_SHARE = 0.5
#: ... but never fewer than this many: the fewest values whose fit measures the noise.
MIN_POINTS = 5
#: The trend is fitted over this fraction of the evaluations so far ...
WINDOW = 0.25
#: ... but over at least this many ...
MIN_WINDOW = 5
#: ... and at most this many values (which bounds the state and the cost of a step).
MAX_WINDOW = 64
#: Look ahead this multiple of the evaluations so far, never past the horizon.
LOOKAHEAD = 2.0
#: The projected slope is this many standard errors steeper than the fitted one.
SLOPE_Z = 1.0
#: The projected lucky draw is this many residual standard deviations times sqrt(2 ln n).
NOISE_K = 1.0
#: Stop when the projection beats the best by no more than this share of |best|.
TOLERANCE = 0.0025
#: A run that looks diverged (fitted level worse than the best by more than |best|) waits
#: this many times the least wait: runs that spike often recover.
DIVERGED_FACTOR = 2.0
#: The fast lane's least wait, as a share of the run (0: no fast lane; the planned rule's 0.1).
FAST_SHARE = 0.25
#: The fast lane opens once this many times its wait has passed since the start (a loss
#: that rises early on may be a warm-up, not a run past its best).
FAST_OPEN = 1.5
#: The fast lane's lucky draw, in the same units as `NOISE_K` ...
FAST_NOISE_K = 2.0
#: ... and its slope, this many standard errors steeper than fitted.
FAST_SLOPE_Z = 2.0
#: Without a horizon, the fast lane is open only to a run whose fitted level sits within this
#: share of its progress (its first value less its best) above its best: a drift away from the
#: best, as when a model overfits, not a swing, which often comes back (`math.inf`: any run).
FAST_CALM = 0.1
#: Never stop while the window's slope is more than this many standard errors below 0 (and
#: gains more than `TOLERANCE` over the look-ahead): the run is still clearly improving (the
#: descent guard; `math.inf`: no guard).
DESCENT_Z = 1.0


@dataclass(frozen=True, slots=True)
class TrendSettings:
    """The default rule's constants, in one place so that a benchmark can vary them.

    `EarlyStopping` uses `DEFAULT_SETTINGS` (the module constants above) without a horizon and
    `PLANNED_SETTINGS` with one; other values are for `benchmarks/stopping_tuning.py`, which
    chooses among them by cross-validation.

    Example:
        >>> TrendSettings().wait_share == WAIT_SHARE
        True
    """

    wait_share: float = WAIT_SHARE
    min_points: int = MIN_POINTS
    window: float = WINDOW
    min_window: int = MIN_WINDOW
    max_window: int = MAX_WINDOW
    lookahead: float = LOOKAHEAD
    slope_z: float = SLOPE_Z
    noise_k: float = NOISE_K
    tolerance: float = TOLERANCE
    diverged_factor: float = DIVERGED_FACTOR
    fast_share: float = FAST_SHARE
    fast_open: float = FAST_OPEN
    fast_noise_k: float = FAST_NOISE_K
    fast_calm: float = FAST_CALM
    descent_z: float = DESCENT_Z

    def least_wait(self, scale: int) -> int:
        """Evaluations without a new best before the rule looks at the trend, in a run of
        `scale` evaluations (the horizon, or the evaluations so far).

        Example:
            >>> TrendSettings(wait_share=0.2, min_points=8).least_wait(100)
            20
        """
        return max(math.ceil(self.wait_share * scale), self.min_points)

    def fast_wait(self, scale: int) -> int | None:
        """The fast lane's least wait in a run of `scale` evaluations, or None without one.

        Example:
            >>> TrendSettings(fast_share=0.1).fast_wait(100)
            10
            >>> TrendSettings(fast_share=0).fast_wait(100) is None
            True
        """
        if self.fast_share <= 0:
            return None
        return max(math.ceil(self.fast_share * scale), self.min_points)


#: The settings `EarlyStopping` uses without a horizon.
DEFAULT_SETTINGS = TrendSettings()
#: The settings `EarlyStopping` uses when told the horizon: it may plan, so it waits 30% of
#: the plan (at least 3 evaluations; twice that when the run looks diverged), looks ahead
#: twice the run so far (never past the plan), stops at a projected gain of at most 0.25%,
#: waits only 10% of the plan when a projection three times as lucky cannot beat the best (the
#: fast lane, open from 15% of the plan), and has no descent guard.
PLANNED_SETTINGS = TrendSettings(
    wait_share=0.3,
    min_points=3,
    lookahead=2.0,
    tolerance=0.0025,
    diverged_factor=2.0,
    fast_share=0.1,
    fast_open=1.5,
    fast_noise_k=3.0,
    descent_z=math.inf,
)


@dataclass(frozen=True, slots=True)
class Projection:
    """What the trend fit projects at one evaluation (values in "lower is better" terms).

    Attributes:
        window: how many values the line was fitted to.
        level: the fitted value at the latest evaluation.
        slope: the fitted change per evaluation.
        noise: the residual standard deviation.
        lookahead: evaluations projected ahead.
        gain: how much better than the best the optimistic projection is, as a share of
            `|best|` (negative when even it is worse).
        descending: whether the slope is more than `descent_z` standard errors below 0 and
            would gain more than `tolerance` over the look-ahead (the run is still clearly
            improving; the descent guard then holds it open).
    """

    window: int
    level: float
    slope: float
    noise: float
    lookahead: int
    gain: float
    descending: bool = False


class TrendCheck(NamedTuple):
    """What the default rule's latest look at the trend found, for `EarlyStopping.explain()`.

    Kept by `TrendRule.check` (a tuple of what it computed anyway) and never saved: after a
    resume the next check fills it in again.

    Attributes:
        evaluation: the index of the evaluation it was made at.
        main: the main test's finding: `"stop"`; `"guard"` (the descent guard holds the run,
            and nothing else was tried); `"short"` (the wait is under the least wait: only the
            fast lane could stop it); `"held"` (the run looks diverged and waits longer); or
            `"gain"` (the projection gains more than the tolerance).
        projection: the main test's projection.
        fast: the fast lane's finding, or None when it was not tried: `"stop"`, `"swing"`
            (closed to a run this far above its best, without a horizon) or `"gain"`.
        evident: the fast lane's projection, when it made one.

    Example:
        >>> rule = TrendRule(1.0)
        >>> for i in range(6):
        ...     rule.observe(i, 1.0)
        >>> rule.check(5, best=1.0, wait=5) is not None, rule.last_check.main
        (True, 'stop')
    """

    evaluation: int
    main: str
    projection: Projection
    fast: str | None = None
    evident: Projection | None = None


def fit_line(points: Sequence[tuple[int, float]]) -> tuple[float, float, float, float]:
    """Least-squares line through `(t, x)` points (at least 3, two distinct t): (level at the
    last t, slope, residual standard deviation, standard error of the slope per unit of noise).

    One pass over sums of values taken relative to the first point, so a step stays cheap.

    Example:
        >>> [round(v, 6) for v in fit_line([(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.0)])]
        [0.0, -1.0, 0.0, 0.447214]
    """
    t0, x0 = points[-1][0], points[0][1]
    n = len(points)
    st = sx = stt = stx = sxx = 0.0
    for t, x in points:
        dt = t - t0
        dx = x - x0
        st += dt
        sx += dx
        stt += dt * dt
        stx += dt * dx
        sxx += dx * dx
    vtt = stt - st * st / n
    vtx = stx - st * sx / n
    vxx = sxx - sx * sx / n
    slope = vtx / vtt
    sse = max(vxx - slope * vtx, 0.0)
    noise = math.sqrt(sse / (n - 2)) if n > 2 else 0.0
    level = x0 + sx / n - slope * st / n  # the fitted value at t0 (dt = 0)
    return level, slope, noise, 1.0 / math.sqrt(vtt)


def window_size(index: int, settings: TrendSettings = DEFAULT_SETTINGS) -> int:
    """How many of the latest evaluations the trend is fitted to at evaluation `index`.

    Example:
        >>> window_size(0), window_size(99), window_size(10_000)
        (5, 25, 64)
    """
    s = settings
    return min(s.max_window, max(s.min_window, math.ceil(s.window * (index + 1))))


class TrendRule:
    """The default rule's state and decision; `EarlyStopping` drives it.

    Args:
        sign: 1.0 for `mode="min"`, -1.0 for `"max"` (values are compared as `sign * x`).
        horizon: the planned number of evaluations, or None.
        settings: the constants; None takes `PLANNED_SETTINGS` with a horizon, else
            `DEFAULT_SETTINGS` (a benchmark passes others).

    Example:
        >>> rule = TrendRule(1.0)
        >>> for i in range(20):
        ...     rule.observe(i, 1.0)
        >>> rule.project(19, best=1.0, wait=19).gain <= TOLERANCE
        True
    """

    def __init__(
        self, sign: float, horizon: int | None = None, settings: TrendSettings | None = None
    ) -> None:
        self._sign = sign
        self._horizon = horizon
        if settings is None:
            settings = DEFAULT_SETTINGS if horizon is None else PLANNED_SETTINGS
        self._settings = settings
        self._points: deque[tuple[int, float]] = deque()
        self._sums = _Sums()
        self._logs: _Sums | None = None  # the same over log(x), from the first diverged fit on
        self._nonpositive = 0  # values in the window that have no logarithm
        self._first: float | None = None  # the run's first finite value, as compared (sign * x)
        self._checked: TrendCheck | None = None  # the latest check's finding, never saved

    @property
    def settings(self) -> TrendSettings:
        """The constants in force."""
        return self._settings

    @property
    def horizon(self) -> int | None:
        """The planned number of evaluations, or None."""
        return self._horizon

    @property
    def last_check(self) -> TrendCheck | None:
        """What the latest `check` that looked at the trend found, or None (none yet, or
        none since `load_state_dict`)."""
        return self._checked

    def observe(self, index: int, value: float) -> None:
        """Remember a finite value (non-finite ones are left out of the fit), and forget the
        values that fell out of the window."""
        points, sums = self._points, self._sums
        if math.isfinite(value):
            x = self._sign * value
            if self._first is None:
                self._first = x
            points.append((index, x))
            sums.add(index, x, 1.0)
            if self._logs is not None:
                self._add_log(index, x, 1)
        first = index - window_size(index, self._settings)
        reset = index % self._settings.max_window == 0  # bounds rounding drift
        while points and points[0][0] <= first:
            t, x = points.popleft()
            reset = reset or sums.large(x)  # its square would swamp the sums once removed
            sums.add(t, x, -1.0)
            if self._logs is not None:
                self._add_log(t, x, -1)
        if reset or not sums.sound():
            sums.reset(points)
            if self._logs is not None:
                self._reset_logs()

    def _add_log(self, t: int, x: float, w: int) -> None:
        assert self._logs is not None
        if x > 0:
            self._logs.add(t, math.log(x), float(w))
        else:
            self._nonpositive += w

    def _reset_logs(self) -> _Sums:
        """Sum `log(x)` over the window from scratch; from then on `observe` keeps it."""
        self._logs, self._nonpositive = _Sums(), 0
        for t, x in self._points:
            self._add_log(t, x, 1)
        return self._logs

    def least_wait(self, index: int) -> int:
        """Evaluations without a new best the rule needs at evaluation `index` before it looks
        at the trend: a share of the horizon, or of the evaluations so far."""
        scale = self._horizon if self._horizon is not None else index + 1
        return self._settings.least_wait(scale)

    def lookahead(self, index: int) -> int:
        """Evaluations the rule projects ahead at evaluation `index`."""
        ahead = max(math.ceil(self._settings.lookahead * (index + 1)), 1)
        if self._horizon is not None:
            ahead = min(ahead, max(self._horizon - index - 1, 1))
        return ahead

    def fast_wait(self, index: int) -> int | None:
        """The fast lane's least wait at evaluation `index`, or None when it is closed: without
        a fast lane, or before `fast_open` times that wait has passed since the start (a loss
        that rises early on may be a warm-up, not a run past its best)."""
        scale = self._horizon if self._horizon is not None else index + 1
        wait = self._settings.fast_wait(scale)
        return None if wait is None or index < self._settings.fast_open * wait else wait

    def earliest_wait(self, index: int) -> int:
        """The fewest evaluations without a new best that can stop the run at `index`: the
        least wait, or the fast lane's when it is shorter."""
        least, fast = self.least_wait(index), self.fast_wait(index)
        return least if fast is None else min(least, fast)

    def project(self, index: int, best: float, wait: int, *, fast: bool = False) -> Projection:
        """Fit the recent values and project the best the run could still reach (`fast`: with
        the fast lane's larger optimism)."""
        points = self._points
        ahead = self.lookahead(index)
        if len(points) < 3:
            return Projection(len(points), math.nan, math.nan, math.nan, ahead, math.inf)
        s = self._settings
        noise_k, slope_z = (s.fast_noise_k, FAST_SLOPE_Z) if fast else (s.noise_k, s.slope_z)
        level, slope, noise, se = self._sums.fit(len(points), points[-1][0])
        target = self._sign * best
        reachable = _reachable(level, slope, noise, se, ahead, noise_k, slope_z)
        worse = level - target
        logs = None
        if worse > abs(target) and target > 0:
            logs = self._reset_logs() if self._logs is None else self._logs
        if logs is not None and self._nonpositive == 0:
            # diverged, positive: project log(value), judged by the orders of magnitude left
            fitted = logs.fit(len(points), points[-1][0])
            reachable = math.exp(min(_reachable(*fitted, ahead, noise_k, slope_z), 709.0))
        gain = (target - reachable) / abs(target) if target != 0 else math.inf
        descending = (
            math.isfinite(s.descent_z)
            and slope < -s.descent_z * noise * se
            and -slope * ahead > s.tolerance * abs(target)  # rounding-sized slopes are flat
        )
        return Projection(len(points), self._sign * level, slope, noise, ahead, gain, descending)

    def check(self, index: int, best: float | None, wait: int) -> Projection | None:
        """Return the projection when the run should stop at `index`, else None."""
        if best is None:
            return None
        if wait < self.earliest_wait(index):
            return None
        least, fast = self.least_wait(index), self.fast_wait(index)
        tolerance = self._settings.tolerance
        projection = self.project(index, best, wait)
        if projection.descending:  # still clearly improving: the descent guard holds it open
            self._checked = TrendCheck(index, "guard", projection)
            return None
        longer = math.ceil(self._settings.diverged_factor * least)
        held = wait < longer and diverged(projection, best, self._sign)  # may be a spike
        if wait >= least and not held and projection.gain <= tolerance:
            self._checked = TrendCheck(index, "stop", projection)
            return projection
        main = "short" if wait < least else "held" if held else "gain"
        if fast is not None and wait >= fast:
            if not self._calm(projection, best):
                self._checked = TrendCheck(index, main, projection, "swing")
                return None
            evident = self.project(index, best, wait, fast=True)
            if evident.gain <= tolerance:
                self._checked = TrendCheck(index, main, projection, "stop", evident)
                return evident
            self._checked = TrendCheck(index, main, projection, "gain", evident)
            return None
        self._checked = TrendCheck(index, main, projection)
        return None

    def _calm(self, projection: Projection, best: float) -> bool:
        """Whether the fast lane is open to the run's state: told the horizon, always;
        without it, only while the fitted level is within `fast_calm` of the run's progress
        (its first value less its best) above the best."""
        calm = self._settings.fast_calm
        if self._horizon is not None or math.isinf(calm):
            return True
        if self._first is None:
            return False
        target = self._sign * best
        return self._sign * projection.level - target <= calm * (self._first - target)

    @staticmethod
    def code(projection: Projection, best: float, sign: float) -> StopReason:
        """`DIVERGENCE` when the fitted level is worse than the best by more than `|best|`,
        else `PATIENCE`."""
        return StopReason.DIVERGENCE if diverged(projection, best, sign) else StopReason.PATIENCE

    def state_dict(self) -> dict[str, Any]:
        """The remembered `[index, value]` pairs (values as watched), the running sums and the
        run's first finite value (None before one)."""
        return {
            "points": [[t, self._sign * x] for t, x in self._points],
            "sums": self._sums.state(),
            "first": None if self._first is None else self._sign * self._first,
        }

    def load_state_dict(self, state: object, evaluations: int = 2**53 + 1) -> None:
        """Restore the pairs and sums saved by `state_dict()`; None starts afresh.

        Raises:
            ValueError: when `state` is not a list of `[int, number]` pairs of increasing
                evaluations below `evaluations` (the stopper's count), finite values, and
                8 sums that are theirs.
        """
        if state is None:  # saved without the default rule's state: start the fit afresh
            self._points, self._sums, self._logs = deque(), _Sums(), None
            self._checked = None
            self._first = None  # the next value stands in for the run's first
            return
        points = state.get("points") if isinstance(state, dict) else None
        sums = state.get("sums") if isinstance(state, dict) else None
        first = state.get("first") if isinstance(state, dict) else None
        if (
            (first is not None and not _is_pair([0, first]))
            or not isinstance(points, list)
            or not all(_is_pair(p) for p in points)
            or any(a[0] >= b[0] for a, b in itertools.pairwise(points))
            or (points and points[-1][0] >= evaluations)
            or not isinstance(sums, list)
            or len(sums) != 8
            or not all(json_number(v) is not None for v in sums)
            # the reference point, the count and the index sums are finite; the value sums
            # may overflow to inf (a run beyond 1e154): `overflowed_sums_of` checks those
            or not all(_is_pair([0, sums[k]]) for k in (0, 1, 2, 3, 5))
        ):
            raise ValueError(
                "EarlyStopping state 'trend' must be {'points': [[evaluation, value], ...] "
                f"(evaluations from 0 to {evaluations - 1}, increasing; finite values), "
                f"'sums': [8 numbers, the first four and the sixth finite], 'first': a finite "
                f"number or null}}; "
                f"got {shown(state)}"
            )
        kept = [(int(t), self._sign * float(x)) for t, x in points]
        saved = _Sums.from_state(sums)
        if not (saved.sums_of(kept) or saved.overflowed_sums_of(kept)):
            raise ValueError(
                "EarlyStopping state 'trend' 'sums' must be the running sums of its "
                f"{len(kept)} 'points' (as state_dict() saved them); got {shown(sums)}"
            )
        self._points = deque(kept)
        self._sums = saved
        self._logs = None
        self._checked = None  # not saved: the next check says what the loaded trend projects
        if first is not None:
            self._first = self._sign * float(first)
        else:  # none seen yet, or saved without it: the oldest value kept stands in (for a
            # run that has been improving, a later value: less progress, a narrower calm lane)
            self._first = self._points[0][1] if self._points else None


class _Sums:
    """Running sums of the window's points, taken relative to a reference point so that
    rounding stays small; `reset` recomputes them from the points."""

    __slots__ = ("n", "st", "stt", "stx", "sx", "sxx", "t0", "x0")

    def __init__(self) -> None:
        self.t0 = 0
        self.x0 = 0.0
        self.n = self.st = self.sx = self.stt = self.stx = self.sxx = 0.0

    def add(self, t: int, x: float, w: float) -> None:
        if self.n == 0 and w > 0:
            self.t0, self.x0 = t, x
        dt = t - self.t0
        dx = x - self.x0
        self.n += w
        self.st += w * dt
        self.sx += w * dx
        self.stt += w * dt * dt
        self.stx += w * dt * dx
        self.sxx += w * dx * dx

    def large(self, x: float) -> bool:
        """Whether removing `x` would leave sums swamped by its rounding: its square is more
        than a million times what the other values' squares add up to."""
        dx = x - self.x0
        return dx * dx > 1e6 * (self.sxx - dx * dx) if self.n > 0 else False

    def sound(self) -> bool:
        """Whether the sums are finite and not dominated by values that left the window."""
        return math.isfinite(self.sxx) and self.n > 0

    def reset(self, points: Sequence[tuple[int, float]]) -> None:
        self.__init__()  # type: ignore[misc]
        for t, x in points:
            self.add(t, x, 1.0)

    def fit(self, n: int, last: int) -> tuple[float, float, float, float]:
        """(level at `last`, slope, residual standard deviation, slope standard error per
        unit of noise), as `fit_line` gives for the same points."""
        st, sx = self.st, self.sx
        vtt = self.stt - st * st / n
        vtx = self.stx - st * sx / n
        vxx = self.sxx - sx * sx / n
        slope = vtx / vtt
        sse = max(vxx - slope * vtx, 0.0)
        noise = math.sqrt(sse / (n - 2))
        level = self.x0 + sx / n + slope * (last - self.t0 - st / n)
        return level, slope, noise, 1.0 / math.sqrt(vtt)

    def sums_of(self, points: Sequence[tuple[int, float]]) -> bool:
        """Whether these are the running sums of `points` as `add` keeps them, however the
        window slid: the count and the index sums exactly (they are sums of integers), the
        value sums up to rounding. A state that passes cannot make `fit` fail."""
        if not all(map(math.isfinite, self.state())) or self.n != len(points):
            return False
        if not points:
            return self.state()[2:] == [0.0] * 6
        if not 0 <= self.t0 <= points[0][0]:
            return False
        dts = [t - self.t0 for t, _ in points]
        if self.st != sum(dts) or self.stt != sum(dt * dt for dt in dts):
            return False
        dxs = [x - self.x0 for _, x in points]
        # rounding left by values that left the window is bounded by the run's own scale
        unit = len(points) * (1.0 + abs(self.x0) + max(abs(x) for _, x in points))
        return all(
            # sum, not fsum: fsum raises on an overflow of finite values (runs beyond 1e308)
            abs(saved - sum(terms)) <= 1e-6 * sum(map(abs, terms)) + 1e-9 * floor
            for saved, terms, floor in (
                (self.sx, dxs, unit),
                (
                    self.stx,
                    [dt * dx for dt, dx in zip(dts, dxs, strict=True)],
                    unit * dts[-1] if dts[-1] else 0.0,  # inf * 0 would be nan
                ),
                (self.sxx, [dx * dx for dx in dxs], unit * unit),
            )
        )

    def overflowed_sums_of(self, points: Sequence[tuple[int, float]]) -> bool:
        """Whether these are the sums of `points` whose squares or products overflow a float
        (values beyond about 1e154, a diverged run): `observe` then sums them afresh at every
        evaluation, so they are exactly what `reset` gives, inf (or nan) included."""
        fresh = _Sums()
        fresh.reset(points)
        return not fresh.sound() and all(
            a == b or (math.isnan(a) and math.isnan(b))
            for a, b in zip(fresh.state(), self.state(), strict=True)
        )

    def state(self) -> list[float]:
        return [float(self.t0), self.x0, self.n, self.st, self.sx, self.stt, self.stx, self.sxx]

    @classmethod
    def from_state(cls, values: Sequence[float]) -> _Sums:
        sums = cls()
        t0, sums.x0, sums.n, sums.st, sums.sx, sums.stt, sums.stx, sums.sxx = map(float, values)
        sums.t0 = int(t0)
        return sums


def _reachable(
    level: float, slope: float, noise: float, se: float, ahead: int, noise_k: float, slope_z: float
) -> float:
    """The optimistic projection: the fitted level `ahead` evaluations on, with the slope
    `slope_z` standard errors steeper (never rising) and `noise_k` lucky draws of the noise."""
    steepest = min(slope - slope_z * noise * se, 0.0)
    return level + steepest * ahead - noise_k * noise * math.sqrt(2.0 * math.log(max(ahead, 2)))


def diverged(projection: Projection, best: float, sign: float) -> bool:
    """Whether the fitted level is worse than the best by more than `|best|` (for a loss,
    more than twice the best): the run looks diverged.

    Example:
        >>> diverged(Projection(10, 2.5, 0.0, 0.1, 15, -1.0), best=1.0, sign=1.0)
        True
    """
    worse = sign * (projection.level - best)
    return worse > abs(best) and worse > 0


def _is_pair(p: Any) -> bool:
    """Whether `p` is `[evaluation, value]`: an int from 0 to 2**53, a finite number."""
    if not (isinstance(p, (list, tuple)) and len(p) == 2):
        return False
    value = json_number(p[1])
    return (
        isinstance(p[0], int)
        and not isinstance(p[0], bool)
        and 0 <= p[0] <= 2**53
        and value is not None
        and math.isfinite(value)
    )


def describe_default_rule(horizon: int | None = None) -> str:
    """Say the default rule in words, for messages and docs.

    Example:
        >>> describe_default_rule().startswith("the default rule: no new best for 50% of")
        True
    """
    s = DEFAULT_SETTINGS if horizon is None else PLANNED_SETTINGS
    scale = "the evaluations so far" if horizon is None else f"the horizon of {horizon}"
    calm = (
        ""
        if horizon is not None or math.isinf(s.fast_calm)
        else f" while the run sits within {s.fast_calm * 100:g}% of its progress above its best"
    )
    fast = (
        ""
        if s.fast_share <= 0
        else f"; or no new best for {s.fast_share * 100:g}% of it and even "
        f"{s.fast_noise_k:g}x the lucky draw projects no more{calm}"
    )
    guard = (
        ""
        if not math.isfinite(s.descent_z)
        else f" and no clear descent (a slope over {s.descent_z:g} standard "
        f"error{'' if s.descent_z == 1 else 's'} below 0)"
    )
    return (
        f"the default rule: no new best for {s.wait_share * 100:g}% of {scale} (at least "
        f"{s.min_points}; {s.diverged_factor:g}x as long when the run looks diverged), and the "
        f"recent trend projects at most {s.tolerance * 100:g}% more improvement{fast}{guard}"
    )


def check_horizon(horizon: object) -> int | None:
    """Validate `horizon`: None or an int >= 1.

    Raises:
        TypeError: for a non-int (booleans included).
        ValueError: for an int < 1.

    Example:
        >>> check_horizon(100), check_horizon(None)
        (100, None)
    """
    if horizon is None:
        return None
    count = whole_number(horizon)
    if count is None:
        raise TypeError(
            f"horizon must be the planned number of evaluations (an int >= 1) or None; got "
            f"{type(horizon).__name__} {shown(horizon)}"
        )
    if count < 1:
        raise ValueError(f"horizon must be an int >= 1; got horizon={shown(horizon)}")
    return count
