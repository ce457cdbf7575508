"""The default rule (`patience=None`): trend projection, horizon, divergence, NaN, resume."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haltpoint import Divergence, EarlyStopping, StopReason
from haltpoint.stopping.adaptive import (
    DIVERGED_WAIT,
    MIN_WAIT,
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


def rule_stop(values: list[float], settings: TrendSettings) -> int | None:
    """Where the default rule with `settings` stops a finite series (EarlyStopping's loop)."""
    rule, best, wait = TrendRule(1.0, None, settings), math.inf, 0
    for i, x in enumerate(values):
        best, wait = (x, 0) if x < best else (best, wait + 1)
        rule.observe(i, x)
        if wait and rule.check(i, best, wait) is not None:
            return i
    return None


@pytest.mark.parametrize(
    ("values", "kwargs", "low", "high", "code"),
    [
        # a noisy plateau stops soon after the least wait
        (PLATEAU, {}, MIN_WAIT, 60, StopReason.PATIENCE),
        # a slow, steady improvement is not stopped early (it has a new best within the noise)
        (SLOW, {}, None, None, None),
        # a second descent after warmup, decay and a slowly improving plateau is not cut short
        (SCHEDULE, {}, None, None, None),
        # a rising curve stops as diverging, after the longer wait of a diverged run
        (DIVERGING, {}, 2 + DIVERGED_WAIT, 2 + DIVERGED_WAIT, StopReason.DIVERGENCE),
        ([1.0, 0.5, math.nan], {}, 2, 2, StopReason.NON_FINITE),
        ([1.0, 0.5, math.inf], {}, 2, 2, StopReason.NON_FINITE),
        # in "max" mode the mirror image behaves the same
        ([-v for v in PLATEAU], {"mode": "max"}, MIN_WAIT, 60, StopReason.PATIENCE),
        ([-v for v in DIVERGING], {"mode": "max"}, 32, 32, StopReason.DIVERGENCE),
    ],
    ids=["plateau", "slow", "schedule", "diverging", "nan", "inf", "max-plateau", "max-diverging"],
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
    stopper = EarlyStopping("val_loss")
    stop_at(stopper, SCHEDULE)
    assert stopper.best_step is not None and stopper.best_step > 150


def test_a_spike_that_recovers_is_waited_for() -> None:
    """Without the longer wait of a diverged run, the rule gives up on it at the least wait."""
    stopper = EarlyStopping("val_loss")
    assert stop_at(stopper, SPIKE) == (None, None)
    assert stopper.best_step is not None and stopper.best_step > 59
    assert rule_stop(SPIKE, TrendSettings()) is None
    assert rule_stop(SPIKE, TrendSettings(diverged_wait=0)) == MIN_WAIT  # gives up at once


def test_a_blow_up_with_wild_noise_needs_a_divergence_threshold() -> None:
    """The documented blind spot: values of 10^15-10^22 let a lucky draw reach the best, so the
    default rule alone runs on; a `Divergence` rule stops at the first value above it."""
    rng = random.Random(3)
    blown_up = [2.77] + [10 ** rng.uniform(15, 22) for _ in range(160)]
    assert stop_at(EarlyStopping("val_loss"), blown_up) == (None, None)
    stopper = EarlyStopping("val_loss", rules=[Divergence(100.0)])
    assert stop_at(stopper, blown_up)[0] == 1
    assert stopper.code is StopReason.DIVERGENCE


def test_reason_says_what_the_trend_projects() -> None:
    stopper = EarlyStopping("val_loss")
    stop_at(stopper, [1.0] * 40)
    assert stopper.reason is not None
    assert stopper.reason.startswith(
        f"val_loss has levelled off: no new best for {MIN_WAIT} evaluations, and its trend over "
        "the last 10 (at 1.0000) projects at most 0.00% more improvement in the next 42 "
        f"(the default rule: at least {MIN_WAIT} evaluations without a new best "
        f"({DIVERGED_WAIT} when the run looks diverged)"
    )
    assert stopper.current_patience() == MIN_WAIT


def test_diverging_reason_names_the_longer_wait() -> None:
    stopper = EarlyStopping("val_loss")
    stop_at(stopper, DIVERGING)
    assert stopper.reason is not None
    assert stopper.reason.startswith(
        f"val_loss is diverging: no new best for {DIVERGED_WAIT} evaluations"
    )


def test_horizon_caps_the_look_ahead() -> None:
    """A slow trend is worth following while much of the run is left, not past its plan."""
    values = noisy([0.5 - 0.0001 * i for i in range(400)], 0.001)
    assert stop_at(EarlyStopping(), values) == (None, None)
    assert stop_at(EarlyStopping(horizon=400), values) == (None, None)
    planned, code = stop_at(EarlyStopping(horizon=100), values)
    assert planned is not None and planned > 100 and code is StopReason.PATIENCE


def test_horizon_is_in_the_reason_and_repr() -> None:
    stopper = EarlyStopping(horizon=50)
    stop_at(stopper, [1.0] * 30)
    assert stopper.reason is not None and "by the horizon of 50 evaluations" in stopper.reason
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
    assert set(state["trend"]) == {"points", "sums"}
    old = {k: v for k, v in state.items() if k != "trend"}  # saved before the default rule
    fresh = EarlyStopping()
    fresh.load_state_dict(old)
    assert fresh.best == 0.9 and fresh.state_dict()["trend"]["points"] == []
    with pytest.raises(ValueError, match=r"'trend' must be \{'points'"):
        fresh.load_state_dict({**state, "trend": [[0, "x"]]})
    assert "trend" not in EarlyStopping(patience=3).state_dict()


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
            least = DIVERGED_WAIT if decision.code is StopReason.DIVERGENCE else MIN_WAIT
            assert decision.wait >= least and not decision.improved
            break
