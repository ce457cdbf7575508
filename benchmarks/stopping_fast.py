"""Replaying the default rule and patience over thousands of curves at once, with NumPy.

`Prepared(curves)` computes, once, everything about a curve that no setting changes: where
its first non-finite value is, the best so far and the wait at every evaluation, and the
least-squares fit of the trend window the default rule looks at (`TrendRule`'s window,
computed directly per window rather than from running sums). `trend_stops(prepared,
settings, horizon)` then finds every curve's stop for one `TrendSettings` with a few array
operations, and `outcomes` turns stops into savings and regrets. `stopping_tuning.py` checks
that these stops are `EarlyStopping`'s, curve by curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from haltpoint.stopping.adaptive import DEFAULT_SETTINGS, FAST_SLOPE_Z, TrendSettings
from stopping_curves import Curves

BIG = np.int64(2**62)


@dataclass(frozen=True)
class Outcomes:
    """Per curve: share of training epochs saved, relative regret on the test loss, and on the
    judged metric (test accuracy where the problem has one, else the test loss)."""

    saved: np.ndarray
    loss: np.ndarray
    judged: np.ndarray


class Prepared:
    """The setting-independent part of replaying every curve (see the module docstring)."""

    def __init__(self, curves: Curves, settings: TrendSettings = DEFAULT_SETTINGS) -> None:
        self.curves = c = curves
        total = c.x.size
        self.owner = np.repeat(np.arange(len(c)), c.length)
        self.i = np.arange(total) - np.repeat(c.start, c.length)  # index within its curve
        self.horizon = np.repeat(c.length, c.length)
        self.best = np.full(total, np.nan)
        self.best_at = np.zeros(total, dtype=np.int64)  # index within the curve
        self.end = np.zeros(len(c), dtype=np.int64)  # first non-finite index, or the last
        self.ref = np.zeros(len(c), dtype=np.int64)  # the whole curve's best (global index)
        for k in range(len(c)):
            s, n = int(c.start[k]), int(c.length[k])
            x = c.x[s : s + n]
            bad = np.flatnonzero(~np.isfinite(x))
            end = int(bad[0]) if bad.size else n - 1
            self.end[k] = end
            head = x[: end + 1]
            finite = np.where(np.isfinite(head), head, np.inf)
            run = np.minimum.accumulate(finite)
            improved = np.empty(len(finite), dtype=bool)
            improved[0] = math.isfinite(finite[0])
            improved[1:] = finite[1:] < run[:-1]
            at = np.maximum.accumulate(np.where(improved, np.arange(len(finite)), 0))
            self.best[s : s + len(finite)] = run
            self.best_at[s : s + len(finite)] = at
            whole = np.where(np.isfinite(x), x, np.inf)
            self.ref[k] = s + int(np.argmin(whole))
        self.wait = self.i - self.best_at
        self.fit(settings)

    def fit(self, settings: TrendSettings) -> None:
        """The trend window's fit at every evaluation, of the values and of their logs (NaN
        where a window holds a value <= 0), and its number of points."""
        s = settings
        n = self.i + 1
        w = np.minimum(
            np.clip(np.ceil(s.window * n).astype(np.int64), s.min_window, s.max_window), n
        )
        self.points = w
        x = self.curves.x
        self.level, self.slope, self.noise, self.se = window_fit(x, w)
        with np.errstate(invalid="ignore", divide="ignore"):
            logs = np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)
        self.log_fit = window_fit(logs, w)

    def first(self, mask: np.ndarray) -> np.ndarray:
        """Per curve, the first index where `mask` holds, else its end (first non-finite
        value or last evaluation)."""
        c = self.curves
        mask = mask & (self.i <= self.end[self.owner])
        at = np.minimum.reduceat(np.where(mask, self.i, BIG), c.start)
        return np.minimum(at, self.end)

    def outcomes(self, stops: np.ndarray) -> Outcomes:
        """Savings and regrets of stopping each curve at `stops` (indices within curves)."""
        c = self.curves
        kept = c.start + self.best_at[c.start + stops]
        x, acc = c.x, c.acc
        ref = self.ref
        best = x[ref]
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = np.where(x[kept] == best, 0.0, (x[kept] - best) / np.abs(best))
            gap = (acc[ref] - acc[kept]) / np.abs(acc[ref])
        loss = np.where(np.isfinite(x[kept]), loss, np.inf)
        judged = np.where(np.isfinite(acc[ref]), np.where(np.isfinite(gap), gap, np.inf), loss)
        saved = 1.0 - stops / (c.length - 1)
        return Outcomes(saved, loss, judged)

    def oracle(self) -> np.ndarray:
        """Share of training epochs the zero-regret oracle saves on each curve."""
        c = self.curves
        return 1.0 - (self.ref - c.start) / (c.length - 1)


def window_fit(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """The least-squares line through the `w[k]` values of `x` up to `k`, at every `k`: level
    at `k`, slope, residual standard deviation, slope standard error per unit noise."""
    level, slope, noise, se = (np.full(x.size, np.nan) for _ in range(4))
    with np.errstate(invalid="ignore", over="ignore"):
        for size in np.unique(w):
            if size < 3:
                continue
            idx = np.flatnonzero(w == size)
            win = np.lib.stride_tricks.sliding_window_view(x, int(size))[idx - size + 1]
            t = np.arange(size, dtype=np.float64) - (size - 1)
            tc = t - t.mean()
            vtt = float(tc @ tc)
            mean = win.mean(axis=1)
            xc = win - mean[:, None]
            fitted = (xc @ tc) / vtt
            resid = xc - fitted[:, None] * tc
            slope[idx] = fitted
            noise[idx] = np.sqrt((resid * resid).sum(axis=1) / (size - 2))
            level[idx] = mean - fitted * t.mean()
            se[idx] = 1.0 / math.sqrt(vtt)
    return level, slope, noise, se


def patience_stops(p: Prepared, patience: int) -> np.ndarray:
    """Where `EarlyStopping(patience=patience)` stops every curve."""
    return p.first(p.wait >= max(patience, 1))


def least_wait(settings: TrendSettings, scale: np.ndarray) -> np.ndarray:
    """The default rule's least wait for runs of `scale` evaluations (NumPy)."""
    s = settings
    return np.maximum(np.ceil(s.wait_share * scale), s.min_points).astype(np.int64)


def _reach(fit: tuple[np.ndarray, ...], ahead: np.ndarray, noise_k: float, slope_z: float):
    level, slope, noise, se = fit
    steep = np.minimum(slope - slope_z * noise * se, 0.0)
    return level + steep * ahead - noise_k * noise * np.sqrt(2.0 * np.log(np.maximum(ahead, 2)))


def _gain(
    p: Prepared, ahead: np.ndarray, noise_k: float, slope_z: float, diverged: np.ndarray
) -> np.ndarray:
    """How much better than the best the optimistic projection is, as a share of |best|
    (projected on the log scale for diverged runs of positive values, as `TrendRule` does)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        reach = _reach((p.level, p.slope, p.noise, p.se), ahead, noise_k, slope_z)
        logged = np.exp(np.minimum(_reach(p.log_fit, ahead, noise_k, slope_z), 709.0))
        use_log = diverged & (p.best > 0) & np.isfinite(p.log_fit[0])
        reach = np.where(use_log, logged, reach)
        return np.where(p.best != 0, (p.best - reach) / np.abs(p.best), np.inf)


def trend_stops(p: Prepared, settings: TrendSettings, horizon: bool = False) -> np.ndarray:
    """Where `EarlyStopping(horizon=len if horizon else None)` with `settings` stops."""
    s = settings
    n = p.i + 1
    scale = p.horizon if horizon else n
    wait = least_wait(s, scale)
    ahead = np.maximum(np.ceil(s.lookahead * n), 1).astype(np.int64)
    if horizon:
        ahead = np.minimum(ahead, np.maximum(p.horizon - p.i - 1, 1))
    with np.errstate(invalid="ignore"):
        worse = p.level - p.best
        diverged = (worse > np.abs(p.best)) & (worse > 0)
    gain = _gain(p, ahead, s.noise_k, s.slope_z, diverged)
    longer = np.ceil(s.diverged_factor * wait)
    can = (p.wait > 0) & (p.points >= 3)
    if math.isfinite(s.descent_z):  # the descent guard: never while still clearly improving
        with np.errstate(invalid="ignore"):
            steady = p.slope < -s.descent_z * p.noise * p.se
            can &= ~(steady & (-p.slope * ahead > s.tolerance * np.abs(p.best)))
    held = diverged & (p.wait < longer)  # the main lane waits longer: it may be a spike
    mask = can & ~held & (p.wait >= wait) & (gain <= s.tolerance)
    if s.fast_share > 0:
        fast = np.maximum(np.ceil(s.fast_share * scale), s.min_points)
        evident = _gain(p, ahead, s.fast_noise_k, FAST_SLOPE_Z, diverged)
        opened = p.i >= s.fast_open * fast
        if not horizon and math.isfinite(s.fast_calm):  # only a drift from the best, no swing
            first = p.curves.x[p.curves.start][p.owner]
            with np.errstate(invalid="ignore"):
                opened &= p.level - p.best <= s.fast_calm * (first - p.best)
        mask |= can & (p.wait >= fast) & opened & (evident <= s.tolerance)
    return p.first(mask)
