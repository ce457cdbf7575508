"""Reliability campaign `quarantine`.

The README loop's run (steps 10, 14, 15; keep_last=2, keep_best=2) gets one file of one
checkpoint damaged (its manifest or its tensor file); then a writer resumes it: `restore` must
give the newest intact checkpoint, exactly; every save up to step 17 must work (a damaged step
is saved again); no checkpoint the rules keep among the intact ones may be lost, no byte of the
damaged one deleted or changed, and neither `restore("best")`, `restore("latest")` nor
`haltpoint gc --keep-last 1` may pick or keep a damaged one over an intact one.

    python benchmarks/reliability.py quarantine --trials 1000
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from haltpoint import (
    Checkpointer,
    CheckpointError,
)
from haltpoint.policies.retention import build_rules, retained_steps
from haltpoint.reader import RunReader
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage
from reliability_common import TENSORS, Report, damage_file, fresh_copy, quiet_cli


@dataclass
class QuarantineReport(Report):
    trials: int = 0
    damaged: int = 0  # trials whose damage made a checkpoint unusable (the rest: header bytes)
    quarantined_by_restore: int = 0
    quarantined_by_retention: int = 0
    left_in_place: int = 0  # an older checkpoint's manifest damaged: neither used nor moved
    dropped_by_rules: int = 0  # damaged, and removed by retention, whose rules keep it not
    saves: int = 0
    stuck: list[str] = field(default_factory=list)  # a save that failed
    wrong_restores: list[str] = field(default_factory=list)
    intact_lost: list[str] = field(default_factory=list)
    damaged_bytes_lost: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.stuck or self.wrong_restores or self.intact_lost or self.damaged_bytes_lost
        )

    def summary(self) -> str:
        return (
            f"quarantine: {self.trials} trials, {self.damaged} made a checkpoint unusable; set "
            f"aside by restore {self.quarantined_by_restore}, by retention "
            f"{self.quarantined_by_retention}, left in place {self.left_in_place}, removed by "
            f"retention (not kept) {self.dropped_by_rules}; {self.saves} saves, "
            f"stuck: {len(self.stuck)}; wrong restores: {len(self.wrong_restores)}; intact "
            f"checkpoints lost: {len(self.intact_lost)}; damaged bytes lost: "
            f"{len(self.damaged_bytes_lost)}"
        )


_QUARANTINE_LOSSES = {10: 0.3, 14: 0.5, 15: 0.1}  # step 15, the newest, is also the best
_RULES = build_rules(keep_last=2, keep_best=2, monitor="loss", mode="min", keep_every=None)


def _quarantine_writer(run: Path, async_save: bool = True) -> Checkpointer:
    return Checkpointer(
        run, monitor="loss", keep_last=2, keep_best=2, capture_rng=False, async_save=async_save
    )


def _quarantine_state(step: int) -> dict:
    return {"w": torch.full((1024,), float(step)), "step": step}


def _usable(run: Path, step: int) -> bool:
    """Whether a checkpoint of the damaged run is usable: its manifest decodes, its data hashes."""
    entry = next(e for e in RunDirectory(LocalStorage(run)).scan() if e.step == step)
    if entry.manifest is None:
        return False
    return RunReader(RunDirectory(LocalStorage(run)), None, "min").damage(entry) is None


def _restored(ckpt: Checkpointer, which: str, usable: set[int], why: list[str]) -> int | None:
    state = {"w": torch.zeros(1024), "step": -1}
    info = ckpt.restore(state, which)
    if info is None or info.step not in usable:
        why.append(f"restore({which!r}) gave {info and info.step}, usable: {sorted(usable)}")
        return None
    if state["step"] != info.step or not torch.equal(state["w"], torch.full((1024,), info.step)):
        why.append(f"restore({which!r}) of step {info.step} gave other data")
    return info.step


def _quarantine_trial(run: Path, rng: random.Random, report: QuarantineReport) -> None:
    victim = rng.choice(sorted(_QUARANTINE_LOSSES))
    folder = run / f"step-{victim:09d}"
    what = f"step {victim}: " + damage_file(folder / rng.choice(["manifest.json", TENSORS]), rng)
    evidence = {p.name: p.read_bytes() for p in folder.iterdir()}
    usable = {s for s in _QUARANTINE_LOSSES if s != victim or _usable(run, s)}
    unusable = victim not in usable
    report.damaged += unusable
    losses = dict(_QUARANTINE_LOSSES)
    with _quarantine_writer(run) as ckpt:
        resumed = _restored(ckpt, "latest", usable, report.wrong_restores)
        if resumed is None:
            return
        for step in range(resumed + 1, 18):  # the loop goes on; a damaged step is saved again
            try:
                ckpt.save(step, _quarantine_state(step), {"loss": 0.6})
                ckpt.wait()
            except CheckpointError as exc:
                report.stuck.append(f"{what}: save({step}): {exc}")
                return
            report.saves += 1
            usable.add(step)
            losses[step] = 0.6
        listed = {info.step for info in ckpt.list()}
        for which in ("latest", "best"):
            _restored(ckpt, which, listed & usable, report.wrong_restores)
    # the steps the rules keep among the usable checkpoints must all be there (saved in step
    # order, with no rewind: the commit order is the step order, as without sequences)
    records = [
        SimpleNamespace(step=s, metrics={"loss": losses[s]}, pinned=False, sequence=None)
        for s in usable
    ]
    expected = retained_steps(records, _RULES)
    if not expected <= listed:
        report.intact_lost.append(f"{what}: kept {sorted(listed)}, expected {sorted(expected)}")
    held = sorted(p.name for p in (run / "quarantine").glob("*.json"))
    kept_aside = unusable and (held or (folder / "manifest.json").exists())
    if unusable:
        if held == [f"step-{victim:09d}-1.json"]:
            report.quarantined_by_restore += victim > resumed
            report.quarantined_by_retention += victim < resumed
        elif kept_aside:
            report.left_in_place += 1
        else:
            report.dropped_by_rules += 1
    quiet_cli(["gc", str(run), "--keep-last", "1"])
    newest = [e.step for e in RunDirectory(LocalStorage(run)).committed()]
    if newest != [17]:
        report.intact_lost.append(f"{what}: gc --keep-last 1 kept {newest}, not [17]")
    if kept_aside:  # no byte of a checkpoint set aside (or left in place) is gone or changed
        aside = [run / "quarantine" / name for name in held]
        for name, data in evidence.items():
            sources = [folder / name, *(aside if name == "manifest.json" else [])]
            if not any(p.exists() and p.read_bytes() == data for p in sources):
                report.damaged_bytes_lost.append(f"{what}: {name} is gone or changed")


def quarantine_trials(trials: int, *, seed: int = 0, workdir: Path) -> QuarantineReport:
    """Damage one file of the README loop's run `trials` times, then resume it as a writer."""
    rng = random.Random(seed)
    pristine, run = workdir / "pristine", workdir / "resumed"
    with _quarantine_writer(pristine, async_save=False) as ckpt:
        for step, loss in _QUARANTINE_LOSSES.items():
            ckpt.save(step, _quarantine_state(step), {"loss": loss})
    report = QuarantineReport()
    for _ in range(trials):
        fresh_copy(pristine, run)
        report.trials += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # damage and quarantine are reported by warnings
            _quarantine_trial(run, rng, report)
    return report
