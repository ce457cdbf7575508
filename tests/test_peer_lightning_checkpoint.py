"""Lightning's own ModelCheckpoint tests (tests/tests_pytorch/checkpointing/
test_model_checkpoint.py), ported: the cases not already in tests/test_peer_checkpoint_ports.py.

Lightning's callback saves from inside its Trainer; here a loop saves with `Checkpointer`,
`save_top_k` being `keep_best`, `save_last` the always-kept newest (`keep_last`), and
`every_n_train_steps` / `train_time_interval` being `every=` with `maybe_save`. Where haltpoint
differs by design, the case asserts haltpoint's documented behaviour and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.policies.interval import parse_every
from haltpoint.schedule import SaveSchedule
from haltpoint.store.run_dir import checkpoint_dirname


def make_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"model": torch.nn.Linear(32, 2)}


def step_folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


def test_model_checkpoint_topk_all(tmp_path: Path) -> None:
    """Ports test_model_checkpoint_topk_all: save_top_k=-1 with monitor="epoch", mode="max"
    keeps every epoch and the best is the last."""
    with Checkpointer(tmp_path, monitor="epoch", mode="max", keep_best=3) as ckpt:
        for epoch in range(3):
            ckpt.save(epoch, make_state(), {"epoch": epoch})
        assert [info.step for info in ckpt.list()] == [0, 1, 2]
        best = ckpt.restore(make_state(), "best")
    assert best is not None and (best.step, best.metrics["epoch"]) == (2, 2)


def test_model_checkpoint_save_last_none_monitor(tmp_path: Path) -> None:
    """Ports test_model_checkpoint_save_last_none_monitor; differs by design.

    With monitor=None Lightning keeps every checkpoint and calls the last one best. haltpoint
    ranks only by a monitor: "best" without one is a ValueError saying to pass it, and the
    newest is what "latest" restores.
    """
    with Checkpointer(tmp_path, keep_last=100) as ckpt:
        for epoch in range(2):
            ckpt.save(epoch, make_state())
        assert [info.step for info in ckpt.list()] == [0, 1]
        with pytest.raises(ValueError, match=r"which='best' needs the Checkpointer's monitor"):
            ckpt.restore(make_state(), "best")
        latest = ckpt.restore(make_state())
    assert latest is not None and latest.step == 1


def test_none_monitor_not_alternating(tmp_path: Path) -> None:
    """Ports test_none_monitor_not_alternating: with one checkpoint kept and no monitor, each
    epoch starts with exactly one checkpoint folder, the previous epoch's (asynchronous saves,
    waited for), never an alternation of names or a leftover."""
    state = make_state()
    with Checkpointer(tmp_path, keep_last=1, async_save=True) as ckpt:
        for epoch in range(3):
            if epoch > 0:
                ckpt.wait()
                assert step_folders(tmp_path) == [checkpoint_dirname(epoch - 1)]
            ckpt.save(epoch, state)


def test_model_checkpoint_train_time_interval() -> None:
    """Ports test_model_checkpoint_train_time_interval: a batch takes 7 s and the interval is
    a minute, so 2 epochs of 64 batches (896 s) save 14 times.

    Lightning mocks its module's clock; here the save schedule behind `every="1min"` is given
    a fake clock (its `clock` argument), and asked after every batch.
    """
    now = [0.0]
    schedule = SaveSchedule(parse_every("1min"), monitor=None, mode="min", clock=lambda: now[0])
    saves = 0
    for batch in range(1, 2 * 64 + 1):
        now[0] = 7.0 * batch
        if schedule.decide(batch, {}, None) is not None:
            schedule.saved(batch, 0.0, None)
            saves += 1
    assert saves == 14


@pytest.mark.parametrize("same_resume_folder", [True, False], ids=["same_folder", "new_folder"])
def test_resume_and_old_checkpoint_files_remain(tmp_path: Path, same_resume_folder: bool) -> None:
    """Ports test_resume_and_old_checkpoint_files_remain (and, with a new folder,
    test_resume_training_preserves_old_ckpt_last); the same folder differs by design.

    Top 2 by step, a save every 2 steps (explicit: `maybe_save` would also save at every
    improvement of the monitor, and "step" improves at each): the first run keeps 2 and 4.
    Resumed from 4 into a new folder, the first folder is untouched. In the same folder
    Lightning never deletes the checkpoint it resumed from; haltpoint's retention treats it as
    any other (docs/guide.md, section 2: the kept set is the union of the rules), so 4 goes
    once 6 and 8 are committed, and `pin(4)` is the way to keep it.
    """
    first = tmp_path / "first"
    second = first if same_resume_folder else tmp_path / "second"
    options: dict[str, Any] = {"monitor": "step", "mode": "max", "keep_best": 2}
    state = make_state()
    with Checkpointer(first, async_save=False, **options) as ckpt:
        for step in range(2, 6, 2):
            ckpt.save(step, state, {"step": step})
        assert [info.step for info in ckpt.list()] == [2, 4]
    with Checkpointer(first, read_only=True) as reader:
        info = reader.restore(state, 4)
    assert info is not None
    with Checkpointer(second, async_save=False, **options) as ckpt:
        for step in range(info.step + 2, 9, 2):
            ckpt.save(step, state, {"step": step})
        assert [info.step for info in ckpt.list()] == [6, 8]
    if not same_resume_folder:
        assert step_folders(first) == [checkpoint_dirname(2), checkpoint_dirname(4)]


def test_resume_and_old_checkpoint_files_remain_pinned(tmp_path: Path) -> None:
    """Ports test_resume_and_old_checkpoint_files_remain (same folder) the haltpoint way: the
    checkpoint resumed from, pinned, stays beside the two best saved after it."""
    options: dict[str, Any] = {"monitor": "step", "mode": "max", "keep_best": 2}
    state = make_state()
    with Checkpointer(tmp_path, async_save=False, **options) as ckpt:
        for step in (2, 4):
            ckpt.save(step, state, {"step": step})
    with Checkpointer(tmp_path, async_save=False, **options) as ckpt:
        info = ckpt.restore(state)
        assert info is not None and info.step == 4
        ckpt.pin(info.step)
        for step in (6, 8):
            ckpt.save(step, state, {"step": step})
        assert [info.step for info in ckpt.list()] == [4, 6, 8]
