"""Resuming in a fresh interpreter is bitwise equal to never stopping; kills lose nothing."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from haltpoint import (
    Checkpointer,
    ConsecutiveIncreases,
    Divergence,
    EarlyStopping,
    GeneralizationLoss,
    ProgressQuotient,
    RelativeDelta,
    Target,
    TimeBudget,
)

WORKERS = Path(__file__).parent / "workers"


def run_worker(*args: str) -> None:
    subprocess.run([sys.executable, str(WORKERS / "resume_worker.py"), *args], check=True)


def load(out: Path) -> tuple[dict, dict]:
    tensors = safetensors.torch.load_file(str(out) + ".safetensors")
    return tensors, json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.slow
def test_resume_in_a_fresh_interpreter_is_bitwise_equal(tmp_path: Path) -> None:
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    run_worker("--run-dir", str(tmp_path / "a"), "--stop-after", "6", "--out", str(straight))
    run_worker("--run-dir", str(tmp_path / "b"), "--stop-after", "3", "--out", str(first))
    run_worker("--run-dir", str(tmp_path / "b"), "--stop-after", "6", "--out", str(resumed))

    expected_tensors, expected_values = load(straight)
    got_tensors, got_values = load(resumed)
    assert sorted(got_tensors) == sorted(expected_tensors)
    for key, tensor in expected_tensors.items():
        assert torch.equal(got_tensors[key], tensor), key
    assert got_values == expected_values
    halfway, _ = load(first)
    assert not torch.equal(halfway["model.0.weight"], expected_tensors["model.0.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_sigkill_mid_save_loses_nothing_committed(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    run = tmp_path / "run"
    size = 1 << 18
    known_committed = -1
    for _ in range(2):
        child = subprocess.Popen(
            [sys.executable, str(WORKERS / "kill_worker.py"), str(run), str(size)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        first = child.stdout.readline()  # the child has started saving
        assert first.strip().isdigit()
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        out, _ = child.communicate()
        lines = [first, *out.splitlines()]
        known_committed = max(known_committed, max(int(s) for s in lines if s.strip()))

        with (
            pytest.warns(UserWarning, match="taking over the writer lock"),
            Checkpointer(run, keep_last=2) as ckpt,
        ):
            steps = [i.step for i in ckpt.list()]
            assert known_committed in steps
            state = {"w": torch.zeros(size), "step": -1}
            info = ckpt.restore(state)
            assert info is not None and info.step == max(steps)
            assert state["step"] == info.step
            assert torch.equal(state["w"], torch.full((size,), float(info.step)))


def test_the_take_over_warning_of_a_killed_writers_lock_points_at_the_users_line(
    tmp_path: Path,
) -> None:
    # it pointed at haltpoint/checkpointer.py ("self._lock.acquire()"), a line of no use to
    # the person whose job was killed; like every other warning, it names their own line
    run = tmp_path / "run"
    src = str(Path(__file__).resolve().parent.parent / "src")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from haltpoint import Checkpointer; Checkpointer(sys.argv[1]); "
            "print('open', flush=True); time.sleep(60)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert holder.stdout is not None and holder.stdout.readline() == "open\n"
    holder.kill()
    holder.wait(timeout=10)
    with pytest.warns(UserWarning, match="taking over the writer lock") as caught:
        Checkpointer(run).close()
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name]


def _loop_objects(run: Path) -> tuple[torch.nn.Module, Any, Any, Checkpointer, dict[str, Any]]:
    """The objects the README's and DESIGN.md's loops build: model, optimizer, stopper,
    checkpointer and the state that holds them."""
    from haltpoint import EarlyStopping

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stopper = EarlyStopping("val_loss", mode="min", patience=2)
    ckpt = Checkpointer(run, monitor="val_loss", mode="min", keep_best=3, keep_last=2)
    state = {"model": model, "optimizer": optimizer, "stopper": stopper}
    return model, optimizer, stopper, ckpt, state


def readme_loop(run: Path, losses: list[float]) -> tuple[list[int], str | None, torch.nn.Module]:
    """The README's loop, as written there: the epochs it trained, what it printed, the model."""
    model, optimizer, stopper, ckpt, state = _loop_objects(run)
    trained, printed = [], None
    info = ckpt.restore(state)
    for epoch in range(info.step + 1 if info else 0, len(losses)):
        if stopper.stopped:
            break
        trained.append(epoch)
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        metrics = {"val_loss": losses[epoch]}
        stopper.step(metrics)
        ckpt.save(epoch, state, metrics)
    if stopper.stopped:
        printed = stopper.reason
    ckpt.restore({"model": model}, "best")
    ckpt.close()
    return trained, printed, model


def test_a_rerun_of_the_readme_loop_on_a_stopped_run_trains_nothing(tmp_path: Path) -> None:
    losses = [1.0, 0.5, 0.7, 0.8, 0.9, 0.2, 0.1]
    trained, reason, model = readme_loop(tmp_path, losses)
    assert trained == [0, 1, 2, 3] and reason is not None
    steps = [info.step for info in Checkpointer(tmp_path, read_only=True).list()]
    for _ in range(2):  # a scheduler reruns the finished job, twice
        again, reason_again, rerun_model = readme_loop(tmp_path, losses)
        assert again == [] and reason_again == reason
        assert [info.step for info in Checkpointer(tmp_path, read_only=True).list()] == steps
        assert torch.equal(rerun_model.weight, model.weight)  # the best, epoch 1's, weights


def design_loop(run: Path, losses: list[float]) -> tuple[list[int], list[str], torch.nn.Module]:
    """DESIGN.md's loop, as written there: it trains and saves before it asks the stopper.
    The epochs it trained, what it printed, the model after `restore(state, "best")`."""
    model, optimizer, stopper, ckpt, state = _loop_objects(run)
    trained, printed = [], []
    info = ckpt.restore(state)
    for epoch in range(info.step + 1 if info else 0, len(losses)):
        trained.append(epoch)
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        metrics = {"val_loss": losses[epoch]}
        decision = stopper.step(metrics)
        ckpt.save(epoch, state, metrics)
        if decision:
            printed.append(decision.reason)
            break
    ckpt.restore(state, "best")
    ckpt.close()
    return trained, printed, model


def test_a_rerun_of_the_design_loop_on_a_stopped_run_saves_nothing_and_says_so(
    tmp_path: Path,
) -> None:
    """The loop trains one epoch before the restored stopper says stop again; that epoch's
    save wrote a checkpoint past the stop (and its retention evicted one) on every rerun."""
    losses = [1.0, 0.5, 0.7, 0.8, 0.9, 0.2, 0.1]
    trained, printed, model = design_loop(tmp_path, losses)
    assert trained == [0, 1, 2, 3] and len(printed) == 1
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "lock"}
    for _ in range(2):  # a scheduler reruns the finished job, twice
        with pytest.warns(
            UserWarning,
            match=r"step 4 not saved: the run restored from step 3 "
            r"had already stopped \(val_loss did not improve",
        ) as caught:
            again, printed_again, rerun_model = design_loop(tmp_path, losses)
        assert [Path(w.filename).name for w in caught] == [Path(__file__).name]
        assert again == [4] and printed_again == printed
        now = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "lock"}
        assert now == files
        assert torch.equal(rerun_model.weight, model.weight)  # the best, epoch 1's, weights


@pytest.mark.parametrize("forget", ["clear_stop", "reset"])
def test_a_stopper_that_forgets_the_stop_after_the_restore_saves_again(
    tmp_path: Path, forget: str
) -> None:
    from haltpoint import EarlyStopping

    design_loop(tmp_path, [1.0, 0.5, 0.7, 0.8])
    stopper = EarlyStopping("val_loss", patience=2)
    with Checkpointer(tmp_path, monitor="val_loss") as ckpt:
        state = {"model": torch.nn.Linear(3, 1), "stopper": stopper}
        info = ckpt.restore(state, strict=False)
        assert info is not None and stopper.stopped
        getattr(stopper, forget)()
        stopper.step({"val_loss": 0.4})
        assert ckpt.save(info.step + 1, state, {"val_loss": 0.4}).step == info.step + 1


def test_a_stopped_run_resumed_with_more_patience_trains_on_after_clear_stop(
    tmp_path: Path,
) -> None:
    """The way on past a stop with a new configuration: the best and the wait stay, so the
    larger patience counts from where the run stood (reset() would forget the best)."""
    from haltpoint import EarlyStopping

    losses = [1.0, 0.5, 0.7, 0.8, 0.9, 0.4, 0.45, 0.5, 0.6]
    design_loop(tmp_path, losses)  # patience 2: stops at epoch 3, best 0.5 at epoch 1
    stopper = EarlyStopping("val_loss", mode="min", patience=4)
    with Checkpointer(tmp_path, monitor="val_loss", mode="min", keep_best=3) as ckpt:
        state = {"model": torch.nn.Linear(3, 1), "stopper": stopper}
        info = ckpt.restore(state, strict=False)
        assert info is not None and info.step == 3 and stopper.stopped
        stopper.clear_stop()
        assert (stopper.best, stopper.best_step, stopper.wait) == (0.5, 1, 2)
        stops = []
        for epoch in range(info.step + 1, len(losses)):
            stops.append(bool(stopper.step({"val_loss": losses[epoch]})))
            ckpt.save(epoch, state, {"val_loss": losses[epoch]})
        # 0.9 (wait 3), 0.4 best, then 0.45, 0.5, 0.6: wait 3 < 4, no stop
        assert stops == [False] * 5 and stopper.best == 0.4
        assert [i.step for i in ckpt.list()][-1] == len(losses) - 1


def test_a_run_trained_on_past_clear_stop_saves_its_new_stop_and_a_rerun_trains_nothing(
    tmp_path: Path,
) -> None:
    """The save of the evaluation that stopped the run again (after clear_stop and a larger
    patience) was refused as 'past the stop' of the restored run: the run's last checkpoint
    then held a stopper that had not stopped, and every rerun trained that epoch again."""
    from haltpoint import EarlyStopping

    losses = [1.0, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0, 1.1]
    design_loop(tmp_path, losses)  # patience 2: stops at epoch 3, best 0.5 at epoch 1

    def resumed(clear: bool) -> tuple[list[int], int | None]:
        stopper = EarlyStopping("val_loss", mode="min", patience=4)
        with Checkpointer(tmp_path, monitor="val_loss", mode="min", keep_best=3) as ckpt:
            state = {"model": torch.nn.Linear(3, 1), "stopper": stopper}
            info = ckpt.restore(state, strict=False)
            assert info is not None
            if clear:
                stopper.clear_stop()
            trained = []
            for epoch in range(info.step + 1, len(losses)):
                if stopper.stopped:
                    break
                trained.append(epoch)
                stopper.step({"val_loss": losses[epoch]})
                ckpt.save(epoch, state, {"val_loss": losses[epoch]})
            return trained, ckpt.list()[-1].step

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "step 5 not saved" warning
        assert resumed(clear=True) == ([4, 5], 5)  # wait 3, then 4 >= 4: stops at 5, saved
        assert resumed(clear=False) == ([], 5)  # the rerun: stopped at 5, nothing to train


# -- a stopper resumed at every evaluation decides as one that never stopped ---------------


def _case(seed: int) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    """A run and a stopper configuration drawn from `seed`: a loss that falls, then rises or
    wanders, on a grid of eighths (ties at min_delta happen), now and then NaN or inf, with a
    training loss that levels off (so ProgressQuotient can stop); and any mix of the settings
    and rules."""
    rng = random.Random(seed)
    mode = rng.choice(["min", "max"])
    rise, noise, length = rng.uniform(-1, 2), rng.choice([0.0, 0.1, 0.4]), rng.randint(1, 40)
    values = []
    for i in range(length):
        level = 1.0 + 2.0 * 0.8**i + rise * i / 20 + rng.gauss(0, noise)
        value = round(max(level, 0.125) * 8) / 8
        value = value if mode == "min" else 5.0 - value
        if rng.random() < 0.03:
            value = rng.choice([math.nan, math.inf, -math.inf])
        values.append((value, 1.0 + 0.5 * 0.5**i + rng.choice([0.0, 0.0, 0.001])))
    config = {
        "mode": mode,
        "patience": rng.choice([None, None, 0, 1, 3]),
        "horizon": rng.choice([None, length, 2 * length]),
        "min_delta": rng.choice([0.0, 0.125, RelativeDelta(0.05)]),
        "warmup": rng.choice([0, 0, 2, 5]),
        "baseline": rng.choice([None, None, 1.5, 3.5]),
        "check_finite": rng.random() < 0.8,
        "rules": rng.sample(range(7), rng.randint(0, 3)),
    }
    return values, config


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _stopper(config: dict[str, Any], clock: _Clock) -> EarlyStopping:
    maker = {
        0: lambda: TimeBudget(12.0, clock=clock),
        1: lambda: ConsecutiveIncreases(2, strip=2),
        2: lambda: ProgressQuotient(0.5, strip=2),  # "min" only, as GL
        3: lambda: GeneralizationLoss(20.0),
        4: lambda: Target(1.0 if config["mode"] == "min" else 4.0),
        5: lambda: Divergence(3.5 if config["mode"] == "min" else 1.5),
        6: lambda: TimeBudget(1e9, clock=clock),
    }
    rules = [maker[k]() for k in config["rules"] if config["mode"] == "min" or k not in (2, 3)]
    kwargs = {k: v for k, v in config.items() if k != "rules"}
    if kwargs["patience"] is not None:
        kwargs["horizon"] = None  # the horizon is for the default rule only
    return EarlyStopping("val_loss", rules=rules, **kwargs)


def _run(values: list[tuple[float, float]], config: dict[str, Any], hop: Any = None) -> list[str]:
    """Every decision of one stopper (`hop` None), or with the stopper handed on by `hop` to
    a fresh one, created at the time of the save, after each evaluation (`hop(stopper,
    successor, i)`)."""
    clock = _Clock()
    stopper = _stopper(config, clock)
    decisions = []
    for i, (value, train) in enumerate(values):
        clock.now = 1.5 * i
        decision = stopper.step({"val_loss": value, "train_loss": train})
        decisions.append(json.dumps(decision.to_dict()))
        if hop is not None:
            successor = _stopper(config, clock)
            hop(stopper, successor, i)
            stopper = successor
    return decisions


@pytest.mark.parametrize("seed", range(400))
def test_a_stopper_resumed_through_json_at_every_evaluation_decides_as_one_run(seed: int) -> None:
    """The default rule (with and without horizon), patience, warmup, baseline, relative
    deltas and every rule: state saved after each evaluation, round-tripped through JSON
    (inf and nan allowed, as the checkpoint's codec keeps them), loaded into a fresh stopper."""
    values, config = _case(seed)
    straight = _run(values, config)

    def through_json(stopper: EarlyStopping, successor: EarlyStopping, _: int) -> None:
        state = json.loads(json.dumps(stopper.state_dict(), allow_nan=True))
        successor.load_state_dict(state)
        assert json.dumps(successor.state_dict()) == json.dumps(state)

    assert _run(values, config, through_json) == straight


@pytest.mark.parametrize("seed", range(0, 400, 20))
def test_a_stopper_resumed_through_a_checkpointer_at_every_evaluation_decides_as_one_run(
    tmp_path: Path, seed: int
) -> None:
    """As above, through a real save and restore of the checkpoint (a new Checkpointer each
    time, as a rerun of the job opens one)."""
    values, config = _case(seed)
    directory = tmp_path
    straight = _run(values, config)

    def through_a_checkpoint(stopper: EarlyStopping, successor: EarlyStopping, i: int) -> None:
        with Checkpointer(directory, keep_last=1, async_save=False, capture_rng=False) as ckpt:
            ckpt.save(i, {"stopper": stopper})
        with Checkpointer(directory, keep_last=1, capture_rng=False) as ckpt:
            info = ckpt.restore({"stopper": successor})
        assert info is not None and info.step == i

    assert _run(values, config, through_a_checkpoint) == straight
