"""benchmarks/tuning.py: its NumPy replay stops every trial where the real HaltpointPruner does in
an Optuna study, regret is judged as documented, and it skips cleanly without the data."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("optuna")

from haltpoint.integrations.optuna import HaltpointPruner
from haltpoint.tuning import PruneSettings

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import tuning  # noqa: E402
from tuning_sweeps import Sweep, replay, trained  # noqa: E402


def synthetic(seed: int, trials: int = 14, epochs: int = 16) -> Sweep:
    """Noisy decaying curves at random rates and floors, some diverging, as one sweep."""
    rng = np.random.default_rng(seed)
    losses, qualities = [], []
    for _ in range(trials):
        rate, floor = rng.uniform(0.02, 1.0), rng.uniform(0.1, 1.0)
        loss = floor + np.exp(-rate * np.arange(epochs + 1)) + rng.normal(0, 0.02, epochs + 1)
        if rng.random() < 0.15:
            loss[rng.integers(3, epochs) :] = np.nan
            loss = loss[: int(np.flatnonzero(np.isnan(loss))[0]) + 1]
        losses.append(loss)
        qualities.append(1.0 - loss / 3)
    return Sweep("synthetic", "SGD", tuple(losses), tuple(qualities), has_acc=True)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "settings",
    [
        PruneSettings(),
        PruneSettings(min_trials=2, margin=0.25, tolerance=0.01, min_step=3),
        PruneSettings(min_trials=2, margin=0.5, min_share=0.4, trend=1.0, min_step=1),
        PruneSettings(min_trials=2, margin=0.5, min_share=0.0, band=0.3, overall=0.0),
        PruneSettings(min_trials=2, margin=0.4, min_share=0.1, overall=1.0),
    ],
)
def test_the_numpy_replay_stops_where_the_real_pruner_does(
    seed: int, settings: PruneSettings
) -> None:
    sweep = synthetic(seed)
    fast = tuning.outcome(tuning.fast_stops(tuning.Prepared(sweep), settings))
    assert fast == replay(sweep, HaltpointPruner(settings))


def test_regret_is_judged_on_the_best_loss_trials_quality() -> None:
    loss = (np.array([3.0, 1.0, 2.0]), np.array([3.0, 1.5]), np.array([3.0, np.nan]))
    acc = (np.array([0.1, 0.8, 0.9]), np.array([0.1, 0.76]), np.array([0.1, np.nan]))
    sweep = Sweep("p", "SGD", loss, acc, has_acc=True)
    assert sweep.epochs() == 2 + 1 + 1
    assert sweep.regret([0, 1, 2]) == 0.0
    assert sweep.regret([1]) == pytest.approx(5.0)  # 0.76 against 0.8 at trial 0's best loss
    assert sweep.regret([]) == 100.0


def test_the_benchmark_refuses_a_missing_data_file_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json.gz"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "tuning.py"), str(missing)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == f"tuning.py: error: data file not found: {missing}\n"


def test_order_seeds_are_parsed_and_bad_ones_named() -> None:
    assert tuning.parse_seeds("0,1,2,3,4") == [0, 1, 2, 3, 4]
    assert tuning.parse_seeds("7") == [7]
    for bad in ("", "1,x", "-1", "2,2"):
        with pytest.raises(argparse.ArgumentTypeError, match="--order-seeds must be distinct"):
            tuning.parse_seeds(bad)


def test_the_pooled_family_keeps_only_the_trials_that_trained() -> None:
    loss = (
        np.array([3.0, 1.0, 0.5]),  # gained 2.5: the most
        np.array([3.0, 2.0, 1.6]),  # gained 1.4, over half of 2.5
        np.array([3.0, 2.9, 2.0]),  # gained 1.0, under half
        np.array([3.0, 0.4, np.nan]),  # diverged
    )
    sweep = Sweep("p", "SGD", loss, loss, has_acc=False)
    assert trained(sweep) == [0, 1]
