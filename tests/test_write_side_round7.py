"""Write-side safety, seventh round: what a writer removes after open, and the clock.

Rule: no code path deletes or overwrites a checkpoint unless a newer intact one that the
same retention keeps has been verified. Here, the paths that removed one anyway: a new
writer's clean-up racing an old writer's commit (its lock file deleted by hand), a writer's
retention after its lock was taken over, and a save under a clock the reader refuses. The
races are made deterministic by running the other writer's step from inside a wrapped
storage call. Earlier rounds: tests/test_write_side_round6.py and those it names.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from crafted import model_at, writer
from haltpoint import Checkpointer
from haltpoint import checkpointer as checkpointer_module
from haltpoint.errors import CheckpointError
from haltpoint.state.tree import flatten_state
from haltpoint.store.lock import LOCK_NAME, WriterLock
from haltpoint.store.manifest import MANIFEST_NAME, Manifest
from haltpoint.store.run_dir import TENSORS_NAME, RunDirectory, checkpoint_dirname
from haltpoint.store.storage import LocalStorage
from haltpoint.store.writer import write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")


def written_uncommitted(run: Path, step: int, sequence: int) -> Callable[[], None]:
    """Write the tensors of `step` as an old writer's save does, up to its commit (its lock
    check passed); return that commit, to run later."""
    storage = LocalStorage(run)
    old = RunDirectory(storage)
    held: list[Manifest] = []
    old.commit = lambda m: held.append(m) or checkpoint_dirname(m.step)  # type: ignore[method-assign]
    flat = flatten_state({"model": model_at(step)})
    write_checkpoint(
        old,
        step=step,
        time=time.time(),
        metrics={"loss": 1.0},
        tree=flat.tree,
        tensors=flat.tensors,
        sequence=sequence,
    )
    assert not (run / checkpoint_dirname(step) / MANIFEST_NAME).exists()
    return lambda: RunDirectory(LocalStorage(run)).commit(held[0])


@pytest.mark.parametrize("when", ["after-its-listing", "after-its-file-removals"])
def test_clean_up_at_open_never_deletes_a_manifest_an_old_writer_commits_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """An old writer saves step 1: its tensors are written and its lock check passed; then
    its lock file is deleted by hand, and a new writer opens the run. The new writer's
    clean-up lists step 1's folder (no manifest: an interrupted save's leftovers) and the
    old writer commits step 1 before clean-up removes anything (or, the second case, after
    clean-up removed the files and before it removes the folder). Clean-up removed the
    folder whole (`rmtree`), the manifest just committed with it: a checkpoint committed,
    reported saved, gone. Now it looks again right before each removal, leaves a folder that
    holds a manifest, and removes a folder only when it is empty."""
    run = tmp_path / "run"
    with writer(run) as first:
        first.save(0, {"model": model_at(0)}, {"loss": 2.0})
    old_lock = WriterLock(LocalStorage(run))
    old_lock.acquire()
    commit = written_uncommitted(run, 1, sequence=1)
    os.remove(run / LOCK_NAME)  # by hand, while the old writer holds it

    step1 = checkpoint_dirname(1)
    pending = [commit]

    def commit_first(real: Callable[..., Any], fires: Callable[[Any], bool]) -> Callable[..., Any]:
        def patched(self: LocalStorage, *args: Any) -> Any:
            if pending and fires(args):
                pending.pop()()
            return real(self, *args)

        return patched

    if when == "after-its-listing":  # clean-up asks whether the tensor file is a folder
        target = f"{step1}/{TENSORS_NAME}"
        monkeypatch.setattr(
            LocalStorage,
            "is_folder",
            commit_first(LocalStorage.is_folder, lambda args: args[0] == target),
        )
    else:  # the tensor file is gone; the folder, and the manifest in it, are next
        real_remove_many = LocalStorage.remove_many

        def remove_then_commit(self: LocalStorage, rels: list[str]) -> None:
            real_remove_many(self, rels)
            if pending and any(r.startswith(f"{step1}/") for r in rels):
                pending.pop()()

        monkeypatch.setattr(LocalStorage, "remove_many", remove_then_commit)
    with writer(run, keep_last=5) as new:
        assert not pending  # the old writer's commit ran inside the new writer's clean-up
        assert (run / step1 / MANIFEST_NAME).is_file()
        if when == "after-its-listing":  # nothing of it was removed: it restores exactly
            model = torch.nn.Linear(4, 3)
            info = new.restore({"model": model}, 1)
            assert info is not None and info.step == 1
            assert torch.equal(model.weight, torch.full((3, 4), 1.0))
    old_lock.release()


def test_retention_after_the_lock_was_taken_over_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer (keep_last=1) commits step 1; before its retention runs, its lock file is
    deleted by hand and a second writer (keep_last=5) opens the run. The first writer's
    retention then removed step 0, which the new holder's retention keeps: commit and `gc`
    check the lock, retention did not. Now it checks first, warns, and removes nothing."""
    run = tmp_path / "run"
    opened: list[Checkpointer] = []
    real_append = checkpointer_module.append_history

    def take_over_first(storage: Any, record: Any) -> None:  # runs between commit and retention
        if record["step"] == 1 and not opened:
            os.remove(run / LOCK_NAME)
            opened.append(writer(run, keep_last=5))
        real_append(storage, record)

    monkeypatch.setattr(checkpointer_module, "append_history", take_over_first)
    old = writer(run, keep_last=1)
    old.save(0, {"model": model_at(0)}, {"loss": 2.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old.save(1, {"model": model_at(1)}, {"loss": 1.0})
    assert opened, "the second writer opened between the commit and retention"
    assert [c.step for c in opened[0].list()] == [0, 1]
    assert any("retention removed no checkpoint" in str(w.message) for w in caught)
    opened[0].close()
    old.close()


@pytest.mark.parametrize("clock", [-1.0, 40_000_000_000.0, float("nan")])
def test_a_save_under_a_clock_the_reader_refuses_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: float
) -> None:
    """The system clock says 1969 (or the year 3237, or NaN: a broken RTC, a clock set by
    hand). `save` wrote the checkpoint with that time; the reader refuses a manifest time
    before 1970 or after the year 3000, so the step was committed, reported saved, and
    damaged on every read (and retention then kept it in place of an intact one). Now the
    save is refused before anything is written, one line naming the clock."""
    run = tmp_path / "run"
    with writer(run, keep_last=2) as ckpt:
        ckpt.save(0, {"model": model_at(0)}, {"loss": 2.0})
        monkeypatch.setattr(checkpointer_module.time, "time", lambda: clock)
        with pytest.raises(CheckpointError, match="clock") as raised:
            ckpt.save(1, {"model": model_at(1)}, {"loss": 1.0})
        assert "\n" not in str(raised.value)
        monkeypatch.undo()
        assert not (run / checkpoint_dirname(1)).exists()
        assert [c.step for c in ckpt.list()] == [0]
        ckpt.save(1, {"model": model_at(1)}, {"loss": 1.0})  # the clock fixed: it saves
        assert [c.step for c in ckpt.list()] == [0, 1]


def test_an_import_under_a_clock_the_reader_refuses_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`haltpoint import` under a clock that says 1969: the same refusal, before the
    import removes a killed import's leftovers or writes anything."""
    from haltpoint.cli import importer

    run = tmp_path / "run"
    with writer(run) as ckpt:
        ckpt.save(0, {"model": model_at(0)}, {"loss": 2.0})
    monkeypatch.setattr(importer.time, "time", lambda: -1.0)
    with pytest.raises(CheckpointError, match="clock"):
        importer._write_import(str(run), 1, {"fc.weight": torch.ones(2, 2)})
    monkeypatch.undo()
    assert not (run / checkpoint_dirname(1)).exists()


def test_a_lost_history_line_of_a_save_made_after_the_clock_jumped_back_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps 0 (the best) and 1 are saved with their history lines; the clock then jumps
    back (NTP, a VM restored), and step 2 is committed but its line is not written (a full
    disk), and retention (keep_last=1, keep_best=1) removes step 1, the save of the
    history's last line. The next writer's open recovers the lines of the saves committed
    after that one: with its manifest gone it took those of a later time, and step 2's time
    is earlier: its line was never written. Now the saves after the newest one whose line
    the history holds (step 0, by commit sequence) are recovered."""
    from haltpoint.store.history import read_history

    run = tmp_path / "run"
    clock = {"now": 2.0e9}
    monkeypatch.setattr(checkpointer_module.time, "time", lambda: clock["now"])
    real_append = checkpointer_module.append_history

    def full_at_step_2(storage: Any, record: Any) -> None:
        if record["step"] == 2:
            raise OSError(28, "No space left on device")
        real_append(storage, record)

    with writer(run, keep_best=1) as ckpt:
        ckpt.save(0, {"model": model_at(0)}, {"loss": 0.1})
        clock["now"] = 2.1e9
        ckpt.save(1, {"model": model_at(1)}, {"loss": 0.5})
        clock["now"] = 1.9e9  # back by 2.3 days
        monkeypatch.setattr(checkpointer_module, "append_history", full_at_step_2)
        with pytest.raises(CheckpointError, match="history"):
            ckpt.save(2, {"model": model_at(2)}, {"loss": 0.6})
        assert [c.step for c in ckpt.list()] == [0, 2]
    monkeypatch.undo()
    with writer(run, keep_best=1):
        pass
    assert [r["step"] for r in read_history(LocalStorage(run))] == [0, 1, 2]
