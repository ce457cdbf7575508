"""benchmarks/stopping_tuning.py and its helpers: the lean and the vectorised replays stop where
EarlyStopping does, the variants are honest, and the choice is judged per band and problem."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from haltpoint import EarlyStopping
from haltpoint.stopping.adaptive import DEFAULT_SETTINGS, PLANNED_SETTINGS
from haltpoint.stopping.replay import replay

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, str(ROOT / "benchmarks"))
tuning = load("stopping_tuning")
curves_module = load("stopping_curves")
fast = load("stopping_fast")

CURVES = st.lists(
    st.one_of(
        st.floats(0.0, 2.0, allow_nan=False),
        st.integers(0, 8).map(lambda i: i / 4),
        st.just(math.nan),
    ),
    min_size=2,
    max_size=150,
)


@given(
    curve=CURVES,
    walk=st.lists(st.floats(-0.05, 0.05), min_size=2, max_size=200),
    horizon=st.one_of(st.none(), st.integers(1, 250)),
)
@settings(max_examples=150, deadline=None)
def test_stop_index_is_early_stopping(
    curve: list[float], walk: list[float], horizon: int | None
) -> None:
    drifting = [1.0 + sum(walk[: i + 1]) for i in range(len(walk))]  # long, quiet stretches
    for values in (curve, drifting):
        expected = replay(lambda: EarlyStopping("loss", horizon=horizon), values).last_index
        shipped = DEFAULT_SETTINGS if horizon is None else PLANNED_SETTINGS
        assert tuning.stop_index(values, shipped, horizon) == expected


def test_grid_holds_the_shipped_settings() -> None:
    assert DEFAULT_SETTINGS in tuning.grid() and PLANNED_SETTINGS in tuning.grid()


def synthetic_runs(count: int = 12, seed: int = 0) -> list[dict[str, object]]:
    """Runs shaped like DeepOBS's: descents, plateaus, rises, blow-ups, a NaN, two problems."""
    rng = random.Random(seed)
    runs = []
    for k in range(count):
        n = rng.choice([51, 101, 161])
        floor = rng.uniform(0.2, 1.0)
        turn = rng.randrange(5, n)
        loss = [
            floor + 2.0 * 0.9**i + max(0, i - turn) * rng.uniform(0, 0.01) + rng.gauss(0, 0.01)
            for i in range(n)
        ]
        if k % 5 == 4:
            loss[rng.randrange(10, n)] = math.nan
        if k % 4 == 3:  # blown up after a few evaluations: hundreds of times, noisy
            jump = rng.randrange(1, 6)
            loss[jump:] = [v * 300 * math.exp(rng.gauss(0, 0.7)) for v in loss[jump:]]
        run: dict[str, object] = {
            "testproblem": f"p{k % 2}",
            "optimizer": "sgd",
            "test_losses": loss,
        }
        if k % 2:
            run["test_accuracies"] = [1 - v / 4 for v in loss]
        runs.append(run)
    return runs


def test_variants_are_cut_and_subsampled_runs() -> None:
    assert curves_module.variants(51) == [(1, 1.0, 51), (1, 0.5, 26), (2, 1.0, 26)]
    runs = synthetic_runs()
    curves = curves_module.build(runs)
    assert all(20 <= n <= 351 for n in curves.length)
    for c in range(len(curves)):
        source = runs[int(curves.run[c])]["test_losses"]
        stride = int(curves.stride[c])
        expected = source[::stride][: int(curves.length[c])]  # type: ignore[index]
        assert np.array_equal(curves.series(c), expected, equal_nan=True)
    assert set(curves.band()) <= {0, 1, 2}


def test_vectorised_replay_stops_where_early_stopping_does() -> None:
    curves = curves_module.build(synthetic_runs())
    prepared = fast.Prepared(curves)
    for shipped, horizon in ((DEFAULT_SETTINGS, False), (PLANNED_SETTINGS, True)):
        stops = fast.trend_stops(prepared, shipped, horizon)
        for c in range(len(curves)):
            values = curves.series(c)
            h = len(values) if horizon else None
            expected = replay(lambda h=h: EarlyStopping("loss", horizon=h), values).last_index
            assert stops[c] == expected
    stops = fast.patience_stops(prepared, 5)
    for c in range(len(curves)):
        expected = replay(lambda: EarlyStopping("loss", patience=5), curves.series(c))
        assert stops[c] == expected.last_index


def test_vectorised_replay_of_the_descent_guard_is_the_rule() -> None:
    """Every guard value in the grid (and none) stops where `TrendRule` does, with and without a
    horizon; on a run that recovers slowly from a jump the guard holds it open."""
    runs = synthetic_runs()
    rng = random.Random(1)
    slow = [2.0 - 0.1 * i for i in range(11)] + [1.5 - 0.001 * (i - 11) for i in range(11, 161)]
    runs.append(
        {
            "testproblem": "p0",
            "optimizer": "sgd",
            "test_losses": [v + rng.gauss(0, 0.0005) for v in slow],
        }
    )
    curves = curves_module.build(runs)
    prepared = fast.Prepared(curves)
    stops = {}
    for z in tuning.GRID["descent_z"]:
        for horizon in (False, True):
            base = PLANNED_SETTINGS if horizon else DEFAULT_SETTINGS
            setting = dataclasses.replace(base, descent_z=z)
            stops[z, horizon] = fast.trend_stops(prepared, setting, horizon)
            for c in range(len(curves)):
                h = int(curves.length[c]) if horizon else None
                assert stops[z, horizon][c] == tuning.stop_index(curves.series(c), setting, h)
    last = int(np.flatnonzero((curves.run == len(runs) - 1) & (curves.length == 161))[0])
    for z in tuning.GRID["descent_z"]:  # the slow recovery
        assert not math.isfinite(z) or stops[z, False][last] > stops[math.inf, False][last]


def test_outcomes_are_the_replay_regret_and_accuracy_is_judged() -> None:
    curves = curves_module.build(synthetic_runs())
    prepared = fast.Prepared(curves)
    stops = fast.patience_stops(prepared, 3)
    out = prepared.outcomes(stops)
    for c in range(len(curves)):
        values = curves.series(c)
        result = replay(lambda: EarlyStopping("loss", patience=3), values)
        assert out.loss[c] == result.regret
        assert out.saved[c] == 1 - result.last_index / (len(values) - 1)
        if not curves.has_acc()[c]:
            assert out.judged[c] == out.loss[c]


def test_summary_headroom_and_targets() -> None:
    # two runs: one saves half with no regret, one saves nothing and loses 2%
    out = fast.Outcomes(np.array([0.5, 0.0]), np.array([0.0, 0.02]), np.array([0.0, 0.02]))
    summary = tuning.summarize(out, np.array([0.5, 0.5]), np.array([0, 1]))
    assert summary.saved == 25.0 and summary.share == 0.5
    assert summary.regret == 1.0 and summary.harmful == 50.0
    assert summary.headroom() == min(0.5 / 0.75, 0.3 / 1.0, 1.5 / 50.0)
    assert summary.meets() == "misses saving, regret, harm"
    assert tuning.summarize(out, np.array([0.5, 0.5]), np.array([0])).meets() == "meets all"


def test_leave_one_problem_out_chooses_without_the_scored_problem() -> None:
    """Setting 1 saves more but is harmful on problem p1 only: the fold that leaves p1 out
    cannot see that and chooses it; the fold that leaves p0 out does not."""
    curves = curves_module.build(synthetic_runs())
    oracle = np.full(len(curves), 0.5)
    safe = fast.Outcomes(np.full(len(curves), 0.4), np.zeros(len(curves)), np.zeros(len(curves)))
    harm = np.where(curves.problem == 1, 0.5, 0.0)
    greedy = fast.Outcomes(np.full(len(curves), 0.5), harm, harm)
    table = tuning.Table([safe, greedy], oracle, curves)
    chosen = tuning.leave_one_problem_out(table, curves)
    assert set(chosen[curves.problem == 1]) == {1}  # chosen on p0 alone
    assert set(chosen[curves.problem == 0]) == {0}


def test_the_choice_is_made_on_the_judged_metric_not_on_the_test_loss() -> None:
    """Setting 1 saves more and keeps the judged metric (test accuracy) intact while its test
    loss regret is large everywhere: the targets are on the judged metric, so it is chosen;
    once that harm shows on the judged metric too, it is not."""
    curves = curves_module.build(synthetic_runs())
    n = len(curves)
    oracle = np.full(n, 0.5)
    safe = fast.Outcomes(np.full(n, 0.4), np.zeros(n), np.zeros(n))
    loss_only = fast.Outcomes(np.full(n, 0.5), np.full(n, 0.5), np.zeros(n))
    table = tuning.Table([safe, loss_only], oracle, curves)
    assert tuning.choose(table, list(range(len(curves.problems)))) == 1
    judged_too = fast.Outcomes(np.full(n, 0.5), np.full(n, 0.5), np.full(n, 0.5))
    table = tuning.Table([safe, judged_too], oracle, curves)
    assert tuning.choose(table, list(range(len(curves.problems)))) == 0
