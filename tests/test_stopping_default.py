"""The default rule (`patience=None`): trend projection, horizon, divergence, NaN, resume."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haltpoint import Divergence, EarlyStopping, StopReason
from haltpoint.stopping.adaptive import (
    DEFAULT_SETTINGS,
    MIN_POINTS,
    PLANNED_SETTINGS,
    Projection,
    TrendRule,
    TrendSettings,
    diverged,
    fit_line,
)


def stop_at(stopper: EarlyStopping, values: list[float]) -> tuple[int | None, Any]:
    for value in values:
        decision = stopper.step(value)
        if decision:
            return decision.step, decision.code
    return None, None


def noisy(values: list[float], sigma: float, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [v + rng.gauss(0.0, sigma) for v in values]


N = 300
PLATEAU = noisy([1.0] * N, 0.01)
# a plateau that drifts up a little: its best comes early, so a planned wait can run out
DRIFTING = noisy([1.0 + 0.0002 * i for i in range(N)], 0.01)
DRIFTING_BEST = min(range(N), key=DRIFTING.__getitem__)
SLOW = noisy([1.0 / (1 + 0.01 * i) for i in range(N)], 0.001)
# warmup (rises), decay, a long slowly improving plateau, then a second descent at 150
SCHEDULE = noisy(
    [1.0 + 0.02 * i for i in range(5)]
    + [1.1 - 0.6 * (1 - math.exp(-(i - 5) / 10)) for i in range(5, 60)]
    + [0.5 - 0.0008 * (i - 60) for i in range(60, 150)]
    + [0.428 - 0.2 * (1 - math.exp(-(i - 150) / 10)) for i in range(150, N)],
    0.002,
)
DIVERGING = [1.0, 0.8, 0.6] + [0.6 * 1.3**i for i in range(1, 50)]
# the untrained model is the best for a long time: a slow start, a spike at 18, then recovery
# (below the start from evaluation 59), as DeepOBS runs with a large learning rate do
SPIKE = [1.0] + [1.2 + 2.0 * 0.8**i for i in range(17)] + [0.6 + 7.5 * 0.93**i for i in range(100)]


def rule_stop(
    values: list[float], settings: TrendSettings, horizon: int | None = None
) -> int | None:
    """Where the default rule with `settings` stops a finite series (EarlyStopping's loop)."""
    rule, best, wait = TrendRule(1.0, horizon, settings), math.inf, 0
    for i, x in enumerate(values):
        best, wait = (x, 0) if x < best else (best, wait + 1)
        rule.observe(i, x)
        if wait and rule.check(i, best, wait) is not None:
            return i
    return None


#: Where a series that never beats its first value stops without a horizon: the floor.
FLAT_STOP = MIN_POINTS
#: ... and a steep rise after a best at evaluation 2, told the horizon: the fast lane, once open
#: (a diverged run is not held longer there).
_FAST = PLANNED_SETTINGS.fast_wait(len(DIVERGING)) or 0
DIVERGED_STOP = max(2 + _FAST, math.ceil(PLANNED_SETTINGS.fast_open * _FAST))


@pytest.mark.parametrize(
    ("values", "kwargs", "low", "high", "code"),
    [
        # a noisy plateau stops; told the horizon, not before the planned least wait has passed
        (PLATEAU, {}, MIN_POINTS, N - 1, StopReason.PATIENCE),
        (
            DRIFTING,
            {"horizon": N},
            DRIFTING_BEST + PLANNED_SETTINGS.least_wait(N),
            N - 1,
            StopReason.PATIENCE,
        ),
        # a slow, steady improvement is not stopped early (it has a new best within the noise)
        (SLOW, {}, None, None, None),
        (SLOW, {"horizon": N}, None, None, None),
        # a second descent after warmup, decay and a slowly improving plateau is not cut short
        # when the rule knows the plan or the warmup (without either, a warmup whose loss rises
        # for MIN_POINTS evaluations looks like a run that never improves; docs/stopping.md)
        (SCHEDULE, {"horizon": N}, None, None, None),
        (SCHEDULE, {"warmup": 10}, None, None, None),
        # a rising curve stops as diverging when told the plan; without it the diverged wait
        # (twice half the run so far) is never reached: add a Divergence threshold
        (
            DIVERGING,
            {"horizon": len(DIVERGING)},
            DIVERGED_STOP,
            DIVERGED_STOP,
            StopReason.DIVERGENCE,
        ),
        (DIVERGING, {}, None, None, None),
        ([1.0, 0.5, math.nan], {}, 2, 2, StopReason.NON_FINITE),
        ([1.0, 0.5, math.inf], {}, 2, 2, StopReason.NON_FINITE),
        # in "max" mode the mirror image behaves the same
        ([-v for v in PLATEAU], {"mode": "max"}, MIN_POINTS, N - 1, StopReason.PATIENCE),
        (
            [-v for v in DIVERGING],
            {"mode": "max", "horizon": len(DIVERGING)},
            DIVERGED_STOP,
            DIVERGED_STOP,
            StopReason.DIVERGENCE,
        ),
    ],
    ids=[
        "plateau",
        "plateau-horizon",
        "slow",
        "slow-horizon",
        "schedule-horizon",
        "schedule-warmup",
        "diverging-horizon",
        "diverging",
        "nan",
        "inf",
        "max-plateau",
        "max-diverging",
    ],
)
def test_default_rule_behaviour(
    values: list[float], kwargs: dict[str, Any], low: int | None, high: int | None, code: Any
) -> None:
    at, got = stop_at(EarlyStopping("val_loss", **kwargs), values)
    if low is None:
        assert at is None
    else:
        assert at is not None and low <= at <= (high or at)
    assert got == code


def test_schedule_keeps_the_best_of_the_second_descent() -> None:
    stopper = EarlyStopping("val_loss", horizon=N)
    stop_at(stopper, SCHEDULE)
    assert stopper.best_step is not None and stopper.best_step > 150


def test_a_spike_that_recovers_is_waited_for() -> None:
    """Without the longer wait of a diverged run, the rule gives up on it at the least wait."""
    stopper = EarlyStopping("val_loss")
    assert stop_at(stopper, SPIKE) == (None, None)
    assert stopper.best_step is not None and stopper.best_step > 59
    assert rule_stop(SPIKE, DEFAULT_SETTINGS) is None
    given_up = rule_stop(SPIKE, TrendSettings(diverged_factor=1.0))
    assert given_up is not None and given_up < 59  # before it recovers


#: a best at 10, a jump to 1.5, then a slow, clear descent (0.001 an evaluation, noise 0.0005)
#: that the linear projection says cannot reach the best within its look-ahead
RECOVERING = noisy(
    [2.0 - 0.1 * i for i in range(11)] + [1.5 - 0.001 * (i - 11) for i in range(11, N)], 0.0005
)


def test_a_run_that_is_still_clearly_improving_is_not_stopped() -> None:
    """The descent guard: once the least wait has passed the trend projects no new best, but
    the window's slope is many standard errors below 0, so the default rule does not stop."""
    assert stop_at(EarlyStopping("val_loss"), RECOVERING) == (None, None)
    unguarded = rule_stop(RECOVERING, replace(DEFAULT_SETTINGS, descent_z=math.inf))
    assert unguarded is not None and unguarded < 30  # stopped mid-descent without the guard
    rule = TrendRule(1.0)
    for i, x in enumerate(RECOVERING[:100]):
        rule.observe(i, x)
    projection = rule.project(99, best=min(RECOVERING), wait=89)
    assert projection.descending and projection.gain < DEFAULT_SETTINGS.tolerance


def test_a_flat_noisy_run_is_still_stopped_with_the_guard() -> None:
    """On a plateau the slope is within its noise, so the guard seldom holds the run open: every
    seed stops, and never earlier than it would without the guard."""
    unguarded = replace(DEFAULT_SETTINGS, descent_z=math.inf)
    for seed in range(20):
        plateau = noisy([1.0] * N, 0.01, seed=seed)
        at, code = stop_at(EarlyStopping("val_loss"), plateau)
        assert at is not None and code is StopReason.PATIENCE
        without = rule_stop(plateau, unguarded)
        assert without is not None and without <= at


def test_the_guard_is_in_the_reason_and_off_when_planned() -> None:
    stopper = EarlyStopping("val_loss")
    stop_at(stopper, [1.0] * 40)
    assert stopper.reason is not None
    assert "(at 1.0000, no clear descent)" in stopper.reason
    assert not math.isfinite(PLANNED_SETTINGS.descent_z)
    planned = EarlyStopping("val_loss", horizon=40)
    stop_at(planned, [1.0] * 40)
    assert planned.reason is not None and "descent" not in planned.reason


def test_a_blow_up_with_wild_noise_needs_a_divergence_threshold() -> None:
    """The documented blind spot: values of 10^15-10^22 let a lucky draw reach the best, so the
    default rule alone runs on; a `Divergence` rule stops at the first value above it."""
    rng = random.Random(3)
    blown_up = [2.77] + [10 ** rng.uniform(15, 22) for _ in range(160)]
    assert stop_at(EarlyStopping("val_loss"), blown_up) == (None, None)
    stopper = EarlyStopping("val_loss", rules=[Divergence(100.0)])
    assert stop_at(stopper, blown_up)[0] == 1
    assert stopper.code is StopReason.DIVERGENCE


def test_a_diverged_run_is_projected_on_the_log_scale() -> None:
    """Hundreds of times above its best, with noise as large as its level, a linear fit's lucky
    draw reaches the best; on the log scale the run is orders of magnitude away and, told the
    plan, it is given up. A run as far above that falls by orders of magnitude is not."""
    rng = random.Random(5)
    stuck = [1.0] + [200.0 * math.exp(rng.gauss(0.0, 0.6)) for _ in range(299)]
    rule, best = TrendRule(1.0, 300), 1.0
    for i, x in enumerate(stuck[:80]):
        rule.observe(i, x)
    s = rule.settings
    projection = rule.project(79, best=best, wait=79)
    assert diverged(projection, best, 1.0) and projection.gain <= s.tolerance
    level, slope, noise, se = fit_line(list(enumerate(stuck))[80 - projection.window : 80])
    ahead = projection.lookahead
    linear = level + min(slope - noise * se, 0.0) * ahead - noise * math.sqrt(2 * math.log(ahead))
    assert linear < best  # the linear projection alone would wait on
    stopper = EarlyStopping("val_loss", horizon=300)
    at, code = stop_at(stopper, stuck)
    assert code is StopReason.DIVERGENCE and at is not None
    assert at <= math.ceil(s.fast_open * s.least_wait(300))
    falling = [1.0] + [1000.0 * 0.85**i * math.exp(rng.gauss(0.0, 0.3)) for i in range(99)]
    stopper = EarlyStopping("val_loss", horizon=100)
    assert stop_at(stopper, falling[:40]) == (None, None)
    assert stopper.best_step == 0 and stopper.wait == 39


def test_reason_says_what_the_trend_projects() -> None:
    stopper = EarlyStopping("val_loss")
    stop_at(stopper, [1.0] * 40)
    assert stopper.reason is not None
    assert stopper.reason == (
        f"val_loss has levelled off: no new best for {FLAT_STOP} evaluations (the default "
        f"rule's wait: half of the {FLAT_STOP + 1} evaluations so far, at least {MIN_POINTS}), "
        f"and its trend over the last 5 (at 1.0000, no clear descent) projects at most 0.00% "
        f"more improvement in the next {2 * (FLAT_STOP + 1)} (it stops at 0.25% or less); best "
        "1.0000 at evaluation 0"
    )
    assert stopper.current_patience() == MIN_POINTS


def test_diverging_reason_names_the_longer_wait() -> None:
    stopper = EarlyStopping("val_loss", horizon=len(DIVERGING))
    stop_at(stopper, DIVERGING)
    assert stopper.reason is not None
    assert stopper.reason.startswith(
        f"val_loss is diverging: no new best for {DIVERGED_STOP - 2} evaluations"
    )


def test_waits_scale_with_the_horizon() -> None:
    """Told the plan, a run that never improves waits a share of it, not a fixed count: a
    noiseless one by the fast lane once it opens (a noisy one: see the fast lane's test)."""
    short, long = EarlyStopping(horizon=30), EarlyStopping(horizon=300)
    for stopper, horizon in ((short, 30), (long, 300)):
        fast = PLANNED_SETTINGS.fast_wait(horizon)
        assert fast is not None  # the fast lane opens at evaluation fast_open * fast
        expected = min(
            PLANNED_SETTINGS.least_wait(horizon), math.ceil(PLANNED_SETTINGS.fast_open * fast)
        )
        assert stop_at(stopper, [1.0] * 300)[0] == expected
    assert long.current_patience() == 10 * short.current_patience()


def test_the_fast_lane_stops_a_clear_rise_sooner_and_ignores_noise() -> None:
    """Told the plan, a run that is clearly past its best (rising well beyond its noise) stops
    after the fast lane's shorter wait; a noisy plateau is not stopped before the least wait,
    except in the plan's last fast wait, where the look-ahead is too short for its noise."""
    shape = [1.0 - 0.01 * i for i in range(40)] + [0.61 + 0.01 * i for i in range(160)]
    rising = noisy(shape, 0.002)
    at, code = stop_at(EarlyStopping(horizon=len(rising)), rising)
    best = min(range(len(rising)), key=rising.__getitem__)
    fast, least = PLANNED_SETTINGS.fast_wait(200), PLANNED_SETTINGS.least_wait(200)
    assert fast is not None and at is not None and code is StopReason.PATIENCE
    assert best + fast <= at < best + least
    slow = rule_stop(rising, replace(PLANNED_SETTINGS, fast_share=0.0), horizon=len(rising))
    assert slow is not None and slow >= best + least
    # a warm-up whose loss rises for 12% of a 50-evaluation plan, then a decay: not stopped,
    # because the fast lane opens only once fast_open times its wait has passed since the start
    warm = [1.0 + 0.03 * i for i in range(6)]
    warm += [1.15 - 0.6 * (1 - math.exp(-(i - 6) / 5)) for i in range(6, 50)]
    assert stop_at(EarlyStopping(horizon=50), noisy(warm, 0.002))[0] is None
    for seed in range(5):
        plateau = noisy([1.0] * N, 0.01, seed=seed)
        stopper = EarlyStopping(horizon=N)
        stop_at(stopper, plateau)
        decision = stopper.last_decision
        assert decision is not None
        fast = PLANNED_SETTINGS.fast_wait(N) or 0
        assert (
            not decision.stop
            or decision.wait >= PLANNED_SETTINGS.least_wait(N)
            or (N - 1 - decision.step < fast)
        )


def test_without_a_horizon_a_run_that_overfits_after_its_midpoint_is_stopped() -> None:
    """A 50-evaluation run whose loss turns at evaluation 30 and drifts up steadily (as a model
    that overfits does) is stopped by the calm fast lane a few evaluations after its best; the
    main test alone never could (its wait is half the evaluations so far)."""
    shape = [3.0 + 2.0 * math.exp(-i / 5) - 0.002 * i for i in range(31)]
    shape += [shape[-1] + 0.004 * (i - 30) for i in range(31, 50)]
    for seed in range(5):
        values = noisy(shape, 0.002, seed=seed)
        best = min(range(len(values)), key=values.__getitem__)
        at, code = stop_at(EarlyStopping(), values)
        assert at is not None and code is StopReason.PATIENCE
        assert best + DEFAULT_SETTINGS.fast_wait(at + 1) <= at < best + 15
        assert rule_stop(values, replace(DEFAULT_SETTINGS, fast_share=0.0)) is None


def test_the_calm_lane_leaves_a_swing_to_the_main_test() -> None:
    """Without a horizon, a loss that swings far back up (a large share of what it had gained:
    such runs often come back) is not stopped by the fast lane, only after the least wait; with
    the calm condition off it would be."""
    swing = [10.0 - 0.6 * i for i in range(11)] + [4.0 + 0.3 * (i - 10) for i in range(11, 40)]
    swing = noisy(swing, 0.01)
    best = min(range(len(swing)), key=swing.__getitem__)
    at = rule_stop(swing, DEFAULT_SETTINGS)
    assert at is not None and at - best >= DEFAULT_SETTINGS.least_wait(at + 1)
    loose = rule_stop(swing, replace(DEFAULT_SETTINGS, fast_calm=math.inf))
    assert loose is not None and loose < at


def test_waits_scale_with_the_evaluations_so_far() -> None:
    """Without a plan, the least wait is a share of the evaluations so far: a plateau after a
    best at evaluation 200 waits several times longer than after a best at evaluation 20."""
    waits = []
    for best in (20, 200):
        values = [1.0 - 0.001 * i for i in range(best + 1)] + [1.0] * 400
        stopper = EarlyStopping()
        at, _ = stop_at(stopper, values)
        assert at is not None
        wait = at - best
        assert wait >= DEFAULT_SETTINGS.wait_share * (at + 1)
        waits.append(wait)
    assert waits[1] > 5 * waits[0]


def test_horizon_caps_the_look_ahead() -> None:
    """A trend is followed as far ahead as twice the run so far, told a plan or not, and never
    past the plan."""
    assert TrendRule(1.0).lookahead(150) == 302
    assert TrendRule(1.0, horizon=1000).lookahead(150) == 302
    assert TrendRule(1.0, horizon=400).lookahead(150) == 249
    assert TrendRule(1.0, horizon=250).lookahead(150) == 99
    assert TrendRule(1.0, horizon=100).lookahead(150) == 1


def test_horizon_is_in_the_reason_and_repr() -> None:
    stopper = EarlyStopping(horizon=50)
    stop_at(stopper, [1.0] * 30)
    assert stopper.reason is not None and "10% of the horizon of 50)" in stopper.reason
    assert stopper.horizon == 50 and "horizon=50" in repr(stopper)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"horizon": 0}, ValueError, r"horizon must be an int >= 1; got horizon=0"),
        ({"horizon": -5}, ValueError, r"horizon must be an int >= 1; got horizon=-5"),
        ({"horizon": 10.0}, TypeError, r"horizon must be the planned number .* got float 10.0"),
        ({"horizon": True}, TypeError, r"horizon must be the planned number .* got bool True"),
        ({"horizon": 10, "patience": 5}, ValueError, r"horizon=10 is for the default rule"),
    ],
)
def test_horizon_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        EarlyStopping(**kwargs)


def test_fit_line_matches_the_running_sums() -> None:
    values = noisy([1.0 - 0.01 * i for i in range(40)], 0.01)
    stopper = EarlyStopping()
    for v in values:
        stopper.step(v)
    points = [(t, x) for t, x in stopper.state_dict()["trend"]["points"]]
    level, slope, noise, _ = fit_line(points)
    assert slope == pytest.approx(-0.01, abs=0.003) and noise == pytest.approx(0.01, rel=0.5)
    assert level == pytest.approx(values[-1], abs=0.03)


def test_state_without_trend_loads_and_bad_trend_is_refused() -> None:
    stopper = EarlyStopping()
    for v in (1.0, 0.9, 0.95):
        stopper.step(v)
    state = stopper.state_dict()
    assert set(state["trend"]) == {"points", "sums", "first"}
    assert state["trend"]["first"] == 1.0
    old = {k: v for k, v in state.items() if k != "trend"}  # saved before the default rule
    fresh = EarlyStopping()
    fresh.load_state_dict(old)
    assert fresh.best == 0.9 and fresh.state_dict()["trend"]["points"] == []
    with pytest.raises(ValueError, match=r"'trend' must be \{'points'"):
        fresh.load_state_dict({**state, "trend": [[0, "x"]]})
    assert "trend" not in EarlyStopping(patience=3).state_dict()
    with pytest.raises(ValueError, match=r"'first': a finite number or null"):
        fresh.load_state_dict({**state, "trend": {**state["trend"], "first": math.inf}})


@pytest.mark.parametrize("field", range(8))
@pytest.mark.parametrize("wrong", [-5.0, 0.0, 1.0, 1e300, -1e300])
def test_trend_sums_that_are_not_the_points_sums_are_refused(field: int, wrong: float) -> None:
    """Crafted running sums (a negative count, an index sum that makes the fit's variance
    negative) once loaded and failed later, inside `step`, with 'math domain error'."""
    stopper = EarlyStopping("val_loss")
    for i in range(30):
        stopper.step(1.0 / (i + 1) + 0.01 * (i % 3))
    state = json.loads(json.dumps(stopper.state_dict()))
    if state["trend"]["sums"][field] == wrong:
        wrong = wrong + 3.0
    state["trend"]["sums"][field] = wrong
    resumed = EarlyStopping("val_loss")
    with pytest.raises(ValueError, match=r"'trend' 'sums' must be the running sums of its 8"):
        resumed.load_state_dict(state)
    assert resumed.evaluations == 0


SCALED = st.lists(
    st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False),
        st.floats(-1e-6, 1e-6, allow_nan=False),
        st.sampled_from([0.0, 1.0, 1e12, -1e12, 1.34e154, -1e200, 1.7e308]),
    ),
    min_size=1,
    max_size=200,
)


@given(values=SCALED, mode=st.sampled_from(["min", "max"]))
@settings(max_examples=60, deadline=None)
def test_every_state_a_run_saves_loads_whatever_its_values_scale(
    values: list[float], mode: str
) -> None:
    """The check on the trend's sums never refuses what `state_dict` saved: at every
    evaluation of runs mixing tiny, huge and constant values, as the window slides (values
    beyond about 1e154 overflow the sums of squares: a diverged run's state holds inf)."""
    stopper = EarlyStopping("val_loss", mode=mode)
    for value in values:
        stopper.step(value)
        state = json.loads(json.dumps(stopper.state_dict()))
        EarlyStopping("val_loss", mode=mode).load_state_dict(state)


def test_a_diverged_run_whose_sums_overflow_resumes_and_decides_as_if_never_stopped() -> None:
    """A run beyond 1e154 saves sums of squares that are inf: that state was refused as 'not 8
    finite numbers', so its checkpoint could not be resumed; it now loads, and the resumed
    stopper takes the uninterrupted one's decisions."""
    values = [0.5, 0.4, 1.34e154, 1e200, 3e200] + [2e200 - 1e198 * i for i in range(40)]
    whole = EarlyStopping("val_loss")
    for value in values[:5]:
        whole.step(value)
    state = json.loads(json.dumps(whole.state_dict()))
    assert math.isinf(state["trend"]["sums"][-1])
    resumed = EarlyStopping("val_loss")
    resumed.load_state_dict(state)
    for value in values[5:]:
        assert resumed.step(value).to_dict() == whole.step(value).to_dict()
    crafted = json.loads(json.dumps(state))
    crafted["trend"]["sums"][-1] = -math.inf  # not what these points sum to
    with pytest.raises(ValueError, match=r"'trend' 'sums' must be the running sums of its"):
        EarlyStopping("val_loss").load_state_dict(crafted)


def test_a_trend_state_saved_without_the_first_value_takes_the_oldest_one_kept() -> None:
    """A stopper saved by a haltpoint that did not keep the run's first value resumes with the
    oldest value of its window in its place (less progress, so the calm lane opens later)."""
    stopper = EarlyStopping()
    for i in range(60):
        stopper.step(2.0 - 0.01 * i)
    state = stopper.state_dict()
    assert state["trend"]["first"] == 2.0
    older = {**state, "trend": {k: v for k, v in state["trend"].items() if k != "first"}}
    resumed = EarlyStopping()
    resumed.load_state_dict(older)
    oldest = state["trend"]["points"][0][1]
    assert oldest < 2.0 and resumed.state_dict()["trend"]["first"] == oldest


VALUES = st.lists(
    st.one_of(
        st.floats(-2.0, 2.0, allow_nan=False),
        st.integers(-8, 8).map(lambda i: i / 4),
        st.sampled_from([math.nan, math.inf]),
    ),
    min_size=1,
    max_size=120,
)


@given(
    values=VALUES,
    split=st.integers(0, 120),
    mode=st.sampled_from(["min", "max"]),
    horizon=st.one_of(st.none(), st.integers(1, 150)),
    check_finite=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_resume_mid_run_is_invisible(
    values: list[float], split: int, mode: str, horizon: int | None, check_finite: bool
) -> None:
    """Save after `split` evaluations, reload through JSON into a fresh stopper: same decisions."""

    def make() -> EarlyStopping:
        return EarlyStopping("val_loss", mode=mode, horizon=horizon, check_finite=check_finite)

    straight = make()
    expected = [json.dumps(straight.step(v).to_dict()) for v in values]
    first = make()
    split = min(split, len(values))
    got = [json.dumps(first.step(v).to_dict()) for v in values[:split]]
    state = json.loads(json.dumps(first.state_dict()))
    second = make()
    second.load_state_dict(state)
    assert json.dumps(second.state_dict()) == json.dumps(state)
    got += [json.dumps(second.step(v).to_dict()) for v in values[split:]]
    assert got == expected


def test_resume_of_a_diverged_run_is_invisible() -> None:
    """The log-scale sums of a diverged run are rebuilt after a resume: the same decisions."""
    rng = random.Random(11)
    stuck = [1.0] + [200.0 * math.exp(rng.gauss(0.0, 0.6)) for _ in range(299)]
    for horizon in (None, 300):
        straight = EarlyStopping("val_loss", horizon=horizon)
        expected = [straight.step(v).to_dict() for v in stuck]
        for split in (20, 45, 70, 130):
            first = EarlyStopping("val_loss", horizon=horizon)
            got = [first.step(v).to_dict() for v in stuck[:split]]
            second = EarlyStopping("val_loss", horizon=horizon)
            second.load_state_dict(json.loads(json.dumps(first.state_dict())))
            got += [second.step(v).to_dict() for v in stuck[split:]]
            assert got == expected, (horizon, split)


LEVELS = st.floats(-100.0, 100.0, allow_nan=False)


@given(level=LEVELS, best=LEVELS, higher=st.floats(0.0, 50.0))
def test_diverged_is_mirrored_and_monotone(level: float, best: float, higher: float) -> None:
    def proj(x: float) -> Projection:
        return Projection(10, x, 0.0, 0.0, 20, -1.0)

    assert diverged(proj(level), best, 1.0) == diverged(proj(-level), -best, -1.0)
    if diverged(proj(level), best, 1.0):  # worse still is still diverged
        assert diverged(proj(level + higher), best, 1.0)
    assert not diverged(proj(best), best, 1.0)  # at the best is never diverged


@given(values=VALUES, mode=st.sampled_from(["min", "max"]))
@settings(max_examples=200, deadline=None)
def test_the_default_rule_never_stops_before_its_waits(values: list[float], mode: str) -> None:
    stopper = EarlyStopping("val_loss", mode=mode, check_finite=False)
    for value in values:
        decision = stopper.step(value)
        if decision:
            least = stopper.current_patience()
            if decision.code is StopReason.DIVERGENCE:
                least = math.ceil(DEFAULT_SETTINGS.diverged_factor * least)
            assert decision.wait >= least and not decision.improved
            break


#: A state saved by haltpoint 0.x before the rule scaled with the run (10-value window).
OLD_STATE = {
    "version": 1,
    "evaluations": 12,
    "best": 0.79,
    "best_step": 9,
    "wait": 2,
    "last_decision": {
        "stop": False,
        "improved": False,
        "step": 11,
        "value": 0.81,
        "best": 0.79,
        "best_step": 9,
        "wait": 2,
        "code": None,
        "reason": None,
    },
    "rules": [],
    "trend": {
        "points": [
            [2, 0.8],
            [3, 0.85],
            [4, 0.82],
            [5, 0.81],
            [6, 0.83],
            [7, 0.84],
            [8, 0.8],
            [9, 0.79],
            [10, 0.8],
            [11, 0.81],
        ],
        "sums": [0.0, 1.0, 10.0, 65.0, -1.8499999999999996, 505.0, -12.24, 0.3456999999999999],
    },
}


def test_a_state_saved_before_the_rule_scaled_loads_and_decides_as_now() -> None:
    head = [1.0, 0.9, 0.8, 0.85, 0.82, 0.81, 0.83, 0.84, 0.8, 0.79, 0.8, 0.81]
    tail = noisy([0.8] * 60, 0.01, seed=4)
    resumed = EarlyStopping("val_loss")
    resumed.load_state_dict(OLD_STATE)
    straight = EarlyStopping("val_loss")
    for v in head:
        straight.step(v)
    assert stop_at(resumed, tail) == stop_at(straight, tail)


RISING_WARMUP = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5] + [1.5 - 0.1 * k for k in range(1, 25)]


@pytest.mark.parametrize(
    ("settings", "stops_at"),
    [
        ({}, 5),
        ({"warmup": 6}, 6),  # ends at the top of the rise: stops at the first evaluation after
        ({"warmup": 7}, None),  # covers one falling evaluation too
        ({"horizon": 30}, 5),  # the rise is over 15% of the plan: the fast lane
        ({"horizon": 40}, None),
    ],
)
def test_a_rising_warm_up_stops_as_the_known_limits_say(
    settings: dict[str, Any], stops_at: int | None
) -> None:
    """docs/stopping.md, "Known limits": the numbers it gives for a warm-up whose loss rises."""
    stopper = EarlyStopping("val_loss", mode="min", **settings)
    stopped = [i for i, v in enumerate(RISING_WARMUP) if stopper.step(v)]
    assert (stopped[0] if stopped else None) == stops_at
