"""Reliability campaign `history`.

One random bit of a run's `history.jsonl` is flipped, then `haltpoint gc --keep-last 1 --keep-
best 1` runs: the true best checkpoint (by the monitor the run was saved with) must still be
there, and gc must not fail. The same flips on a copy in the older format (manifests that do not
record their monitor, history lines without checksums) show what the history used to decide.

    python benchmarks/reliability.py history --trials 2000
"""

from __future__ import annotations

import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from haltpoint import (
    Checkpointer,
)
from haltpoint.store.history import read_history
from haltpoint.store.run_dir import RunDirectory
from haltpoint.store.storage import LocalStorage
from reliability_common import Report, fresh_copy, quiet_cli


@dataclass
class HistoryReport(Report):
    trials: int = 0
    best_lost: list[str] = field(default_factory=list)
    gc_failed: list[str] = field(default_factory=list)
    undetected: list[str] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    legacy_best_lost: int = 0
    legacy_gc_failed: int = 0

    @property
    def ok(self) -> bool:
        return not self.best_lost and not self.gc_failed and not self.undetected

    def summary(self) -> str:
        return (
            f"history: {self.trials} single-bit flips of history.jsonl, then gc "
            f"--keep-last 1 --keep-best 1: true best lost {len(self.best_lost)}, gc failed "
            f"{len(self.gc_failed)}; reading the history skipped the line with a warning "
            f"{self.seen.get('warned', 0)} times, dropped a last line as torn "
            f"{self.seen.get('dropped', 0)} times, read every record unchanged "
            f"{self.seen.get('unchanged', 0)} times, returned a changed record "
            f"{len(self.undetected)} times; the same flips in the older format: true best "
            f"lost {self.legacy_best_lost}, gc failed {self.legacy_gc_failed}"
        )


_CURVE = (0.9, 0.6, 0.4, 0.25, 0.3, 0.35, 0.5, 0.45)  # val_loss; the true best is step 3


def _make_ranked_run(run: Path) -> int:
    """A run saved with monitor val_loss (min), val_acc beside it; returns the best step."""
    from haltpoint import EarlyStopping

    model, stopper = torch.nn.Linear(4, 2), EarlyStopping("val_loss", mode="min", patience=20)
    with Checkpointer(
        run,
        monitor="val_loss",
        mode="min",
        keep_last=len(_CURVE),
        capture_rng=False,
        async_save=False,
    ) as ckpt:
        for step, loss in enumerate(_CURVE):
            metrics = {"val_loss": loss, "val_acc": round(1 - loss, 6)}
            stopper.step(metrics)
            ckpt.save(step, {"model": model, "stopper": stopper}, metrics)
    return _CURVE.index(min(_CURVE))


def _to_old_format(run: Path) -> None:
    """What an older haltpoint wrote: no ranking in manifests, no checksums in history."""
    import json

    from haltpoint.store.manifest import RANKING_KEY, Manifest

    for path in run.glob("step-*/manifest.json"):
        manifest = Manifest.decode(path.read_bytes(), source=str(path))
        del manifest.extra[RANKING_KEY]
        path.write_bytes(manifest.encode())
    history = run / "history.jsonl"
    lines = [json.loads(line) for line in history.read_text().splitlines()]
    history.write_text(
        "".join(
            json.dumps({k: v for k, v in x.items() if k != "checksum"}, separators=(",", ":"))
            + "\n"
            for x in lines
        )
    )


def _gc_after_a_flip(pristine: Path, run: Path, rng: random.Random) -> tuple[str, int, str]:
    """Flip one bit of the history of a copy of `pristine`, then run gc.

    Returns what was flipped, gc's exit status, and what reading the history made of the
    flip: "warned" (a line skipped with a warning), "dropped" (the last line, taken for one
    torn by a crash), "unchanged" (every record reads back as it was), or "undetected" (a
    record read back changed, with no warning).
    """
    fresh_copy(pristine, run)
    storage = LocalStorage(run)
    before = read_history(storage)
    history = run / "history.jsonl"
    data = bytearray(history.read_bytes())
    index, bit = rng.randrange(len(data)), rng.randrange(8)
    data[index] ^= 1 << bit
    history.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = read_history(storage)
    kept = [r for r in after if any(all(r.get(k) == v for k, v in b.items()) for b in before)]
    if caught:
        seen = "warned"
    elif len(kept) < len(after):
        seen = "undetected"
    else:
        seen = "dropped" if len(after) < len(before) else "unchanged"
    code, _ = quiet_cli(["gc", str(run), "--keep-last", "1", "--keep-best", "1"])
    return f"bit {bit} of byte {index}", code, seen


def history_trials(trials: int, *, seed: int = 0, workdir: Path) -> HistoryReport:
    """Flip one bit of the history `trials` times, then gc: the true best must stay."""
    rng = random.Random(seed)
    pristine, old, run = workdir / "pristine", workdir / "old-format", workdir / "flipped"
    best = _make_ranked_run(pristine)
    shutil.copytree(pristine, old)
    _to_old_format(old)
    report = HistoryReport()
    for _ in range(trials):
        report.trials += 1
        what, code, seen = _gc_after_a_flip(pristine, run, rng)
        report.seen[seen] = report.seen.get(seen, 0) + 1
        if seen == "undetected":
            report.undetected.append(what)
        if code != 0:
            report.gc_failed.append(what)
        elif best not in [e.step for e in RunDirectory(LocalStorage(run)).committed()]:
            report.best_lost.append(what)
        _, code, _ = _gc_after_a_flip(old, run, rng)
        if code != 0:
            report.legacy_gc_failed += 1
        elif best not in [e.step for e in RunDirectory(LocalStorage(run)).committed()]:
            report.legacy_best_lost += 1
    return report
