"""Reliability campaign `links`.

A symbolic link to a manifest, a tensor file or a checkpoint folder of the run is planted,
before the writer opens or while it is open, at the name of a file the writer then writes (the
lock, the history, the next checkpoint's folder, manifest or tensor file, a pin marker); the
writer opens, saves and pins. Every write through the link must be refused (or go around it), no
file of the run may change, and every checkpoint must still verify intact.

    python benchmarks/reliability.py links --trials 500
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from haltpoint import (
    Checkpointer,
    CheckpointError,
    LinkedFileError,
)
from haltpoint.cli.verify import verify_run
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage
from reliability_common import Report, fresh_copy, frozen_state


@dataclass
class LinkReport(Report):
    trials: int = 0
    refused: int = 0
    refused_other: int = 0
    went_around: int = 0
    changed: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.changed and not self.damaged

    def summary(self) -> str:
        return (
            f"links: {self.trials} trials; refused with LinkedFileError {self.refused}, "
            f"with another CheckpointError {self.refused_other}, went around the link "
            f"{self.went_around}; files changed through a link: {len(self.changed)}; "
            f"checkpoints damaged: {len(self.damaged)}"
        )


_LINK_NAMES = (
    ".haltpoint.lock",
    "history.jsonl",
    "step-000000003",
    "step-000000003/manifest.json",
    "step-000000003/tensors.safetensors",
    "step-000000001/pinned",
)


def _writer_session(run: Path, plant: Callable[[], None], before_open: bool, sync: bool) -> None:
    if before_open:
        plant()
    with Checkpointer(run, keep_last=10, capture_rng=False, async_save=not sync) as ckpt:
        if not before_open:
            plant()
        ckpt.save(3, frozen_state(3))
        ckpt.wait()
        ckpt.pin(1)


def link_trials(trials: int, *, seed: int = 0, workdir: Path) -> LinkReport:
    """Plant links where the writer writes; nothing may be written through them."""
    rng = random.Random(seed)
    pristine, run = workdir / "links-pristine", workdir / "links"
    with Checkpointer(pristine, keep_last=10, capture_rng=False, async_save=False) as ckpt:
        for step in range(3):
            ckpt.save(step, frozen_state(step))
    report = LinkReport()
    for _ in range(trials):
        fresh_copy(pristine, run)
        name = rng.choice(_LINK_NAMES)
        step = rng.randrange(3)
        if name == "step-000000003":
            target = f"step-{step:09d}"
        else:
            target = f"step-{step:09d}/" + rng.choice(["manifest.json", "tensors.safetensors"])
        before_open, sync = rng.random() < 0.5, rng.random() < 0.5
        what = f"{name} -> {target}, planted {'before' if before_open else 'after'} opening"
        files = sorted(run.glob("step-*/*"))
        snapshot = {p: p.read_bytes() for p in files}

        def plant(name: str = name, target: str = target) -> None:
            link = run / name
            link.parent.mkdir(exist_ok=True)
            if link.exists() and not link.is_dir():
                link.unlink()
            os.symlink(run / target, link)

        report.trials += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # planted links are reported by warnings too
            try:
                _writer_session(run, plant, before_open, sync)
                report.went_around += 1
            except LinkedFileError:
                report.refused += 1
            except CheckpointError:
                report.refused_other += 1
        report.changed += [
            f"{what}: {p.name} changed" for p, b in snapshot.items() if p.read_bytes() != b
        ]
        checks = verify_run(RunDirectory(LocalStorage(run)))
        report.damaged += [
            f"{what}: step {c.step} {c.status}"
            for c in checks
            if c.step < 3 and c.status != "intact"
        ]
    return report
