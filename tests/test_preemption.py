"""save_on_signal: a signal becomes a save at the next safe point and a clean exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.preemption import SignalFlag

sys.path.insert(0, str(Path(__file__).parent))
from torchrun import rank_results, torchrun

TRAINER = textwrap.dedent(
    """
    import signal, sys, torch
    from haltpoint import Checkpointer

    model = torch.nn.Linear(4, 4)
    with Checkpointer(sys.argv[1], save_on_signal=[signal.SIGTERM, signal.SIGUSR1]) as ckpt:
        step = 0
        print("ready", flush=True)
        while True:
            with torch.no_grad():
                model.weight.add_(1.0)
            if ckpt.preempted:
                ckpt.save(step, {"model": model, "step": step})
                print(f"saved {step} after {ckpt.preempted}", flush=True)
                break
            step += 1
    sys.exit(0)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_becomes_a_save_and_a_clean_exit(tmp_path: Path, sig: signal.Signals) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    os.kill(child.pid, sig)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    step = int(out.split()[1])
    assert out.strip() == f"saved {step} after {sig.name}"
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        model = torch.nn.Linear(4, 4)
        state = {"model": model, "step": -1}
        assert ckpt.restore(state).step == step
    assert state["step"] == step


def test_the_handler_only_records_the_signal(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, save_on_signal=signal.SIGUSR1) as ckpt:
        assert ckpt.preempted is None
        before = sorted(os.listdir(tmp_path))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ckpt.preempted == "SIGUSR1"
        assert sorted(os.listdir(tmp_path)) == before  # no I/O in the handler
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # put back on close


def test_a_second_signal_falls_through_to_the_previous_handler() -> None:
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        flag = SignalFlag([signal.SIGUSR2])
        os.kill(os.getpid(), signal.SIGUSR2)
        assert flag.received == "SIGUSR2" and seen == []
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]
        flag.uninstall()
    finally:
        signal.signal(signal.SIGUSR2, previous)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("SIGTERM", "save_on_signal must be a signal or a list of signals"),
        ([999], "save_on_signal must be a signal or a list of signals"),
        ([], "save_on_signal must name at least one signal"),
    ],
)
def test_save_on_signal_errors(tmp_path: Path, value, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        Checkpointer(tmp_path, save_on_signal=value)


def test_save_on_signal_needs_a_writer_and_the_main_thread(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not combine it with read_only"):
        Checkpointer(tmp_path, read_only=True, save_on_signal=signal.SIGTERM)
    errors = []

    def in_thread() -> None:
        try:
            SignalFlag([signal.SIGTERM])
        except ValueError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert errors and "main thread" in errors[0]


@pytest.mark.parametrize("uncatchable", [signal.SIGKILL, signal.SIGSTOP])
def test_an_uncatchable_signal_is_refused_and_no_handler_is_left_behind(
    tmp_path: Path, uncatchable: signal.Signals
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ValueError, match=f"save_on_signal names {uncatchable.name}, which cannot"):
        Checkpointer(tmp_path, save_on_signal=[signal.SIGTERM, uncatchable])
    assert signal.getsignal(signal.SIGTERM) is before  # SIGTERM still ends the process


_GUIDE = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text()
(_PREEMPTED_LOOP,) = [
    block.split("```")[0]
    for block in _GUIDE.split("```python\n")[1:]
    if "save_on_signal=[signal.SIGTERM" in block.split("```")[0]
]


def _guide_loop(directory: Path, signal_at: int | None = None) -> tuple[list[int], list[Any]]:
    """docs/guide.md's preemption loop, as one job runs it: a new model, optimizer and data,
    and SIGTERM to itself once `signal_at + 1` steps are trained; the steps it trained (counted
    from 0 in this job) and the weights it ends with."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    trained: list[int] = []

    def train_step(batch: Any) -> None:
        inputs, targets = batch
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        trained.append(len(trained))
        if signal_at is not None and len(trained) == signal_at + 1:
            os.kill(os.getpid(), signal.SIGTERM)

    namespace: dict[str, Any] = {
        "torch": torch,
        "Checkpointer": Checkpointer,
        "dataset": torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)),
        "max_epochs": 3,
        "state": {"model": model, "optimizer": optimizer},
        "train_step": train_step,
    }
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        exec(compile(_PREEMPTED_LOOP, "docs/guide.md (preemption)", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return trained, [p.detach().clone() for p in model.parameters()]


def _run_files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".haltpoint.lock"
    }


def test_the_guide_s_preemption_loop_resumes_where_it_stopped_and_a_rerun_trains_nothing(
    tmp_path: Path,
) -> None:
    """The guide's loop began `for batch in loader` afresh after the restore and saved only on
    the signal: resumed after a preemption it trained the pass from its first batch again, in
    a new order (a 3-epoch run preempted after 5 of its 9 steps trained 9 more, to step 13,
    and ended with other weights), and a rerun of a job that had finished trained it all
    again. Now the resumed job trains the 4 steps left and ends with the weights of a run
    never stopped; run again, twice, it trains and writes nothing."""
    (tmp_path / "straight").mkdir()
    (tmp_path / "preempted").mkdir()
    trained, weights = _guide_loop(tmp_path / "straight")
    assert len(trained) == 9  # 40 examples in batches of 16: 3 batches, 3 epochs

    trained, _ = _guide_loop(tmp_path / "preempted", signal_at=4)
    assert len(trained) == 5
    trained, resumed = _guide_loop(tmp_path / "preempted")
    assert len(trained) == 4
    for got, want in zip(resumed, weights, strict=True):
        assert torch.equal(got, want)

    files = _run_files(tmp_path / "preempted" / "runs/exp1")
    for _ in range(2):
        trained, again = _guide_loop(tmp_path / "preempted")
        assert trained == []
        assert _run_files(tmp_path / "preempted" / "runs/exp1") == files
        for got, want in zip(again, weights, strict=True):
            assert torch.equal(got, want)


_WORKER = Path(__file__).parent / "workers" / "preempt_worker.py"


def _guide_on_two_ranks(
    root: Path, out: Path, signal_at: int = -1, signal_rank: int = 1
) -> list[dict[str, Any]]:
    """docs/guide.md's preemption loop on 2 gloo ranks of a DDP job (process-group timeout
    20 s: a rank left in a collective fails the launch fast); `signal_rank` alone sends itself
    SIGTERM once it has trained `signal_at + 1` steps."""
    out.mkdir(exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    torchrun(
        _WORKER, "--root", str(root), "--out", str(out), "--signal-at", str(signal_at),
        "--signal-rank", str(signal_rank), timeout=90,
    )  # fmt: skip
    return rank_results(out)


@pytest.mark.slow
@pytest.mark.parametrize("signalled", [1, 0])
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_a_rerun_resumes(
    tmp_path: Path, signalled: int
) -> None:
    """`ckpt.preempted` was each rank's own flag, and only rank 0 installed the handler: a
    SIGTERM to rank 1 alone (SLURM signals the batch step, a node's agent its local ranks,
    `kill` one PID) killed it, and rank 0 failed in DDP's all-reduce with nothing saved; one
    to rank 0 alone made it save (a collective) while rank 1 trained on into that all-reduce.
    Now every rank catches the signal and the ranks agree at the call: both save the same
    step once and leave the loop, and the rerun resumes there and ends with the weights of a
    run never stopped."""
    (tmp_path / "straight").mkdir()
    (tmp_path / "ranks").mkdir()
    _, weights = _guide_loop(tmp_path / "straight")  # one process, never stopped

    r0, r1 = _guide_on_two_ranks(tmp_path / "ranks", tmp_path / "out", 4, signalled)
    for r in (r0, r1):
        assert r["error"] is None, r["error"]
        assert r["preempted"] == "SIGTERM"  # also on the rank that got no signal
        assert r["trained"] == [0, 1, 2, 3, 4] and r["step"] == 4
    history = (tmp_path / "ranks" / "runs/exp1" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in history] == [4]  # saved once

    r0, r1 = _guide_on_two_ranks(tmp_path / "ranks", tmp_path / "out")
    for r in (r0, r1):
        assert r["error"] is None, r["error"]
        assert r["preempted"] is None and r["trained"] == [0, 1, 2, 3] and r["step"] == 9
        assert r["weights"] == [w.flatten().tolist() for w in weights]
