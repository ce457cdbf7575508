"""The peers' checkpoint-manager test suites, ported to haltpoint's public API.

Each test is named after the peer case it ports: Lightning's `ModelCheckpoint`
(tests/tests_pytorch/checkpointing/test_model_checkpoint.py), the Hugging Face Trainer's
checkpointing (tests/trainer/test_trainer.py), ignite's `Checkpoint` (tests/ignite/handlers/
test_checkpoint.py) and Orbax's `CheckpointManager` (checkpoint_manager_test.py). Where
haltpoint deliberately differs, the test asserts haltpoint's documented behaviour and says why.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from haltpoint import (
    Checkpointer,
    CheckpointExistsError,
    CheckpointNotFoundError,
    StateMismatchError,
    UnsupportedStateError,
)
from haltpoint.store.run_dir import checkpoint_dirname


def make_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler}


def train_step(state: dict[str, Any]) -> None:
    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    optimizer.zero_grad()
    model(torch.randn(4, 3)).pow(2).sum().backward()
    optimizer.step()
    scheduler.step()


def run(directory: Path, values: list[float], **options: Any) -> list[int]:
    """Save one checkpoint per value of `val` (step = index); the steps kept, oldest first."""
    state = make_state()
    with Checkpointer(directory, async_save=False, **options) as ckpt:
        for step, value in enumerate(values):
            ckpt.save(step, state, {"val": value})
        return [info.step for info in ckpt.list()]


# -- PyTorch Lightning ModelCheckpoint ----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kept"),
    [("min", [1, 3, 5]), ("max", [0, 4, 5])],  # best two by mode, plus the newest (save_last)
)
def test_lightning_save_top_k_min_max_mode(tmp_path: Path, mode: str, kept: list[int]) -> None:
    values = [5.0, 1.0, 4.0, 2.0, 4.5, 3.0]
    assert run(tmp_path, values, monitor="val", mode=mode, keep_best=2, keep_last=1) == kept


def test_lightning_save_top_k_with_async_checkpoint_io(tmp_path: Path) -> None:
    # AsyncCheckpointIO: the same top-k once the background writes are done
    state = make_state()
    with Checkpointer(tmp_path, monitor="val", keep_best=2, async_save=True) as ckpt:
        for step, value in enumerate([5.0, 1.0, 4.0, 2.0, 4.5, 3.0]):
            train_step(state)
            ckpt.save(step, state, {"val": value})
        assert [i.step for i in ckpt.list()] == [1, 3, 5]


def test_lightning_save_top_k_best_model_path_and_score(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, monitor="val", mode="max", keep_best=1, async_save=False) as ckpt:
        for step, value in enumerate([0.2, 0.9, 0.5]):
            ckpt.save(step, state, {"val": value})
        best = ckpt.restore(state, "best")
    assert best is not None and best.step == 1 and best.metrics["val"] == 0.9
    assert Path(best.path).name == checkpoint_dirname(1)


def test_lightning_save_last_keeps_the_newest_whatever_its_score(tmp_path: Path) -> None:
    kept = run(tmp_path, [1.0, 2.0, 3.0, 4.0], monitor="val", keep_best=1, keep_last=1)
    assert kept == [0, 3]  # the best (step 0) and the last


def test_lightning_save_top_k_zero_keeps_only_last(tmp_path: Path) -> None:
    assert run(tmp_path, [3.0, 1.0, 2.0], keep_last=1) == [2]


def test_lightning_save_top_k_minus_one_keeps_all(tmp_path: Path) -> None:
    # haltpoint has no -1: "keep all" is keep_last larger than the run
    assert run(tmp_path, [3.0, 1.0, 2.0, 0.5], keep_last=100) == [0, 1, 2, 3]


def test_lightning_every_n_train_steps(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, every=3, keep_last=100, async_save=False) as ckpt:
        saved = [s for s in range(1, 11) if ckpt.maybe_save(s, state) is not None]
    assert saved == [3, 6, 9]  # Lightning: global_step % every_n_train_steps == 0


def test_lightning_every_n_epochs(tmp_path: Path) -> None:
    # Lightning saves when (current_epoch + 1) % n == 0, its epochs counted from 0; haltpoint's
    # step is the caller's number, so pass the epochs completed to save after epochs 2 and 4
    state = make_state()
    with Checkpointer(tmp_path, every=2, keep_last=100, async_save=False) as ckpt:
        saved = [e for e in range(1, 6) if ckpt.maybe_save(e, state) is not None]
    assert saved == [2, 4]


def test_lightning_every_n_train_steps_after_resume_keeps_the_grid(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, every=5, keep_last=100, async_save=False) as ckpt:
        saved = [s for s in range(1, 8) if ckpt.maybe_save(s, state) is not None]
    with Checkpointer(tmp_path, every=5, keep_last=100, async_save=False) as ckpt:
        info = ckpt.restore(state)
        assert info is not None
        saved += [s for s in range(info.step + 1, 16) if ckpt.maybe_save(s, state) is not None]
    assert saved == [5, 10, 15]  # the multiples of 5, not 5 steps after the resume


def test_lightning_resume_keeps_best_model_score_and_best_k_models(tmp_path: Path) -> None:
    options = {"monitor": "val", "keep_best": 2, "keep_last": 1, "async_save": False}
    state = make_state()
    with Checkpointer(tmp_path, **options) as ckpt:
        for step, value in enumerate([0.5, 0.2, 0.9]):
            ckpt.save(step, state, {"val": value})
    # the directory is the truth: a new Checkpointer sees the top-k the first one kept
    with Checkpointer(tmp_path, **options) as ckpt:
        assert ckpt.restore(state) is not None
        for step, value in [(3, 0.8), (4, 0.7)]:
            ckpt.save(step, state, {"val": value})
        assert [i.step for i in ckpt.list()] == [0, 1, 4]
        best = ckpt.restore(state, "best")
    assert best is not None and (best.step, best.metrics["val"]) == (1, 0.2)


def test_lightning_none_monitor_top_k(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"keep_best=2 needs monitor"):
        Checkpointer(tmp_path, keep_best=2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"monitor": "val", "keep_best": -1}, "keep_best must be an int >= 0, got -1"),
        ({"keep_last": 0}, "keep_last must be an int >= 1"),  # ignite n_saved >= 1 as well
        ({"monitor": "val", "mode": "unknown_option"}, "mode must be one of"),
    ],
)
def test_lightning_invalid_top_k_and_mode_options(
    tmp_path: Path, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Checkpointer(tmp_path, **options)


def test_lightning_resume_with_every_n_train_steps_keeps_best_model_score(tmp_path: Path) -> None:
    options: dict[str, Any] = {"monitor": "val", "keep_best": 1, "every": 100}
    state = make_state()
    with Checkpointer(tmp_path, async_save=False, **options) as ckpt:
        for step, value in [(1, 0.5), (2, 0.2), (3, 0.3)]:
            ckpt.maybe_save(step, state, {"val": value})
    with Checkpointer(tmp_path, async_save=False, **options) as ckpt:
        assert ckpt.restore(state) is not None
        # maybe_save's own "improved" trigger starts afresh in a new process (docs/guide.md,
        # section 8: the best it has seen), so 0.4 saves; what is best comes from the disk
        assert ckpt.maybe_save(4, state, {"val": 0.4}) is not None
        assert ckpt.maybe_save(5, state, {"val": 0.45}) is None
        assert [i.step for i in ckpt.list()] == [2, 4]  # the best of both runs, and the last
        best = ckpt.restore(state, "best")
    assert best is not None and (best.step, best.metrics["val"]) == (2, 0.2)


def test_lightning_monitor_missing_raises(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, monitor="val_loss", async_save=False) as ckpt:
        with pytest.raises(ValueError, match=r"no 'val_loss'.*\['train_loss'\]"):
            ckpt.save(0, state, {"train_loss": 1.0})
        assert ckpt.list() == []


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_lightning_nan_monitor_never_becomes_best(tmp_path: Path, bad: float) -> None:
    # Lightning ranks NaN as worst (test_invalid_top_k's torch.isnan guard, #2474)
    kept = run(tmp_path, [bad, 3.0, bad, 2.0, bad], monitor="val", keep_best=1, keep_last=1)
    assert kept == [3, 4]
    with Checkpointer(tmp_path, monitor="val", read_only=True) as ckpt:
        best = ckpt.restore(make_state(), "best")
    assert best is not None and best.step == 3


def test_lightning_nan_only_run_has_no_best(tmp_path: Path) -> None:
    run(tmp_path, [math.nan, math.nan], monitor="val", keep_best=1)
    ckpt = Checkpointer(tmp_path, monitor="val", read_only=True)
    with ckpt, pytest.raises(CheckpointNotFoundError):
        ckpt.restore(make_state(), "best")


@pytest.mark.parametrize(("mode", "values"), [("min", [8.0, 7.0, 5.0]), ("max", [5.0, 7.0, 8.0])])
def test_lightning_checkpointing_with_nan_as_first(
    tmp_path: Path, mode: str, values: list[float]
) -> None:
    run(tmp_path, [math.nan, *values], monitor="val", mode=mode, keep_best=1)
    with Checkpointer(tmp_path, monitor="val", mode=mode, read_only=True) as ckpt:
        best = ckpt.restore(make_state(), "best")
    assert best is not None and (best.step, best.metrics["val"]) == (3, values[-1])


def test_lightning_current_score_is_saved_with_each_checkpoint(tmp_path: Path) -> None:
    run(tmp_path, [0.1, 0.2, 0.3], monitor="val", keep_best=3)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert [i.metrics["val"] for i in ckpt.list()] == [0.1, 0.2, 0.3]


def test_lightning_model_checkpoint_score_and_ckpt_scheduler_state(tmp_path: Path) -> None:
    # each checkpoint holds the scheduler as it was at its save, after that epoch's step
    state = make_state()
    with Checkpointer(tmp_path, keep_last=3, async_save=False) as ckpt:
        for epoch in range(3):
            train_step(state)
            ckpt.save(epoch, state, {"val": float(epoch)})
    for epoch in range(3):
        fresh = make_state()
        with Checkpointer(tmp_path, read_only=True) as ckpt:
            ckpt.restore(fresh, epoch)
        assert fresh["scheduler"].state_dict()["_step_count"] == epoch + 2  # starts at 1
        assert fresh["optimizer"].param_groups[0]["lr"] == 0.1 * 0.5 ** ((epoch + 1) // 2)


def test_lightning_checkpoint_repeated_strategy(tmp_path: Path) -> None:
    # resuming from the best again and again, training nothing, writes and removes nothing
    run(tmp_path, [0.3, 0.1, 0.2], monitor="val", keep_best=1, keep_last=1)
    before = sorted(p.name for p in tmp_path.iterdir())
    for _ in range(3):
        with Checkpointer(tmp_path, monitor="val", keep_best=1, keep_last=1) as ckpt:
            info = ckpt.restore(make_state(), "best")
            assert info is not None and info.step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_lightning_filename_uniqueness(tmp_path: Path) -> None:
    # Lightning appends -v1, -v2 to a name taken; haltpoint names a folder by its step and
    # refuses a step already taken, so nothing is ever silently versioned or overwritten
    state = make_state()
    with Checkpointer(tmp_path, keep_last=5, async_save=False) as ckpt:
        ckpt.save(0, state, {"val": 1.0})
        ckpt.save(1, state, {"val": 1.0})
        with pytest.raises(CheckpointExistsError):
            ckpt.save(1, state, {"val": 0.5})
        names = [Path(i.path).name for i in ckpt.list()]
    assert names == [checkpoint_dirname(0), checkpoint_dirname(1)]


# -- Hugging Face Trainer -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "kept"),
    [
        ([0.1, 0.5, 0.6, 0.7, 0.8], [0, 4]),  # the best is the oldest: kept beside the newest
        ([0.8, 0.7, 0.6, 0.5, 0.1], [4]),  # the best is the newest: one checkpoint
        ([0.8, 0.1, 0.6, 0.7, 0.9], [1, 4]),  # in between
    ],
)
def test_transformers_save_total_limit_keeps_the_best_even_when_oldest(
    tmp_path: Path, values: list[float], kept: list[int]
) -> None:
    # _sorted_checkpoints with load_best_model_at_end: the best is never rotated out
    assert run(tmp_path, values, monitor="val", keep_best=1, keep_last=1) == kept


def test_transformers_rotate_checkpoints(tmp_path: Path) -> None:
    # save_total_limit=2 without a best: the two newest
    assert run(tmp_path, [1.0] * 5, keep_last=2) == [3, 4]


def test_transformers_resume_restores_optimizer_scheduler_rng_and_step(tmp_path: Path) -> None:
    """test_can_resume_training: straight through == saved, reloaded, continued."""
    straight = make_state()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    for _ in range(6):
        train_step(straight)
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    resumed = make_state()
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        for step in range(3):
            train_step(resumed)
            ckpt.save(step, resumed)
    fresh = make_state(seed=42)
    torch.manual_seed(99)  # the state the restore must replace
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        info = ckpt.restore(fresh)
    assert info is not None and info.step == 2  # the global step to go on from
    for _ in range(3):
        train_step(fresh)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws
    for a, b in zip(straight["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh["scheduler"].state_dict() == straight["scheduler"].state_dict()
    momentum = [s["momentum_buffer"] for s in fresh["optimizer"].state.values()]
    expected = [s["momentum_buffer"] for s in straight["optimizer"].state.values()]
    assert all(torch.equal(a, b) for a, b in zip(momentum, expected, strict=True))


def test_transformers_resume_from_a_given_checkpoint(tmp_path: Path) -> None:
    # resume_from_checkpoint=<path> picks that one, not the latest
    run(tmp_path, [1.0, 2.0, 3.0], keep_last=3)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        info = ckpt.restore(make_state(), 1)
        assert info is not None and info.step == 1
        # the Trainer would write checkpoint-2 over the old one; haltpoint never overwrites
        with pytest.raises(CheckpointExistsError, match="step 2"):
            ckpt.save(2, make_state())
        assert [i.step for i in ckpt.list()] == [0, 1, 2]


def test_transformers_resume_from_a_missing_checkpoint_raises(tmp_path: Path) -> None:
    # "Can't find a valid checkpoint at ...": haltpoint names the steps there are
    run(tmp_path, [1.0, 2.0], keep_last=3)
    ckpt = Checkpointer(tmp_path, read_only=True)
    with ckpt, pytest.raises(CheckpointNotFoundError, match=r"step 7.*0.*1"):
        ckpt.restore(make_state(), 7)


def test_transformers_save_best_checkpoint(tmp_path: Path) -> None:
    """test_save_best_checkpoint: save_strategy="best" saves only at a new best.

    The Trainer saves when `metric_for_best_model` strictly improves; `maybe_save` always
    saves at an improvement of `monitor`, so with an interval no run reaches it saves exactly
    there: evaluations 1, 2 and 4 of [0.5, 0.6, 0.55, 0.7, 0.7] (the tie at 0.7 is no gain).
    """
    state = make_state()
    options: dict[str, Any] = {"monitor": "accuracy", "mode": "max", "every": 10**9}
    with Checkpointer(tmp_path, keep_last=100, async_save=False, **options) as ckpt:
        values = [0.5, 0.6, 0.55, 0.7, 0.7]
        saved = [
            step
            for step, value in enumerate(values, start=1)
            if ckpt.maybe_save(step, state, {"accuracy": value}) is not None
        ]
        assert saved == [1, 2, 4]
        assert [i.step for i in ckpt.list()] == [1, 2, 4]


def test_transformers_save_best_checkpoint_metric_not_found(tmp_path: Path) -> None:
    """test_save_best_checkpoint: a metric_for_best_model the evaluation does not report is
    an error naming it and the metrics there were; nothing is saved."""
    options: dict[str, Any] = {"monitor": "accuracy", "mode": "max", "every": 10**9}
    with Checkpointer(tmp_path, async_save=False, **options) as ckpt:
        with pytest.raises(ValueError, match=r"no 'accuracy'.*\['loss'\]"):
            ckpt.maybe_save(1, make_state(), {"loss": 0.5})
        assert ckpt.list() == []


def test_transformers_resume_training_with_frozen_params(tmp_path: Path) -> None:
    """test_resume_training_with_frozen_params: with the first layer frozen (not in the
    optimizer), a resumed run ends where a straight run does, the frozen layer unchanged."""

    def build() -> dict[str, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
        model[0].requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return {"model": model, "optimizer": torch.optim.AdamW(trainable, lr=0.1)}

    def train(state: dict[str, Any], steps: int) -> None:
        for _ in range(steps):
            state["optimizer"].zero_grad()
            state["model"](torch.randn(4, 3)).pow(2).sum().backward()
            state["optimizer"].step()

    straight = build()
    frozen = [p.detach().clone() for p in straight["model"][0].parameters()]
    torch.manual_seed(1)
    train(straight, 4)

    first = build()
    torch.manual_seed(1)
    train(first, 2)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(2, first)
    resumed = build()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.restore(resumed)
    train(resumed, 2)
    pairs = zip(straight["model"].parameters(), resumed["model"].parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert all(
        torch.equal(a, b) for a, b in zip(resumed["model"][0].parameters(), frozen, strict=True)
    )


# -- ignite Checkpoint / ModelCheckpoint --------------------------------------------------


def test_ignite_checkpoint_with_score_function_n_saved(tmp_path: Path) -> None:
    # n_saved=2 with score_function keeps the two best; haltpoint's keep_last=1 (at least one,
    # for a resume) keeps the newest as well: the kept set is the union of the rules
    kept = run(tmp_path, [0.3, 0.9, 0.1, 0.8, 0.2], monitor="val", mode="max", keep_best=2)
    assert kept == [1, 3, 4]


def test_ignite_greater_or_equal_ties(tmp_path: Path) -> None:
    # ignite's greater_or_equal=True lets a later equal score replace an earlier one; haltpoint
    # keeps the earlier step on a tie (documented in policies.retention: the first to reach it)
    kept = run(tmp_path, [0.5, 0.5, 0.1], monitor="val", mode="max", keep_best=1)
    assert kept == [0, 2]


def test_ignite_include_self_state_survives_a_new_manager(tmp_path: Path) -> None:
    # include_self saves the handler's saved list; haltpoint rebuilds it from the directory
    run(tmp_path, [0.4, 0.1, 0.3], monitor="val", keep_best=1, keep_last=1)
    with Checkpointer(tmp_path, monitor="val", keep_best=1, async_save=False) as ckpt:
        assert [i.step for i in ckpt.list()] == [1, 2]
        ckpt.save(3, make_state(), {"val": 0.2})
        assert [i.step for i in ckpt.list()] == [1, 3]


def test_ignite_load_objects_strict(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": state["model"]})
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        with pytest.raises(StateMismatchError, match="optimizer"):
            ckpt.restore({"model": state["model"], "optimizer": state["optimizer"]})
        wanted = {"model": state["model"], "optimizer": state["optimizer"]}
        info = ckpt.restore(wanted, strict=False)
    assert info is not None and info.report is not None and "optimizer" in str(info.report)


def test_ignite_load_objects_a_subset_of_what_was_saved(tmp_path: Path) -> None:
    # to_load may name fewer objects than the checkpoint holds, strict or not
    state = make_state()
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state)
    model = torch.nn.Linear(3, 2)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        info = ckpt.restore({"model": model})
    assert info is not None and info.report is not None
    assert {"optimizer", "scheduler"} <= set(info.report.unexpected)
    assert torch.equal(model.weight, state["model"].weight)


def test_ignite_load_objects_strict_module_keys(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {"model": torch.nn.Linear(3, 2)})
    other = torch.nn.Sequential(torch.nn.Linear(3, 2))  # keys "0.weight", not "weight"
    with Checkpointer(tmp_path, read_only=True) as ckpt, pytest.raises(StateMismatchError):
        ckpt.restore({"model": other})


def test_ignite_filename_prefix_separates_runs(tmp_path: Path) -> None:
    # filename_prefix lets two handlers share a folder; haltpoint gives each run its directory
    run(tmp_path / "a", [1.0, 2.0], keep_last=2)
    run(tmp_path / "b", [1.0], keep_last=2)
    for name, steps in [("a", [0, 1]), ("b", [0])]:
        with Checkpointer(tmp_path / name, read_only=True) as ckpt:
            assert [i.step for i in ckpt.list()] == steps


def test_ignite_last_checkpoint(tmp_path: Path) -> None:
    run(tmp_path, [0.1, 0.5, 0.9], monitor="val", keep_best=1)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert ckpt.list()[-1].step == 2  # last_checkpoint: the newest, not the best
        info = ckpt.restore(make_state())
    assert info is not None and info.step == 2


def test_ignite_atomic_save_of_an_unsaveable_object_leaves_nothing(tmp_path: Path) -> None:
    # ignite saves an unpicklable object with atomic=True and finds no file left
    state = {**make_state(), "bad": object()}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(UnsupportedStateError, match=r"bad"):
            ckpt.save(0, state)
        assert ckpt.list() == []
    assert not (tmp_path / checkpoint_dirname(0)).exists()


def test_ignite_saved_state_is_complete(tmp_path: Path) -> None:
    state = make_state()
    train_step(state)
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, {**state, "epoch": 7, "note": ("a", None)})
    fresh = {**make_state(seed=3), "epoch": 0, "note": None}
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        ckpt.restore(fresh)
    assert fresh["epoch"] == 7 and fresh["note"] == ("a", None)
    assert fresh["optimizer"].state_dict()["state"].keys() == {0, 1}
    assert fresh["scheduler"].state_dict() == state["scheduler"].state_dict()
    pairs = zip(fresh["model"].parameters(), state["model"].parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


# -- Orbax CheckpointManager --------------------------------------------------------------


def test_orbax_max_to_keep(tmp_path: Path) -> None:
    assert run(tmp_path, [1.0] * 6, keep_last=3) == [3, 4, 5]


def test_orbax_keep_period(tmp_path: Path) -> None:
    assert run(tmp_path, [1.0] * 8, keep_last=2, keep_every=3) == [0, 3, 6, 7]


def test_orbax_best_fn_min_mode_with_max_to_keep(tmp_path: Path) -> None:
    # Orbax's best_fn + max_to_keep may evict the newest; haltpoint always keeps it too
    kept = run(tmp_path, [0.5, 0.2, 0.9, 0.1, 0.7], monitor="val", mode="min", keep_best=2)
    assert kept == [1, 3, 4]


def test_orbax_should_save_interval_steps(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, every=2, keep_last=100, async_save=False) as ckpt:
        saved = [s for s in range(0, 7) if ckpt.maybe_save(s, state) is not None]
    assert saved == [0, 2, 4, 6]  # should_save: step % save_interval_steps == 0


def test_orbax_should_save_not_twice_at_a_step(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, every=2, keep_last=100, async_save=False) as ckpt:
        assert ckpt.maybe_save(4, state) is not None
        assert ckpt.maybe_save(4, state) is None  # should_save: step > latest_step


def test_orbax_should_save_is_false_at_the_restored_step(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, every=5, keep_last=100, async_save=False) as ckpt:
        for step in range(1, 11):
            ckpt.maybe_save(step, state)
    with Checkpointer(tmp_path, every=5, keep_last=100, async_save=False) as ckpt:
        info = ckpt.restore(state)
        assert info is not None and info.step == 10
        assert ckpt.maybe_save(10, state) is None  # latest_step is 10: nothing to save
        assert ckpt.maybe_save(15, state) is not None


def test_orbax_keep_checkpoints_without_metrics(tmp_path: Path) -> None:
    # Orbax keeps a checkpoint without metrics beside best_fn's by default; haltpoint's
    # keep_best never ranks one, and only keep_last (or keep_every, a pin) keeps it
    state = make_state()
    with Checkpointer(tmp_path, monitor="val", keep_best=1, async_save=False) as ckpt:
        ckpt.save(0, state, {"val": 0.5})
        ckpt.save(1, state)
        ckpt.save(2, state, {"val": 0.9})
        ckpt.save(3, state)
        assert [i.step for i in ckpt.list()] == [0, 3]


def test_orbax_save_on_preemption(tmp_path: Path) -> None:
    # reached_preemption makes should_save true whatever the interval
    state = make_state()
    options: dict[str, Any] = {"every": 1000, "save_on_signal": signal.SIGUSR1}
    with Checkpointer(tmp_path, async_save=False, **options) as ckpt:
        assert ckpt.maybe_save(1, state) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert ckpt.preempted == "SIGUSR1"
        info = ckpt.maybe_save(2, state)
    assert info is not None and info.step == 2


def test_orbax_latest_step_all_steps(tmp_path: Path) -> None:
    state = make_state()
    with Checkpointer(tmp_path, keep_last=10) as ckpt:
        assert ckpt.list() == [] and ckpt.restore(state) is None  # latest_step() is None
        for step in (0, 2, 5):
            ckpt.save(step, state)
        assert [i.step for i in ckpt.list()] == [0, 2, 5]  # all_steps()
        assert ckpt.list()[-1].step == 5  # latest_step()


def test_orbax_interrupted_save_is_invisible(tmp_path: Path) -> None:
    run(tmp_path, [1.0, 2.0], keep_last=5)
    torn = tmp_path / checkpoint_dirname(2)  # step 2's files written, its manifest never
    shutil.copytree(tmp_path / checkpoint_dirname(1), torn)
    (torn / "manifest.json").unlink()
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        assert [i.step for i in ckpt.list()] == [0, 1]
        info = ckpt.restore(make_state())
    assert info is not None and info.step == 1


def test_orbax_reload_after_reopen(tmp_path: Path) -> None:
    run(tmp_path, [1.0, 2.0, 3.0], keep_last=2)
    with Checkpointer(tmp_path, keep_last=2, async_save=False) as ckpt:
        assert [i.step for i in ckpt.list()] == [1, 2]
        ckpt.save(3, make_state())
        assert [i.step for i in ckpt.list()] == [2, 3]


def test_orbax_reload_sees_what_another_manager_did(tmp_path: Path) -> None:
    state = make_state()
    with (
        Checkpointer(tmp_path, keep_last=2, async_save=False) as writer,
        Checkpointer(tmp_path, read_only=True) as reader,
    ):
        writer.save(0, state)
        assert [i.step for i in reader.list()] == [0]
        writer.save(1, state)
        writer.save(2, state)
        assert [i.step for i in reader.list()] == [1, 2]  # read from disk, not remembered
        shutil.rmtree(tmp_path / checkpoint_dirname(1))  # removed by hand
        assert [i.step for i in reader.list()] == [2]


def test_orbax_delete_unfinished_step_then_save_it(tmp_path: Path) -> None:
    run(tmp_path, [1.0, 2.0], keep_last=5)
    torn = tmp_path / checkpoint_dirname(2)
    shutil.copytree(tmp_path / checkpoint_dirname(1), torn)
    (torn / "manifest.json").unlink()
    with Checkpointer(tmp_path, read_only=True):
        assert torn.exists()  # a reader never removes anything
    state = make_state(seed=5)
    with Checkpointer(tmp_path, keep_last=5, async_save=False) as ckpt:
        assert not torn.exists()  # the writer removed the unfinished step at open
        ckpt.save(2, state)
    fresh = make_state(seed=6)
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        info = ckpt.restore(fresh)
        assert [i.step for i in ckpt.list()] == [0, 1, 2]
    assert info is not None and info.step == 2
    assert torch.equal(fresh["model"].weight, state["model"].weight)
