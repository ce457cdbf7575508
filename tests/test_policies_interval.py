"""Save-interval policies: tables of cases and hypothesis properties, no clock and no disk."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from haltpoint.policies.interval import (
    DEFAULT_MTBF_SECONDS,
    DEFAULT_OVERHEAD,
    Auto,
    Costs,
    EverySteps,
    EveryTime,
    Progress,
    parse_duration,
    parse_every,
    young_daly,
)

MEASURED = Costs(blocked_seconds=0.5, write_seconds=2.0, step_seconds=0.1, measured=True)


@pytest.mark.parametrize(
    ("every", "expected"),
    [
        (100, EverySteps(100)),
        ("10min", EveryTime(600.0)),
        ("30s", EveryTime(30.0)),
        ("1.5h", EveryTime(5400.0)),
        (" 2 m ", EveryTime(120.0)),
        (timedelta(minutes=5), EveryTime(300.0)),
        ("auto", Auto(DEFAULT_OVERHEAD, DEFAULT_MTBF_SECONDS)),
    ],
)
def test_parse_every_forms(every, expected):
    assert parse_every(every) == expected


def test_auto_takes_overhead_and_mtbf_in_any_duration_form():
    assert parse_every("auto", overhead=0.05, mtbf="6h") == Auto(0.05, 6 * 3600.0)
    assert parse_every("auto", mtbf=timedelta(hours=1)) == Auto(DEFAULT_OVERHEAD, 3600.0)
    assert parse_every("auto", mtbf=90) == Auto(DEFAULT_OVERHEAD, 90.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every": 0}, ValueError, "every must be a positive number of steps, got 0"),
        ({"every": -3}, ValueError, "every must be a positive number of steps"),
        ({"every": True}, TypeError, "every must be an int number of steps"),
        ({"every": 1.5}, TypeError, r'every must be .*"auto"; got float 1.5'),
        ({"every": "10 parsecs"}, ValueError, r"every must be .*\"10min\".*got '10 parsecs'"),
        ({"every": "\u0661\u0660min"}, ValueError, "every must be"),  # Arabic-Indic 10
        ({"every": "0s"}, ValueError, "every must be"),
        ({"every": timedelta(0)}, ValueError, "every must be"),
        ({"every": "auto", "overhead": 0}, ValueError, "overhead must be a fraction .* got 0"),
        ({"every": "auto", "overhead": 1.0}, ValueError, "overhead must be a fraction"),
        ({"every": "auto", "overhead": "2%"}, ValueError, "overhead must be a fraction"),
        ({"every": "auto", "mtbf": "soon"}, ValueError, "mtbf must be a duration"),
        ({"every": "auto", "mtbf": -1}, ValueError, "mtbf must be a positive duration"),
        ({"every": 100, "overhead": 0.02}, ValueError, 'apply to every="auto" only'),
        ({"every": "10min", "mtbf": "1h"}, ValueError, 'apply to every="auto" only'),
    ],
)
def test_bad_values_name_the_argument_and_the_allowed_forms(kwargs, error, match):
    every = kwargs.pop("every")
    with pytest.raises(error, match=match):
        parse_every(every, **kwargs)


@pytest.mark.parametrize(
    ("steps", "due"),
    [(0, False), (99, False), (100, True), (250, True)],
)
def test_every_steps(steps, due):
    reason = EverySteps(100).due(Progress(steps=steps, seconds=1e9), Costs())
    assert (reason is not None) == due
    if due:
        assert reason.startswith(f"every 100 steps: step {steps} ")


@pytest.mark.parametrize(
    ("seconds", "due"),
    [(0.0, False), (599.9, False), (600.0, True), (7200.0, True)],
)
def test_every_time_ignores_steps(seconds, due):
    reason = EveryTime(600.0).due(Progress(steps=10**6, seconds=seconds), Costs())
    assert (reason is not None) == due
    if due:
        assert reason.startswith("every 10min: ")


def test_young_daly_formula():
    assert young_daly(2.0, 3600.0) == 120.0
    assert young_daly(0.0, 3600.0) == 0.0


def test_auto_saves_first_to_measure_then_waits_for_measurements():
    auto = Auto()
    assert auto.due(Progress(0, 0.0, saved_before=False), Costs()) == (
        "auto: the first save, to measure what a save costs"
    )
    assert auto.due(Progress(10**6, 1e9, saved_before=True), Costs()) is None


@pytest.mark.parametrize(
    ("costs", "overhead", "mtbf", "interval"),
    [
        # Young/Daly binds: sqrt(2 * 0.5 * 86400) = 293.9 > 0.5 / 0.02 = 25
        (MEASURED, 0.02, 86400.0, math.sqrt(86400.0)),
        # the budget binds: 0.5 / 0.001 = 500 > sqrt(2 * 0.5 * 3600) = 60
        (MEASURED, 0.001, 3600.0, 500.0),
        # one write binds: 2.0 > sqrt(2 * 0.001 * 100) and 0.001 / 0.02
        (Costs(0.001, 2.0, 0.1, True), 0.02, 100.0, 2.0),
        # one step binds when everything else is shorter
        (Costs(0.0, 0.0, 3.0, True), 0.02, 100.0, 3.0),
    ],
)
def test_auto_interval_is_young_daly_within_the_budget(costs, overhead, mtbf, interval):
    assert Auto(overhead, mtbf).interval_seconds(costs) == pytest.approx(interval)


def test_auto_reason_names_the_interval_and_the_costs():
    reason = Auto(0.02, 86400.0).due(Progress(3000, 300.0), MEASURED)
    assert reason is not None
    assert reason.startswith("auto: 5min since the last save >= interval 4.9min")
    assert "save cost 0.5s" in reason and "MTBF 24h" in reason


positive = st.floats(min_value=1e-4, max_value=1e5, allow_nan=False)


@given(
    blocked=positive, write=positive, step=positive, overhead=st.floats(1e-3, 0.5), mtbf=positive
)
def test_auto_interval_keeps_overhead_within_budget(blocked, write, step, overhead, mtbf):
    interval = Auto(overhead, mtbf).interval_seconds(Costs(blocked, write, step, True))
    assert blocked / interval <= overhead * (1 + 1e-9)
    assert interval >= write and interval >= step
    assert interval >= young_daly(blocked, mtbf) * (1 - 1e-9)


@given(seconds=st.floats(min_value=0, max_value=1e6), interval=positive)
def test_auto_is_due_exactly_when_the_interval_has_passed(seconds, interval):
    # blocked cost chosen so that Young/Daly gives `interval`; nothing else binds
    blocked = interval**2 / (2 * 1e6)
    costs = Costs(blocked, 0.0, 0.0, True)
    auto = Auto(0.999, 1e6)
    due = auto.due(Progress(1, seconds), costs) is not None
    assert due == (seconds >= auto.interval_seconds(costs))


@given(steps=st.integers(0, 10**6), n=st.integers(1, 10**4))
def test_every_steps_is_due_exactly_from_n_steps(steps, n):
    assert (EverySteps(n).due(Progress(steps, 0.0), Costs()) is not None) == (steps >= n)


@given(last=st.integers(-1, 10**6), gap=st.integers(0, 10**4), n=st.integers(1, 10**4))
def test_every_steps_is_due_when_a_multiple_of_n_was_reached(last, gap, n):
    step = last + gap
    due = EverySteps(n).due(Progress(gap, 0.0, step=step), Costs()) is not None
    assert due == any(s % n == 0 for s in range(last + 1, step + 1))


def test_parse_duration_names_the_argument():
    with pytest.raises(ValueError, match="mtbf must be a duration"):
        parse_duration(None, "mtbf")
    assert parse_duration(".5min", "every") == 30.0
