"""Orbax's own CheckpointManager tests (checkpoint/orbax/checkpoint/checkpoint_manager_test.py),
ported: the cases not already in tests/test_peer_checkpoint_ports.py.

Orbax saves PyTrees of JAX arrays; here the state is a small torch model. `max_to_keep` is
`keep_last`, `keep_period` is `keep_every`, `best_fn` + `best_mode` is `monitor` + `mode` with
`keep_best`, `save_interval_steps` is `every=` with `maybe_save`, and `force=True` is a plain
`save`. Where haltpoint differs by design, the case asserts haltpoint's documented behaviour and
says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from haltpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    StateMismatchError,
    StepBehindError,
)
from haltpoint.store.run_dir import checkpoint_dirname


def make_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    return {"params": torch.nn.Linear(8, 4)}


def step_folders(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir())


def test_save_interval_force(tmp_path: Path) -> None:
    """Ports test_save_interval_force: every 2 steps saves 0, 2, 4; a forced save of step 5
    (a plain `save`) saves whatever the interval."""
    state = make_state()
    with Checkpointer(tmp_path, every=2, keep_last=100, async_save=False) as ckpt:
        saved = [step for step in range(6) if ckpt.maybe_save(step, state) is not None]
        ckpt.save(5, state)
        assert saved == [0, 2, 4]
        assert [info.step for info in ckpt.list()] == [0, 2, 4, 5]


@pytest.mark.parametrize(("monitor", "mode"), [("loss", "min"), ("accuracy", "max")])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_best(tmp_path: Path, monitor: str, mode: str, async_save: bool) -> None:
    """Ports test_save_best: max_to_keep=2 by best_fn, across a restart after step 4.

    The two best are steps 1 and 5 by either metric (accuracy's tie at 75 is not among them);
    Orbax keeps only those, haltpoint also keeps the newest (step 9), which best_fn with
    max_to_keep evicts in Orbax.
    """
    loss = [5, 2, 4, 3, 7, 1, 10, 9, 7, 4]  # the second manager saves from step 5 on
    accuracy = [30, 85, 70, 80, 60, 100, 40, 45, 75, 75]
    options: dict[str, Any] = {"monitor": monitor, "mode": mode, "keep_best": 2}
    state = make_state()
    for steps in (range(5), range(5, 10)):  # the second manager reads the first's metrics
        with Checkpointer(tmp_path, async_save=async_save, **options) as ckpt:
            for step in steps:
                ckpt.save(step, state, {"loss": loss[step], "accuracy": accuracy[step]})
    with Checkpointer(tmp_path, read_only=True, **options) as ckpt:
        assert [info.step for info in ckpt.list()] == [1, 5, 9]
        best = ckpt.restore(make_state(seed=1), "best")
    assert best is not None and best.step == 5


def test_save_gcs_with_unfinalized_checkpoints(tmp_path: Path) -> None:
    """Ports test_save_gcs_with_unfinalized_checkpoints: an empty folder where step 0's
    checkpoint would go (a save that never got further) does not stop step 0 being saved."""
    (tmp_path / checkpoint_dirname(0)).mkdir()
    state = make_state()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state)
        assert [info.step for info in ckpt.list()] == [0]
    fresh = make_state(seed=1)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        info = ckpt.restore(fresh, 0)
    assert info is not None and torch.equal(fresh["params"].weight, state["params"].weight)


def test_restore_independent(tmp_path: Path) -> None:
    """Ports test_restore_independent: a run restores a pretrained checkpoint stored
    elsewhere (a reader on that directory), which its own empty directory does not hold,
    and the other directory is left as it was."""
    pretrained, run = tmp_path / "pretrained", tmp_path / "run"
    saved = make_state()
    with Checkpointer(pretrained, async_save=False) as ckpt:
        ckpt.save(0, saved)
    before = step_folders(pretrained)
    state = make_state(seed=1)
    with Checkpointer(run, async_save=False) as ckpt:
        with pytest.raises(CheckpointNotFoundError, match="step 0"):
            ckpt.restore(state, 0)
        with Checkpointer(pretrained, read_only=True) as secondary:
            secondary.restore(state, 0)
        ckpt.save(0, state)
    assert torch.equal(state["params"].weight, saved["params"].weight)
    assert step_folders(pretrained) == before


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_removes_old_saves_keep_period(tmp_path: Path, async_save: bool) -> None:
    """Ports test_removes_old_saves_keep_period: max_to_keep=2, keep_period=4 and a save
    every 2 steps keep 0, 4, 8 (the period) and 8, 10 (the newest two)."""
    state = make_state()
    options: dict[str, Any] = {"keep_last": 2, "keep_every": 4, "every": 2}
    with Checkpointer(tmp_path, async_save=async_save, **options) as ckpt:
        for step in range(12):
            ckpt.maybe_save(step, state)
        assert [info.step for info in ckpt.list()] == [0, 4, 8, 10]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_same_step(tmp_path: Path, async_save: bool) -> None:
    """Ports test_save_same_step and test_no_overwrite_existing: saving a step again, even
    while its first save is still being written, is refused each time; no temporary folder
    is left, and the step restores as first saved."""
    state = make_state()
    first = state["params"].weight.detach().clone()
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(0, state)
        with torch.no_grad():
            state["params"].weight.mul_(2.0)  # the doubled tree of Orbax's test
        for _ in range(2):
            with pytest.raises(CheckpointExistsError, match="step 0"):
                ckpt.save(0, state)
        assert [info.step for info in ckpt.list()] == [0]
    assert step_folders(tmp_path) == [checkpoint_dirname(0)]
    fresh = make_state(seed=1)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        ckpt.restore(fresh)
    assert torch.equal(fresh["params"].weight, first)


def test_multiple_items(tmp_path: Path) -> None:
    """Ports test_multiple_items: a model, a NumPy array and a JSON tree saved as three named
    items of one step come back as they were, the tree's ints still ints."""
    metadata = {"VERSION": 2, "optimizer": {"lr": 0.001, "type": "adam"}}
    saved = make_state()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {**saved, "arr": np.arange(16), "metadata": metadata})
    state: dict[str, Any] = {**make_state(seed=1), "arr": None, "metadata": None}
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        ckpt.restore(state, 0)
    assert torch.equal(state["params"].weight, saved["params"].weight)
    np.testing.assert_array_equal(state["arr"], np.arange(16))
    assert state["metadata"] == metadata and type(state["metadata"]["VERSION"]) is int


def test_default_init_multi_item_dynamic_items(tmp_path: Path) -> None:
    """Ports test_default_init_multi_item_dynamic_items: the items may change from step to
    step; each step restores the items it holds.

    Orbax's `restore(step, args=None)` returns whatever the step holds; haltpoint restores
    into the caller's state, so asking step 1 for an item it lacks is a StateMismatchError
    naming it, and asking a step for fewer items than it holds loads those.
    """
    tree = {"a": 1, "b": 2}
    with Checkpointer(tmp_path, keep_last=3, async_save=False) as ckpt:
        ckpt.save(0, {"state": tree, "embeddings": tree})
        ckpt.save(1, {"state": tree})
        ckpt.save(2, {"state": tree, "embeddings": tree, "extra": tree})
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        for step, names in [(0, ["state", "embeddings"]), (1, ["state"]), (2, ["extra"])]:
            state: dict[str, Any] = dict.fromkeys(names)
            ckpt.restore(state, step)
            assert state == dict.fromkeys(names, tree)
        with pytest.raises(StateMismatchError, match="missing from the checkpoint: 'embeddings'"):
            ckpt.restore({"state": None, "embeddings": None}, 1)


def test_latest_step_restore(tmp_path: Path) -> None:
    """Ports test_latest_step_restore: saving every 2 steps over 0..5, the latest is step 4,
    and restoring it gives back the step number saved in the state."""
    with Checkpointer(tmp_path, every=2, keep_last=3, async_save=False) as ckpt:
        for step in range(6):
            ckpt.maybe_save(step, {**make_state(), "step": step})
    state: dict[str, Any] = {**make_state(seed=1), "step": None}
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        info = ckpt.restore(state)
    assert info is not None and info.step == 4 and state["step"] == 4


def test_read_only_manager(tmp_path: Path) -> None:
    """Ports test_existing_dir_doesnt_err_when_read_only, test_restore_works_normally_when_
    read_only, test_save_returns_false_when_read_only and test_delete_skipped_when_read_only.

    A reader opens a directory a writer holds, and restores from it. Differs by design in
    the refusals: Orbax's read-only `save` returns False and `delete` does nothing, quietly;
    haltpoint's reader raises, saying to open without read_only, and leaves the run as it was.
    """
    saved = make_state()
    with Checkpointer(tmp_path, async_save=False) as writer:
        writer.save(0, saved)
        with Checkpointer(tmp_path, read_only=True) as reader:
            state = make_state(seed=1)
            info = reader.restore(state, 0)
            assert info is not None
            assert torch.equal(state["params"].weight, saved["params"].weight)
            for refused in (lambda: reader.save(1, state), lambda: reader.pin(0)):
                with pytest.raises(CheckpointError, match="open it without read_only"):
                    refused()
            assert [i.step for i in reader.list()] == [0]


@pytest.mark.parametrize("how", ["wait", "save"], ids=["wait_until_finished", "subsequent_save"])
def test_async_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Ports test_async_error_wait_until_finished, test_async_error_subsequent_save and
    test_async_error_multiple_steps: a background write that fails is raised once, by the
    next `wait` or `save`, and then cleared; nothing of it is committed, and the steps saved
    before it (1 and 2 of max_to_keep=2) stay, as no retention ran for it."""
    import haltpoint.checkpointer as module

    state = make_state()
    with Checkpointer(tmp_path, keep_last=2) as ckpt:
        for step in range(3):
            ckpt.save(step, state)
        ckpt.wait()

        def broken(*args: Any, **kwargs: Any) -> None:
            raise OSError("injected write failure")

        monkeypatch.setattr(module, "write_checkpoint", broken)
        ckpt.save(3, state)
        with pytest.raises(OSError, match="injected write failure"):
            ckpt.wait() if how == "wait" else ckpt.save(4, state)
        ckpt.wait()  # cleared: not raised again
        assert [info.step for info in ckpt.list()] == [1, 2]
    assert step_folders(tmp_path) == [checkpoint_dirname(1), checkpoint_dirname(2)]


def test_preservation_joint_policy(tmp_path: Path) -> None:
    """Ports test_preservation_joint_policy: BestN(2, loss), EveryNSteps(4) and
    CustomSteps([0, 3]) combined keep 0, 1, 3, 4, 8, 11.

    haltpoint's retention is the union of its rules (docs/guide.md, section 2): keep_best=2,
    keep_every=4, and `pin` for the custom steps; its always-kept newest (11) is also a best.
    """
    losses = [5, 2, 4, 3, 7, 10, 11, 9, 8, 6, 12, 1]
    options: dict[str, Any] = {"monitor": "loss", "keep_best": 2, "keep_every": 4}
    state = make_state()
    with Checkpointer(tmp_path, async_save=False, **options) as ckpt:
        for step, loss in enumerate(losses):
            ckpt.save(step, state, {"loss": loss}, pin=step in (0, 3))
        assert [info.step for info in ckpt.list()] == [0, 1, 3, 4, 8, 11]


def test_save_preempted_incomplete_step_is_not_restored(tmp_path: Path) -> None:
    """Ports test_save_preempted_gcs: a step folder a preempted save left unfinished is not a
    checkpoint: asking for it is an error (CheckpointNotFoundError naming the step), it is
    not listed, and the next save commits beside it."""
    (tmp_path / checkpoint_dirname(0) / "subdir").mkdir(parents=True)
    with Checkpointer(tmp_path, read_only=True) as reader:
        with pytest.raises(CheckpointNotFoundError, match="step 0"):
            reader.restore(make_state(), 0)
        assert reader.list() == []
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, make_state())
        assert [info.step for info in ckpt.list()] == [1]


def test_should_save_with_older_step(tmp_path: Path) -> None:
    """Ports test_should_save_with_older_step; differs by design.

    Orbax's `should_save(5)` is False once any folder of step 10 exists, even an empty one.
    haltpoint counts only committed checkpoints (the directory is the truth, and a folder
    without a manifest is not a checkpoint): with only an empty folder of step 10, step 5 is
    saved; once step 10 is committed, saving step 5 is refused with StepBehindError, which
    says how to rewind, rather than skipped without a word.
    """
    (tmp_path / checkpoint_dirname(10)).mkdir()
    state = make_state()
    with Checkpointer(tmp_path, every=1, keep_last=5, async_save=False) as ckpt:
        assert ckpt.maybe_save(5, state) is not None
        ckpt.save(10, state)
        with pytest.raises(StepBehindError, match="older than step 10"):
            ckpt.maybe_save(7, state)
        assert [info.step for info in ckpt.list()] == [5, 10]
