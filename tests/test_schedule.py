"""`Checkpointer(every=...)` and `maybe_save`: the schedule's triggers, measurements and record."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli import main
from haltpoint.policies.interval import Auto, EverySteps, EveryTime
from haltpoint.schedule import SaveSchedule
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def saved_steps(schedule: SaveSchedule, clock: FakeClock, steps, dt=1.0, metrics=None):
    """Walk `steps`, `dt` seconds apart; record a save (1 s blocked) where one is due."""
    saved = []
    for step in steps:
        clock.now += dt
        decision = schedule.decide(step, (metrics or {}).get(step, {}), None)
        if decision is not None:
            saved.append((step, decision["policy"]))
            schedule.saved(step, 1.0, 2.0)
    return saved


def test_every_steps_saves_the_multiples_whatever_the_first_step_seen():
    clock = FakeClock()
    schedule = SaveSchedule(EverySteps(3), monitor=None, mode="min", clock=clock)
    assert [s for s, _ in saved_steps(schedule, clock, range(10, 20))] == [12, 15, 18]


def test_every_steps_saves_past_a_multiple_the_calls_skipped():
    clock = FakeClock()
    schedule = SaveSchedule(EverySteps(5), monitor=None, mode="min", clock=clock)
    assert [s for s, _ in saved_steps(schedule, clock, range(0, 30, 7))] == [0, 7, 14, 21, 28]


def test_every_time_uses_the_clock_not_steps():
    clock = FakeClock()
    schedule = SaveSchedule(EveryTime(5.0), monitor=None, mode="min", clock=clock)
    saved = saved_steps(schedule, clock, range(20), dt=2.5)
    assert [s for s, _ in saved] == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]


def test_improvement_always_saves_whatever_the_interval():
    clock = FakeClock()
    schedule = SaveSchedule(EverySteps(1000), monitor="loss", mode="min", clock=clock)
    losses = {1: 0.9, 2: 1.0, 3: 0.8, 4: float("nan"), 5: 0.8, 6: 0.5}
    metrics = {step: {"loss": v} for step, v in losses.items()}
    saved = saved_steps(schedule, clock, range(1, 7), metrics=metrics)
    assert saved == [(1, "improvement"), (3, "improvement"), (6, "improvement")]


def test_improvement_in_max_mode():
    schedule = SaveSchedule(EverySteps(1000), monitor="acc", mode="max", clock=FakeClock())
    assert schedule.decide(1, {"acc": 0.5}, None) is not None
    assert schedule.decide(2, {"acc": 0.4}, None) is None
    assert schedule.decide(3, {"acc": 0.6}, None) == {
        "policy": "improvement",
        "reason": "acc improved to 0.6 from 0.5",
    }


def test_preemption_always_saves():
    schedule = SaveSchedule(EverySteps(1000), monitor=None, mode="min", clock=FakeClock())
    assert schedule.decide(1, {}, "SIGTERM") == {
        "policy": "preemption",
        "reason": "SIGTERM received: save before exit",
    }


def test_auto_measures_step_time_and_costs_then_saves_at_the_interval():
    clock = FakeClock()
    # blocked 1 s, MTBF 50 s: Young/Daly sqrt(2 * 1 * 50) = 10 s; budget 1 / 0.5 = 2 s
    schedule = SaveSchedule(Auto(0.5, 50.0), monitor=None, mode="min", clock=clock)
    saved = saved_steps(schedule, clock, range(40))
    assert [s for s, _ in saved] == [0, 10, 20, 30]
    costs = schedule.costs()
    assert (costs.blocked_seconds, costs.write_seconds, costs.step_seconds) == (1.0, 2.0, 1.0)


# -- through the Checkpointer -------------------------------------------------------------------


def test_maybe_save_saves_when_due_and_records_why(tmp_path: Path, capsys):
    model = torch.nn.Linear(2, 1)
    with Checkpointer(tmp_path, monitor="loss", keep_last=10, every=3, capture_rng=False) as ckpt:
        results = [ckpt.maybe_save(step, {"model": model}, {"loss": 1.0}) for step in range(7)]
        assert [r.step for r in results if r is not None] == [0, 3, 6]
    manifests = {e.step: e.manifest for e in RunDirectory(LocalStorage(tmp_path)).committed()}
    assert manifests[0].extra["saved_by"]["policy"] == "improvement"
    assert manifests[3].extra["saved_by"] == {
        "policy": "every 3 steps",
        "reason": "every 3 steps: step 3 is a multiple of 3",
    }
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "saved by:  every 3 steps: every 3 steps: step 6 is a multiple of 3" in out
    assert "extra:" not in out


def test_save_records_no_policy_and_show_leaves_it_out(tmp_path: Path, capsys):
    with Checkpointer(tmp_path, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(0, {"x": torch.ones(1)})
    (entry,) = RunDirectory(LocalStorage(tmp_path)).committed()
    assert "saved_by" not in entry.manifest.extra
    assert main(["show", str(tmp_path)]) == 0
    assert "saved by" not in capsys.readouterr().out


def test_maybe_save_on_preemption(tmp_path: Path):
    with Checkpointer(tmp_path, every=1000, save_on_signal=signal.SIGUSR1) as ckpt:
        assert ckpt.maybe_save(1, {"x": torch.ones(1)}) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        info = ckpt.maybe_save(2, {"x": torch.ones(1)})
        assert info is not None and info.step == 2


def test_maybe_save_auto_saves_first(tmp_path: Path):
    with Checkpointer(tmp_path, every="auto", overhead=0.05, mtbf="1h") as ckpt:
        assert ckpt.maybe_save(0, {"x": torch.ones(1)}) is not None
        assert ckpt.maybe_save(1, {"x": torch.ones(1)}) is None


def test_maybe_save_without_every_is_refused(tmp_path: Path):
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(ValueError, match=r"maybe_save needs a save interval: .*every=100"),
    ):
        ckpt.maybe_save(0, {"x": torch.ones(1)})


def test_bad_every_is_refused_at_construction(tmp_path: Path):
    with pytest.raises(ValueError, match=r"every must be .*got 'often'"):
        Checkpointer(tmp_path, every="often")
    with pytest.raises(ValueError, match='apply to every="auto" only'):
        Checkpointer(tmp_path, overhead=0.02)
