"""ignite's own checkpoint tests (tests/ignite/handlers/test_checkpoint.py), ported.

Cases not already in tests/test_peer_checkpoint_ports.py. ignite's `Checkpoint` saves the
objects of `to_save` through a save handler and ranks them by a `score_function`; here the
objects are a `Checkpointer`'s state and the score is the monitored metric (ignite always
maximizes, so `mode="max"`). haltpoint's `keep_last` is at least 1, so the newest checkpoint is
kept beside ignite's `n_saved` best. Where haltpoint differs by design, the case asserts
haltpoint's documented behaviour and says so.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import (
    Checkpointer,
    EarlyStopping,
    StateMismatchError,
    StepBehindError,
    UnsupportedStateError,
)
from haltpoint.store.run_dir import checkpoint_dirname


class DummyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(1, 1)


class DummyPretrainedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Linear(4, 2, bias=False)
        self.fc = torch.nn.Linear(2, 1)


def kept_by_score(directory: Path, scores: list[float], keep_best: int) -> list[int]:
    """Save one checkpoint per score (step = index), ranked by it; the steps kept."""
    state = {"model": DummyModel()}
    options: dict[str, Any] = {"monitor": "score", "mode": "max", "keep_best": keep_best}
    with Checkpointer(directory, async_save=False, **options) as ckpt:
        for step, score in enumerate(scores):
            ckpt.save(step, state, {"score": score})
        return [info.step for info in ckpt.list()]


@pytest.mark.parametrize("state", [12, [12]], ids=["int", "list"])
def test_checkpoint_wrong_input(tmp_path: Path, state: Any) -> None:
    """Ports test_checkpoint_wrong_input: `to_save` must be a dictionary."""
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(TypeError, match="state must be a mapping of names to objects"):
            ckpt.save(0, state)
        assert ckpt.list() == []


def test_checkpoint_score_function_wrong_output(tmp_path: Path) -> None:
    """Ports test_checkpoint_score_function_wrong_output: a score that is not a number is
    refused, naming the metric, and nothing is saved."""
    with Checkpointer(tmp_path, monitor="acc", mode="max", keep_best=1) as ckpt:
        with pytest.raises(TypeError, match=r"metrics\['acc'\] must be a number.*got dict"):
            ckpt.save(0, {"model": DummyModel()}, {"acc": {"1": 1}})
        assert ckpt.list() == []


@pytest.mark.parametrize(
    ("scores", "keep_best", "kept"),
    [
        ([1.2, -2.0, 3.1, -4.0], 2, [0, 2, 3]),  # test_best_k: 1.2 and 3.1, and the newest
        ([-0.77, -0.76], 1, [1]),  # test_checkpoint_with_score_name_and_function
        ([0.3456789, 0.1234, 0.4567, 0.134567], 2, [0, 2, 3]),  # test_best_k_with_suffix
    ],
    ids=["best_k", "negative_scores", "best_k_with_suffix"],
)
def test_best_k(tmp_path: Path, scores: list[float], keep_best: int, kept: list[int]) -> None:
    """Ports test_best_k, test_checkpoint_with_score_name_and_function and
    test_best_k_with_suffix: negative scores rank as numbers (-0.76 beats -0.77), and the
    two best are kept beside the newest."""
    assert kept_by_score(tmp_path, scores, keep_best) == kept


def test_removes_each_score_at_most_once(tmp_path: Path) -> None:
    """Ports test_removes_each_score_at_most_once: tied scores [0, 1, 1, 2, 3] with
    n_saved=2 evict without error, and the two best remain."""
    assert kept_by_score(tmp_path, [0, 1, 1, 2, 3], keep_best=2) == [3, 4]


def test_checkpoint_with_int_score(tmp_path: Path) -> None:
    """Ports test_checkpoint_with_int_score: an int score (the epoch) ranks the checkpoints;
    haltpoint records metrics as floats."""
    with Checkpointer(tmp_path, monitor="epoch", mode="max", keep_best=1) as ckpt:
        for step, epoch in [(0, 1), (1, 12)]:
            ckpt.save(step, {"model": DummyModel()}, {"epoch": epoch})
        [info] = ckpt.list()
    assert info.step == 1 and info.metrics["epoch"] == 12


def test_checkpoint_with_dp(tmp_path: Path) -> None:
    """Ports test_checkpoint_with_dp: a DataParallel model is saved as its module, so its
    checkpoint loads into the bare model and into another DataParallel wrapper."""
    model = DummyModel()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": torch.nn.DataParallel(model)})
    bare, wrapped = DummyModel(), torch.nn.DataParallel(DummyModel())
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        ckpt.restore({"model": bare})
        ckpt.restore({"model": wrapped})
    for loaded in (bare, wrapped.module):
        assert torch.equal(loaded.net.weight, model.net.weight)


def test_model_checkpoint_simple_recovery_from_existing_non_empty(tmp_path: Path) -> None:
    """Ports test_model_checkpoint_simple_recovery_from_existing_non_empty: files of someone
    else in the directory stay, whatever retention removes of its own checkpoints."""
    (tmp_path / "PREFIX_obj_1.txt").write_text("test")
    (tmp_path / "PREFIX_obj_1.pt").write_text("test")
    (tmp_path / "notes").mkdir()
    model = DummyModel()
    with Checkpointer(tmp_path, keep_last=1, async_save=False) as ckpt:
        for step in range(3):
            ckpt.save(step, {"model": model})
    names = {path.name for path in tmp_path.iterdir()}
    assert {"PREFIX_obj_1.txt", "PREFIX_obj_1.pt", "notes", checkpoint_dirname(2)} <= names
    assert not {checkpoint_dirname(0), checkpoint_dirname(1)} & names
    assert (tmp_path / "PREFIX_obj_1.pt").read_text() == "test"


def test_load_checkpoint_with_different_num_classes(tmp_path: Path) -> None:
    """Ports test_load_checkpoint_with_different_num_classes; differs by design.

    ignite loads a whole-model checkpoint into `model.features` under another name and raises
    RuntimeError when strict; with strict=False it loads the keys that match (none do).
    haltpoint matches entries by name: strict, the name the checkpoint lacks is a
    StateMismatchError naming it; strict=False loads nothing into it and reports both sides.
    """
    model = DummyPretrainedModel()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": model})
    features = DummyPretrainedModel().features
    before = features.weight.detach().clone()
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(StateMismatchError, match="missing from the checkpoint: 'pretrained"):
            ckpt.restore({"pretrained_features": features})
        info = ckpt.restore({"pretrained_features": features}, strict=False)
    assert info is not None and info.report is not None
    assert info.report.missing == ["pretrained_features"]
    assert info.report.unexpected == ["model"]
    assert torch.equal(features.weight, before)


def test_valid_state_dict_save(tmp_path: Path) -> None:
    """Ports test_valid_state_dict_save and test_checkpoint_load_objects ({"a": None});
    differs by design.

    ignite refuses an object without `state_dict` (`{"name": 42}`) and one without
    `load_state_dict` at load. haltpoint's state holds JSON-able values beside such objects
    (DESIGN.md): 42 is saved, and restored into the mapping in place of what was there.
    """
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"name": 42, "model": DummyModel()})
    state: dict[str, Any] = {"name": None, "model": DummyModel()}
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        ckpt.restore(state)
    assert state["name"] == 42


def test_save_model_optimizer_lr_scheduler_with_validation(tmp_path: Path) -> None:
    """Ports test_save_model_optimizer_lr_scheduler_with_validation.

    A run saves the trainer's epoch, model, optimizer, scheduler and early stopper after each
    validation (accuracy 0.2, 0.3, 0.2; patience 2), keeping one checkpoint. A new process
    with fresh objects restores it and trains on (accuracy 0.1 from then on): the restored
    stopper stops at epoch 4, and retention still keeps only the newest checkpoint.
    """

    def build() -> dict[str, Any]:
        torch.manual_seed(23)
        model = DummyModel()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
        stopper = EarlyStopping("accuracy", mode="max", patience=2)
        return {"model": model, "optimizer": optimizer, "scheduler": scheduler,
                "stopper": stopper, "epoch": 0}  # fmt: skip

    def train(state: dict[str, Any], accuracies: list[float], max_epochs: int) -> None:
        model, optimizer = state["model"], state["optimizer"]
        with Checkpointer(tmp_path, keep_last=1, async_save=False) as ckpt:
            ckpt.restore(state)
            for epoch in range(state["epoch"] + 1, max_epochs + 1):
                optimizer.zero_grad()
                model.net(torch.rand(4, 1)).pow(2.0).sum().backward()
                optimizer.step()
                state["scheduler"].step()
                state["epoch"] = epoch
                decision = state["stopper"].step({"accuracy": accuracies[epoch - 1]})
                ckpt.save(epoch, state, {"accuracy": accuracies[epoch - 1]})
                if decision:
                    break

    first = build()
    train(first, [0.2, 0.3, 0.2], max_epochs=3)
    second = build()
    with Checkpointer(tmp_path, read_only=True) as reader:
        info = reader.restore(second)
    assert info is not None and info.step == 3 and second["epoch"] == 3
    for name in ("model", "optimizer", "scheduler", "stopper"):
        assert str(second[name].state_dict()) == str(first[name].state_dict()), name

    train(second, [0.2, 0.3, 0.2, 0.1, 0.1, 0.1], max_epochs=6)
    assert second["epoch"] == 4 and second["stopper"].stopped
    with Checkpointer(tmp_path, read_only=True) as reader:
        assert [info.step for info in reader.list()] == [4]


@pytest.mark.parametrize(
    ("iterations", "epochs", "kept"),
    [(1, 9, [7, 8]), (2, 4, [6, 8])],
    ids=["last_k", "with_engine"],
)
def test_last_k(tmp_path: Path, iterations: int, epochs: int, kept: list[int]) -> None:
    """Ports test_last_k (n_saved=2 over iterations 0..8 keeps 7 and 8) and test_with_engine
    (n_saved=2, a save at the end of each of 4 epochs of 2 iterations keeps 6 and 8)."""
    state = {"model": DummyModel()}
    with Checkpointer(tmp_path, keep_last=2, async_save=False) as ckpt:
        for epoch in range(1, epochs + 1):
            step = epoch * iterations if iterations > 1 else epoch - 1
            ckpt.save(step, state)
        assert [info.step for info in ckpt.list()] == kept
    assert [p.name for p in sorted(tmp_path.iterdir()) if p.is_dir()] == [
        checkpoint_dirname(step) for step in kept
    ]


def test_disk_saver_atomic_files_are_readable_by_others(tmp_path: Path) -> None:
    """Ports test_disk_saver_atomic's file-mode check (ignite #1876: an atomic save through a
    temporary file left the checkpoint readable by its owner only): under umask 022 every file
    of a committed checkpoint is readable by owner, group and others."""
    old = os.umask(0o022)
    try:
        with Checkpointer(tmp_path, async_save=False) as ckpt:
            info = ckpt.save(0, {"model": DummyModel()})
    finally:
        os.umask(old)
    files = [p for p in Path(info.path).rglob("*") if p.is_file()]
    assert files
    for path in files:
        mode = stat.filemode(path.stat().st_mode)
        assert [mode[1], mode[4], mode[7]] == ["r", "r", "r"], (path.name, mode)


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"model": [DummyModel(), DummyModel()]}, r'state\["model"\]\[0\]'),
        ({"model": {"a": {"b": DummyModel()}}}, r'state\["model"\]\["a"\]\["b"\]'),
    ],
    ids=["list", "nested_dict"],
)
def test_checkpoint_setup_checkpoint_nested(tmp_path: Path, state: Any, path: str) -> None:
    """Ports test_checkpoint__setup_checkpoint and test_checkpoint_load_objects (nested
    objects); differs by design.

    ignite saves `{"model": [m1, m2]}` and `{"model": {"a": {"b": m}}}` as the state dicts of
    the objects inside. haltpoint keeps objects with `state_dict()` at the top level of the
    state, each under its own name (docs/guide.md, section 2): a nested one is refused at
    save time, naming its path and the remedy, and nothing is written.
    """
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(UnsupportedStateError, match=path + r".*give it its own name"):
            ckpt.save(0, state)
        flat = {f"model_{i}": DummyModel() for i in range(2)}
        ckpt.save(0, flat)  # the same objects, each under its own name
        assert [info.step for info in ckpt.list()] == [0]


class Counter:
    """An object with state_dict(), as ignite's Engine: its state is plain numbers."""

    def __init__(self) -> None:
        self.epoch, self.iteration = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.iteration = state["epoch"], state["iteration"]


@pytest.mark.parametrize("obj_to_save", ["optim", "trainer"])
def test_load_single_object(tmp_path: Path, obj_to_save: str) -> None:
    """Ports test_load_single_object (ignite #2479): a checkpoint of one object alone, an
    optimizer over a bare tensor or the trainer's counters, loads back into a fresh one."""
    if obj_to_save == "optim":
        t = torch.tensor(0.0, requires_grad=True)
        obj: Any = torch.optim.SGD([t], lr=0.1, momentum=0.9)
        t.grad = torch.tensor(1.0)
        obj.step()
        fresh: Any = torch.optim.SGD([torch.tensor(0.0, requires_grad=True)], lr=0.5)
    else:
        obj, fresh = Counter(), Counter()
        obj.epoch, obj.iteration = 3, 30
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {obj_to_save: obj})
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        ckpt.restore({obj_to_save: fresh})
    assert str(fresh.state_dict()) == str(obj.state_dict())


def test_checkpoint_reset_with_engine(tmp_path: Path) -> None:
    """Ports test_checkpoint_reset_with_engine; differs by design.

    ignite's `reset()` forgets what it saved, and a second run from epoch 1 in the same folder
    writes steps 2 and 4 beside 18 and 20. haltpoint's steps only go forward in a run: saving
    step 2 after step 20 is refused with StepBehindError, which names the latest and how to
    rewind (restore an older step first), and the run is left as it was.
    """
    state = {"model": DummyModel()}
    with Checkpointer(tmp_path, keep_last=2, async_save=False) as ckpt:
        for epoch in range(1, 11):
            ckpt.save(epoch * 2, state)
    with Checkpointer(tmp_path, keep_last=2, async_save=False) as ckpt:
        with pytest.raises(StepBehindError, match=r"older than step 20.*rewind"):
            ckpt.save(2, state)
        assert [info.step for info in ckpt.list()] == [18, 20]
        ckpt.restore(state, 18)  # a rewind: the steps saved from here on go after 18
        ckpt.save(19, state)
        assert 19 in [info.step for info in ckpt.list()]
