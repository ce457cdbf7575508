"""Retention rules: tables of cases and hypothesis properties over made-up records."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from haltpoint.policies.retention import (
    CheckpointRecord,
    KeepBest,
    KeepEvery,
    KeepLatest,
    KeepPinned,
    RetentionRule,
    best_record,
    build_rules,
    commit_order,
    retained_steps,
)


@dataclass(frozen=True)
class Rec:
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    pinned: bool = False
    sequence: int | None = None


def recs(*values: float | None, monitor: str = "loss") -> list[Rec]:
    """Records at steps 1, 2, ... with `monitor` set to each value (None: metric absent)."""
    return [Rec(step, {} if v is None else {monitor: v}) for step, v in enumerate(values, start=1)]


NAN = float("nan")
INF = float("inf")


# --- tables of cases ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "records", "expected"),
    [
        (KeepLatest(1), recs(0.1, 0.2, 0.3), {3}),
        (KeepLatest(2), recs(0.1, 0.2, 0.3), {2, 3}),
        (KeepLatest(5), recs(0.1, 0.2), {1, 2}),
        (KeepLatest(3), [], set()),
        # commit order: a rewind to 1 saved 4 and 5 after 10 and 20 (sequences 0..4)
        (
            KeepLatest(2),
            [
                Rec(1, sequence=0),
                Rec(10, sequence=1),
                Rec(20, sequence=2),
                Rec(4, sequence=3),
                Rec(5, sequence=4),
            ],
            {4, 5},
        ),
        (
            KeepLatest(3),
            [Rec(1, sequence=0), Rec(10, sequence=1), Rec(20, sequence=2), Rec(4, sequence=3)],
            {4, 10, 20},
        ),
        # no sequence (an older haltpoint's): before any with one, then by step
        (KeepLatest(1), [Rec(7), Rec(3, sequence=0)], {3}),
        (KeepLatest(2), [Rec(7), Rec(9), Rec(3, sequence=0)], {3, 9}),
        (KeepLatest(1), [Rec(2, sequence=5), Rec(1, sequence=5)], {2}),  # a tie: by step
        (KeepBest(1, "loss"), recs(0.5, 0.1, 0.3), {2}),
        (KeepBest(2, "loss"), recs(0.5, 0.1, 0.3), {2, 3}),
        (KeepBest(1, "loss", "max"), recs(0.5, 0.1, 0.3), {1}),
        (KeepBest(1, "loss"), recs(0.2, 0.2, 0.2), {1}),  # tie: earliest step wins
        (KeepBest(2, "loss", "max"), recs(0.1, 0.9, 0.9, 0.9), {2, 3}),
        (KeepBest(1, "loss"), recs(NAN, 0.4, -INF), {2}),  # non-finite never best
        (KeepBest(1, "loss", "max"), recs(INF, 0.4, NAN), {2}),
        (KeepBest(2, "loss"), recs(None, 0.4, None), {2}),  # missing metric never best
        (KeepBest(3, "loss"), recs(None, NAN), set()),
        (KeepBest(1, "loss"), recs(0.0, -0.0), {1}),  # -0.0 == 0.0: a tie
        (KeepBest(1, "loss"), [Rec(1, {"loss": True})], set()),  # bool is not a metric
        (KeepEvery(3), recs(*[0.0] * 7), {3, 6}),
        (KeepEvery(1), recs(0.0, 0.0), {1, 2}),
        (KeepEvery(5), [Rec(0), Rec(4), Rec(10)], {0, 10}),
        (KeepPinned(), [Rec(1, pinned=True), Rec(2), Rec(3, pinned=True)], {1, 3}),
        (KeepPinned(), recs(0.1, 0.2), set()),
    ],
)
def test_rule_selects(rule: RetentionRule, records: list[Rec], expected: set[int]) -> None:
    assert rule.select(records) == expected


@pytest.mark.parametrize(
    ("values", "mode", "expected_step"),
    [
        ((0.5, 0.1, 0.3), "min", 2),
        ((0.5, 0.1, 0.3), "max", 1),
        ((0.2, 0.1, 0.1), "min", 2),
        ((NAN, None, INF, 7.0), "min", 4),
        ((NAN, None, -INF), "min", None),
        ((), "max", None),
    ],
)
def test_best_record(
    values: tuple[float | None, ...], mode: str, expected_step: int | None
) -> None:
    best = best_record(recs(*values), "loss", mode)
    assert (best.step if best is not None else None) == expected_step


def test_best_record_returns_the_record_object() -> None:
    records = recs(0.3, 0.2)
    assert best_record(records, "loss", "min") is records[1]


def test_rules_never_fight_newest_worst_is_kept() -> None:
    # The Orbax / transformers #15089 trap: the newest checkpoint is the worst one.
    records = recs(0.1, 0.2, 0.3, 0.9)
    rules = build_rules(keep_last=1, keep_best=2, monitor="loss", mode="min", keep_every=None)
    assert retained_steps(records, rules) == {1, 2, 4}


def test_build_rules_order_and_content() -> None:
    assert build_rules(keep_last=1, keep_best=0, monitor=None, mode="min", keep_every=None) == [
        KeepLatest(1),
        KeepPinned(),
    ]
    assert build_rules(keep_last=3, keep_best=2, monitor="acc", mode="max", keep_every=10) == [
        KeepLatest(3),
        KeepBest(2, "acc", "max"),
        KeepEvery(10),
        KeepPinned(),
    ]
    # a monitor without keep_best is allowed (it still names what "best" means)
    assert build_rules(keep_last=1, keep_best=0, monitor="acc", mode="max", keep_every=None) == [
        KeepLatest(1),
        KeepPinned(),
    ]


_GOOD = {"keep_last": 1, "keep_best": 0, "monitor": None, "mode": "min", "keep_every": None}


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"keep_last": 0}, ValueError, r"keep_last must be an int >= 1 \(the newest .*got 0"),
        ({"keep_last": -2}, ValueError, r"keep_last must be an int >= 1.*got -2"),
        ({"keep_last": True}, TypeError, r"keep_last must be an int >= 1.*got True"),
        ({"keep_last": 1.0}, TypeError, r"keep_last must be an int >= 1.*got 1\.0"),
        ({"keep_best": -1}, ValueError, r"keep_best must be an int >= 0, got -1"),
        ({"keep_best": False}, TypeError, r"keep_best must be an int >= 0, got False"),
        ({"keep_best": "3"}, TypeError, r"keep_best must be an int >= 0, got '3'"),
        ({"keep_best": 2}, ValueError, r"keep_best=2 needs monitor.*monitor='val_loss'"),
        ({"keep_every": 0}, ValueError, r"keep_every must be None or an int >= 1, got 0"),
        ({"keep_every": True}, TypeError, r"keep_every must be None or an int >= 1, got True"),
        ({"keep_every": 2.5}, TypeError, r"keep_every must be None or an int >= 1, got 2\.5"),
        ({"mode": "auto"}, ValueError, r"mode must be 'min' or 'max', got 'auto'"),
        ({"mode": "MIN"}, ValueError, r"mode must be 'min' or 'max', got 'MIN'"),
        ({"monitor": ""}, TypeError, r"monitor must be a non-empty metric name \(str\), got ''"),
        ({"monitor": 3}, TypeError, r"monitor must be a non-empty metric name \(str\), got 3"),
    ],
)
def test_build_rules_refuses(overrides: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build_rules(**{**_GOOD, **overrides})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: KeepLatest(0), ValueError, r"KeepLatest\.n must be an int >= 1, got 0"),
        (lambda: KeepLatest(True), TypeError, r"KeepLatest\.n must be an int >= 1, got True"),
        (lambda: KeepEvery(-1), ValueError, r"KeepEvery\.n must be an int >= 1, got -1"),
        (lambda: KeepBest(0, "loss"), ValueError, r"KeepBest\.k must be an int >= 1, got 0"),
        (lambda: KeepBest(1, None), TypeError, r"monitor must be a non-empty .*got None"),
        (lambda: KeepBest(1, "loss", "best"), ValueError, r"mode must be 'min' or 'max'"),
        (lambda: best_record([], "loss", "up"), ValueError, r"mode must be .*got 'up'"),
        (lambda: best_record([], "", "min"), TypeError, r"monitor must be .*got ''"),
    ],
)
def test_rule_constructors_refuse(make: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()  # type: ignore[operator]


@pytest.mark.parametrize("kind", [np.int8, np.int32, np.int64, np.uint16])
def test_counts_take_numpy_integers_as_plain_ints(kind: type) -> None:
    rules = build_rules(keep_last=kind(2), keep_best=kind(1), monitor="loss", mode="min",
                        keep_every=kind(3))  # fmt: skip
    counts = [getattr(r, "n", getattr(r, "k", None)) for r in rules[:3]]
    assert counts == [2, 1, 3] and all(type(c) is int for c in counts)
    assert type(KeepLatest(kind(4)).n) is int and type(KeepBest(kind(1), "loss").k) is int
    for bad in (np.bool_(True), np.float64(2.0)):
        with pytest.raises(TypeError, match=r"keep_last must be an int >= 1"):
            build_rules(**{**_GOOD, "keep_last": bad})  # type: ignore[arg-type]


def test_rules_satisfy_the_protocol() -> None:
    for rule in (KeepLatest(1), KeepBest(1, "m"), KeepEvery(2), KeepPinned()):
        assert isinstance(rule, RetentionRule)
    record: CheckpointRecord = Rec(1)
    assert record.step == 1


# --- hypothesis properties ----------------------------------------------------------------

metric_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-5, max_value=5),
    st.sampled_from([0.0, -0.0, 1.0, NAN]),  # ties and NaNs on purpose
)


@st.composite
def record_lists(draw: st.DrawFn) -> list[Rec]:
    steps = draw(st.lists(st.integers(min_value=0, max_value=200), unique=True, max_size=25))
    records = []
    for step in steps:
        metrics: dict[str, float] = {}
        if draw(st.booleans()):
            metrics["loss"] = draw(metric_values)
        if draw(st.booleans()):
            metrics["acc"] = draw(metric_values)
        sequence = draw(st.none() | st.integers(min_value=0, max_value=30))  # ties on purpose
        records.append(Rec(step, metrics, draw(st.booleans()), sequence))
    return records


settings_st = st.fixed_dictionaries(
    {
        "keep_last": st.integers(min_value=1, max_value=6),
        "keep_best": st.integers(min_value=0, max_value=6),
        "monitor": st.sampled_from(["loss", "acc"]),
        "mode": st.sampled_from(["min", "max"]),
        "keep_every": st.one_of(st.none(), st.integers(min_value=1, max_value=20)),
    }
)


def _is_finite_metric(record: Rec, monitor: str) -> bool:
    value = record.metrics.get(monitor)
    return isinstance(value, (int, float)) and math.isfinite(value)


@given(record_lists(), settings_st)
def test_the_newest_committed_are_always_kept(records: list[Rec], settings: dict) -> None:
    """Whatever the other rules say, the keep_last newest by commit order stay (after a
    rewind, never one of the new branch for one of the abandoned branch's higher steps)."""
    kept = retained_steps(records, build_rules(**settings))
    newest = sorted(records, key=commit_order)[-settings["keep_last"] :]
    assert {r.step for r in newest} <= kept
    assert kept <= {r.step for r in records}
    dropped = [r for r in records if r.step not in kept]
    assert all(commit_order(r) < commit_order(n) for r in dropped for n in newest)


@given(record_lists(), settings_st)
def test_best_is_kept_whenever_keep_best(records: list[Rec], settings: dict) -> None:
    kept = retained_steps(records, build_rules(**settings))
    best = best_record(records, settings["monitor"], settings["mode"])
    if settings["keep_best"] >= 1 and best is not None:
        assert best.step in kept


@given(record_lists(), settings_st)
def test_kept_is_exactly_the_union(records: list[Rec], settings: dict) -> None:
    rules = build_rules(**settings)
    union: set[int] = set()
    for rule in rules:
        union |= rule.select(records)
    assert retained_steps(records, rules) == union
    pinned = {r.step for r in records if r.pinned}
    assert pinned <= union


@given(record_lists(), settings_st, st.randoms(use_true_random=False))
def test_independent_of_record_order(
    records: list[Rec], settings: dict, rnd: random.Random
) -> None:
    rules = build_rules(**settings)
    shuffled = list(records)
    rnd.shuffle(shuffled)
    assert retained_steps(shuffled, rules) == retained_steps(records, rules)
    for rule in rules:
        assert rule.select(shuffled) == rule.select(records)
    a = best_record(records, settings["monitor"], settings["mode"])
    b = best_record(shuffled, settings["monitor"], settings["mode"])
    assert (a.step if a else None) == (b.step if b else None)


@given(record_lists(), settings_st)
def test_rules_are_deterministic(records: list[Rec], settings: dict) -> None:
    first = retained_steps(records, build_rules(**settings))
    assert retained_steps(list(records), build_rules(**settings)) == first


@given(record_lists(), st.integers(min_value=1, max_value=8), st.sampled_from(["min", "max"]))
def test_keep_best_picks_only_finite_and_the_best(records: list[Rec], k: int, mode: str) -> None:
    chosen = KeepBest(k, "loss", mode).select(records)
    eligible = [r for r in records if _is_finite_metric(r, "loss")]
    assert len(chosen) == min(k, len(eligible))
    by_step = {r.step: r for r in records}
    assert all(_is_finite_metric(by_step[s], "loss") for s in chosen)
    # nothing left out is strictly better than something chosen
    sign = 1 if mode == "min" else -1
    for other in eligible:
        if other.step not in chosen:
            for s in chosen:
                assert sign * by_step[s].metrics["loss"] <= sign * other.metrics["loss"]
    best = best_record(records, "loss", mode)
    if best is not None:
        assert best.step in chosen


@given(record_lists(), st.integers(min_value=1, max_value=8))
def test_keep_latest_is_the_top_n_by_commit_order(records: list[Rec], n: int) -> None:
    chosen = KeepLatest(n).select(records)
    ordered = sorted(records, key=lambda r: (-1 if r.sequence is None else r.sequence, r.step))
    assert chosen == {r.step for r in ordered[-n:]}


@given(record_lists(), st.integers(min_value=1, max_value=8))
def test_keep_latest_without_sequences_is_the_top_n_steps(records: list[Rec], n: int) -> None:
    """An older haltpoint's run (no manifest records a sequence) is kept as it always was."""
    old = [Rec(r.step, r.metrics, r.pinned) for r in records]
    chosen = KeepLatest(n).select(old)
    steps = sorted(r.step for r in old)
    assert chosen == set(steps[-n:]) if steps else chosen == set()
