"""Reliability campaign `fulldisk`.

A run of six saves (keep_last=2, keep_best=1, step 2 saved pinned) hits ENOSPC once, at one
write point (the run folder or the lock when a writer opens; a checkpoint's folder, tensor file,
pin marker, manifest or history line during a save), sync or async; each call that fails is made
again, as the errors say. No bare `OSError` may escape, the retry must work (never
`CheckpointExistsError`), and at the end the history must hold one line per step, step 2 must be
pinned, the rules' checkpoints kept, and the newest restore exactly.

    python benchmarks/reliability.py fulldisk --trials 700
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

from haltpoint import (
    Checkpointer,
    CheckpointExistsError,
    HistoryNotWrittenError,
    InsufficientSpaceError,
)
from haltpoint.store import history as history_module
from haltpoint.store import lock as lock_module
from haltpoint.store.direct_io import AlignedFileWriter
from haltpoint.store.history import read_history
from haltpoint.store.storage import LocalStorage
from reliability_common import Report

_LOSSES = (0.5, 0.4, 0.45, 0.3, 0.35, 0.38)  # step 3 is the best; step 2 is saved pinned
_FULL_KEPT = [2, 3, 4, 5]  # pinned, best, and the last two
FULL_POINTS = (
    "open: run folder",
    "open: lock",
    "save: folder",
    "save: tensors",
    "save: pin",
    "save: manifest",
    "save: history",
)


def _no_space() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _FullOnce:
    """Patches one write point so that its first call, once armed, raises ENOSPC."""

    def __init__(self, point: str) -> None:
        self.point, self.armed, self.fired = point, False, False

    def _hit(self, matches: bool) -> None:
        if self.armed and not self.fired and matches:
            self.fired = True
            raise _no_space()

    def patches(self) -> list[contextlib.AbstractContextManager[object]]:
        point, hit = self.point, self._hit
        if point == "open: run folder":
            real_makedirs = os.makedirs

            def makedirs(path: str, *args: object, **kwargs: object) -> None:
                hit(not os.path.isdir(path))
                real_makedirs(path, *args, **kwargs)  # type: ignore[arg-type]

            return [mock.patch.object(os, "makedirs", makedirs)]
        if point == "open: lock":
            real_open = lock_module.open_unlinked

            def open_lock(path: str, *args: int) -> int:
                hit(True)
                return real_open(path, *args)

            return [mock.patch.object(lock_module, "open_unlinked", open_lock)]
        if point == "save: folder":
            real_dir = LocalStorage.makedirs

            def folder(self: LocalStorage, rel: str) -> None:
                hit(rel.startswith("step-"))
                real_dir(self, rel)

            return [mock.patch.object(LocalStorage, "makedirs", folder)]
        if point == "save: tensors":
            real_write = AlignedFileWriter._pwrite

            def pwrite(self: AlignedFileWriter, view: memoryview, offset: int) -> None:
                hit(True)
                real_write(self, view, offset)

            return [mock.patch.object(AlignedFileWriter, "_pwrite", pwrite)]
        if point in ("save: pin", "save: manifest"):
            real_publish = LocalStorage.publish
            name = "/pinned" if point == "save: pin" else "/manifest.json"

            def publish(self: LocalStorage, rel: str, data: bytes) -> None:
                hit(rel.endswith(name))
                real_publish(self, rel, data)

            return [mock.patch.object(LocalStorage, "publish", publish)]
        real_append = history_module._append_local

        def append(path: str, line: bytes) -> None:
            hit(True)
            real_append(path, line)

        return [mock.patch.object(history_module, "_append_local", append)]


@dataclass
class FullDiskReport(Report):
    trials: int = 0
    raised: dict[str, int] = field(default_factory=dict)  # "point: error class" -> count
    bare_oserror: list[str] = field(default_factory=list)
    retry_refused: list[str] = field(default_factory=list)
    retry_failed: list[str] = field(default_factory=list)
    pins_lost: list[str] = field(default_factory=list)
    history_wrong: list[str] = field(default_factory=list)
    kept_wrong: list[str] = field(default_factory=list)
    wrong_restores: list[str] = field(default_factory=list)
    not_hit: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.not_hit
            or self.bare_oserror
            or self.retry_refused
            or self.retry_failed
            or self.pins_lost
            or self.history_wrong
            or self.kept_wrong
            or self.wrong_restores
        )

    def summary(self) -> str:
        return (
            f"fulldisk: {self.trials} trials; raised: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(self.raised.items()))}; bare OSError "
            f"{len(self.bare_oserror)}, retry refused {len(self.retry_refused)}, retry failed "
            f"{len(self.retry_failed)}; history wrong {len(self.history_wrong)}, pins lost "
            f"{len(self.pins_lost)}, kept wrong {len(self.kept_wrong)}, wrong restores "
            f"{len(self.wrong_restores)}, injection not hit {len(self.not_hit)}"
        )


def _full_state(step: int) -> dict[str, object]:
    return {"w": torch.full((1 << 16,), float(step)), "step": step}


def _twice(what: str, call: Callable[[], object], report: FullDiskReport, point: str) -> None:
    """`call`, and when it fails on the full disk, the same call once more (space freed)."""
    for attempt in range(2):
        try:
            call()
            return
        except (HistoryNotWrittenError, InsufficientSpaceError) as exc:
            key = f"{point}: {type(exc).__name__}"
            report.raised[key] = report.raised.get(key, 0) + 1
            if attempt:
                report.retry_failed.append(f"{what}: {exc}")
        except CheckpointExistsError as exc:
            report.retry_refused.append(f"{what}: {exc}")
            return
        except OSError as exc:
            report.bare_oserror.append(f"{what}: {exc!r}")
            if attempt == 0:
                continue
            return


def _full_disk_trial(run: Path, point: str, at: int, sync: bool, report: FullDiskReport) -> None:
    """Six saves (a writer opened at step 0 and again at `at`); ENOSPC once at `point`
    during the open or the save of step `at`."""
    full = _FullOnce(point)
    options = {"monitor": "val_loss", "keep_best": 1, "keep_last": 2, "capture_rng": False}
    writers: list[Checkpointer] = []
    what = f"{point} at step {at} ({'sync' if sync else 'async'})"

    def open_writer() -> None:
        writers.append(Checkpointer(run, async_save=not sync, **options))  # type: ignore[arg-type]

    def save(step: int) -> None:
        writers[-1].save(step, _full_state(step), {"val_loss": _LOSSES[step]}, pin=step == 2)
        writers[-1].wait()

    def armed(on: bool, call: Callable[[], None]) -> Callable[[], None]:
        def run_it() -> None:
            full.armed = on
            try:
                call()
            finally:
                full.armed = False

        return run_it

    with contextlib.ExitStack() as stack:
        for patch in full.patches():
            stack.enter_context(patch)
        for step in range(len(_LOSSES)):
            if step in (0, at):
                if writers:
                    writers[-1].close()
                count = len(writers)
                on = point.startswith("open") and step == at
                _twice(f"{what}: open", armed(on, open_writer), report, point)
                if len(writers) == count:
                    return
            on = point.startswith("save") and step == at
            _twice(f"{what}: save({step})", armed(on, lambda step=step: save(step)), report, point)
        writers[-1].close()
    if not full.fired:
        report.not_hit.append(what)
    steps = [r["step"] for r in read_history(LocalStorage(run))]
    if steps != list(range(len(_LOSSES))):
        report.history_wrong.append(f"{what}: history steps {steps}")
    with Checkpointer(run, read_only=True, capture_rng=False) as reader:
        infos = reader.list()
        if [i.step for i in infos] != _FULL_KEPT:
            report.kept_wrong.append(f"{what}: kept {[i.step for i in infos]}")
        if not any(i.step == 2 and i.pinned for i in infos):
            report.pins_lost.append(what)
        state = {"w": torch.zeros(1 << 16), "step": -1}
        info = reader.restore(state)
        last = len(_LOSSES) - 1
        if info is None or info.step != last or not torch.equal(state["w"], _full_state(last)["w"]):
            report.wrong_restores.append(f"{what}: restored {info and info.step}")


def full_disk_trials(trials: int, *, seed: int = 0, workdir: Path) -> FullDiskReport:
    """ENOSPC at one write point of a run of six saves; each failed call is made again."""
    rng = random.Random(seed)
    report = FullDiskReport()
    for index in range(trials):
        point = FULL_POINTS[index % len(FULL_POINTS)]
        at = {"save: pin": 2, "open: run folder": 0}.get(point, rng.randrange(len(_LOSSES)))
        run = workdir / "full" / str(index)
        report.trials += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _full_disk_trial(run, point, at, rng.random() < 0.5, report)
        shutil.rmtree(run, ignore_errors=True)
    return report
