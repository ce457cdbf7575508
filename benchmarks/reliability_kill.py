"""Reliability campaign `kill`.

A child process trains a small model and saves every step (async saves, keep_last=2), and is
SIGKILLed at a random moment; then it is started again and resumes. After every kill the run
must open, `restore` must give the newest committed checkpoint with exactly that step's weights,
and every step the child reported committed (after `wait()`) must still be there unless
retention removed it. At the end the run is finished and its final weights must equal those of a
run that was never killed, bit for bit.

    python benchmarks/reliability.py kill --trials 200
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from haltpoint import Checkpointer
from reliability_common import Report

TRAINER = textwrap.dedent(
    """
    import sys, torch
    from haltpoint import Checkpointer

    run_dir, total, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 256), torch.nn.Dropout(0.2), torch.nn.Linear(256, 8)]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": optimizer, "step": -1}
    with Checkpointer(run_dir, keep_last=2) as ckpt:
        info = ckpt.restore(state)
        for step in range(info.step + 1 if info else 0, total):
            loss = model(torch.randn(32, 64)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state["step"] = step
            ckpt.save(step, state)
            ckpt.wait()
            print(step, flush=True)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out)
    """
)


@dataclass
class KillReport(Report):
    kills: int = 0
    restores_checked: int = 0
    committed_lost: list[int] = field(default_factory=list)
    wrong_restores: list[str] = field(default_factory=list)
    final_equal: bool = False

    @property
    def ok(self) -> bool:
        return not self.committed_lost and not self.wrong_restores and self.final_equal

    def summary(self) -> str:
        return (
            f"kill -9: {self.kills} kills, {self.restores_checked} restores checked, "
            f"committed steps lost: {len(self.committed_lost)}, wrong restores: "
            f"{len(self.wrong_restores)}, resumed run bitwise equal to an unkilled one: "
            f"{self.final_equal}"
        )


def _train(run: Path, total: int, out: Path, kill_after: float | None) -> list[int]:
    child = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(run), str(total), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    if kill_after is None:
        output, _ = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the trainer failed with status {child.returncode}")
        return [int(line) for line in output.split()]
    first = child.stdout.readline()  # saving has started
    time.sleep(kill_after)
    os.kill(child.pid, signal.SIGKILL)
    output, _ = child.communicate()
    return [int(line) for line in (first + output).split()]


def _check_run(run: Path, known: int, report: KillReport) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stale lock of the killed child is taken over
        with Checkpointer(run, keep_last=2) as ckpt:
            steps = [info.step for info in ckpt.list()]
            if known >= 0 and known not in steps:
                report.committed_lost.append(known)
            model = torch.nn.Sequential(
                torch.nn.Linear(64, 256), torch.nn.Dropout(0.2), torch.nn.Linear(256, 8)
            )
            state = {"model": model, "step": -2}
            info = ckpt.restore(
                state,
                strict=False,
            )
    report.restores_checked += 1
    if steps and (info is None or info.step != max(steps) or state["step"] != info.step):
        report.wrong_restores.append(f"restored {info and info.step}, newest {max(steps)}")


def kill_trials(trials: int, *, total: int = 10_000, seed: int = 0, workdir: Path) -> KillReport:
    """Kill a training child `trials` times, check after each kill, then finish and compare."""
    rng = random.Random(seed)
    report = KillReport()
    run, reference = workdir / "killed", workdir / "reference"
    steps_per_trial = 0
    known = -1
    for _ in range(trials):
        reported = _train(run, total, workdir / "unused.pt", kill_after=rng.uniform(0.0, 0.25))
        report.kills += 1
        if reported:
            known = max(known, *reported)
            steps_per_trial = max(steps_per_trial, len(reported))
        _check_run(run, known, report)
    total_steps = known + 5  # finish a little past the last step the kills reached
    _train(run, total_steps, workdir / "killed.pt", kill_after=None)
    _train(reference, total_steps, workdir / "reference.pt", kill_after=None)
    killed = torch.load(workdir / "killed.pt", weights_only=True)
    straight = torch.load(workdir / "reference.pt", weights_only=True)
    report.final_equal = all(torch.equal(killed[k], straight[k]) for k in straight)
    return report
