"""benchmarks/stopping_tuning.py: its lean replay stops where EarlyStopping does, and the
cross-validation chooses on one set of runs and scores on another."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

from haltpoint import EarlyStopping
from haltpoint.stopping.adaptive import DEFAULT_SETTINGS
from haltpoint.stopping.replay import replay

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tuning = load("stopping_tuning")

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
        assert tuning.stop_index(values, DEFAULT_SETTINGS, horizon) == expected


def test_grid_holds_the_shipped_setting() -> None:
    assert DEFAULT_SETTINGS in tuning.grid()


def test_summary_headroom_and_targets() -> None:
    # two runs: one saves half with no regret, one saves nothing and loses 2%
    summary = tuning.summarize([(0.5, 0.0), (0.0, 0.02)], [0.5, 0.5])
    assert summary.saved == 25.0 and summary.share == 0.5
    assert summary.regret == 1.0 and summary.harmful == 50.0
    assert summary.headroom() == min(0.5 / 0.75, 0.3 / 1.0, 1.5 / 50.0)
    assert summary.meets() == "misses saving, regret, harm"
    assert tuning.summarize([(0.5, 0.0)], [0.5]).meets() == "meets all"


def test_cross_validation_chooses_without_the_scored_runs() -> None:
    # setting 0 is safe everywhere; setting 1 saves more but is harmful on run 2 only
    results = [
        [(0.4, 0.0), (0.4, 0.0), (0.4, 0.0)],
        [(0.5, 0.0), (0.5, 0.0), (0.9, 0.5)],
    ]
    oracle = [0.5, 0.5, 0.5]
    folds = [("a", [1, 2], [0]), ("b", [0, 2], [1]), ("c", [0, 1], [2])]
    rows, pooled = tuning.cross_validate(results, oracle, folds, ["p", "p", "p"])
    assert [k for _, k, _, _ in rows] == [0, 0, 1]  # "c" cannot see run 2's harm
    assert pooled.runs == 3 and pooled.harmful == 100 / 3


def test_choice_is_judged_across_problems() -> None:
    """Two settings with the same pooled figures: the one that is harmful on a single problem
    only (a large spread across problems) has the worse bound."""
    even = [(0.5, 0.02), (0.5, 0.0)] * 2  # one harmful run on each problem
    lumpy = [(0.5, 0.02), (0.5, 0.02), (0.5, 0.0), (0.5, 0.0)]  # both on problem "a"
    groups = ["a", "a", "b", "b"]
    runs, oracle = [0, 1, 2, 3], [0.5] * 4
    assert tuning.summarize(even, oracle) == tuning.summarize(lumpy, oracle)
    assert tuning.bounded(lumpy, runs, oracle, groups).harmful > 50.0
    assert tuning.bounded(even, runs, oracle, groups).harmful == 50.0
    assert tuning.choose([lumpy, even], runs, oracle, groups) == 1


def test_log_slope_t_reads_the_trend_of_log_values() -> None:
    decay = [2.0 * 0.9**t for t in range(10)]  # an exact exponential decay
    assert tuning.log_slope_t(decay, 0, 9) < -1e6  # no noise but rounding
    assert tuning.log_slope_t([3.0] * 10, 0, 9) == 0.0  # a stuck run has no trend
    rising = [1.0, 1.3, 1.1, 1.6, 1.4, 2.0]
    assert tuning.log_slope_t(rising, 0, 5) > 2.0
    assert math.isnan(tuning.log_slope_t(rising, 0, 1))  # too few values
