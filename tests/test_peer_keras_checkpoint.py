"""Keras' own checkpoint tests (keras/src/callbacks/model_checkpoint_test.py), ported.

Keras' `ModelCheckpoint` writes one file per epoch (or every `save_freq` batches) from
`model.fit`; here a loop saves the model with `Checkpointer.save` after each epoch, or calls
`maybe_save` after each batch with `every=` as `save_freq`. Keras' monolithic
`test_model_checkpoint_options` is split into one test per case it checks. Where haltpoint
differs by design, the case asserts haltpoint's documented behaviour and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer, load_best

NUM_CLASSES = 3
INPUT_DIM = 3


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(INPUT_DIM, 5), torch.nn.ReLU(), torch.nn.Linear(5, NUM_CLASSES)
    )


def set_weights_to(model: torch.nn.Module, value: float) -> None:
    """Marks the model with `value`, as Keras' tests mark a model with its epoch."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)


def test_model_checkpoint_options_creates_the_missing_subdirectory(tmp_path: Path) -> None:
    """Ports test_model_checkpoint_options (its setup): a file path in a missing subdirectory
    is created on the first save."""
    run = tmp_path / "subdir" / "run"
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(0, {"model": make_model()})
        assert [info.step for info in ckpt.list()] == [0]
    assert run.is_dir()


@pytest.mark.parametrize(
    ("monitor", "mode", "keep_best", "resolved"),
    [
        ("val_loss", "auto", 0, "min"),  # Case 1: save_best_only=False, mode="auto"
        ("val_loss", "min", 0, "min"),  # Case 2: mode="min"
        ("val_acc", "max", 0, "max"),  # Case 3: val_acc, mode="max"
        ("val_acc", "max", 1, "max"),  # Case 4: save_best_only=True
        ("val_acc", "auto", 1, "max"),  # Case 11's val_acc under mode="auto"
    ],
)
def test_model_checkpoint_options_one_epoch_writes_a_checkpoint(
    tmp_path: Path, monitor: str, mode: str, keep_best: int, resolved: str
) -> None:
    """Ports test_model_checkpoint_options, Cases 1-4: one epoch leaves one checkpoint, with
    the direction each monitor and mode resolve to (Keras' "auto": `acc` is maximized)."""
    metrics = {"val_loss": 0.9, "val_acc": 0.4}
    with Checkpointer(tmp_path, monitor=monitor, mode=mode, keep_best=keep_best) as ckpt:
        assert ckpt.mode == resolved
        ckpt.save(0, {"model": make_model()}, metrics)
        assert [info.step for info in ckpt.list()] == [0]


def batches_saved(tmp_path: Path, every: int, batches_per_epoch: int, epochs: int) -> list[Any]:
    """(epoch, batch) numbered from 1, as in Keras' file names, of each save `every=` makes
    when `maybe_save` is called after every batch with the global batch count."""
    model = make_model()
    saved = []
    with Checkpointer(tmp_path, every=every, keep_last=1000, async_save=False) as ckpt:
        for epoch in range(1, epochs + 1):
            for batch in range(1, batches_per_epoch + 1):
                global_batch = (epoch - 1) * batches_per_epoch + batch
                if ckpt.maybe_save(global_batch, {"model": model}) is not None:
                    saved.append((epoch, batch))
        assert len(ckpt.list()) == len(saved)
    return saved


def test_model_checkpoint_options_integer_save_freq(tmp_path: Path) -> None:
    """Ports test_model_checkpoint_options, Case 8a: save_freq=15 with 5 batches an epoch
    saves at the end of epochs 3, 6 and 9 of 10 (the count runs across epochs)."""
    assert batches_saved(tmp_path, every=15, batches_per_epoch=5, epochs=10) == [
        (3, 5),
        (6, 5),
        (9, 5),
    ]


def test_model_checkpoint_options_save_with_batch_in_filename(tmp_path: Path) -> None:
    """Ports test_model_checkpoint_options, Case 10a: save_freq=1 saves after every batch,
    each (epoch, batch) once: 5 epochs of 2 batches are 10 checkpoints."""
    saved = batches_saved(tmp_path, every=1, batches_per_epoch=2, epochs=5)
    assert saved == [(epoch, batch) for epoch in range(1, 6) for batch in (1, 2)]


@pytest.mark.parametrize("entry_only", [False, True], ids=["model", "weights_only"])
def test_model_checkpoint_loading(tmp_path: Path, entry_only: bool) -> None:
    """Ports test_model_checkpoint_loading: the best checkpoint (save_best_only, val_loss,
    mode="auto") loads into a new model with the saved weights.

    Keras loads the whole model (`saving.load_model`) or its weights (`load_weights`); here
    `restore(..., "best")` loads the model entry of the run's state, and `load_best` loads
    one entry into a bare module.
    """
    model = make_model()
    with Checkpointer(tmp_path, monitor="val_loss", mode="auto", keep_best=1) as ckpt:
        for epoch, loss in enumerate([0.8, 0.5, 0.6]):
            set_weights_to(model, float(epoch))
            ckpt.save(epoch, {"model": model, "epoch": epoch}, {"val_loss": loss})
    new = make_model(seed=1)
    if entry_only:
        info = load_best(tmp_path, new, monitor="val_loss")
    else:
        state: dict[str, Any] = {"model": new, "epoch": None}
        with Checkpointer(tmp_path, monitor="val_loss", read_only=True) as reader:
            info = reader.restore(state, "best")
        assert state["epoch"] == 1
    assert info is not None and info.step == 1
    assert all(torch.all(parameter == 1.0) for parameter in new.parameters())


def test_model_checkpoint_options_metric_not_available(tmp_path: Path) -> None:
    """Ports test_model_checkpoint_options, Case 5: with monitor="unknown" and save_best_only,
    Keras warns and writes no file. Differs by design (a metric that is missing names the keys
    that were there, DESIGN.md): the save is refused with a ValueError naming them, and
    nothing is written."""
    with Checkpointer(tmp_path, monitor="unknown", keep_best=1, async_save=False) as ckpt:
        with pytest.raises(ValueError, match=r"no 'unknown'.*\['val_acc', 'val_loss'\]"):
            ckpt.save(0, {"model": make_model()}, {"val_loss": 0.9, "val_acc": 0.4})
        assert ckpt.list() == []
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_model_checkpoint_options_unknown_mode(tmp_path: Path) -> None:
    """Ports test_model_checkpoint_options, Case 6: Keras warns "mode 'unknown' is unknown"
    and falls back to "auto". Differs by design (no silent fallbacks, docs STYLE): the mode
    is refused with a ValueError naming it and what is allowed, before any folder is made."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"mode must be one of.*'unknown'"):
        Checkpointer(run, monitor="val_acc", keep_best=1, mode="unknown")
    assert not run.exists()


@pytest.mark.parametrize("every", [1, 3, 15, "30s", "auto"])
def test_model_checkpoint_options_valid_save_freq(tmp_path: Path, every: Any) -> None:
    """Ports test_model_checkpoint_options, Case 9 (valid values): an integer save_freq and
    its time-based and automatic counterparts are accepted (Keras' "epoch" is a plain save
    after each epoch, no interval)."""
    Checkpointer(tmp_path, every=every).close()


@pytest.mark.parametrize("every", ["invalid_save_freq", 0, -3])
def test_model_checkpoint_options_invalid_save_freq(tmp_path: Path, every: Any) -> None:
    """Ports test_model_checkpoint_options, Case 9: an unrecognized save_freq is a ValueError
    naming it, raised before the run directory is created."""
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=repr(every) if isinstance(every, str) else str(every)):
        Checkpointer(run, every=every)
    assert not run.exists()
