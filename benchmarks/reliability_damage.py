"""Reliability campaign `damage`.

A run of a few checkpoints is damaged at random (bits flipped or a file truncated, in a manifest
or a tensor file); then `haltpoint verify` must report the damage, and `restore` must return
exactly the data of the checkpoint it reports, or raise a `CheckpointError`. It must never
return wrong data.

    python benchmarks/reliability.py damage --trials 5000
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from haltpoint import (
    Checkpointer,
    CheckpointError,
)
from haltpoint.cli.verify import verify_run
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage
from reliability_common import Report, damage_file, fresh_copy


@dataclass
class DamageReport(Report):
    trials: int = 0
    verify_missed: list[str] = field(default_factory=list)
    restore_refused: int = 0
    fell_back: int = 0
    restored_newest: int = 0
    wrong_data: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.verify_missed and not self.wrong_data

    def summary(self) -> str:
        return (
            f"damage: {self.trials} trials; missed by verify: {len(self.verify_missed)}; "
            f"restore gave the newest checkpoint {self.restored_newest} times, fell back to "
            f"an older intact one {self.fell_back} times, refused {self.restore_refused} "
            f"times; wrong data returned: {len(self.wrong_data)}"
        )


def _make_run(run: Path, steps: int, size: int) -> None:
    with Checkpointer(run, keep_last=steps, capture_rng=False, async_save=False) as ckpt:
        for step in range(steps):
            ckpt.save(step, {"w": torch.full((size,), float(step)), "step": step})


def damage_trials(trials: int, *, seed: int = 0, workdir: Path) -> DamageReport:
    """Damage a pristine run `trials` times; `restore` must be right or raise."""
    rng = random.Random(seed)
    pristine, run = workdir / "pristine", workdir / "damaged"
    _make_run(pristine, steps=3, size=1024)
    report = DamageReport()
    for _ in range(trials):
        fresh_copy(pristine, run)
        files = sorted(p for p in run.glob("step-*/*") if p.is_file())
        what = damage_file(rng.choice(files), rng)
        report.trials += 1
        checks = verify_run(RunDirectory(LocalStorage(run)))
        if all(check.status == "intact" for check in checks):
            report.verify_missed.append(what)
        state = {"w": torch.zeros(1024), "step": -1}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damage is reported by warnings; counted below
            try:
                info = Checkpointer(run, read_only=True, capture_rng=False).restore(state)
            except CheckpointError:
                report.restore_refused += 1
                continue
        if info is None:
            report.restore_refused += 1
            continue
        expected = torch.full((1024,), float(info.step))
        if state["step"] != info.step or not torch.equal(state["w"], expected):
            report.wrong_data.append(what)
        elif info.step == 2:
            report.restored_newest += 1
        else:
            report.fell_back += 1
    return report
