"""Replaying stoppers over recorded curves, and the quality benchmark's skip path."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from haltpoint import EarlyStopping, ProgressQuotient, StopReason
from haltpoint.stopping.replay import best_index, relative_regret, replay

NAN = math.nan
ROOT = Path(__file__).resolve().parent.parent

REPLAYS = [
    # (curve, patience, last index, stopped, best index, saving, regret)
    ([3.0, 2.0, 2.5, 1.0], 1, 2, True, 1, 0.25, 1.0),
    ([3.0, 2.0, 2.5, 1.0], 2, 3, False, 3, 0.0, 0.0),
    ([3.0, 2.0, NAN, 1.0], 5, 2, True, 1, 0.25, 1.0),  # diverged: stops at the NaN
    ([1.0, 2.0, 3.0, 4.0], 1, 1, True, 0, 0.5, 0.0),
    ([4.0, 2.0, 2.0, 2.0, 2.0], 3, 4, True, 1, 0.0, 0.0),
]


@pytest.mark.parametrize(
    ("curve", "patience", "last", "stopped", "best", "saving", "regret"), REPLAYS
)
def test_replay(
    curve: list[float],
    patience: int,
    last: int,
    stopped: bool,
    best: int,
    saving: float,
    regret: float,
) -> None:
    result = replay(lambda: EarlyStopping(patience=patience), curve)
    assert (result.last_index, result.stopped, result.best_index) == (last, stopped, best)
    assert result.saving == pytest.approx(saving)
    assert result.regret == pytest.approx(regret)
    assert result.length == len(curve)


def test_replay_judges_another_series_and_feeds_extra_metrics() -> None:
    loss = [1.0, 0.8, 0.85, 0.86, 0.9, 0.95]
    accuracy = [0.5, 0.7, 0.72, 0.8, 0.6, 0.6]
    train = [1.0, 0.9, 0.899, 0.898, 0.897, 0.896]
    result = replay(
        lambda: EarlyStopping("val", patience=100, rules=[ProgressQuotient(1.0, strip=2)]),
        loss,
        judged=accuracy,
        judge_mode="max",
        extra={"train_loss": train},
    )
    assert (result.last_index, result.code, result.best_index) == (
        3,
        StopReason.PROGRESS_QUOTIENT,
        1,
    )
    assert result.regret == pytest.approx((0.8 - 0.7) / 0.8)


def test_replay_errors() -> None:
    with pytest.raises(ValueError, match=r"watched must hold at least one value"):
        replay(EarlyStopping, [])
    with pytest.raises(ValueError, match=r"len\(watched\) = 2 values; got lengths \{'judged': 1\}"):
        replay(EarlyStopping, [1.0, 2.0], judged=[1.0])


def test_best_index_and_regret() -> None:
    assert best_index([NAN, 2.0, 1.0, 1.0, 3.0], "min") == 2
    assert best_index([NAN, 2.0, 1.0, 1.0, 3.0], "max") == 4
    assert best_index([1.0, 0.5], "min", end=1) == 0
    assert best_index([NAN], "min") is None
    assert relative_regret([2.0, 4.0], 1, "min") == 1.0
    assert relative_regret([-2.0, -1.0], 1, "min") == 0.5  # relative to |best|
    assert relative_regret([0.5, 0.4], 1, "max") == pytest.approx(0.2)
    assert relative_regret([1.0, NAN], 1, "min") == math.inf
    assert relative_regret([1.0], None, "min") == math.inf
    assert math.isnan(relative_regret([NAN], None, "min"))


def quality(*args: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / "benchmarks" / "stopping_quality.py"
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=False
    )


def test_quality_benchmark_help_names_the_data_argument() -> None:
    done = quality("--help")
    assert done.returncode == 0
    assert done.stdout.startswith("usage: stopping_quality.py [-h] [data]")
    assert "the DeepOBS curves (.json.gz)" in done.stdout


def test_quality_benchmark_rejects_a_missing_data_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json.gz"
    done = quality(str(missing))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"stopping_quality.py: error: data file not found: {missing}\n"


def test_quality_benchmark_skips_without_data_at_the_default_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import stopping_curves

    missing = tmp_path / "absent.json.gz"
    assert stopping_curves.data_argument("d", []) == stopping_curves.DATA
    assert stopping_curves.load(missing) is None
    assert capsys.readouterr().out.startswith(f"skipped: DeepOBS curves not found at {missing}")
