"""Reliability campaign `rot`.

Bits of a deduplicated tensor file (a frozen backbone) are flipped, or the file is truncated,
between two writer sessions; the second session saves four more checkpoints. Every one of them
must restore exactly (none may reference the rotten bytes), the writer must warn once, and the
damaged file must keep its bytes (older checkpoints reference it).

    python benchmarks/reliability.py rot --trials 300
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
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage
from reliability_common import Report, fresh_copy, frozen_state


@dataclass
class RotReport(Report):
    trials: int = 0
    warned_once: int = 0
    referenced_rot: list[str] = field(default_factory=list)
    evidence_changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.referenced_rot and not self.evidence_changed

    def summary(self) -> str:
        return (
            f"rot: {self.trials} trials, {4 * self.trials} later saves; restores that met the "
            f"rotten bytes: {len(self.referenced_rot)}; warned exactly once: "
            f"{self.warned_once}; damaged files changed: {len(self.evidence_changed)}"
        )


def rot_trials(trials: int, *, seed: int = 0, workdir: Path) -> RotReport:
    """Rot a deduplicated file between two sessions; later saves must never reference it."""
    rng = random.Random(seed)
    pristine, run = workdir / "rot-pristine", workdir / "rot"
    options: dict[str, object] = {"keep_last": 10, "capture_rng": False}
    with Checkpointer(pristine, async_save=False, **options) as ckpt:  # type: ignore[arg-type]
        for step in range(3):
            ckpt.save(step, frozen_state(step))
    report = RotReport()
    for _ in range(trials):
        fresh_copy(pristine, run)
        record = RunDirectory(LocalStorage(run)).read_manifest("step-000000002").tensors
        key = rng.choice(["a", "b"])
        path = run / record[key].file
        data = bytearray(path.read_bytes())
        if rng.random() < 0.25:
            cut = rng.randrange(record[key].offset, record[key].offset + record[key].nbytes)
            what = f"truncated {record[key].file} to {cut} bytes (in {key!r})"
            data = data[:cut]
        else:
            flips = rng.randint(1, 4)
            for _ in range(flips):
                index = rng.randrange(record[key].offset, record[key].offset + record[key].nbytes)
                data[index] ^= 1 << rng.randrange(8)
            what = f"flipped {flips} bits of {key!r} in {record[key].file}"
        path.write_bytes(bytes(data))
        report.trials += 1
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            async_save = rng.random() < 0.5
            with Checkpointer(run, async_save=async_save, **options) as ckpt:  # type: ignore[arg-type]
                for step in range(3, 7):
                    ckpt.save(step, frozen_state(step))
        report.warned_once += sum("do not match" in str(w.message) for w in seen) == 1
        for step in range(3, 7):
            state = {
                k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else -1
                for k, v in frozen_state(step).items()
            }
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    Checkpointer(run, read_only=True, capture_rng=False).restore(state, step)
            except CheckpointError as exc:
                report.referenced_rot.append(f"{what}: step {step}: {exc}")
                continue
            expected = frozen_state(step)
            if any(not torch.equal(state[k], expected[k]) for k in ("a", "b", "head")):
                report.referenced_rot.append(f"{what}: step {step} restored wrong data")
        if path.read_bytes() != bytes(data):
            report.evidence_changed.append(what)
    return report
