"""Hugging Face's own early-stopping tests, ported (tests/trainer/test_trainer.py
`test_early_stopping_callback`, tests/trainer/test_trainer_callback.py `StatefulCallbackTest`
and `EarlyStoppingCallbackTest`).

Each case runs `haltpoint.integrations.transformers.HaltpointCallback` inside a real
`transformers.Trainer` on CPU: a one-layer regression model, four optimizer steps an epoch, and
the monitored metric scripted per evaluation through `compute_metrics`. Where haltpoint differs
by design (docs/integrations.md), the case asserts haltpoint's behaviour and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from haltpoint import Checkpointer, EarlyStopping  # noqa: E402
from haltpoint.integrations.transformers import HaltpointCallback  # noqa: E402

STEPS_PER_EPOCH = 4


class Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        out = self.linear(x).squeeze(-1)
        loss = torch.nn.functional.mse_loss(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out}


def data() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen)
    y = x.sum(1)
    return [{"x": x[i], "labels": y[i]} for i in range(16)]


def scripted(values: list[float]) -> Any:
    """A `compute_metrics` returning the next value (the last one again after the end)."""
    it: Iterator[float] = iter(values)
    last = [values[0]]

    def compute(_: Any) -> dict[str, float]:
        last[0] = next(it, last[0])
        return {"accuracy": last[0]}

    return compute


def make_trainer(
    tmp_path: Path, callbacks: list[Any], accuracy: list[float], epochs: int = 20, **kwargs: Any
) -> Any:
    settings: dict[str, Any] = {
        "output_dir": str(tmp_path / "hf_out"),
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 16,
        "num_train_epochs": epochs,
        "learning_rate": 1e-2,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(kwargs)
    return transformers.Trainer(
        model=Regression(),
        args=transformers.TrainingArguments(**settings),
        train_dataset=data(),
        eval_dataset=data(),
        compute_metrics=scripted(accuracy),
        callbacks=callbacks,
    )


PLATEAU = [0.5, 0.6, 0.7, 0.7, 0.70001, 0.7, 0.7]


def test_stops_before_the_planned_epochs(tmp_path: Path) -> None:
    """Ports test_trainer.py test_early_stopping_callback (patience 1, threshold 1e-4)."""
    stopper = EarlyStopping("accuracy", mode="max", patience=1, min_delta=0.0001)
    trainer = make_trainer(
        tmp_path,
        [HaltpointCallback(stopper)],
        PLATEAU,
        load_best_model_at_end=True,
        save_strategy="epoch",
        metric_for_best_model="accuracy",
    )
    trainer.train()
    assert trainer.state.global_step == 4 * STEPS_PER_EPOCH < 20 * STEPS_PER_EPOCH
    assert stopper.best_step == 2


def test_needs_no_best_model_settings(tmp_path: Path) -> None:
    """Ports test_early_stopping_callback's invalid inputs; differs by design.

    HF's callback asserts `load_best_model_at_end` and `metric_for_best_model`; haltpoint's
    needs neither (docs/integrations.md, "setup needed") and stops the same run.
    """
    stopper = EarlyStopping("accuracy", mode="max", patience=1, min_delta=0.0001)
    trainer = make_trainer(tmp_path, [HaltpointCallback(stopper)], PLATEAU)
    trainer.train()
    assert trainer.state.global_step == 4 * STEPS_PER_EPOCH


def test_refuses_a_run_without_evaluations(tmp_path: Path) -> None:
    """Ports test_early_stopping_callback's assertion for eval_strategy="no": a clear error."""
    stopper = EarlyStopping("accuracy", mode="max", patience=1)
    trainer = make_trainer(tmp_path, [HaltpointCallback(stopper)], PLATEAU, eval_strategy="no")
    with pytest.raises(ValueError, match="eval_strategy"):
        trainer.train()


def test_stopper_state_persists_across_a_resume(tmp_path: Path) -> None:
    """Ports StatefulCallbackTest.test_early_stopping_state_persists; differs by design.

    HF restores the callback's saved arguments (patience 5 wins over the new default); haltpoint
    restores the stopper's state and keeps the new configuration (docs/integrations.md,
    "stopper state on resume"). Resumed here through haltpoint's own checkpoints.
    """
    accuracy = [0.5, 0.6, 0.6, 0.6]
    with Checkpointer(tmp_path / "run", monitor="eval_accuracy", mode="max") as ckpt:
        first = EarlyStopping("accuracy", mode="max", patience=5, min_delta=0.2)
        make_trainer(tmp_path, [HaltpointCallback(first, ckpt)], accuracy, epochs=2).train()
    assert (first.evaluations, first.best, first.wait) == (2, 0.5, 1)  # 0.6 is not 0.2 better
    with Checkpointer(tmp_path / "run", monitor="eval_accuracy", mode="max") as ckpt:
        second = EarlyStopping("accuracy", mode="max", patience=3)
        callback = HaltpointCallback(second, ckpt, resume=True)
        make_trainer(tmp_path, [callback], accuracy[2:], epochs=4).train()
    assert second.patience == 3 and second.min_delta == 0.0  # the new configuration
    assert second.evaluations == 4  # two restored, two new
    assert (second.best, second.best_step) == (0.6, 2)  # with min_delta 0, 0.6 beats 0.5


def test_resume_beside_a_regular_callback(tmp_path: Path) -> None:
    """Ports StatefulCallbackTest.test_mixed_stateful_and_regular_callbacks (haltpoint's resume)."""

    class Recorder(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.events: list[str] = []

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.events.append("on_evaluate")

    accuracy = [0.5, 0.6, 0.7, 0.8]
    with Checkpointer(tmp_path / "run", monitor="eval_accuracy", mode="max") as ckpt:
        first = EarlyStopping("accuracy", mode="max", patience=5)
        callbacks = [Recorder(), HaltpointCallback(first, ckpt)]
        make_trainer(tmp_path, callbacks, accuracy, epochs=2).train()
    with Checkpointer(tmp_path / "run", monitor="eval_accuracy", mode="max") as ckpt:
        second = EarlyStopping("accuracy", mode="max", patience=5)
        recorder = Recorder()
        callbacks = [HaltpointCallback(second, ckpt, resume=True), recorder]
        make_trainer(tmp_path, callbacks, accuracy[2:], epochs=4).train()
    assert second.evaluations == 4 and second.best == 0.8
    assert recorder.events == ["on_evaluate"] * 2


def test_stopper_state_rides_in_the_trainers_own_checkpoint(tmp_path: Path) -> None:
    """Ports StatefulCallbackTest.test_early_stopping_state_persists via resume_from_checkpoint.

    Differs by design: the state rides in the Trainer's checkpoint without
    `restore_callback_states_from_checkpoint` (which must stay off, docs/integrations.md), and
    the configuration is the new stopper's.
    """
    first = EarlyStopping("accuracy", mode="max", patience=5, min_delta=0.2)
    steps = {"save_strategy": "steps", "save_steps": 4, "eval_strategy": "steps", "eval_steps": 4}
    make_trainer(tmp_path, [HaltpointCallback(first)], [0.5, 0.6], epochs=2, **steps).train()
    assert (first.evaluations, first.best, first.wait) == (2, 0.5, 1)
    second = EarlyStopping("accuracy", mode="max", patience=3)
    trainer = make_trainer(
        tmp_path,
        [HaltpointCallback(second)],
        [0.5],
        epochs=2,
        **steps,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf_out" / "checkpoint-4"))
    assert second.evaluations == 2  # restored at step 4 (one evaluation), one more at step 8
    assert second.best == 0.5 and second.patience == 3


def test_best_checkpoint_known_without_load_best_model_at_end(tmp_path: Path) -> None:
    """Ports test_early_stopping_callback's last part: the best checkpoint is set anyway.

    HF sets `state.best_model_checkpoint` with `load_best_model_at_end=False`; haltpoint's
    checkpointer ranks its checkpoints by its monitor whatever the Trainer's best-model settings.
    """
    stopper = EarlyStopping("accuracy", mode="max", patience=1, min_delta=0.0001)
    with Checkpointer(tmp_path / "run", monitor="eval_accuracy", mode="max", keep_best=1) as ckpt:
        trainer = make_trainer(
            tmp_path, [HaltpointCallback(stopper, ckpt)], PLATEAU, load_best_model_at_end=False
        )
        trainer.train()
        best = ckpt.restore({"model": Regression()}, "best")
    assert best is not None and best.step == 3 * STEPS_PER_EPOCH  # the 0.7 of evaluation 3
    assert trainer.state.global_step == 4 * STEPS_PER_EPOCH


def test_wait_grows_when_the_metric_does_not_improve() -> None:
    """Ports EarlyStoppingCallbackTest.test_patience_counter_increments_when_metric_does_...

    (..._not_improve): a value worse than the best adds one to the wait.
    """
    stopper = EarlyStopping("accuracy", mode="max", patience=3)
    stopper.step({"accuracy": 0.9})
    assert not stopper.step({"accuracy": 0.8})
    assert stopper.wait == 1 and stopper.best == 0.9


def test_wait_resets_when_the_metric_improves() -> None:
    """Ports EarlyStoppingCallbackTest.test_patience_counter_resets_when_metric_improves."""
    stopper = EarlyStopping("accuracy", mode="max", patience=3)
    for value in [0.8, 0.7, 0.75]:
        stopper.step({"accuracy": value})
    assert stopper.wait == 2
    stopper.step({"accuracy": 0.95})
    assert stopper.wait == 0 and stopper.best == 0.95


def test_gain_within_min_delta_is_no_improvement() -> None:
    """Ports EarlyStoppingCallbackTest.test_threshold_prevents_small_improvements."""
    stopper = EarlyStopping("accuracy", mode="max", patience=3, min_delta=0.1)
    stopper.step({"accuracy": 0.8})
    stopper.step({"accuracy": 0.85})  # 0.05 better: within the threshold
    assert stopper.wait == 1 and stopper.best == 0.8


def test_exported_state_holds_the_wait_not_the_settings() -> None:
    """Ports EarlyStoppingCallbackTest.test_state_includes_all_attributes; differs by design.

    HF exports patience and threshold as the callback's arguments, to rebuild it on resume;
    haltpoint's callback exports the stopper's state (the wait, the best) and a resume keeps
    the new stopper's configuration (docs/integrations.md, "stopper state on resume").
    """
    stopper = EarlyStopping("accuracy", mode="max", patience=5, min_delta=0.1)
    for value in [0.8, 0.75, 0.7, 0.85]:
        stopper.step({"accuracy": value})
    exported = HaltpointCallback(stopper).state()
    assert exported["args"] == {}
    saved = exported["attributes"]["stopper_state"]
    assert (saved["wait"], saved["best"], saved["evaluations"]) == (3, 0.8, 4)
    assert "patience" not in saved and "min_delta" not in saved


def test_resume_without_the_callback_warns_naming_it(tmp_path: Path) -> None:
    """Ports StatefulCallbackTest.test_missing_stateful_callback_warning.

    The callback's state rides in the Trainer's checkpoint under its class name, so a resume
    with `restore_callback_states_from_checkpoint=True` that leaves it out gets the Trainer's
    own warning naming HaltpointCallback (with it in, that setting is refused, as above).
    """
    steps = {"save_strategy": "steps", "save_steps": 4, "eval_strategy": "steps", "eval_steps": 4}
    stopper = EarlyStopping("accuracy", mode="max", patience=5)
    make_trainer(tmp_path, [HaltpointCallback(stopper)], [0.5], epochs=1, **steps).train()
    trainer = make_trainer(
        tmp_path, [], [0.5], epochs=2, restore_callback_states_from_checkpoint=True, **steps
    )
    warned: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warned.append(record.getMessage())  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers.trainer")
    hf_logger.addHandler(handler)
    try:
        trainer.train(resume_from_checkpoint=str(tmp_path / "hf_out" / "checkpoint-4"))
    finally:
        hf_logger.removeHandler(handler)
    assert any("not included" in line and "HaltpointCallback" in line for line in warned)


@pytest.mark.parametrize(
    ("monitor", "mode"), [("loss", "min"), ("accuracy", "max")], ids=["two_metrics", "one_metric"]
)
def test_two_callbacks_each_resume_their_own_stopper(
    tmp_path: Path, monitor: str, mode: str
) -> None:
    """Ports StatefulCallbackTest.test_multiple_instances_of_same_stateful_callback.

    Two HaltpointCallbacks (as HF's two StatefulTestCallbacks, "first" and "second") share a
    Trainer; resumed through `resume_from_checkpoint`, each stopper gets its own state back, as
    it was at that checkpoint: with the second on another metric, and on the same metric with
    another patience. The Trainer keeps both under the one class name, as a list to which every
    save appends both states again, so its first entries are the states at the start of
    training, not at the checkpoint.
    """
    steps = {"save_strategy": "steps", "save_steps": 4, "eval_strategy": "steps", "eval_steps": 4}

    def stoppers() -> tuple[EarlyStopping, EarlyStopping]:
        first = EarlyStopping("accuracy", mode="max", patience=5)
        return first, EarlyStopping(monitor, mode=mode, patience=7)

    first, second = stoppers()
    callbacks = [HaltpointCallback(first), HaltpointCallback(second)]
    make_trainer(tmp_path, callbacks, [0.5, 0.6, 0.7], epochs=3, **steps).train()
    assert (first.evaluations, second.evaluations) == (3, 3)

    again_first, again_second = stoppers()
    callbacks = [HaltpointCallback(again_first), HaltpointCallback(again_second)]
    trainer = make_trainer(tmp_path, callbacks, [0.55], epochs=3, **steps)
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf_out" / "checkpoint-8"))
    # Two evaluations restored (steps 4 and 8), one more at step 12.
    assert (again_first.evaluations, again_second.evaluations) == (3, 3)
    assert (again_first.best, again_first.best_step) == (0.6, 1)
    assert (again_second.monitor, again_second.patience) == (monitor, 7)
    if monitor == "accuracy":
        assert (again_second.best, again_second.best_step) == (0.6, 1)
