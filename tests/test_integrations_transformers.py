"""The Hugging Face Trainer adapter inside real `Trainer.train` runs on CPU (a tiny BERT)."""

from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from haltpoint import (  # noqa: E402
    Checkpointer,
    CheckpointExistsError,
    CorruptCheckpointError,
    EarlyStopping,
    StateMismatchError,
)
from haltpoint.integrations.transformers import HaltpointCallback  # noqa: E402
from haltpoint.stopping.replay import replay  # noqa: E402
from haltpoint.store.history import read_history  # noqa: E402
from haltpoint.store.storage import LocalStorage  # noqa: E402

STEPS_PER_EPOCH = 4  # 32 examples, batches of 8


def make_model() -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=1,  # regression: MSE loss
    )
    return transformers.BertForSequenceClassification(config)


def make_data(sign: float) -> list[dict[str, torch.Tensor]]:
    """Train targets follow +f(tokens), evaluation targets -f: the eval loss rises."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (32, 6), generator=gen)
    y = sign * (ids.float().mean(1) / 12.5 - 2.0)
    mask = torch.ones(6, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": y[i]} for i in range(32)]


def training_args(out: Path, epochs: int, **kwargs: Any) -> Any:
    """The tests' TrainingArguments: CPU, small batches, an evaluation each epoch; `kwargs`
    override any of them."""
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "eval_strategy": "epoch",
        "save_strategy": "no",
        "logging_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 32,
        "num_train_epochs": epochs,
        "learning_rate": 5e-3,
        "disable_tqdm": True,
        "seed": 0,
    }
    return transformers.TrainingArguments(**{**settings, **kwargs})


def train(
    tmp_path: Path, model: Any, callbacks: list[Any], epochs: int, **kwargs: Any
) -> tuple[Any, list[float]]:
    args = training_args(tmp_path / "hf_out", epochs, **kwargs)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=make_data(1.0),
        eval_dataset=make_data(-1.0),
        callbacks=callbacks,
    )
    trainer.train()
    losses = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e]
    return trainer, losses


@dataclass
class StoppedRun:
    """One run that stops early, with every evaluation saved and the best weights restored."""

    directory: Path
    trainer: Any
    model: Any
    stopper: EarlyStopping
    callback: HaltpointCallback
    losses: list[float]
    steps: list[int]
    metrics: list[float]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> StoppedRun:
    tmp_path = tmp_path_factory.mktemp("stopped")
    model, stopper = make_model(), EarlyStopping("loss", patience=2)  # "loss" finds eval_loss
    with Checkpointer(tmp_path / "run", monitor="eval_loss", keep_best=1, keep_last=20) as ckpt:
        callback = HaltpointCallback(stopper, ckpt, restore_best=True)
        trainer, losses = train(tmp_path, model, [callback], epochs=20)
        infos = ckpt.list()
    steps, metrics = [i.step for i in infos], [i.metrics["eval_loss"] for i in infos]
    return StoppedRun(tmp_path / "run", trainer, model, stopper, callback, losses, steps, metrics)


def test_stops_at_the_evaluation_a_replay_of_the_logged_losses_gives(stopped: StoppedRun) -> None:
    expected = replay(lambda: EarlyStopping("loss", patience=2), stopped.losses)
    assert stopped.stopper.stopped and expected.stopped
    assert expected.last_index == len(stopped.losses) - 1 < 19
    assert stopped.trainer.state.global_step == STEPS_PER_EPOCH * len(stopped.losses)


def test_checkpoints_are_in_haltpoint_format_whatever_save_strategy_says(
    stopped: StoppedRun,
) -> None:

    assert stopped.steps == [STEPS_PER_EPOCH * (e + 1) for e in range(len(stopped.losses))]
    assert stopped.metrics == pytest.approx(stopped.losses)
    folders = sorted(p for p in stopped.directory.iterdir() if p.is_dir())
    assert len(folders) == len(stopped.steps)
    for folder, step in zip(folders, stopped.steps, strict=True):
        assert json.loads((folder / "manifest.json").read_text())["step"] == step
        assert (folder / "tensors.safetensors").is_file()
    records = read_history(LocalStorage(stopped.directory))
    # the Trainer's bookkeeping (eval_runtime, eval_*_per_second, epoch) is no metric
    assert {name for r in records for name in r["metrics"]} == {"eval_loss", "loss"}
    hf_out = stopped.directory.parent / "hf_out"  # save_strategy="no": the Trainer wrote nothing
    assert not hf_out.exists() or not any(hf_out.iterdir())


def test_restore_best_loads_the_weights_saved_at_the_best_evaluation(stopped: StoppedRun) -> None:
    from safetensors.torch import load_file

    best = min(range(len(stopped.losses)), key=stopped.losses.__getitem__)
    assert stopped.callback.best_step == stopped.steps[best] < stopped.steps[-1]
    saved = make_model()
    reader = Checkpointer(stopped.directory, monitor="eval_loss", read_only=True)
    reader.restore({"model": saved}, stopped.callback.best_step, strict=False)
    for got, want in zip(stopped.model.parameters(), saved.parameters(), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(saved.classifier.weight, make_model().classifier.weight)
    folder = Path(reader.list()[best].path)
    tensors = load_file(folder / "tensors.safetensors")  # any safetensors reader opens it
    weight = stopped.model.classifier.weight.detach()
    assert any(t.shape == weight.shape and torch.equal(t, weight) for t in tensors.values())


class Spy(transformers.TrainerCallback):  # type: ignore[misc]
    """Records what the model and optimizer hold when training begins (after the resume)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step
        self.weight = kwargs["model"].classifier.weight.detach().clone()
        self.exp_avg = kwargs["optimizer"].state_dict()["state"][0]["exp_avg"].clone()
        self.lr_step = kwargs["lr_scheduler"].last_epoch


def test_resume_keeps_the_patience_used_and_the_training_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = make_model()
    with Checkpointer(tmp_path / "run") as ckpt:
        trainer, losses = train(
            tmp_path, first, [HaltpointCallback(EarlyStopping("eval_loss", patience=2), ckpt)], 2
        )
    assert losses[1] > losses[0]  # one evaluation without improvement already spent
    end_exp_avg = trainer.optimizer.state_dict()["state"][0]["exp_avg"]

    capsys.readouterr()
    stopper, spy = EarlyStopping("eval_loss", patience=2), Spy()
    with Checkpointer(tmp_path / "run") as ckpt:
        callback = HaltpointCallback(stopper, ckpt, resume=True)
        trainer, losses = train(tmp_path, make_model(), [callback, spy], epochs=20)
        steps = [i.step for i in ckpt.list()]
    assert spy.step == spy.lr_step == 2 * STEPS_PER_EPOCH
    resumed = [line for line in capsys.readouterr().err.splitlines() if "resumed" in line]
    assert resumed == [f"haltpoint: resumed from step {spy.step} in {ckpt.directory}"]
    assert torch.equal(spy.weight, first.classifier.weight)
    assert torch.equal(spy.exp_avg, end_exp_avg)
    # transformers #28544 lost the wait on resume: the fresh run would stop two evaluations later
    assert stopper.stopped and stopper.evaluations == 3 and stopper.best_step == 0
    assert trainer.state.global_step == steps[-1] == 3 * STEPS_PER_EPOCH
    assert trainer.state.epoch == pytest.approx(3.0)


def test_a_resumed_run_that_had_stopped_keeps_its_weights(
    stopped: StoppedRun, tmp_path: Path
) -> None:
    latest = make_model()
    reader = Checkpointer(stopped.directory, read_only=True)
    reader.restore({"model": latest}, "latest", strict=False)
    model, stopper = make_model(), EarlyStopping("loss", patience=2)
    with Checkpointer(stopped.directory, monitor="eval_loss", keep_last=20) as ckpt:
        callback = HaltpointCallback(stopper, ckpt, resume=True)
        trainer, _ = train(tmp_path, model, [callback], epochs=20)
        assert [i.step for i in ckpt.list()] == stopped.steps  # nothing new saved
    assert trainer.state.global_step == trainer.lr_scheduler.last_epoch == stopped.steps[-1]
    assert stopper.stopped and stopper.reason == stopped.stopper.reason
    assert torch.equal(model.classifier.weight, latest.classifier.weight)


def test_a_rerun_of_a_stopped_run_restores_the_best_weights(
    stopped: StoppedRun, tmp_path: Path
) -> None:
    model, stopper = make_model(), EarlyStopping("loss", patience=2)
    with Checkpointer(stopped.directory, monitor="eval_loss", keep_best=1, keep_last=20) as ckpt:
        callback = HaltpointCallback(stopper, ckpt, resume=True, restore_best=True)
        train(tmp_path, model, [callback], epochs=20)
        assert [i.step for i in ckpt.list()] == stopped.steps  # nothing new saved
    assert callback.best_step == stopped.callback.best_step
    assert stopper.reason == stopped.stopper.reason
    assert torch.equal(model.classifier.weight, stopped.model.classifier.weight)


def test_a_metric_that_was_never_logged_is_named_with_the_keys_that_were(tmp_path: Path) -> None:
    callback = HaltpointCallback(EarlyStopping("accuracy", mode="max", patience=2))
    with pytest.raises(ValueError, match=r"'accuracy' was not logged.*'eval_loss'.*#28530"):
        train(tmp_path, make_model(), [callback], epochs=3)


def test_a_stopper_without_evaluations_is_refused(tmp_path: Path) -> None:
    callback = HaltpointCallback(EarlyStopping("eval_loss", patience=2))
    with pytest.raises(ValueError, match=r"needs evaluations.*eval_strategy"):
        train(tmp_path, make_model(), [callback], epochs=1, eval_strategy="no")


@pytest.mark.parametrize(("option", "value"), [("fsdp", ["full_shard"]), ("deepspeed", "ds.json")])
def test_sharded_training_is_refused_with_a_checkpointer(
    tmp_path: Path, option: str, value: Any
) -> None:
    from types import SimpleNamespace

    with Checkpointer(tmp_path, async_save=False) as ckpt:
        callback = HaltpointCallback(None, ckpt)
        args = SimpleNamespace(fsdp=None, deepspeed=None, eval_strategy="epoch")
        callback.on_train_begin(args, SimpleNamespace(), SimpleNamespace())  # DDP/one device
        setattr(args, option, value)
        with pytest.raises(
            ValueError, match=rf"replicates the model .* not TrainingArguments\({option}"
        ):
            callback.on_train_begin(args, SimpleNamespace(), SimpleNamespace())
        HaltpointCallback(EarlyStopping("eval_loss"), None).on_train_begin(  # stopping only
            args, SimpleNamespace(), SimpleNamespace()
        )


def _sealed(body: dict[str, Any]) -> bytes:
    """The manifest an attacker who knows the format writes for `body` (xxh3 is no signature)."""
    from haltpoint.store.hashing import hash_bytes

    def canonical(obj: Any) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    body = {k: v for k, v in body.items() if k != "checksum"}
    return canonical({**body, "checksum": hash_bytes(canonical(body))}) + b"\n"


def _trainer(step: Any, epoch: Any = 1.0) -> dict[str, Any]:
    """The `trainer` entry's content as the codec writes it (a dict whose keys are not in
    sorted order is a list of pairs)."""
    return {"__hp__": "dict", "items": [["global_step", step], ["epoch", epoch]]}


@pytest.mark.parametrize(
    "position",
    [
        "x",
        None,
        [2],
        {"epoch": 1.0},
        _trainer("2"),
        _trainer(10**12),
        _trainer({"__hp__": "float", "v": "inf"}),
        _trainer(2, {"__hp__": "float", "v": "nan"}),
        _trainer(2, {"__hp__": "complex", "v": [1.0, 2.0]}),
        _trainer(2, {"__hp__": "int", "v": "0x" + "f" * 4000}),
        _trainer(2, -1.0),
    ],
    ids=[
        "a-string", "null", "a-list", "no-global-step", "global-step-a-string",
        "global-step-of-another-step", "global-step-inf", "epoch-nan", "epoch-complex",
        "epoch-of-4800-digits", "epoch-negative",
    ],
)  # fmt: skip
def test_a_crafted_trainer_position_is_a_corrupt_checkpoint(tmp_path: Path, position: Any) -> None:
    """The restored `trainer` entry was trusted: a crafted checkpoint (checksum valid) made
    resume raise TypeError, KeyError or OverflowError, or set the Trainer's global step to a
    string or to another step's."""
    from types import SimpleNamespace

    model, run = torch.nn.Linear(3, 2), tmp_path / "run"
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(2, {"model": model, "trainer": {"global_step": 2, "epoch": 1.0}})
    path = run / "step-000000002" / "manifest.json"
    body = json.loads(path.read_bytes())
    body["tree"]["trainer"]["content"] = position
    path.write_bytes(_sealed(body))
    args = SimpleNamespace(eval_strategy="epoch", fsdp=None, deepspeed=None)
    state = SimpleNamespace(global_step=0, epoch=0.0, max_steps=10, stateful_callbacks=None)
    with Checkpointer(run) as ckpt:
        callback = HaltpointCallback(None, ckpt, resume=True)
        with pytest.raises(CorruptCheckpointError, match=r"step 2 .* records the Trainer's pos"):
            callback.on_train_begin(args, state, SimpleNamespace(), model=model)
    assert (state.global_step, state.epoch) == (0, 0.0)


def test_a_used_directory_needs_resume(stopped: StoppedRun, tmp_path: Path) -> None:
    with (
        Checkpointer(stopped.directory) as ckpt,
        pytest.raises(CheckpointExistsError, match=r"already holds checkpoints.*resume=True"),
    ):
        train(tmp_path, make_model(), [HaltpointCallback(None, ckpt)], epochs=1)


def test_evaluate_outside_train_is_not_part_of_the_run(stopped: StoppedRun) -> None:
    evaluations = stopped.stopper.evaluations
    stopped.trainer.evaluate()
    assert stopped.stopper.evaluations == evaluations == len(stopped.losses)


def test_module_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "haltpoint.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'haltpoint\[transformers\]'"):
        importlib.import_module("haltpoint.integrations.transformers")


def _hf_run(tmp_path: Path, callback: HaltpointCallback, epochs: int, **kwargs: Any) -> Any:
    args = training_args(tmp_path / "hf_own", epochs, **{"save_strategy": "epoch", **kwargs})
    return transformers.Trainer(
        model=make_model(),
        args=args,
        train_dataset=make_data(1.0),
        eval_dataset=make_data(-1.0),
        callbacks=[callback],
    )


def test_the_stopper_rides_in_the_trainer_s_own_checkpoints(tmp_path: Path) -> None:
    first = EarlyStopping("eval_loss", patience=2)
    _hf_run(tmp_path, HaltpointCallback(first), epochs=2).train()
    assert first.evaluations == 2 and first.wait == 1  # the eval loss rises after the first
    saved = json.loads((tmp_path / "hf_own" / "checkpoint-8" / "trainer_state.json").read_text())
    assert (
        saved["stateful_callbacks"]["HaltpointCallback"]["attributes"]["stopper_state"][
            "evaluations"
        ]
        == 2
    )

    stopper = EarlyStopping("eval_loss", patience=2)
    trainer = _hf_run(tmp_path, HaltpointCallback(stopper), epochs=20)
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf_own" / "checkpoint-8"))
    # restored: one more evaluation without improvement stops (a fresh stopper would need two)
    assert stopper.stopped and stopper.evaluations == 3 and stopper.best_step == 0
    assert trainer.state.global_step == 3 * STEPS_PER_EPOCH


def test_restoring_callback_states_the_trainer_s_way_is_refused(tmp_path: Path) -> None:
    _hf_run(tmp_path, HaltpointCallback(EarlyStopping("eval_loss", patience=2)), epochs=1).train()
    trainer = _hf_run(
        tmp_path,
        HaltpointCallback(EarlyStopping("eval_loss", patience=2)),
        epochs=3,
        restore_callback_states_from_checkpoint=True,
    )
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint=False"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "hf_own" / "checkpoint-4"))


@pytest.mark.parametrize(
    ("exported", "message"),
    [
        (5, r"stateful_callbacks\['HaltpointCallback'\] = 5, not the"),
        ([], r"stateful_callbacks\['HaltpointCallback'\] = \[\], not the"),
        ({"attributes": 3}, r"= \{'attributes': 3\}, not the"),
        ({"attributes": {"stopper_state": "x"}}, r"cannot load: state must be a mapping"),
        ({"attributes": {"stopper_state": {"version": 1}}}, r"cannot load: .* missing keys"),
    ],
)
def test_a_crafted_stopper_state_in_trainer_state_json_is_one_state_mismatch_line(
    tmp_path: Path, exported: Any, message: str
) -> None:
    """The Trainer hands the callback what the resumed checkpoint's trainer_state.json holds;
    altered, it was an AttributeError, IndexError or TypeError from deep in the callback."""
    _hf_run(tmp_path, HaltpointCallback(EarlyStopping("eval_loss", patience=2)), epochs=1).train()
    path = tmp_path / "hf_own" / "checkpoint-4" / "trainer_state.json"
    saved = json.loads(path.read_text())
    saved["stateful_callbacks"]["HaltpointCallback"] = exported
    path.write_text(json.dumps(saved))
    stopper = EarlyStopping("eval_loss", patience=2)
    trainer = _hf_run(tmp_path, HaltpointCallback(stopper), epochs=3)
    with pytest.raises(StateMismatchError, match=message) as raised:
        trainer.train(resume_from_checkpoint=str(path.parent))
    assert "\n" not in str(raised.value) and stopper.evaluations == 0


def _files(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` but the writer's lock, by its path there, with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".haltpoint.lock"
    }


def _training_state(trainer: Any) -> tuple[int, float, int, list[torch.Tensor]]:
    """The Trainer's position, its scheduler's step and the optimizer's moments."""
    moments = [t for s in trainer.optimizer.state_dict()["state"].values() for t in s.values()]
    return (
        trainer.state.global_step,
        trainer.state.epoch,
        trainer.lr_scheduler.last_epoch,
        [t.clone() for t in moments],
    )


@pytest.mark.parametrize("restore_best", [False, True])
@pytest.mark.parametrize(
    "length",
    [
        {"epochs": 2, "save_strategy": "epoch"},
        {"epochs": 2, "save_strategy": "epoch", "eval_on_start": True},
        {
            "epochs": 3,
            "save_strategy": "epoch",
            "load_best_model_at_end": True,
            "metric_for_best_model": "eval_loss",
        },
        {
            "epochs": 20,
            "max_steps": 6,
            "eval_strategy": "steps",
            "eval_steps": 3,
            "save_strategy": "steps",
            "save_steps": 3,
        },
    ],
    ids=["num_train_epochs", "eval_on_start", "load_best_model_at_end", "max_steps"],
)
def test_a_rerun_of_a_completed_run_trains_saves_and_evicts_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
    restore_best: bool,
    length: dict[str, Any],
) -> None:
    """A run that reached its planned length without stopping early, run again, is finished:
    no optimizer, scheduler or position change survives, and neither haltpoint nor the Trainer
    writes a checkpoint."""
    directory, trainer_out = tmp_path / "run", tmp_path / "hf_out"

    def run() -> tuple[Any, Any, HaltpointCallback, EarlyStopping]:
        model, stopper = make_model(), EarlyStopping("eval_loss", patience=50)
        with Checkpointer(directory, monitor="eval_loss", keep_best=1) as ckpt:
            callback = HaltpointCallback(stopper, ckpt, restore_best=restore_best, resume=True)
            trainer, _ = train(tmp_path, model, [callback], **length)
        return trainer, model, callback, stopper

    trainer, first, callback, stopper = run()
    end = trainer.state.max_steps
    assert not stopper.stopped and trainer.state.global_step == end
    files, state, trained = _files(directory), stopper.state_dict(), _training_state(trainer)
    trainer_files = _files(trainer_out)
    assert f"checkpoint-{end}/trainer_state.json" in trainer_files
    capsys.readouterr()

    recwarn.clear()
    retrainer, model, rerun, restopper = run()
    assert _files(directory) == files  # nothing committed, nothing evicted
    assert _files(trainer_out) == trainer_files  # no checkpoint-<end + 1> from the Trainer
    assert not any("eval_loss" in entry for entry in retrainer.state.log_history)
    assert retrainer.args.eval_on_start == length.get("eval_on_start", False)  # put back
    position, moments = _training_state(retrainer)[:3], _training_state(retrainer)[3]
    assert position == trained[:3]
    assert len(moments) == len(trained[3])
    assert all(torch.equal(got, want) for got, want in zip(moments, trained[3], strict=True))
    assert [str(w.message) for w in recwarn if "haltpoint" in str(w.message)] == []
    assert restopper.state_dict() == state
    assert rerun.best_step == callback.best_step
    for got, want in zip(model.parameters(), first.parameters(), strict=True):
        assert torch.equal(got, want)
    lines = [line for line in capsys.readouterr().err.splitlines() if "haltpoint" in line]
    assert lines == [
        f"haltpoint: resumed from step {end} in {directory}; the run had already finished: it "
        f"reached max_steps={end}"
    ]


def test_a_stopped_run_resumed_from_the_trainer_s_own_checkpoint_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """resume_from_checkpoint of the Trainer's last checkpoint of a run the stopper ended
    restored the stopped stopper, then trained a whole epoch and wrote checkpoint-<N+4> before
    the next evaluation stopped it again. Now it stops at once, saves nothing, and says so."""
    first = EarlyStopping("eval_loss", patience=2)
    trainer = _hf_run(tmp_path, HaltpointCallback(first), epochs=20)
    trainer.train()
    assert first.stopped
    step, files = trainer.state.global_step, _files(tmp_path / "hf_own")
    capsys.readouterr()

    stopper = EarlyStopping("eval_loss", patience=2)
    trainer = _hf_run(tmp_path, HaltpointCallback(stopper), epochs=20)
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf_own" / f"checkpoint-{step}"))
    assert stopper.state_dict() == first.state_dict()
    assert trainer.state.global_step == step
    assert _files(tmp_path / "hf_own") == files
    lines = [line for line in capsys.readouterr().err.splitlines() if "haltpoint" in line]
    assert lines == [
        f"haltpoint: resumed from the Trainer's checkpoint of step {step}; the run had already "
        f"stopped: {first.reason}"
    ]


def test_a_stopped_run_rerun_from_the_trainer_s_own_checkpoint_keeps_its_weights(
    tmp_path: Path,
) -> None:
    """With no checkpointer of ours, the rerun kept the one step the Trainer takes before it
    reads `should_training_stop` in the model, the optimizer and the scheduler: a stopped
    run, run again, ended with weights the run never had (and `trainer.save_model()` wrote
    them). Now the state the Trainer resumed is put back after that step."""
    first = EarlyStopping("eval_loss", patience=2)
    trainer = _hf_run(tmp_path, HaltpointCallback(first), epochs=20)
    trainer.train()
    step = trainer.state.global_step
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state_dict()["state"].values()]
    rate = trainer.lr_scheduler.get_last_lr()

    trainer = _hf_run(tmp_path, HaltpointCallback(EarlyStopping("eval_loss", patience=2)), 20)
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf_own" / f"checkpoint-{step}"))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    again = [s["exp_avg"] for s in trainer.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(again, moments, strict=True))
    assert trainer.lr_scheduler.get_last_lr() == rate
    assert trainer.state.global_step == step


def _logged_run(directory: Path, out: Path, stopper: EarlyStopping, epochs: int) -> tuple[Any, Any]:
    """A run through the checkpointer (resume=True) that logs the loss at every step."""
    args = training_args(out, epochs, logging_strategy="steps", logging_steps=1)
    with Checkpointer(directory, monitor="eval_loss", keep_best=1) as ckpt:
        trainer = transformers.Trainer(
            model=make_model(),
            args=args,
            train_dataset=make_data(1.0),
            eval_dataset=make_data(-1.0),
            callbacks=[HaltpointCallback(stopper, ckpt, resume=True)],
        )
        output = trainer.train()
    return trainer, output


def test_the_loss_logged_after_a_resume_counts_the_steps_trained_and_a_rerun_none(
    tmp_path: Path,
) -> None:
    """The Trainer divides the loss by the steps since the global step it started at (0), not
    the one the callback resumed at: after a resume at step 8 the first `loss` line was that
    step's loss / 9 and `train_loss` the sum / 12 for 4 steps trained; a finished run, run
    again, logged the loss of the step it cancels, over 12 steps, as its `train_loss`."""
    directory, out = tmp_path / "run", tmp_path / "hf_out"
    _logged_run(directory, out, EarlyStopping("eval_loss", patience=50), epochs=2)
    trainer, output = _logged_run(directory, out, EarlyStopping("eval_loss", patience=50), 3)
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    assert [step for step, _ in losses] == [9, 10, 11, 12]
    mean = sum(loss for _, loss in losses) / 4
    assert output.metrics["train_loss"] == pytest.approx(mean, rel=1e-9)
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(mean, rel=1e-9)
    assert losses[0][1] > 0.5 * mean  # not a ninth of the step's loss

    trainer, output = _logged_run(directory, out, EarlyStopping("eval_loss", patience=50), 3)
    assert not [e for e in trainer.state.log_history if "loss" in e]
    end = trainer.state.log_history[-1]
    assert math.isnan(output.metrics["train_loss"]) and math.isnan(end["train_loss"])
    assert end["train_steps_per_second"] == end["train_samples_per_second"] == 0.0


def test_a_stopped_run_rerun_from_the_trainer_s_own_checkpoint_logs_no_train_loss(
    tmp_path: Path,
) -> None:
    """The cancelled step's loss came out divided by 0.001 (the Trainer's guard for no steps)."""
    first = EarlyStopping("eval_loss", patience=2)
    trainer = _hf_run(tmp_path, HaltpointCallback(first), epochs=20)
    trainer.train()
    step = trainer.state.global_step
    trainer = _hf_run(tmp_path, HaltpointCallback(EarlyStopping("eval_loss", patience=2)), 20)
    output = trainer.train(resume_from_checkpoint=str(tmp_path / "hf_own" / f"checkpoint-{step}"))
    assert math.isnan(output.metrics["train_loss"])
    assert math.isnan(trainer.state.log_history[-1]["train_loss"])
