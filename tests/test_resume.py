"""Resuming in a fresh interpreter is bitwise equal to never stopping; kills lose nothing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from haltpoint import Checkpointer

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


def readme_loop(run: Path, losses: list[float]) -> tuple[list[int], str | None, torch.nn.Module]:
    """The README's loop, as written there: the epochs it trained, what it printed, the model."""
    from haltpoint import EarlyStopping

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stopper = EarlyStopping("val_loss", mode="min", patience=2)
    ckpt = Checkpointer(run, monitor="val_loss", mode="min", keep_best=3, keep_last=2)
    state = {"model": model, "optimizer": optimizer, "stopper": stopper}
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
