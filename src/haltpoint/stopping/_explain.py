"""The sentences that say where a stopper stands: `EarlyStopping.explain()` and the default
rule's stop reason.

Everything here reads state the stopper and its `TrendRule` already keep (the rule's
`last_check` is what its latest look at the trend computed anyway); nothing changes a
decision. The words are docs/stopping.md's: an *evaluation* is one `step()`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from haltpoint._printable import printable
from haltpoint.stopping._text import evaluations, fmt, label
from haltpoint.stopping.adaptive import Projection, TrendCheck, TrendRule
from haltpoint.stopping.decision import StopReason
from haltpoint.stopping.delta import beats, by_more_than

if TYPE_CHECKING:
    from haltpoint.stopping.early_stopping import EarlyStopping

__all__ = ["explain", "trend_stop_reason"]


def _share(fraction: float) -> str:
    """A share in words: "half", "a quarter", else a percentage."""
    if fraction == 0.5:
        return "half"
    if fraction == 0.25:
        return "a quarter"
    return f"{fraction * 100:g}%"


def _of_the_run(trend: TrendRule, fraction: float, index: int) -> str:
    """What a wait of `fraction` is a share of at evaluation `index`, with the floor when it
    binds: "half of the 40 evaluations so far", "30% of the horizon of 100"."""
    horizon = trend.horizon
    scale = index + 1 if horizon is None else horizon
    of = (
        f"of the {evaluations(scale)} so far" if horizon is None else f"of the horizon of {horizon}"
    )
    floor = trend.settings.min_points
    at_least = f", at least {floor}" if math.ceil(fraction * scale) < floor else ""
    return f"{_share(fraction)} {of}{at_least}"


def _trend_at(projection: Projection) -> str:
    return f"its trend over the last {projection.window} (at {fmt(projection.level)})"


def _gain(projection: Projection) -> str:
    return f"{max(projection.gain, 0.0) * 100:.2f}%"


def _tolerance(trend: TrendRule) -> str:
    return f"{trend.settings.tolerance * 100:.2f}%"


def trend_stop_reason(
    name: str, trend: TrendRule, checked: TrendCheck, code: StopReason, wait: int, best: str
) -> str:
    """The default rule's stop reason: what the run did, which wait it passed, what its trend
    projects against the tolerance, and the best (`best`: "best 0.2310 at evaluation 12").

    Example:
        >>> rule = TrendRule(1.0)
        >>> for i in range(6):
        ...     rule.observe(i, 1.0)
        >>> _ = rule.check(5, best=1.0, wait=5)
        >>> code = StopReason.PATIENCE
        >>> print(trend_stop_reason("loss", rule, rule.last_check, code, 5, "best 1.0000 at 0"))
        ... # doctest: +NORMALIZE_WHITESPACE
        loss has levelled off: no new best for 5 evaluations (the default rule's wait: half of
        the 6 evaluations so far, at least 5), and its trend over the last 5 (at 1.0000, no clear
        descent) projects at most 0.00% more improvement in the next 12 (it stops at 0.25% or
        less); best 1.0000 at 0
    """
    s = trend.settings
    what = "is diverging" if code is StopReason.DIVERGENCE else "has levelled off"
    if checked.fast == "stop":
        projection = checked.evident or checked.projection
        calm = (
            ""
            if trend.horizon is not None or math.isinf(s.fast_calm)
            else f", while the run sits within {s.fast_calm * 100:g}% of its progress above its "
            "best"
        )
        share = _of_the_run(trend, s.fast_share, checked.evaluation)
        which = f"the default rule's fast lane: {share}{calm}"
        lucky = f"even with {s.fast_noise_k:g}x the lucky draw "
    else:
        projection = checked.projection
        share = _of_the_run(trend, s.wait_share, checked.evaluation)
        which = (
            f"{s.diverged_factor:g}x the default rule's wait ({share}), as the run looks diverged"
            if code is StopReason.DIVERGENCE and s.diverged_factor != 1
            else f"the default rule's wait: {share}"
        )
        lucky = ""
    guard = ", no clear descent" if math.isfinite(s.descent_z) else ""
    return (
        f"{name} {what}: no new best for {evaluations(wait)} ({which}), and {lucky}its trend "
        f"over the last {projection.window} (at {fmt(projection.level)}{guard}) projects at "
        f"most {_gain(projection)} more improvement in the next {projection.lookahead} (it "
        f"stops at {_tolerance(trend)} or less); {best}"
    )


def explain(stopper: EarlyStopping, trend: TrendRule | None) -> str:
    """One line on where `stopper` stands after its latest evaluation (see
    `EarlyStopping.explain`)."""
    if stopper.stopped:
        return printable(str(stopper.reason))
    name = label(stopper.monitor)
    if stopper.evaluations == 0:
        if trend is None:
            how = (
                f"it stops after {evaluations(stopper.patience or 0)} without improvement"
                f"{by_more_than(stopper.min_delta)}"
            )
        else:
            st = trend.settings
            share = (
                f"{_share(st.wait_share)} of the evaluations so far (at least {st.min_points})"
                if trend.horizon is None
                else _of_the_run(trend, st.wait_share, 0)
            )
            how = f"the default rule looks at its trend after no new best for {share}"
        return printable(f"no evaluation of {name} yet; {how}{_rules(stopper)}")
    index = stopper.evaluations - 1
    text = _patience(stopper, name, index) if trend is None else _trend(stopper, trend, name, index)
    return printable(f"{text}{_baseline(stopper, trend, index)}{_rules(stopper)}")


def _where_best(stopper: EarlyStopping) -> str:
    return f"best {fmt(stopper.best)} at evaluation {stopper.best_step}"


def _standing(stopper: EarlyStopping, name: str, index: int, *, delta: bool) -> str:
    """The run's state at `index`: a new best, no improvement for so long, or no finite value."""
    wait = stopper.wait
    if stopper.best is None:
        return f"no finite {name} in {evaluations(wait)}"
    if wait == 0:
        return f"{name} improved to {fmt(stopper.best)} at evaluation {index}, a new best"
    if delta:
        return f"{name} has not improved{by_more_than(stopper.min_delta)} for {evaluations(wait)}"
    return f"{name} has had no new best for {evaluations(wait)}"


def _in_warmup(stopper: EarlyStopping, index: int) -> str:
    if index >= stopper.warmup:
        return ""
    but = " but a non-finite value" if stopper.check_finite else ""
    return f"; in the warmup, nothing{but} stops it before evaluation {stopper.warmup}"


def _patience(stopper: EarlyStopping, name: str, index: int) -> str:
    patience = stopper.patience or 0
    wait = stopper.wait
    standing = _standing(stopper, name, index, delta=True)
    if patience == 0:
        rest = "; it stops at the first evaluation that does not improve (patience 0)"
    elif wait == 0 and stopper.best is not None:
        rest = (
            f"; it stops after {evaluations(patience)} without improvement"
            f"{by_more_than(stopper.min_delta)}"
        )
    elif wait >= patience:
        rest = f"; it stops at the next evaluation that does not improve (patience {patience})"
    else:
        rest = f"; it stops after {patience}"
    best = f" ({_where_best(stopper)})" if wait and stopper.best is not None else ""
    return f"{standing}{rest}{best}{_in_warmup(stopper, index)}"


def _trend(stopper: EarlyStopping, trend: TrendRule, name: str, index: int) -> str:
    s = trend.settings
    wait = stopper.wait
    best = f"; {_where_best(stopper)}" if wait and stopper.best is not None else ""
    warmup = _in_warmup(stopper, index)
    least = trend.least_wait(index)
    checked = trend.last_check
    if (
        checked is not None
        and checked.evaluation == index
        and stopper.best is not None
        and not warmup
    ):
        return _checked(stopper, trend, checked, name, index) + best
    standing = _standing(stopper, name, index, delta=False)
    wait_of = _of_the_run(trend, s.wait_share, index)
    if stopper.best is None:
        return f"{standing}; the default rule stops after {trend.earliest_wait(index)}{warmup}"
    if wait >= trend.earliest_wait(index) and not warmup:
        return (
            f"{standing}, past the default rule's wait of {least} ({wait_of}); after a resume, "
            f"the next evaluation says what its trend projects{best}"
        )
    fast = trend.fast_wait(index)
    lane = "" if fast is None or fast >= least else f", or after {fast} in its fast lane"
    without = " evaluations without one" if wait == 0 else ""
    return (
        f"{standing}; the default rule looks at the trend after {least}{without} ({wait_of})"
        f"{lane}{best}{warmup}"
    )


def _checked(
    stopper: EarlyStopping, trend: TrendRule, checked: TrendCheck, name: str, index: int
) -> str:
    """What the rule's look at the trend at `index` found, as the start of the sentence."""
    s = trend.settings
    p = checked.projection
    wait = stopper.wait
    least = trend.least_wait(index)
    no_best = f"no new best for {evaluations(wait)}"
    if checked.main == "stop" or checked.fast == "stop":  # stop cleared by clear_stop()
        return (
            f"{name}'s stop at evaluation {index} was cleared: {no_best}, past the default "
            f"rule's wait; the next evaluation decides again"
        )
    if checked.main == "guard":
        sigma = "standard error" if s.descent_z == 1 else "standard errors"
        return (
            f"{name} is still clearly improving: {no_best}, but {_trend_at(p)} still improves "
            f"by {fmt(abs(p.slope))} an evaluation, over {s.descent_z:g} {sigma} from flat, so "
            "the descent guard holds it"
        )
    if checked.main == "gain":
        if p.window < 3:  # the window's other values are not finite (check_finite=False)
            return (
                f"{name} has had {no_best}, but only {p.window} of its recent values "
                f"{'is' if p.window == 1 else 'are'} finite, too few to fit a trend"
            )
        return f"{name} has had {no_best}, but {_trend_at(p)} {_projects(trend, p, stopper.best)}"
    if checked.main == "held":
        longer = math.ceil(s.diverged_factor * least)
        text = (
            f"{name} looks diverged: {no_best}, and {_trend_at(p)} is more than |best| worse "
            f"than its best, so the default rule waits for {longer} without one "
            f"({s.diverged_factor:g}x its wait of {least}) before its trend may stop it, as "
            "spikes often recover"
        )
        lane = "" if checked.fast == "swing" else _fast_lane(trend, checked, index, stopper.best)
        return text + lane  # a diverged run is far above its best: no need to say it swings
    return (  # "short": only the fast lane looked
        f"{name} has had {no_best}; the default rule looks at the trend after {least} "
        f"({_of_the_run(trend, s.wait_share, index)})"
        + _fast_lane(trend, checked, index, stopper.best)
    )


def _projects(trend: TrendRule, p: Projection, best: float | None) -> str:
    """What a projection says against the tolerance, from its verb on."""
    if best == 0 and math.isinf(p.gain):
        return "cannot be judged against a best of exactly 0 (the tolerance is a share of |best|)"
    return (
        f"projects up to {_gain(p)} more improvement in the next {p.lookahead}, more than the "
        f"{_tolerance(trend)} that stops it"
    )


def _fast_lane(trend: TrendRule, checked: TrendCheck, index: int, best: float | None) -> str:
    """What the fast lane found, as a clause; nothing when it was not tried."""
    fast = trend.fast_wait(index)
    if checked.fast == "swing":
        calm = trend.settings.fast_calm * 100
        return (
            f"; its fast lane (after {fast}) is closed to a run more than {calm:g}% of its "
            "progress above its best (a swing, which often comes back)"
        )
    if checked.fast == "gain" and checked.evident is not None:
        lucky = trend.settings.fast_noise_k
        projects = _projects(trend, checked.evident, best)
        return f"; its fast lane (after {fast}), with {lucky:g}x the lucky draw, {projects}"
    return ""


def _baseline(stopper: EarlyStopping, trend: TrendRule | None, index: int) -> str:
    """While the best has not beaten the baseline: the evaluation that stops the run unless it
    does (the patience, or the default rule's least wait, counted after warmup)."""
    baseline, best, warmup = stopper.baseline, stopper.best, stopper.warmup
    if baseline is None or (
        best is not None and beats(best, baseline, stopper.mode, stopper.min_delta)
    ):
        return ""
    at = max(index + 1, warmup)
    if trend is None or trend.horizon is not None:  # the patience in force is fixed
        patience = stopper.patience if trend is None else trend.least_wait(0)
        at = max(at, (patience or 0) + warmup - 1)
    else:  # the least wait grows with the run; it is due from about here (closed form) on
        s = trend.settings
        start = warmup + s.min_points - 1
        if s.wait_share < 1:
            start = max(start, math.ceil(warmup / (1 - s.wait_share)) - 1)
        at = max(at, start - 2)
        for _ in range(1000):  # due(j) never turns false again: j gains 1, the wait at most 1
            if at - warmup + 1 >= trend.least_wait(at):
                break
            at += 1
    return (
        f"; it stops at evaluation {at} unless the best beats the baseline {fmt(baseline)}"
        f"{by_more_than(stopper.min_delta)} by then"
    )


def _rules(stopper: EarlyStopping) -> str:
    rules = stopper.rules
    if not rules:
        return ""
    names = ", ".join(type(rule).__name__ for rule in rules)
    if len(rules) == 1:
        return f"; its rule ({names}) has not stopped it"
    return f"; none of its rules ({names}) has stopped it"
