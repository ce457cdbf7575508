"""Lightning's own early-stopping tests (tests_pytorch/callbacks/test_early_stopping.py), ported.

Each case runs `haltpoint.integrations.lightning.HaltpointCallback` inside a real
`lightning.pytorch.Trainer` on CPU (Lightning's `BoringModel`, two training batches and one
validation batch an epoch), the monitored values scripted per epoch as in Lightning's tests.
The two-process cases run in tests/workers/peer_lightning_ddp_worker.py, launched once with
torchrun on two gloo ranks. Also ports trainer/test_trainer.py's early-stopping case.
Where haltpoint differs by design (docs/stopping.md, docs/integrations.md), the case asserts
haltpoint's documented behaviour and says so.
"""

from __future__ import annotations

import logging
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402

from haltpoint import Divergence, EarlyStopping, StopReason, Target  # noqa: E402
from haltpoint.integrations.lightning import HaltpointCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from torchrun import rank_results, torchrun  # noqa: E402


class Scripted(BoringModel):  # type: ignore[misc]
    """Logs `values[current_epoch]` (the last one after the end) under `name` at validation end."""

    def __init__(self, values: list[Any], name: str = "val_loss") -> None:
        super().__init__()
        self.values = values
        self.name = name

    def on_validation_epoch_end(self) -> None:
        value = self.values[min(self.current_epoch, len(self.values) - 1)]
        self.log(self.name, torch.as_tensor(value, dtype=torch.float32))


def fit(model: Any, callbacks: list[Any], tmp_path: Path, **kwargs: Any) -> Any:
    settings: dict[str, Any] = {
        "max_epochs": 10,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "default_root_dir": str(tmp_path),
    }
    settings.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **settings)
    trainer.fit(model)
    return trainer


@pytest.mark.parametrize(
    ("losses", "patience", "stop_epoch"),
    [([6, 5, 5, 5, 5, 5], 3, 4), ([6, 5, 4, 4, 3, 3], 1, 3), ([6, 5, 6, 5, 5, 5], 3, 4)],
)
def test_patience(tmp_path: Path, losses: list[int], patience: int, stop_epoch: int) -> None:
    """Ports test_early_stopping_patience: not stopped before the patience is spent."""
    stopper = EarlyStopping("test_val_loss", patience=patience)
    trainer = fit(Scripted(losses, "test_val_loss"), [HaltpointCallback(stopper)], tmp_path)
    assert trainer.current_epoch - 1 == stop_epoch


class ScriptedTrain(BoringModel):  # type: ignore[misc]
    """Logs `values[current_epoch]` under `train_loss` in its own `on_train_epoch_end`."""

    def __init__(self, values: list[Any]) -> None:
        super().__init__()
        self.values = values

    def on_train_epoch_end(self) -> None:
        self.log(
            "train_loss", torch.as_tensor(self.values[self.current_epoch], dtype=torch.float32)
        )


@pytest.mark.parametrize("without_validation", [True, False], ids=["no_val_step", "val_step"])
@pytest.mark.parametrize(
    ("losses", "patience", "stop_epoch"),
    [([6, 5, 5, 5, 5, 5], 3, 4), ([6, 5, 4, 4, 3, 3], 1, 3), ([6, 5, 6, 5, 5, 5], 3, 4)],
)
def test_patience_train(
    tmp_path: Path, without_validation: bool, losses: list[int], patience: int, stop_epoch: int
) -> None:
    """Ports test_early_stopping_patience_train: a metric the module logs at train epoch end."""
    model = ScriptedTrain(losses)
    if without_validation:
        model.validation_step = None
    stopper = EarlyStopping("train_loss", patience=patience)
    callback = HaltpointCallback(stopper, check_on_train_epoch_end=True)
    trainer = fit(model, [callback], tmp_path)
    assert trainer.current_epoch - 1 == stop_epoch


def test_one_check_per_validation(tmp_path: Path) -> None:
    """Ports test_early_stopping_no_extraneous_invocations: one check per epoch, 4 in 4 epochs.

    Differs by design in its other assertion: Lightning's `trainer.early_stopping_callback(s)`
    lists instances of its own `EarlyStopping` class, which HaltpointCallback is not (as it is
    not a Lightning `Checkpoint`; docs/integrations.md), so they stay empty; the callback is in
    `trainer.callbacks`.
    """
    stopper = EarlyStopping("val_loss", patience=10)
    callback = HaltpointCallback(stopper)
    trainer = fit(Scripted([4.0, 3.0, 2.0, 1.0]), [callback], tmp_path, max_epochs=4)
    assert stopper.evaluations == 4
    assert callback in trainer.callbacks
    assert trainer.early_stopping_callback is None and trainer.early_stopping_callbacks == []


def test_stopper_state_rides_in_lightnings_own_checkpoint(tmp_path: Path) -> None:
    """Ports test_resume_early_stopping_from_checkpoint (Lightning #1463, #1464)."""
    losses = [5.0, 4.0, 4.5, 3.0]
    callback = HaltpointCallback(EarlyStopping("val_loss", patience=3))
    states: list[dict[str, Any]] = []

    class Record(pl.Callback):  # type: ignore[misc]
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            states.append(callback.stopper.state_dict())  # type: ignore[union-attr]

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    fit(
        Scripted(losses),
        [callback, Record(), saver],
        tmp_path,
        max_epochs=4,
        enable_checkpointing=True,
    )
    checkpoint = torch.load(saver.best_model_path, weights_only=False)
    assert checkpoint["callbacks"][callback.state_key]["stopper"] == states[3]

    restored = HaltpointCallback(EarlyStopping("val_loss", patience=3))
    trainer = pl.Trainer(
        max_epochs=4,
        callbacks=[restored],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Scripted(losses), ckpt_path=saver.best_model_path)
    assert restored.stopper.state_dict() == states[3]  # type: ignore[union-attr]

    # As Lightning's: resuming that checkpoint into a Trainer of max_epochs=1 is refused.
    short = pl.Trainer(
        max_epochs=1,
        callbacks=[HaltpointCallback(EarlyStopping("val_loss", patience=3))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(Exception, match="You restored a checkpoint with current_epoch"):
        short.fit(Scripted(losses), ckpt_path=saver.best_model_path)


@pytest.mark.parametrize("dumps", ["pickle", "cloudpickle"])
def test_pickling(dumps: str) -> None:
    """Ports test_pickling: the callback and its stopper survive pickle and cloudpickle."""
    module = pytest.importorskip(dumps)
    callback = HaltpointCallback(EarlyStopping("foo", patience=2))
    callback.stopper.step({"foo": 1.0})  # type: ignore[union-attr]
    loaded = pickle.loads(module.dumps(callback))
    assert repr(loaded.stopper) == repr(callback.stopper)
    assert loaded.stopper.state_dict() == callback.stopper.state_dict()  # type: ignore[union-attr]
    assert loaded.state_key == callback.state_key


@pytest.mark.parametrize(
    ("rules", "losses", "stop_epoch"),
    [
        ([], [8, 4, 2, 3, 4, 5, 8, 10], 5),
        ([Target(2.9)], [9, 8, 7, 6, 5, 6, 4, 3, 2, 1], 8),
        ([Divergence(15.9)], [9, 4, 2, 16, 32, 64], 3),
    ],
)
def test_thresholds(tmp_path: Path, rules: list[Any], losses: list[int], stop_epoch: int) -> None:
    """Ports test_early_stopping_thresholds: Target and Divergence as the thresholds."""
    stopper = EarlyStopping("abc", patience=3, rules=rules)
    trainer = fit(Scripted(losses, "abc"), [HaltpointCallback(stopper)], tmp_path, max_epochs=20)
    assert trainer.current_epoch - 1 == stop_epoch


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_monitor(tmp_path: Path, bad: float) -> None:
    """Ports test_early_stopping_on_non_finite_monitor: an inf or NaN at epoch 2 stops there."""
    stopper = EarlyStopping("val_loss", patience=3)
    trainer = fit(Scripted([4, 3, bad, 2, 1]), [HaltpointCallback(stopper)], tmp_path)
    assert trainer.current_epoch - 1 == 2
    assert stopper.code is StopReason.NON_FINITE
    assert stopper.last_decision is not None and stopper.last_decision.step == 2  # stopped_epoch


@pytest.mark.parametrize(
    ("limit_train_batches", "min_epochs", "min_steps", "stop_step"),
    [
        (3, 0, 10, 10),
        (5, 0, 10, 10),
        (3, 2, 0, 6),
        (5, 2, 0, 10),
        (3, 1, 10, 10),
        (5, 1, 10, 10),
        (3, 3, 10, 10),
        (5, 3, 10, 15),
    ],
)
def test_min_epochs_and_min_steps(
    tmp_path: Path, limit_train_batches: int, min_epochs: int, min_steps: int, stop_step: int
) -> None:
    """Ports test_min_epochs_min_steps_global_step: a stop waits for min_epochs and min_steps."""
    stopper = EarlyStopping("foo", patience=0, rules=[Target(1.0)])  # stops at every check
    trainer = fit(
        Scripted([0.0], "foo"),
        [HaltpointCallback(stopper)],
        tmp_path,
        max_epochs=20,
        limit_train_batches=limit_train_batches,
        min_epochs=min_epochs,
        min_steps=min_steps,
    )
    assert trainer.should_stop
    assert trainer.current_epoch == max(math.ceil(min_steps / limit_train_batches), min_epochs)
    assert trainer.global_step == stop_step


@pytest.mark.parametrize("train_epoch_end", [False, True], ids=["default", "train_epoch_end"])
def test_min_epochs_and_min_steps_as_lightning_logs(
    tmp_path: Path, train_epoch_end: bool, recwarn: pytest.WarningsRecorder
) -> None:
    """Ports test_min_epochs_min_steps_global_step (limit_train_batches=5, min_epochs=3,
    min_steps=10) as Lightning writes it: `foo` logged in training_step, no validation.

    Differs by design: Lightning's EarlyStopping (check_on_train_epoch_end=None) checks at the
    end of every training epoch when validation runs once an epoch or not at all; haltpoint's
    callback checks after each validation unless told check_on_train_epoch_end=True
    (docs/integrations.md, "When"). Without it nothing is checked and the fit says so, naming
    the flag; with it the stop waits for min_epochs and min_steps, as Lightning's.
    """

    class TrainFoo(BoringModel):  # type: ignore[misc]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self.log("foo", float(batch_idx))
            return super().training_step(batch, batch_idx)

    stopper = EarlyStopping("foo", patience=0, rules=[Target(100.0)])  # stops at every check
    callback = HaltpointCallback(stopper, check_on_train_epoch_end=train_epoch_end)
    trainer = fit(
        TrainFoo(),
        [callback],
        tmp_path,
        max_epochs=20,
        limit_train_batches=5,
        limit_val_batches=0,
        min_epochs=3,
        min_steps=10,
    )
    unchecked = [str(w.message) for w in recwarn if "never checked" in str(w.message)]
    if train_epoch_end:
        assert unchecked == [] and trainer.should_stop
        assert (trainer.current_epoch, trainer.global_step) == (3, 15)
    else:
        assert len(unchecked) == 1 and "check_on_train_epoch_end=True" in unchecked[0]
        assert stopper.evaluations == 0 and trainer.current_epoch == 20


def test_mode_options() -> None:
    """Ports test_early_stopping_mode_options: an unknown mode is refused, naming it."""
    with pytest.raises(ValueError, match="unknown_option"):
        EarlyStopping("foo", mode="unknown_option")


@pytest.mark.parametrize(
    ("trainer_kwargs", "global_step", "epochs"),
    [
        ({"val_check_interval": 0.3, "limit_train_batches": 10, "max_epochs": 10}, 6, None),
        ({"check_val_every_n_epoch": 2, "max_epochs": 5}, None, 4),
    ],
    ids=["val_check_interval", "check_val_every_n_epoch"],
)
def test_checks_follow_the_validation_schedule(
    tmp_path: Path, trainer_kwargs: dict[str, Any], global_step: int | None, epochs: int | None
) -> None:
    """Ports test_check_on_train_epoch_end_smart_handling: a check at each validation, not epoch."""
    stopper = EarlyStopping("foo", patience=0)  # the 2nd check of a flat metric stops
    trainer = fit(Scripted([1.0], "foo"), [HaltpointCallback(stopper)], tmp_path, **trainer_kwargs)
    assert stopper.evaluations == 2
    if global_step is not None:
        assert trainer.global_step == global_step
    if epochs is not None:
        assert trainer.current_epoch == epochs


def test_squeezes_a_one_element_tensor() -> None:
    """Ports test_early_stopping_squeezes: a metric logged as tensor([[[0]]]) is the number 0."""
    stopper = EarlyStopping("foo", patience=3)
    assert stopper.step({"foo": torch.tensor([[[0.0]]])}).value == 0.0


def test_stop_is_logged_with_its_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Ports test_early_stopping_log_info (one process): the stop is logged with its reason."""
    stopper = EarlyStopping("val_loss", patience=1)
    with caplog.at_level(logging.INFO, logger="haltpoint"):
        fit(Scripted([2.0, 2.0]), [HaltpointCallback(stopper)], tmp_path)
    assert stopper.reason is not None
    assert any(stopper.reason in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("losses", "kwargs", "max_epochs", "code", "words"),
    [
        ([10.0], {"patience": 2}, 10, StopReason.PATIENCE, "did not improve"),
        (
            [5.0, 3.0, 1.0, 0.5, 0.1],
            {"patience": 3, "rules": [Target(0.6)]},
            10,
            StopReason.TARGET,
            "reached the target",
        ),
        (
            [1.0, 2.0, 5.0, 10.0, 15.0],
            {"patience": 3, "rules": [Divergence(8.0)]},
            10,
            StopReason.DIVERGENCE,
            "divergence threshold",
        ),
        ([1.0, 0.5, math.nan], {"patience": 3}, 10, StopReason.NON_FINITE, "is nan"),
        ([5.0, 4.0, 3.0, 2.0, 1.0], {"patience": 3}, 3, None, None),
    ],
    ids=["patience", "stopping_threshold", "divergence_threshold", "non_finite", "not_stopped"],
)
def test_reasons(
    tmp_path: Path,
    losses: list[float],
    kwargs: dict[str, Any],
    max_epochs: int,
    code: StopReason | None,
    words: str | None,
) -> None:
    """Ports test_early_stopping_reasons (the five fitted cases): a code and a sentence per stop."""
    stopper = EarlyStopping("val_loss", **kwargs)
    fit(Scripted(losses), [HaltpointCallback(stopper)], tmp_path, max_epochs=max_epochs)
    assert stopper.code is code
    if words is None:
        assert stopper.reason is None and not stopper.stopped
    else:
        assert stopper.reason is not None and words in stopper.reason


def test_reason_survives_the_state_dict() -> None:
    """Ports test_early_stopping_reasons (state persistence): the reason is in the state."""
    first = EarlyStopping("val_loss", patience=0)
    first.step(1.0)
    first.step(2.0)
    second = EarlyStopping("val_loss", patience=0)
    second.load_state_dict(first.state_dict())
    assert second.code is StopReason.PATIENCE
    assert second.reason == first.reason


def test_state_without_a_recorded_stop_loads() -> None:
    """Ports test_early_stopping_reasons (old state dict): no reason recorded, the wait is kept."""
    stopper = EarlyStopping("val_loss", patience=3)
    old = {"version": 1, "evaluations": 6, "best": 0.5, "best_step": 3, "wait": 2}
    stopper.load_state_dict({**old, "last_decision": None, "rules": []})
    assert stopper.reason is None and stopper.code is None and not stopper.stopped
    assert (stopper.wait, stopper.evaluations) == (2, 6)


def test_state_key_names_the_monitor_and_settings() -> None:
    """Ports test_early_stopping_state_key: the key is built from the monitor and settings."""
    loss = HaltpointCallback(EarlyStopping("val_loss", patience=3))
    acc = HaltpointCallback(EarlyStopping("val_acc", mode="max", patience=3))
    assert "val_loss" in loss.state_key and "val_acc" in acc.state_key
    assert loss.state_key != acc.state_key


def _log_two_metrics(module: Any) -> None:
    """abc is best at epoch 2, so patience 3 stops at 5; cba is flat, so it stops at 3."""
    module.log("abc", torch.tensor([8.0, 4, 2, 3, 4, 5, 8, 10][module.current_epoch]))
    module.log("cba", torch.tensor(0.0))


class TwoMetrics(BoringModel):  # type: ignore[misc]
    """Logs abc and cba (`_log_two_metrics`) at the end of validation."""

    def on_validation_epoch_end(self) -> None:
        _log_two_metrics(self)


class TwoMetricsAtTrainEnd(BoringModel):  # type: ignore[misc]
    """The same values, logged in the module's own `on_train_epoch_end` instead."""

    def on_train_epoch_end(self) -> None:
        _log_two_metrics(self)


@pytest.mark.parametrize("cba_first", [False, True], ids=["abc_first", "cba_first"])
@pytest.mark.parametrize("at_train_end", [False, True], ids=["validation", "train_epoch_end"])
def test_multiple_callbacks(tmp_path: Path, cba_first: bool, at_train_end: bool) -> None:
    """Ports test_multiple_early_stopping_callbacks (one process; at validation, and with
    check_on_train_epoch_end): any one stops."""
    callbacks = [
        HaltpointCallback(EarlyStopping(name, patience=3), check_on_train_epoch_end=at_train_end)
        for name in ("abc", "cba")
    ]
    if cba_first:
        callbacks.reverse()
    model = TwoMetricsAtTrainEnd() if at_train_end else TwoMetrics()
    trainer = fit(model, callbacks, tmp_path, max_epochs=20)
    assert trainer.current_epoch - 1 == 3


def test_no_validation_step(tmp_path: Path) -> None:
    """Ports test_early_stopping_no_val_step: no validation at all, the training loss decides."""

    class TrainLoss(BoringModel):  # type: ignore[misc]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            self.log("train_loss", out["loss"], on_step=False, on_epoch=True)
            return out

    model = TrainLoss()
    model.validation_step = None
    model.val_dataloader = None
    stopper = EarlyStopping("train_loss", patience=0, min_delta=0.1)
    callback = HaltpointCallback(stopper, check_on_train_epoch_end=True)
    trainer = fit(model, [callback], tmp_path, limit_val_batches=0)
    assert trainer.state.finished
    assert trainer.current_epoch < trainer.max_epochs - 1


def test_one_process_logs_without_a_rank_prefix(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ports test_early_stopping_log_info (log_rank_zero_only=True, world_size=1): no prefix."""
    stopper = EarlyStopping("val_loss", patience=1)
    with caplog.at_level(logging.INFO, logger="haltpoint"):
        fit(Scripted([2.0, 2.0]), [HaltpointCallback(stopper)], tmp_path)
    assert f"haltpoint: {stopper.reason}" in [record.getMessage() for record in caplog.records]


DDP_WORKER = Path(__file__).parent / "workers" / "peer_lightning_ddp_worker.py"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One torchrun launch (2 ranks, gloo on CPU) of all of Lightning's two-process cases."""
    out = tmp_path_factory.mktemp("lightning_ddp")
    torchrun(DDP_WORKER, "--out", str(out), timeout=180)
    return rank_results(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "stop_epoch"),
    [
        ("diverge", 2),
        ("abc_first", 3),
        ("cba_first", 3),
        ("train_end_abc_first", 3),
        ("train_end_cba_first", 3),
    ],
)
def test_multiple_callbacks_on_two_ranks(
    two_ranks: list[dict[str, Any]], case: str, stop_epoch: int
) -> None:
    """Ports test_multiple_early_stopping_callbacks (ddp_spawn, 2 CPU devices): any one stops.

    Lightning spawns two processes per case; here torchrun starts two gloo ranks once and each
    case is a fit with strategy="ddp" there (the same DDP strategy and rank agreement). In
    "diverge" only rank 0's abc turns worse from epoch 2: its stop stops rank 1 as well.
    """
    assert [rank[case]["stop_epoch"] for rank in two_ranks] == [stop_epoch, stop_epoch]


@pytest.mark.slow
def test_a_rank_stopped_by_another_logs_nothing(two_ranks: list[dict[str, Any]]) -> None:
    """Ports test_multiple_early_stopping_callbacks (ddp_spawn, dist_diverge_epoch=2): the log.

    Rank 0 decided and logs its reason; rank 1 only followed it, as Lightning's does.
    """
    [line] = two_ranks[0]["diverge"]["lines"]
    assert line.startswith("[rank: 0] haltpoint: abc did not improve") and "best 4.0" in line
    assert two_ranks[1]["diverge"]["lines"] == []


@pytest.mark.slow
@pytest.mark.parametrize("rank_zero_only", [False, True], ids=["all_ranks", "rank_zero_only"])
@pytest.mark.parametrize("rank", [0, 1])
def test_log_lines_carry_the_rank(
    two_ranks: list[dict[str, Any]], rank_zero_only: bool, rank: int
) -> None:
    """Ports test_early_stopping_log_info (world_size=2): each line is prefixed `[rank: N] `.

    With log_rank_zero_only=True Lightning keeps rank 1 silent; haltpoint has no such flag and
    differs there by design (docs/integrations.md, "Several processes"): every rank that
    decided to stop logs, and the user's logging setup filters the other ranks.
    """
    lines = two_ranks[rank]["abc_first"]["lines"]
    assert len(lines) == 1 and lines[0].startswith(f"[rank: {rank}] haltpoint: cba did not")


def test_min_epochs_outlast_a_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Ports test_trainer.py test_trainer_min_steps_and_min_epochs_not_reached.

    A flat training loss stops (patience 0) after epoch 1: `should_stop` is set from epoch 2 on,
    yet the Trainer runs to min_epochs=5 and says once that it continues.
    """
    seen: list[tuple[int, bool]] = []

    class FlatLoss(BoringModel):  # type: ignore[misc]
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            out = super().training_step(batch, batch_idx)
            out["loss"] = out["loss"] * 0.0
            self.log("loss", out["loss"])
            seen.append((self.current_epoch, self.trainer.should_stop))
            return out

    model = FlatLoss()
    stopper = EarlyStopping("loss", patience=0)
    callback = HaltpointCallback(stopper, check_on_train_epoch_end=True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(model, [callback], tmp_path, min_epochs=5, limit_val_batches=0, max_epochs=None)
    assert [stop for _, stop in seen] == [epoch >= 2 for epoch, _ in seen]
    assert len(seen) == 5 * 2
    note = "`min_epochs=5` or `min_steps=None` has not been met. Training will continue"
    assert sum(note in record.getMessage() for record in caplog.records) == 1
