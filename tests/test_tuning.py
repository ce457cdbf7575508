"""haltpoint.tuning.judge: prunes a trial only when no trial so far recovered a gap that large."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from haltpoint.tuning import PruneSettings, judge

ANY = PruneSettings(min_trials=1, min_step=0)

LEADER = {step: 1.0 / (step + 1) for step in range(10)}
OTHERS = {n: {s: v + 0.01 * n for s, v in LEADER.items()} for n in range(4)}


def test_a_hopeless_trial_is_pruned_with_a_reason_naming_the_leader() -> None:
    verdict = judge(OTHERS, {0: 3.0, 1: 2.9, 2: 2.8})
    assert verdict.prune
    assert "leading trial 0's 0.3333 at the same step" in verdict.reason


def test_a_trial_level_with_the_leader_survives() -> None:
    assert not judge(OTHERS, {0: 1.0, 1: 0.5, 2: 0.34}).prune


def test_a_gap_some_trial_recovered_later_is_not_pruned() -> None:
    late_bloomer = {0: 5.0, 1: 5.0, 2: 5.0, 3: 0.0}
    others = {**OTHERS, 9: late_bloomer}
    assert not judge(others, {0: 3.0, 1: 2.9, 2: 2.8}).prune


def test_maximised_metrics_prune_the_low_trial() -> None:
    others = {n: {s: -v for s, v in c.items()} for n, c in OTHERS.items()}
    assert judge(others, {0: -3.0, 1: -2.9, 2: -2.8}, mode="max").prune
    assert not judge(others, {0: -3.0, 1: -2.9, 2: -2.8}).prune


def test_a_diverged_trial_is_pruned_at_once() -> None:
    verdict = judge({}, {0: 1.0, 1: math.nan})
    assert verdict.prune and "diverged" in verdict.reason


def test_nothing_is_pruned_before_enough_trials_or_steps() -> None:
    assert "only 2 other trials" in judge(dict(list(OTHERS.items())[:2]), {0: 9, 1: 9, 2: 9}).reason
    assert not judge(OTHERS, {0: 9.0, 1: 9.0}).prune
    assert not judge(OTHERS, {}).prune


def test_a_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        judge(OTHERS, {0: 1.0}, mode="up")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_trials": 0}, "min_trials must be >= 1"),
        ({"min_step": -1}, "min_step must be >= 0"),
        ({"margin": 0.0}, "margin must be > 0"),
        ({"tolerance": -0.1}, "tolerance must be >= 0"),
        ({"tolerance": math.nan}, "tolerance must be >= 0"),
        ({"min_share": 1.5}, "min_share must be between 0 and 1"),
        ({"min_share": -0.1}, "min_share must be between 0 and 1"),
        ({"min_share": math.nan}, "min_share must be between 0 and 1"),
        ({"margin": math.inf}, "margin must be > 0 and finite, got inf"),
        ({"tolerance": math.inf}, "tolerance must be >= 0 and finite, got inf"),
        ({"trend": math.inf}, "trend must be >= 0 and finite, got inf"),
        ({"trend": -1.0}, "trend must be >= 0"),
        ({"trend": math.nan}, "trend must be >= 0"),
        ({"band": -0.1}, "band must be >= 0"),
        ({"band": math.nan}, "band must be >= 0"),
        ({"overall": 1.5}, "overall must be between 0 and 1"),
        ({"overall": math.nan}, "overall must be between 0 and 1"),
    ],
)
def test_bad_settings_are_named(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PruneSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_trials": 1.5}, r"min_trials must be an int, got 1.5 \(float\)"),
        ({"min_trials": True}, r"min_trials must be an int, got True \(bool\)"),
        ({"min_trials": "3"}, r"min_trials must be an int, got '3' \(str\)"),
        ({"min_step": None}, r"min_step must be an int, got None"),
        ({"min_step": 2.5}, r"min_step must be an int, got 2.5"),
        ({"margin": "1"}, r"margin must be a real number, got '1' \(str\)"),
        ({"margin": None}, r"margin must be a real number, got None"),
        ({"min_share": True}, r"min_share must be a real number, got True \(bool\)"),
        ({"overall": [0.5]}, r"overall must be a real number, got \[0.5\]"),
    ],
)
def test_settings_of_a_bad_type_are_named(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(TypeError, match=match):
        PruneSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_take_numpy_numbers() -> None:
    np = pytest.importorskip("numpy")
    assert PruneSettings(min_trials=np.int64(2), margin=np.float64(0.5)).min_trials == 2


def test_a_smaller_margin_prunes_a_gap_some_trial_recovered() -> None:
    late_bloomer = {0: 5.0, 1: 5.0, 2: 5.0, 3: 0.0}
    others = {**OTHERS, 9: late_bloomer}
    verdict = judge(others, {0: 3.0, 1: 2.9, 2: 2.8}, settings=PruneSettings(margin=0.4))
    assert verdict.prune and "0.4 x the most any trial caught up" in verdict.reason


def _decaying(step: int) -> float:
    """A loss that falls slowly, then fast as a schedule's learning rate decays (to step 49)."""
    return 2.0 - 1.5 * (step / 49) ** 2


def test_side_by_side_curves_prune_a_trial_far_behind_though_every_trial_gains_much() -> None:
    """Curves that run side by side (an architecture search with one schedule) all gain much
    after step 5, when the learning rate decays, but no trial overtakes one ahead of it: the
    trial 0.5 behind is pruned (before the catch-up rule, a gain of 1.5 kept it)."""
    others = {n: {s: 0.1 * n + _decaying(s) for s in range(50)} for n in range(10)}
    current = {s: 0.5 + _decaying(s) for s in range(6)}
    verdict = judge(others, current)
    assert verdict.prune and "caught up on one ahead of it after step 5" in verdict.reason


def _crossing(start: float, slope: float = 0.02) -> dict[int, float]:
    """A curve `start` behind at step 5 that then closes `slope` a step on every trial."""
    return {s: start + _decaying(s) - (slope * s if s > 5 else 0.0) for s in range(50)}


def test_crossing_curves_keep_a_trial_as_far_behind() -> None:
    """The same gap is kept when an earlier trial near it overtook one ahead of it by more."""
    others = {n: {s: 0.1 * n + _decaying(s) for s in range(50)} for n in range(10)}
    others[10] = _crossing(0.55)  # within `band` (10%) of the current trial at step 5
    current = {s: 0.5 + _decaying(s) for s in range(6)}
    verdict = judge(others, current)
    assert not verdict.prune and "within 0.735 of the leading trial 0's" in verdict.reason


def test_a_crossing_far_from_the_trial_counts_only_at_the_overall_share() -> None:
    """A trial that was twice as far behind closed 0.98: counted at `overall` (half), the
    gap of 0.5 is beyond 0.75 x 0.49; counted whole (`overall=1`, the rule before `band`), the
    trial is kept."""
    others = {n: {s: 0.1 * n + _decaying(s) for s in range(50)} for n in range(10)}
    others[10] = _crossing(1.0)
    current = {s: 0.5 + _decaying(s) for s in range(6)}
    verdict = judge(others, current)
    assert verdict.prune and "0.75 x 0.5 x the most any trial (none near it" in verdict.reason
    assert not judge(others, current, settings=PruneSettings(overall=1.0)).prune
    assert not judge(others, current, settings=PruneSettings(band=1.0)).prune  # all neighbours


def test_a_neighbours_catch_up_is_named_in_the_reason() -> None:
    others = {n: {s: 0.1 * n + _decaying(s) for s in range(50)} for n in range(10)}
    others[10] = _crossing(0.55, slope=0.01)  # a neighbour: closes 0.49
    others[11] = _crossing(1.5, slope=0.016)  # far: closes 0.78, counted at half
    current = {s: 0.6 + _decaying(s) for s in range(6)}
    verdict = judge(others, current)
    assert verdict.prune
    assert "the most a trial near it (within 10%) at step 5 caught up" in verdict.reason


def test_a_near_tie_within_the_tolerance_is_not_pruned() -> None:
    flat = {n: {s: 1.0 + 0.001 * n for s in range(10)} for n in range(4)}
    current = {s: 1.004 for s in range(6)}
    assert judge(flat, current).prune
    assert not judge(flat, current, settings=PruneSettings(tolerance=0.005)).prune


def test_nothing_is_pruned_until_a_share_of_the_trials_ran_on_to_twice_the_step() -> None:
    short = {0: 1.0, 1: 0.6, 2: 0.5}  # pruned at step 2: they show no later gain
    others = {0: LEADER, **{n: short for n in range(1, 6)}}
    hopeless = {0: 3.0, 1: 2.9, 2: 2.8}
    verdict = judge(others, hopeless)
    assert not verdict.prune
    assert "only 1 of 6 other trials ran on to step 4 (min_share 0.2)" in verdict.reason
    assert judge(others, hopeless, settings=PruneSettings(min_share=0.0)).prune
    assert judge({**others, 6: LEADER}, hopeless).prune  # 2 of 7 ran on


def test_a_trial_whose_own_progress_would_close_the_gap_is_kept() -> None:
    steep = {0: 5.0, 1: 4.0, 2: 3.0, 3: 1.5, 4: 0.9}  # 2.1 gained since step 2
    assert not judge(OTHERS, steep).prune
    assert judge(OTHERS, steep, settings=PruneSettings(trend=0.0)).prune
    slow = {0: 3.0, 1: 2.5, 2: 2.0, 3: 1.5, 4: 1.0}  # 1.0 gained: x 0.5 x log2(9/4) < gap 0.8
    verdict = judge(OTHERS, slow)
    assert verdict.prune and "own recent progress projected to step 9 (0.585)" in verdict.reason


curves = st.dictionaries(st.integers(0, 12), st.floats(-10, 10), min_size=1, max_size=12)


@given(st.dictionaries(st.integers(0, 20), curves, max_size=6), curves)
def test_the_trial_leading_at_its_step_is_never_pruned(others: dict, current: dict) -> None:
    step = max(current)
    mine = min(v for s, v in current.items() if s <= step)
    rivals = [
        min((v for s, v in c.items() if s <= step), default=math.inf)
        for c in others.values()
        if max(c) >= step
    ]
    if all(mine <= r for r in rivals):
        assert not judge(others, current, settings=ANY).prune


@given(st.dictionaries(st.integers(0, 20), curves, max_size=6), curves)
def test_flipping_sign_and_mode_gives_the_same_verdict(others: dict, current: dict) -> None:
    flipped = {n: {s: -v for s, v in c.items()} for n, c in others.items()}
    low = judge(others, current, settings=ANY)
    high = judge(flipped, {s: -v for s, v in current.items()}, mode="max", settings=ANY)
    assert low.prune == high.prune


@pytest.mark.parametrize(
    ("others", "current", "error", "match"),
    [
        (OTHERS, {0: 3.0, True: 2.9, 2: 2.8}, TypeError, r"current: step True \(bool\)"),
        (OTHERS, {-5: 3.0, -1: 2.8}, ValueError, r"current: step -5 is negative"),
        (OTHERS, {0: 3.0, 2.5: 2.8}, TypeError, r"current: step 2.5 \(float\)"),
        (OTHERS, {0: 3.0, "2": 2.8}, TypeError, r"current: step '2' \(str\)"),
        (OTHERS, {0: 3.0, 2: "2.8"}, TypeError, r"current: the value at step 2 is '2.8' \(str\)"),
        (OTHERS, {0: 3.0, 2: None}, TypeError, r"current: the value at step 2 is None"),
        (OTHERS, [3.0, 2.9, 2.8], TypeError, r"current must be a mapping of step to value"),
        ({**OTHERS, 7: {0: 1.0, -1: 1.0}}, {0: 3.0, 2: 2.8}, ValueError, r"others\[7\]: step -1"),
        ({**OTHERS, 7: {False: 1.0}}, {0: 3.0, 2: 2.8}, TypeError, r"others\[7\]: step False"),
        ({**OTHERS, 7: {0: "x"}}, {0: 3.0, 2: 2.8}, TypeError, r"others\[7\]: the value at step 0"),
        ({**OTHERS, 7: [1.0]}, {0: 3.0, 2: 2.8}, TypeError, r"others\[7\] must be a mapping"),
        ([LEADER, LEADER, LEADER], {0: 3.0, 2: 2.8}, TypeError, r"others must be a mapping"),
        (None, {0: 3.0, 2: 2.8}, TypeError, r"others must be a mapping"),
    ],
)
def test_bad_curves_are_named(others: object, current: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        judge(others, current)  # type: ignore[arg-type]


def test_bad_settings_type_is_named() -> None:
    with pytest.raises(TypeError, match="settings must be a PruneSettings, got dict"):
        judge(OTHERS, {0: 1.0}, settings={"min_trials": 2})  # type: ignore[arg-type]


def test_numpy_scalars_and_0d_tensors_are_values() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    hopeless = {0: 3.0, 1: 2.9, 2: 2.8}
    expected = judge(OTHERS, hopeless)
    others = {n: {np.int64(s): np.float32(v) for s, v in c.items()} for n, c in OTHERS.items()}
    current = {s: torch.tensor(v) for s, v in hopeless.items()}
    verdict = judge(others, current)
    assert verdict.prune and verdict.reason.split(" by ")[0] == expected.reason.split(" by ")[0]
    with pytest.raises(TypeError, match=r"current: the value at step 2 is tensor"):
        judge(OTHERS, {**hopeless, 2: torch.tensor([2.8, 1.0])})


def test_non_finite_values_in_other_curves_are_skipped() -> None:
    diverged = {0: 1.0, 1: math.nan, 2: math.inf, 3: -math.inf}
    assert judge({**OTHERS, 7: diverged}, {0: 3.0, 1: 2.9, 2: 2.8}).prune
    assert not judge({**OTHERS, 7: diverged}, {0: 1.0, 1: 0.5, 2: 0.3}).prune


def test_huge_steps_are_judged() -> None:
    """Steps are ints of any size (Optuna's in-memory storage keeps 10**400): the doublings
    left to the longest trial no longer overflow a float division."""
    far = {n: {**c, 10**400: c[9]} for n, c in OTHERS.items()}
    assert not judge(far, {0: 3.0, 1: 2.9, 2: 2.8}).prune  # 1330 doublings of progress left
    huge = {n: {s * 10**17: v for s, v in c.items()} for n, c in OTHERS.items()}
    assert judge(huge, {0: 3.0, 10**17: 2.9, 2 * 10**17: 2.8}).prune


def test_a_trial_that_went_on_reporting_nan_is_no_evidence_of_what_comes_later() -> None:
    """Two trials that diverged at step 3 but reported NaN to step 99 (a loop that did not ask
    the pruner, or a study run first without it) counted as having run on to twice the step:
    they passed `min_share` for the one trial that did, and the slow learner was pruned."""
    leader = {s: 0.5 + 0.5 / (s + 1) for s in range(100)}
    short = {n: {s: 0.6 + 0.5 / (s + 1) + 0.01 * n for s in range(6)} for n in range(1, 5)}
    nan_tail = {s: 2.0 if s < 3 else math.nan for s in range(100)}
    slow = {s: 2.0 - 0.1 * s for s in range(5)}
    verdict = judge({0: leader, **short, 5: nan_tail, 6: nan_tail}, slow)
    assert not verdict.prune
    assert "only 1 of 7 other trials ran on to step 8" in verdict.reason


hostile = st.one_of(st.floats(-10, 10), st.sampled_from([math.nan, math.inf, -math.inf]))
hostile_curves = st.dictionaries(st.integers(0, 12), hostile, min_size=1, max_size=12)


@given(
    st.dictionaries(st.integers(0, 20), hostile_curves, max_size=6),
    curves,
    st.sampled_from(["min", "max"]),
)
def test_non_finite_values_of_others_never_prune_the_leader(
    others: dict, current: dict, mode: str
) -> None:
    sign = 1.0 if mode == "min" else -1.0
    step = max(current)
    mine = min(sign * v for s, v in current.items() if s <= step)
    rivals = [
        min((sign * v for s, v in c.items() if s <= step and math.isfinite(v)), default=math.inf)
        for c in others.values()
        if max(c) >= step
    ]
    if all(mine <= r for r in rivals):
        assert not judge(others, current, mode=mode, settings=ANY).prune
        assert not judge(others, current, mode=mode).prune


def test_a_trial_that_diverged_before_the_step_does_not_lead_at_it() -> None:
    """Three trials at 0.1 on step 0 that went on reporting NaN counted as having reached
    step 2 with their step-0 value: one of them led, and a trial level with the only trial
    that really reached step 2 was pruned 'worse than leading trial 1's 0.1'."""
    tail = {s: 0.1 if s == 0 else math.nan for s in range(100)}
    real = {s: 1.0 - 0.001 * s for s in range(100)}
    verdict = judge({0: real, 1: tail, 2: tail, 3: tail}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert not verdict.prune and "only 1 other trials reached step 2" in verdict.reason
