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

from haltpoint import Checkpointer, CheckpointExistsError
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


@pytest.mark.parametrize("every", [-3, 0])
def test_invalid_every_n_epochs_and_train_steps(tmp_path: Path, every: int) -> None:
    """Ports test_invalid_every_n_epochs and test_invalid_every_n_train_steps: a negative
    interval is refused. Differs for 0: Lightning's 0 turns periodic saves off; haltpoint's
    off is `every=None` (the default), and 0 is refused with the same message."""
    with pytest.raises(ValueError, match=f"every must be a positive number of steps, got {every}"):
        Checkpointer(tmp_path / "run", every=every)
    assert not (tmp_path / "run").exists()


def test_default_checkpoint_behavior(tmp_path: Path) -> None:
    """Ports test_default_checkpoint_behavior: with the defaults, three epochs each save and
    only the newest checkpoint remains."""
    state = make_state()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for epoch in range(3):
            ckpt.save((epoch + 1) * 5, state)
        assert [info.step for info in ckpt.list()] == [15]
    assert step_folders(tmp_path) == [checkpoint_dirname(15)]


def test_ckpt_version_after_rerun_new_trainer(tmp_path: Path) -> None:
    """Ports test_ckpt_version_after_rerun_new_trainer, test_ckpt_version_counter_disabled_
    after_rerun_new_trainer and test_save_last_versioning; differs by design.

    A second run over the same steps in the same folder gets `epoch=0-v1.ckpt` files from
    Lightning, or overwrites them with the version counter off. haltpoint never versions nor
    overwrites a committed step: the rerun's first save is a CheckpointExistsError naming
    the step, and the first run's checkpoints stay as they were.
    """
    first = make_state()
    with Checkpointer(tmp_path, keep_last=10, async_save=False) as ckpt:
        for epoch in range(2):
            ckpt.save(epoch, first, {"epoch": epoch})
    before = first["model"].weight.detach().clone()
    with Checkpointer(tmp_path, keep_last=10, async_save=False) as ckpt:
        with pytest.raises(CheckpointExistsError, match="step 0 already exists"):
            ckpt.save(0, make_state(seed=1), {"epoch": 0})
        assert [info.step for info in ckpt.list()] == [0, 1]
        fresh = make_state(seed=2)
        ckpt.restore(fresh, 0)
    assert torch.equal(fresh["model"].weight, before)
    assert step_folders(tmp_path) == [checkpoint_dirname(0), checkpoint_dirname(1)]


def test_expand_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports test_expand_home: a directory under `~` is the user's home; `./~/...` is a
    folder named `~` under the working directory."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    for step, directory in enumerate(("~/checkpoints", Path("~/checkpoints"), "./~/checkpoints")):
        with Checkpointer(directory, keep_last=3, async_save=False) as ckpt:
            ckpt.save(step, make_state())
    assert step_folders(home / "checkpoints") == [checkpoint_dirname(0), checkpoint_dirname(1)]
    assert step_folders(cwd / "~" / "checkpoints") == [checkpoint_dirname(2)]


def fit_saving(tmp_path: Path, **trainer_kwargs: Any) -> list[int]:
    """A Lightning fit whose HaltpointCallback saves at each validation (val_acc logged, as
    Lightning's LogInTwoMethods); the steps of the checkpoints kept."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.demos.boring_classes import BoringModel

    from haltpoint.integrations.lightning import HaltpointCallback

    class ValAcc(BoringModel):  # type: ignore[misc]
        def on_validation_epoch_end(self) -> None:
            self.log("val_acc", torch.tensor(1.23))

    run = tmp_path / "run"
    with Checkpointer(run, monitor="val_acc", mode="max", keep_last=100) as ckpt:
        trainer = pl.Trainer(
            callbacks=[HaltpointCallback(checkpointer=ckpt)],
            default_root_dir=str(tmp_path),
            limit_val_batches=1,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            **trainer_kwargs,
        )
        trainer.fit(ValAcc())
        ckpt.wait()
        return [info.step for info in ckpt.list()]


def test_val_check_interval_checkpoint_files(tmp_path: Path) -> None:
    """Ports test_val_check_interval_checkpoint_files: validating five times an epoch (every
    2 of 10 batches) saves at steps 2, 4, 6, 8 and 10, each under its own step."""
    steps = fit_saving(tmp_path, val_check_interval=0.2, max_epochs=1, limit_train_batches=10)
    assert steps == [2, 4, 6, 8, 10]


def test_check_val_every_n_epochs_top_k_integration(tmp_path: Path) -> None:
    """Ports test_check_val_every_n_epochs_top_k_integration: validating every 2nd of 5 epochs
    of one batch saves after epochs 1 and 3 (0-based), at global steps 2 and 4."""
    steps = fit_saving(tmp_path, check_val_every_n_epoch=2, max_epochs=5, limit_train_batches=1)
    assert steps == [2, 4]


@pytest.mark.parametrize("dumps", ["pickle", "cloudpickle", "deepcopy"])
def test_pickling(tmp_path: Path, dumps: str) -> None:
    """Ports test_pickling (ModelCheckpoint survives pickle and cloudpickle); differs by design.

    Lightning's callback holds only settings; a Checkpointer holds the run's writer lock, its
    background writer and signal handlers, which a copy would share or, in another process,
    claim. Pickling or copying it is refused with a TypeError saying to create it in the
    process that uses it, and the original goes on saving.
    """
    import copy

    copier: Any = copy.deepcopy if dumps == "deepcopy" else pytest.importorskip(dumps).dumps
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(TypeError, match=r"cannot be pickled or copied.*in the process"):
            copier(ckpt)
        ckpt.save(0, make_state())
        assert [info.step for info in ckpt.list()] == [0]
