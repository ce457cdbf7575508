"""`EarlyStopping.explain()`: one line on why the stopper has (not) stopped, for each state."""

from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from haltpoint import Divergence, EarlyStopping, Target
from haltpoint.stopping.adaptive import TrendRule

NAN = math.nan


def fed(stopper: EarlyStopping, values: list[float]) -> EarlyStopping:
    for value in values:
        if stopper.step(value):
            break
    return stopper


def explained(values: list[float], **kwargs: object) -> str:
    return fed(EarlyStopping("val_loss", **kwargs), values).explain()  # type: ignore[arg-type]


#: improving for 34 evaluations, then 6 without a new best: 40 so far
IMPROVING_THEN_FLAT = [1.0 - 0.01 * i for i in range(34)] + [0.70] * 6
#: a best at 0, then a zig-zag whose noise keeps the projection far from flat
ZIGZAG = [1.0] + [1.1 if i % 2 else 1.3 for i in range(11)]
#: a best at 10, a jump to 1.5, then a slow, clear descent (the descent guard's case)
RECOVERING = [2.0 - 0.1 * i for i in range(11)] + [1.5 - 0.001 * (i - 11) for i in range(11, 30)]
#: a slow start, a spike at 18, then a recovery (as in tests/test_stopping_default.py)
SPIKE = [1.0] + [1.2 + 2.0 * 0.8**i for i in range(17)] + [0.6 + 7.5 * 0.93**i for i in range(3)]
STEADY = [1.0 - 0.05 * i for i in range(12)]  # a best of 0.45 at evaluation 11


# -- before any evaluation, and stopped ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"patience": 5, "min_delta": 0.001},
            "no evaluation of val_loss yet; it stops after 5 evaluations without improvement by "
            "more than 0.001",
        ),
        (
            {},
            "no evaluation of val_loss yet; the default rule looks at its trend after no new "
            "best for half of the evaluations so far (at least 5)",
        ),
        (
            {"horizon": 100},
            "no evaluation of val_loss yet; the default rule looks at its trend after no new "
            "best for 30% of the horizon of 100",
        ),
    ],
)
def test_before_any_evaluation_it_says_so(kwargs: dict[str, object], expected: str) -> None:
    assert EarlyStopping("val_loss", **kwargs).explain() == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "values"),
    [
        ({"patience": 2}, [0.5, 0.6, 0.7]),
        ({}, [1.0] * 12),
        ({"horizon": 40}, [1.0] * 40),
        ({"patience": 5, "rules": [Target(0.1)]}, [0.5, 0.05]),
        ({"patience": 5}, [0.5, NAN]),
    ],
)
def test_a_stopped_stopper_explains_with_its_reason(
    kwargs: dict[str, object], values: list[float]
) -> None:
    stopper = fed(EarlyStopping("val_loss", **kwargs), values)  # type: ignore[arg-type]
    assert stopper.stopped and stopper.explain() == stopper.reason


# -- a patience -------------------------------------------------------------------------------


def test_with_a_patience_it_counts_against_the_patience() -> None:
    assert explained([0.30, 0.25, 0.2495, 0.26, 0.251], patience=5, min_delta=0.001) == (
        "val_loss has not improved by more than 0.001 for 3 evaluations; it stops after 5 "
        "(best 0.2500 at evaluation 1)"
    )
    assert explained([0.30, 0.25], patience=5) == (
        "val_loss improved to 0.2500 at evaluation 1, a new best; it stops after 5 evaluations "
        "without improvement"
    )
    assert explained([NAN, NAN], patience=5, check_finite=False) == (
        "no finite val_loss in 2 evaluations; it stops after 5"
    )
    assert explained([0.5], patience=0, warmup=3, check_finite=False) == (
        "val_loss improved to 0.5000 at evaluation 0, a new best; it stops at the first "
        "evaluation that does not improve (patience 0); in the warmup, nothing stops it before "
        "evaluation 3"
    )


def test_past_the_patience_after_clear_stop_it_says_the_next_non_improvement_stops() -> None:
    stopper = fed(EarlyStopping("val_loss", patience=1), [0.5, 0.6])
    stopper.clear_stop()
    assert stopper.explain() == (
        "val_loss has not improved for 1 evaluation; it stops at the next evaluation that does "
        "not improve (patience 1) (best 0.5000 at evaluation 0)"
    )


def test_warmup_baseline_and_rules_are_named_where_they_apply() -> None:
    rules = [Target(0.1), Divergence(10.0)]
    stopper = EarlyStopping("val_loss", patience=3, warmup=2, baseline=0.5, rules=rules)
    fed(stopper, [1.0])
    assert stopper.explain() == (
        "val_loss improved to 1.0000 at evaluation 0, a new best; it stops after 3 evaluations "
        "without improvement; in the warmup, nothing but a non-finite value stops it before "
        "evaluation 2; it stops at evaluation 4 unless the best beats the baseline 0.5000 by "
        "then; none of its rules (Target, Divergence) has stopped it"
    )
    fed(stopper, [0.9, 0.95])  # out of the warmup
    assert "warmup" not in stopper.explain()
    assert "it stops at evaluation 4 unless the best beats the baseline" in stopper.explain()
    fed(stopper, [0.4])  # the baseline is beaten: no more deadline
    assert "baseline" not in stopper.explain()
    one = fed(EarlyStopping("val_loss", patience=3, rules=[Target(0.1)]), [1.0])
    assert one.explain().endswith("; its rule (Target) has not stopped it")


@pytest.mark.parametrize(
    ("kwargs", "values"),
    [
        ({"patience": 3, "warmup": 2, "baseline": 0.5}, [1.0, 0.9, 0.95, 0.97, 0.96]),
        ({"warmup": 3, "baseline": 0.5}, [1.0, 0.9, 0.95, 0.97, 0.96, 0.8, 0.85, 0.86, 0.87]),
        ({"warmup": 40, "baseline": 0.5}, [1.0 - 0.001 * i for i in range(200)]),
        ({"horizon": 20, "warmup": 4, "baseline": 0.5}, [1.0 - 0.001 * i for i in range(30)]),
    ],
)
def test_the_baseline_deadline_is_where_it_stops(
    kwargs: dict[str, object], values: list[float]
) -> None:
    """The evaluation the line names is the one the baseline stops the run at."""
    stopper = EarlyStopping("val_loss", **kwargs)  # type: ignore[arg-type]
    said = None
    for value in values:
        decision = stopper.step(value)
        if decision:
            break
        said = stopper.explain().split("; it stops at evaluation ")[1].split(" ")[0]
    assert decision and decision.code == "baseline"
    assert said == str(decision.step)


# -- the default rule -------------------------------------------------------------------------


def test_before_its_wait_the_default_rule_says_the_wait_it_needs() -> None:
    assert explained(IMPROVING_THEN_FLAT) == (
        "val_loss has had no new best for 6 evaluations; the default rule looks at the trend "
        "after 20 (half of the 40 evaluations so far), or after 10 in its fast lane; best 0.6700 "
        "at evaluation 33"
    )
    assert explained(IMPROVING_THEN_FLAT, horizon=100) == (
        "val_loss has had no new best for 6 evaluations; the default rule looks at the trend "
        "after 30 (30% of the horizon of 100), or after 10 in its fast lane; best 0.6700 at "
        "evaluation 33"
    )
    assert explained([1.0, 0.9]) == (
        "val_loss improved to 0.9000 at evaluation 1, a new best; the default rule looks at the "
        "trend after 5 evaluations without one (half of the 2 evaluations so far, at least 5)"
    )
    assert explained([NAN] * 3, check_finite=False) == (
        "no finite val_loss in 3 evaluations; the default rule stops after 5"
    )


def test_past_its_wait_it_says_what_the_projection_gains_against_the_tolerance() -> None:
    assert explained(ZIGZAG) == (
        "val_loss has had no new best for 11 evaluations, but its trend over the last 5 (at "
        "1.2200) projects up to 105.89% more improvement in the next 24, more than the 0.25% "
        "that stops it; best 1.0000 at evaluation 0"
    )


def test_the_descent_guard_holding_the_run_is_said() -> None:
    line = explained(RECOVERING)
    assert line.startswith(
        "val_loss is still clearly improving: no new best for 19 evaluations, but its trend "
        "over the last 8 (at 1.4820) still improves by 0.001 an evaluation, over 1 standard "
        "error from flat, so the descent guard holds it; best 1.0000 at evaluation 10"
    )


def test_a_run_that_looks_diverged_waits_longer_and_says_so() -> None:
    assert explained(SPIKE) == (
        "val_loss looks diverged: no new best for 20 evaluations, and its trend over the last 6 "
        "(at 8.3402) is more than |best| worse than its best, so the default rule waits for 22 "
        "without one (2x its wait of 11) before its trend may stop it, as spikes often recover; "
        "best 1.0000 at evaluation 0"
    )
    told = explained([1.0, 0.8, 0.6] + [1.3, 1.9] * 7, horizon=40)
    assert told.startswith("val_loss looks diverged: no new best for 14 evaluations")
    assert "waits for 24 without one (2x its wait of 12)" in told
    assert told.endswith(  # told the horizon, the fast lane is not held: what it found
        "; its fast lane (after 4), with 3x the lucky draw, projects up to 98.63% more "
        "improvement in the next 23, more than the 0.25% that stops it; best 0.6000 at "
        "evaluation 2"
    )


def test_in_the_fast_lane_only_it_says_what_the_lane_found() -> None:
    swing = explained([*STEADY, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert swing == (
        "val_loss has had no new best for 5 evaluations; the default rule looks at the trend "
        "after 9 (half of the 17 evaluations so far); its fast lane (after 5) is closed to a "
        "run more than 10% of its progress above its best (a swing, which often comes back); "
        "best 0.4500 at evaluation 11"
    )
    drift = explained([*STEADY, 0.455, 0.46, 0.452, 0.458, 0.451])
    assert drift == (
        "val_loss has had no new best for 5 evaluations; the default rule looks at the trend "
        "after 9 (half of the 17 evaluations so far); its fast lane (after 5), with 2x the lucky "
        "draw, projects up to 30.88% more improvement in the next 34, more than the 0.25% that "
        "stops it; best 0.4500 at evaluation 11"
    )


def test_a_trend_it_cannot_judge_is_said() -> None:
    assert explained([0.0] * 12).endswith(
        "but its trend over the last 5 (at 0.0) cannot be judged against a best of exactly 0 "
        "(the tolerance is a share of |best|); best 0.0 at evaluation 0"
    )
    assert explained([1.0] + [NAN] * 8, check_finite=False) == (
        "val_loss has had no new best for 8 evaluations, but only 1 of its recent values is "
        "finite, too few to fit a trend; best 1.0000 at evaluation 0"
    )


def test_after_a_resume_the_next_evaluation_says_what_the_trend_projects() -> None:
    straight = fed(EarlyStopping("val_loss"), ZIGZAG)
    resumed = EarlyStopping("val_loss")
    resumed.load_state_dict(json.loads(json.dumps(straight.state_dict())))
    assert resumed.explain() == (
        "val_loss has had no new best for 11 evaluations, past the default rule's wait of 6 "
        "(half of the 12 evaluations so far); after a resume, the next evaluation says what its "
        "trend projects; best 1.0000 at evaluation 0"
    )
    assert "last_check" not in json.dumps(straight.state_dict())  # the state is as before
    for stopper in (straight, resumed):
        stopper.step(1.1)
    assert resumed.explain() == straight.explain()
    assert "projects up to" in resumed.explain()


def test_a_cleared_stop_of_the_default_rule_says_the_next_evaluation_decides() -> None:
    stopper = fed(EarlyStopping("val_loss"), [1.0] * 12)
    stopper.clear_stop()
    assert stopper.explain() == (
        "val_loss's stop at evaluation 5 was cleared: no new best for 5 evaluations, past the "
        "default rule's wait; the next evaluation decides again; best 1.0000 at evaluation 0"
    )


def test_a_name_with_a_newline_still_gives_one_printable_line() -> None:
    line = fed(EarlyStopping("val\nloss", patience=3), [1.0, 2.0]).explain()
    assert line.isprintable() and line.startswith("val\\nloss has not improved")


def test_explain_is_a_pure_read() -> None:
    """Asked after every evaluation or never, the stopper decides the same and saves the same."""
    rng = random.Random(7)
    curves = [
        [1.0 / (1 + 0.1 * i) + rng.gauss(0, 0.01) for i in range(120)],
        [*SPIKE, *(0.6 + 7.5 * 0.93**i for i in range(3, 120))],
        RECOVERING + [1.48 + rng.gauss(0, 0.02) for _ in range(100)],
    ]
    for curve in curves:
        for kwargs in ({}, {"horizon": 150}, {"patience": 10}):
            asked = EarlyStopping("val_loss", **kwargs)  # type: ignore[arg-type]
            quiet = EarlyStopping("val_loss", **kwargs)  # type: ignore[arg-type]
            for value in curve:
                a = asked.step(value)
                asked.explain()
                assert a == quiet.step(value)
            assert asked.state_dict() == quiet.state_dict()


def test_the_trend_rule_remembers_only_its_latest_check() -> None:
    rule = TrendRule(1.0)
    assert rule.last_check is None
    for i in range(6):
        rule.observe(i, 1.0)
    assert rule.check(5, best=1.0, wait=5) is not None
    assert rule.last_check is not None and rule.last_check.evaluation == 5
    rule.load_state_dict(rule.state_dict())
    assert rule.last_check is None


# -- any sequence -----------------------------------------------------------------------------

values = st.lists(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(-10.0, 10.0),
        st.sampled_from([0.0, 1.0, 1.0 + 1e-12, -0.0]),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(
    values=values,
    mode=st.sampled_from(["min", "max"]),
    patience=st.one_of(st.none(), st.integers(0, 12)),
    horizon=st.one_of(st.none(), st.integers(1, 100)),
    warmup=st.integers(0, 8),
    baseline=st.one_of(st.none(), st.floats(-5.0, 5.0)),
    check_finite=st.booleans(),
)
def test_explain_never_raises_and_is_one_printable_line(
    values: list[float],
    mode: str,
    patience: int | None,
    horizon: int | None,
    warmup: int,
    baseline: float | None,
    check_finite: bool,
) -> None:
    stopper = EarlyStopping(
        "val_loss",
        mode=mode,
        patience=patience,
        horizon=None if patience is not None else horizon,
        warmup=warmup,
        baseline=baseline,
        check_finite=check_finite,
    )
    lines = [stopper.explain()]
    for value in values:
        stopper.step(value)
        lines.append(stopper.explain())
    for line in lines:
        assert isinstance(line, str) and line and line.isprintable()


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.one_of(st.floats(-1e6, 1e6), st.just(NAN)), max_size=60),
    mode=st.sampled_from(["min", "max"]),
    horizon=st.one_of(st.none(), st.integers(1, 100)),
)
def test_after_a_resume_explain_is_one_printable_line(
    values: list[float], mode: str, horizon: int | None
) -> None:
    stopper = EarlyStopping("val_loss", mode=mode, horizon=horizon, check_finite=False)
    for value in values:
        stopper.step(value)
    resumed = EarlyStopping("val_loss", mode=mode, horizon=horizon, check_finite=False)
    resumed.load_state_dict(json.loads(json.dumps(stopper.state_dict())))
    line = resumed.explain()
    assert line and line.isprintable()


# -- the default rule's stop reason -----------------------------------------------------------


def test_the_default_rules_stop_reason_says_which_wait_stopped_it_in_under_400_characters() -> None:
    """The docs' examples: the main test, the calm fast lane, and a diverging run told the
    horizon; each names the wait it passed, the projection against the tolerance and the best."""
    main = fed(EarlyStopping("val_loss"), [1.0] * 40).reason
    calm = [1.0 - 0.01 * i for i in range(30)] + [0.71 + 0.001 * i for i in range(40)]
    fast = fed(EarlyStopping("val_loss"), calm).reason
    diverging = [1.0, 0.8, 0.6] + [0.6 * 1.3**i for i in range(1, 50)]
    told = fed(EarlyStopping("val_loss", horizon=len(diverging)), diverging).reason
    assert main == (
        "val_loss has levelled off: no new best for 5 evaluations (the default rule's wait: half "
        "of the 6 evaluations so far, at least 5), and its trend over the last 5 (at 1.0000, no "
        "clear descent) projects at most 0.00% more improvement in the next 12 (it stops at "
        "0.25% or less); best 1.0000 at evaluation 0"
    )
    assert fast is not None and fast.startswith(
        "val_loss has levelled off: no new best for 10 evaluations (the default rule's fast "
        "lane: a quarter of the 40 evaluations so far, while the run sits within 10% of its "
        "progress above its best), and even with 2x the lucky draw its trend "
    )
    assert told == (
        "val_loss is diverging: no new best for 7 evaluations (the default rule's fast lane: 10% "
        "of the horizon of 52), and even with 3x the lucky draw its trend over the last 5 (at "
        "3.5993) projects at most 0.00% more improvement in the next 20 (it stops at 0.25% or "
        "less); best 0.6000 at evaluation 2"
    )
    assert all(len(r) < 400 for r in (main, fast, told))
