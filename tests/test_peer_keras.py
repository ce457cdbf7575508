"""Keras' own early-stopping tests (keras/src/callbacks/early_stopping_test.py), ported.

Also `test_min_delta` of monitor_callback_test.py (`MonitorCallback`, EarlyStopping's base
class); its mode table repeats early_stopping_test.py's and is ported once.

Keras drives its callback with epoch-end logs; here each log is one `EarlyStopping.step()`.
Where haltpoint differs by design (docs/stopping.md, "Point by point"), the case asserts
haltpoint's documented behaviour and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from haltpoint import Checkpointer, EarlyStopping, StopReason


def stop_index(stopper: EarlyStopping, values: list[float], key: str | None = None) -> int | None:
    """The evaluation at which `stopper` stops on `values`, or None."""
    for i, value in enumerate(values):
        if stopper.step(value if key is None else {key: value}):
            return i
    return None


@pytest.mark.parametrize(
    ("mode", "monitor", "expected"),
    [
        ("max", "val_mse", "max"),
        ("min", "val_loss", "min"),
        ("auto", "val_mse", "min"),
        ("auto", "loss", "min"),
        ("auto", "acc", "max"),
        ("auto", "val_accuracy", "max"),
        ("auto", "hinge", "min"),
        ("auto", "f1_score", "max"),
    ],
)
def test_mode_resolution(mode: str, monitor: str, expected: str) -> None:
    """Ports test_early_stopping (its mode/monitor table): the direction each name resolves to."""
    assert EarlyStopping(monitor, mode=mode, patience=0).mode == expected


def test_unknown_monitor_in_auto_mode_is_refused() -> None:
    """Ports test_early_stopping (monitor="unknown" raises ValueError); here at construction."""
    with pytest.raises(ValueError, match="unknown"):
        EarlyStopping("unknown", mode="auto", patience=0)


def test_f1_score_logged_as_a_one_element_array() -> None:
    """Ports test_early_stopping's F1Score metric, which Keras logs as a 1-D array of one."""
    stopper = EarlyStopping("f1_score", mode="auto", patience=0)
    assert not stopper.step({"f1_score": np.array([0.5], dtype=np.float32)})
    assert stopper.step({"f1_score": np.array([0.25], dtype=np.float32)})
    assert stopper.best == 0.5


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_patience(patience: int) -> None:
    """Ports test_early_stopping_patience: stops at epoch max(patience, 1) + 2."""
    losses = [10.0, 9.0, 8.0, 9.0, 8.9, 8.8, 8.7, 8.6, 8.5]
    stopper = EarlyStopping("loss", patience=patience)
    assert stop_index(stopper, losses, "loss") == max(patience, 1) + 2


def test_reuse_across_fits() -> None:
    """Ports test_early_stopping_reuse: after reset() a second fit again runs >= patience."""
    stopper = EarlyStopping("mse", patience=3)
    flat = [0.25] * 20
    first = stop_index(stopper, flat, "mse")
    assert first is not None and first + 1 >= 3
    stopper.reset()
    assert not stopper.stopped and stopper.evaluations == 0
    second = stop_index(stopper, flat, "mse")
    assert second == first


def test_reuse_across_models_forgets_the_best() -> None:
    """Ports test_early_stopping_reuse_across_models (Keras #20256): reset() forgets the best."""
    stopper = EarlyStopping("loss", patience=5)
    stop_index(stopper, [0.1, 0.05, 0.01] + [0.02] * 10, "loss")
    stopper.reset()
    assert stopper.best is None
    # A new model whose losses are all worse than the old best still trains past the patience.
    new_model = [0.7, 0.6, 0.5, 0.45, 0.4, 0.38, 0.36, 0.35]
    assert stop_index(stopper, new_model, "loss") is None
    assert stopper.best == 0.35


def test_baseline_run_lasts_at_least_patience() -> None:
    """Ports test_early_stopping_with_baseline: one never beating the baseline lasts patience."""
    stopper = EarlyStopping("mse", patience=3, baseline=0.6)
    index = stop_index(stopper, [0.9, 0.85, 0.8, 0.75, 0.7, 0.65] * 3, "mse")
    assert index is not None and index + 1 >= 3
    assert stopper.code is StopReason.BASELINE


def test_best_weights_are_those_of_the_best_epoch() -> None:
    """Ports test_early_stopping_final_weights_when_restoring_model_weights (patience=2 case)."""
    stopper = EarlyStopping("val_loss", patience=2)
    assert stop_index(stopper, [0.2, 0.15, 0.1, 0.11, 0.12], "val_loss") == 4
    assert stopper.best_step == 2


def test_baseline_never_beaten_stops_after_patience_and_keeps_the_best() -> None:
    """Ports ...restoring_model_weights (baseline=0.5, patience=5): 5 epochs, best epoch 2."""
    stopper = EarlyStopping("val_loss", patience=5, baseline=0.5)
    index = stop_index(stopper, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], "val_loss")
    assert index == 4  # five evaluations, as Keras trains five epochs
    assert stopper.code is StopReason.BASELINE
    assert stopper.best_step == 2


def test_stop_requested_elsewhere_keeps_the_best() -> None:
    """Ports ...restoring_model_weights (another callback stops at epoch 3): best epoch 2."""
    stopper = EarlyStopping("val_loss", patience=5, baseline=0.5)
    for value in [0.9, 0.8, 0.7, 0.71]:  # the loop is stopped by someone else after epoch 3
        assert not stopper.step({"val_loss": value})
    assert stopper.best_step == 2
    assert not stopper.stopped


def test_start_from_epoch_with_patience() -> None:
    """Ports test_early_stopping_with_start_from_epoch; differs by design (warmup counts).

    Keras forgets the first `start_from_epoch` epochs, so a flat run lasts patience +
    start_from_epoch + 1 epochs. haltpoint's `warmup` tracks the best and the wait during warmup
    (docs/stopping.md, "warmup"): with warmup 2 < patience 3 a flat run stops where it would
    without warmup, after patience + 1 evaluations.
    """
    stopper = EarlyStopping("mse", patience=3, warmup=2)
    assert stop_index(stopper, [0.5] * 20, "mse") == 3


def test_start_from_epoch_with_zero_patience() -> None:
    """Ports test_early_stopping_with_start_from_epoch (patience=0): runs >= start_from_epoch."""
    stopper = EarlyStopping("mse", patience=0, warmup=2)
    index = stop_index(stopper, [0.5] * 20, "mse")
    assert index is not None and index + 1 >= 2


@pytest.mark.parametrize(
    ("best", "value", "improved"),
    [(0.0, 0.75, True), (None, 0.5, True), (0.0, 0.5, False), (0.5, 0.2, False)],
)
def test_min_delta_is_a_strict_margin(best: float | None, value: float, improved: bool) -> None:
    """Ports monitor_callback_test.py test_min_delta (EarlyStopping's base, max mode, 0.5).

    The first value is always an improvement; later ones must beat the best by more than
    min_delta (0.5 over 0.0 is not enough).
    """
    stopper = EarlyStopping(mode="max", patience=5, min_delta=0.5)
    if best is not None:
        stopper.step(best)
    assert stopper.step(value).improved is improved


@pytest.mark.parametrize(
    ("kwargs", "losses", "stop_after", "epochs_trained"),
    [
        ({"patience": 2}, [0.2, 0.15, 0.1, 0.11, 0.12], None, 5),
        ({"patience": 5, "baseline": 0.5}, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], None, 5),
        ({"patience": 5, "baseline": 0.5}, [0.9, 0.8, 0.7, 0.71, 0.72, 0.73], 3, 4),
    ],
    ids=["patience", "baseline_never_beaten", "stopped_by_another_callback"],
)
def test_final_weights_when_restoring_model_weights(
    tmp_path: Path,
    kwargs: dict[str, Any],
    losses: list[float],
    stop_after: int | None,
    epochs_trained: int,
) -> None:
    """Ports test_early_stopping_final_weights_when_restoring_model_weights, weights and all.

    Keras' `restore_best_weights=True` keeps the best epoch's weights in memory; haltpoint
    keeps them on disk (`keep_best=1`) and `restore(state, "best")` brings them back however
    the loop ended: stopped by the stopper, by another callback, or never beating the
    baseline. The model's weights are set to the epoch number, as Keras' DummyModel does.
    """
    model = torch.nn.Linear(1, 1)
    stopper = EarlyStopping("val_loss", **kwargs)
    trained = 0
    with Checkpointer(tmp_path, monitor="val_loss", keep_best=1, async_save=False) as ckpt:
        for epoch, loss in enumerate(losses):
            trained += 1
            with torch.no_grad():
                model.weight.fill_(epoch)
            decision = stopper.step({"val_loss": loss})
            ckpt.save(epoch, {"model": model}, {"val_loss": loss})
            if decision or epoch == stop_after:
                break
        ckpt.restore({"model": model}, "best")
    assert trained == epochs_trained
    assert model.weight.item() == 2.0
