"""Rules: Target, Divergence, TimeBudget, Prechelt's GL / PQ / UP, and user-written rules."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pytest

from haltpoint import (
    ConsecutiveIncreases,
    Divergence,
    EarlyStopping,
    GeneralizationLoss,
    Observation,
    ProgressQuotient,
    Rule,
    StatefulRule,
    Stop,
    StopReason,
    Target,
    TimeBudget,
)
from haltpoint.stopping.prechelt import generalization_loss, training_progress

NAN = math.nan
SR = StopReason
UP = ConsecutiveIncreases
NEVER = 10**9  # patience that never ends a run, to watch a rule alone


def stop_of(stopper: EarlyStopping, values: list[Any]) -> tuple[int | None, StopReason | None]:
    for value in values:
        decision = stopper.step(value)
        if decision:
            return decision.step, decision.code
    return None, None


RULE_CASES = [
    # (rule, mode, values, expected stop index, expected code)
    (Target(0.1), "min", [0.5, 0.2, 0.1], 2, StopReason.TARGET),
    (Target(0.1), "min", [0.5, 0.05], 1, StopReason.TARGET),
    (Target(0.1), "min", [0.5, 0.11, 0.2], None, None),
    (Target(0.9), "max", [0.5, 0.9], 1, StopReason.TARGET),
    (Target(0.9), "max", [0.5, 0.89], None, None),
    (Divergence(10.0), "min", [2.0, 10.0, 10.5], 2, StopReason.DIVERGENCE),
    (Divergence(10.0), "min", [2.0, 9.0], None, None),
    (Divergence(0.2), "max", [0.5, 0.2, 0.1], 2, StopReason.DIVERGENCE),
    (GeneralizationLoss(5.0), "min", [1.0, 0.8, 0.84, 0.85], 3, StopReason.GENERALIZATION_LOSS),
    (GeneralizationLoss(5.0), "min", [1.0, 0.8, 0.84, 0.7, 0.7349], None, None),
    (GeneralizationLoss(50.0), "min", [-2.0, -0.9], 1, StopReason.GENERALIZATION_LOSS),
    (GeneralizationLoss(50.0), "min", [-2.0, -1.0], None, None),
    (GeneralizationLoss(1.0), "min", [0.0, 0.001], 1, StopReason.GENERALIZATION_LOSS),
    # UP_s with strips of 1: s successive worse values
    (UP(2, strip=1), "min", [1.0, 0.5, 0.6, 0.7], 3, SR.CONSECUTIVE_INCREASES),
    (UP(2, strip=1), "min", [1.0, 0.5, 0.6, 0.55, 0.6], None, None),
    (UP(1, strip=1), "max", [0.5, 0.6, 0.55], 2, SR.CONSECUTIVE_INCREASES),
    # strips of 2: only the values at evaluations 1, 3, 5, ... are compared
    (UP(2, strip=2), "min", [1, 0.5, 9, 0.6, 9, 0.7], 5, SR.CONSECUTIVE_INCREASES),
    (UP(2, strip=2), "min", [1, 0.5, 9, 0.4, 9, 0.7], None, None),
    # equal strip ends are not increases
    (UP(1, strip=1), "min", [1.0, 1.0, 1.0], None, None),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "mode", "values", "expected", "code"), RULE_CASES)
def test_rule_stops(
    rule: Rule, mode: str, values: list[float], expected: int | None, code: StopReason | None
) -> None:
    stopper = EarlyStopping("metric", mode=mode, patience=NEVER, rules=[rule])
    assert stop_of(stopper, values) == (expected, code)


@pytest.mark.parametrize(
    ("rule", "values", "part"),
    [
        (Target(0.1), [0.5, 0.1], "val_loss reached the target 0.1000 with 0.1000 at evaluation 1"),
        (Divergence(10.0), [11.0], "val_loss = 11.0000 at evaluation 0 is above the divergence"),
        (GeneralizationLoss(5.0), [1.0, 1.1], "GL = 10.00% exceeds alpha = 5%"),
        (ConsecutiveIncreases(1, strip=1), [1.0, 2.0], "worse at the end of 1 successive strips"),
    ],
)
def test_rule_reasons(rule: Rule, values: list[float], part: str) -> None:
    stopper = EarlyStopping("val_loss", patience=NEVER, rules=[rule])
    for value in values:
        stopper.step(value)
    assert stopper.stopped and stopper.reason is not None and part in stopper.reason


def test_generalization_loss_formula() -> None:
    assert generalization_loss(1.1, 1.0) == pytest.approx(10.0)
    assert generalization_loss(-1.0, -2.0) == pytest.approx(50.0)
    assert generalization_loss(0.0, 0.0) == 0.0
    assert generalization_loss(1.0, 0.0) == math.inf


def test_training_progress_formula() -> None:
    assert training_progress([1.0, 1.0]) == 0.0
    assert training_progress([1.2, 1.0]) == pytest.approx(100.0)  # mean 1.1 is 10% above 1.0
    assert training_progress([0.0, 0.0]) == 0.0
    assert training_progress([1.0, 0.0]) == math.inf


def pq_stopper(alpha: float = 1.0, strip: int = 2) -> EarlyStopping:
    return EarlyStopping("val", patience=NEVER, rules=[ProgressQuotient(alpha, strip=strip)])


PQ_CASES = [
    # ((val, train) pairs, alpha, expected stop index)
    ([(1.0, 1.0), (0.8, 0.9), (0.85, 0.899), (0.86, 0.898)], 1.0, 3),
    # training still improves fast: GL / P is small
    ([(1.0, 1.0), (0.8, 0.9), (0.85, 0.5), (0.86, 0.2)], 1.0, None),
    # GL is 0 at the best: never stops there
    ([(1.0, 1.0), (0.8, 0.9), (0.7, 0.9), (0.6, 0.9)], 1.0, None),
    # training stalled completely (P = 0) while GL > 0: stops
    ([(1.0, 1.0), (0.8, 0.9), (0.85, 0.9), (0.86, 0.9)], 1.0, 3),
    # only strip ends (odd indices here) are judged
    ([(1.0, 1.0), (0.8, 0.9), (0.86, 0.9)], 1.0, None),
]


@pytest.mark.parametrize(("pairs", "alpha", "expected"), PQ_CASES)
def test_progress_quotient(
    pairs: list[tuple[float, float]], alpha: float, expected: int | None
) -> None:
    stopper = pq_stopper(alpha)
    metrics = [{"val": v, "train_loss": t} for v, t in pairs]
    code = StopReason.PROGRESS_QUOTIENT if expected is not None else None
    assert stop_of(stopper, metrics) == (expected, code)


def test_progress_quotient_needs_the_training_loss() -> None:
    stopper = pq_stopper()
    with pytest.raises(
        ValueError,
        match=r"ProgressQuotient train_key='train_loss' is not among the metrics passed to "
        r"step\(\); the keys were \['val'\]",
    ):
        stopper.step({"val": 1.0})
    plain = EarlyStopping(patience=NEVER, rules=[ProgressQuotient(1.0)])
    with pytest.raises(ValueError, match=r"the keys were \['value'\]"):
        plain.step(1.0)


@pytest.mark.parametrize("rule", [GeneralizationLoss(1.0), ProgressQuotient(1.0)])
def test_gl_and_pq_need_min_mode(rule: Rule) -> None:
    stopper = EarlyStopping("val_acc", mode="max", patience=NEVER, rules=[rule])
    with pytest.raises(ValueError, match=r"is defined on errors and needs mode='min'; val_acc is "):
        stopper.step({"val_acc": 0.5, "train_loss": 1.0})


RULE_ERRORS = [
    (lambda: Target("0.1"), TypeError, r"Target value must be a number; got str '0.1'"),
    (lambda: Target(math.nan), ValueError, r"Target value must be a finite number; got"),
    (lambda: Divergence(math.inf), ValueError, r"Divergence threshold must be a finite number"),
    (lambda: TimeBudget(0), ValueError, r"seconds must be a finite number > 0; got seconds=0"),
    (lambda: GeneralizationLoss(-1), ValueError, r"alpha must be a finite number > 0; got alpha"),
    (lambda: GeneralizationLoss(True), TypeError, r"alpha must be a number; got bool True"),
    (lambda: ProgressQuotient(1.0, strip=0), ValueError, r"strip must be an int >= 1 .* strip=0"),
    (lambda: ProgressQuotient(1.0, train_key=3), TypeError, r"train_key must be a str; got int 3"),
    (lambda: ConsecutiveIncreases(0), ValueError, r"s must be an int >= 1 .* got s=0"),
    (lambda: ConsecutiveIncreases(2, strip=1.5), TypeError, r"strip must be an int >= 1 .* float"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "error", "pattern"), RULE_ERRORS)
def test_rule_argument_errors(make: Any, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        make()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_time_budget_stops_at_the_first_evaluation_past_the_budget() -> None:
    clock = FakeClock()
    stopper = EarlyStopping("val_loss", patience=NEVER, rules=[TimeBudget(60.0, clock=clock)])
    for now, expected in [(130.0, False), (159.0, False), (160.0, True)]:
        clock.now = now
        decision = stopper.step(1.0)
        assert decision.stop is expected
    assert stopper.code is StopReason.TIME_BUDGET
    assert stopper.reason is not None and "60 s is spent (60.0 s elapsed" in stopper.reason
    # a rerun prints this saved reason: raising the budget alone trains nothing there
    assert "raise the budget and, resuming this run, call stopper.clear_stop()" in stopper.reason


def test_time_budget_counts_across_resumes() -> None:
    clock = FakeClock()
    first = EarlyStopping(patience=NEVER, rules=[TimeBudget(60.0, clock=clock)])
    clock.now = 140.0
    first.step(1.0)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["rules"] == [{"elapsed": 40.0}]
    clock.now = 5000.0  # the restart happens much later; that gap is not counted
    budget = TimeBudget(60.0, clock=clock)
    second = EarlyStopping(patience=NEVER, rules=[budget])
    second.load_state_dict(state)
    clock.now = 5019.0
    assert budget.elapsed == 59.0 and not second.step(1.0)
    clock.now = 5020.0
    assert second.step(1.0).code is StopReason.TIME_BUDGET


@pytest.mark.parametrize(
    ("rule", "state", "pattern"),
    [
        (TimeBudget(1.0), {"elapsed": -1}, r"TimeBudget state needs 'elapsed'"),
        (ConsecutiveIncreases(2), {"count": 1}, r"ConsecutiveIncreases state needs 'previous'"),
        (ConsecutiveIncreases(2), {"previous": 1.0, "count": -1}, r"and 'count' \(an int >= 0\)"),
        (ProgressQuotient(1.0), {"train": [1.0, "x"]}, r"ProgressQuotient state needs 'train'"),
    ],
)
def test_rule_state_errors(rule: StatefulRule, state: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        rule.load_state_dict(state)


def test_stateful_rules_round_trip() -> None:
    rules: list[StatefulRule] = [ConsecutiveIncreases(2, strip=2), ProgressQuotient(1e9, strip=3)]
    stopper = EarlyStopping("val", patience=NEVER, rules=rules)
    for i in range(5):
        stopper.step({"val": 1.0 + i, "train_loss": 2.0 - 0.1 * i})
    assert not stopper.stopped
    states = [rule.state_dict() for rule in rules]
    assert states[0] == {"previous": 4.0, "count": 1}
    assert states[1] == {"train": pytest.approx([1.8, 1.7, 1.6])}
    fresh: list[StatefulRule] = [ConsecutiveIncreases(2, strip=2), ProgressQuotient(1e9, strip=3)]
    for rule, state in zip(fresh, states, strict=True):
        rule.load_state_dict(json.loads(json.dumps(state)))
        assert rule.state_dict() == state


def test_rules_see_warmup_evaluations_but_cannot_stop_them() -> None:
    up = ConsecutiveIncreases(1, strip=1)
    stopper = EarlyStopping("val_loss", patience=NEVER, warmup=3, rules=[Target(0.5), up])
    assert not stopper.step(0.1)  # would reach the target, but it is warmup
    assert not stopper.step(0.2)
    assert up.state_dict() == {"previous": 0.2, "count": 1}
    assert not stopper.step(0.3)
    assert stopper.step(0.4).code is StopReason.TARGET  # first rule in order wins


def test_first_rule_in_order_names_the_reason() -> None:
    stopper = EarlyStopping(patience=0, rules=[Divergence(1.0), Target(5.0)])
    assert stopper.step(3.0).code is StopReason.DIVERGENCE
    stopper = EarlyStopping(patience=0, rules=[Target(5.0), Divergence(1.0)])
    assert stopper.step(3.0).code is StopReason.TARGET


def test_rules_come_before_patience() -> None:
    stopper = EarlyStopping(patience=1, rules=[Divergence(10.0)])
    stopper.step(1.0)
    assert stopper.step(11.0).code is StopReason.DIVERGENCE


class EveryN:
    """A user-written rule with state: stop after n evaluations with wait > 0."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen = 0

    def check(self, obs: Observation) -> Stop | None:
        self.seen += obs.wait > 0
        if self.seen >= self.n:
            return Stop(f"{obs.name} had {self.seen} quiet evaluations")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen = state["seen"]


class Never:
    """A user-written rule without state."""

    def check(self, obs: Observation) -> Stop | None:
        return None


def test_user_rules_compose_and_resume() -> None:
    assert isinstance(EveryN(1), StatefulRule) and isinstance(Never(), Rule)
    assert not isinstance(Never(), StatefulRule)
    stopper = EarlyStopping("val_loss", patience=NEVER, rules=[Never(), EveryN(3)])
    for v in (1.0, 2.0, 0.5, 2.0):
        assert not stopper.step(v)
    state = json.loads(json.dumps(stopper.state_dict()))
    assert state["rules"] == [None, {"seen": 2}]
    resumed = EarlyStopping("val_loss", patience=NEVER, rules=[Never(), EveryN(3)])
    resumed.load_state_dict(state)
    decision = resumed.step(3.0)
    assert decision.code is StopReason.RULE
    assert decision.reason == "val_loss had 3 quiet evaluations"


def test_observation_reads_other_metrics() -> None:
    seen: list[Observation] = []

    class Spy:
        def check(self, obs: Observation) -> Stop | None:
            seen.append(obs)
            return None

    stopper = EarlyStopping("val_loss", patience=NEVER, rules=[Spy()])
    stopper.step({"val_loss": 2.0, "lr": 0.1})
    stopper.step({"val_loss": 3.0, "lr": 0.05})
    obs = seen[-1]
    assert (obs.step, obs.value, obs.best, obs.best_step, obs.improved, obs.wait) == (
        1, 3.0, 2.0, 0, False, 1
    )  # fmt: skip
    assert obs.metric("lr", "Spy") == 0.05
    with pytest.raises(ValueError, match=r"Spy='momentum' is not among .* \['lr', 'val_loss'\]"):
        obs.metric("momentum", "Spy")
