"""The Lightning adapter inside real `Trainer.fit` runs on CPU (tiny model, a few epochs)."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from haltpoint import (  # noqa: E402
    Checkpointer,
    CheckpointExistsError,
    CorruptCheckpointError,
    EarlyStopping,
    StateMismatchError,
)
from haltpoint.integrations.lightning import HaltpointCallback  # noqa: E402
from haltpoint.stopping.replay import replay  # noqa: E402

BATCHES_PER_EPOCH = 4


def make_data(sign: float) -> torch.utils.data.DataLoader:
    """Train targets follow +w, validation targets -w: the validation loss rises as it learns."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) * sign
    data = torch.utils.data.TensorDataset(x, y.unsqueeze(1))
    # Shuffled from the global RNG, which the checkpoints capture and restore.
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=sign > 0)


def make_module(base: Any = pl) -> Any:
    class Tiny(base.LightningModule):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1))
            self.head = torch.nn.Linear(8, 1)
            self.val_losses: list[float] = []
            self.train_epochs: list[int] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.net(x))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            if not self.train_epochs or self.train_epochs[-1] != self.current_epoch:
                self.train_epochs.append(self.current_epoch)
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def validation_step(self, batch: Any, _: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

        def on_validation_epoch_end(self) -> None:
            if not self.trainer.sanity_checking:
                self.val_losses.append(float(self.trainer.callback_metrics["val_loss"]))

        def configure_optimizers(self) -> Any:
            opt = torch.optim.Adam(self.parameters(), lr=0.05)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]

    return Tiny()


def fit(
    module: Any, callback: Any, max_epochs: int | None = None, base: Any = pl, **kwargs: Any
) -> Any:
    options: dict[str, Any] = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
    }
    trainer = base.Trainer(
        max_epochs=max_epochs,
        callbacks=callback if isinstance(callback, list) else [callback],
        **{**options, **kwargs},
    )
    trainer.fit(module, make_data(1.0), make_data(-1.0))
    return trainer


def test_stops_at_the_evaluation_a_replay_of_the_logged_losses_gives(tmp_path: Path) -> None:
    module = make_module()
    stopper = EarlyStopping("val_loss", patience=2)
    with Checkpointer(tmp_path, monitor="val_loss", keep_best=1) as ckpt:
        trainer = fit(module, HaltpointCallback(stopper, ckpt), max_epochs=20)
    expected = replay(lambda: EarlyStopping("val_loss", patience=2), module.val_losses)
    assert stopper.stopped and expected.stopped
    assert expected.last_index == len(module.val_losses) - 1 < 19
    assert trainer.current_epoch == len(module.val_losses)
    assert stopper.reason is not None and "for 2 evaluations" in stopper.reason


def test_checkpoints_are_in_haltpoint_format_under_the_global_step(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    module = make_module()
    with Checkpointer(tmp_path, monitor="val_loss", keep_last=10) as ckpt:
        fit(module, HaltpointCallback(None, ckpt), max_epochs=3)
        steps = [info.step for info in ckpt.list()]
    assert steps == [BATCHES_PER_EPOCH * (e + 1) for e in range(3)]
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(folders) == 3
    manifest = json.loads((folders[-1] / "manifest.json").read_text())
    assert manifest["metrics"]["val_loss"] == pytest.approx(module.val_losses[-1])
    tensors = load_file(folders[-1] / "tensors.safetensors")  # any safetensors reader opens it
    assert any(torch.equal(t, module.head.weight) for t in tensors.values())


def test_restore_best_loads_the_weights_saved_at_the_best_validation(tmp_path: Path) -> None:
    module = make_module()
    with Checkpointer(tmp_path, monitor="val_loss", keep_best=1) as ckpt:
        callback = HaltpointCallback(EarlyStopping("val_loss", patience=2), ckpt, restore_best=True)
        fit(module, callback, max_epochs=20)
        best = min(range(len(module.val_losses)), key=module.val_losses.__getitem__)
        assert callback.best_step == BATCHES_PER_EPOCH * (best + 1)
        saved = make_module()
        reader = Checkpointer(tmp_path, monitor="val_loss", read_only=True)
        assert reader.restore({"model": saved}, callback.best_step, strict=False) is not None
    for got, want in zip(module.parameters(), saved.parameters(), strict=True):
        assert torch.equal(got, want)
    assert not torch.equal(saved.head.weight, make_module().head.weight)


def test_resumed_fit_continues_where_it_stopped_and_matches_a_straight_run(
    tmp_path: Path,
) -> None:
    straight = make_module()
    straight_stopper = EarlyStopping("val_loss", patience=50)
    with Checkpointer(tmp_path / "straight") as ckpt:
        fit(straight, HaltpointCallback(straight_stopper, ckpt), max_epochs=4)

    first = make_module()
    with Checkpointer(tmp_path / "split") as ckpt:
        fit(first, HaltpointCallback(EarlyStopping("val_loss", patience=50), ckpt), max_epochs=2)
    resumed = make_module()  # fresh objects, fresh trainer, fresh callback
    stopper = EarlyStopping("val_loss", patience=50)
    with Checkpointer(tmp_path / "split") as ckpt:
        trainer = fit(resumed, HaltpointCallback(stopper, ckpt, resume=True), max_epochs=4)
        assert [info.step for info in ckpt.list()] == [4 * BATCHES_PER_EPOCH]
    assert resumed.train_epochs == [2, 3]
    assert trainer.global_step == 4 * BATCHES_PER_EPOCH
    assert stopper.evaluations == 4
    assert stopper.state_dict() == straight_stopper.state_dict()
    for got, want in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(got, want)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def _sealed(body: dict[str, Any]) -> bytes:
    """The manifest an attacker who knows the format writes for `body` (xxh3 is no signature)."""
    from haltpoint.store.hashing import hash_bytes

    def canonical(obj: Any) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    body = {k: v for k, v in body.items() if k != "checksum"}
    return canonical({**body, "checksum": hash_bytes(canonical(body))}) + b"\n"


def _field(node: Any, key: str) -> Any:
    """`node[key]` in the encoded tree, where a dict may be a tagged list of pairs."""
    if node.get("__hp__") == "dict":
        return next(pair for pair in node["items"] if pair[0] == key)
    return [key, node[key]]


def _crafted_loop(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    """Set the counter at `path` of the saved fit loop to `value`."""

    def change(body: dict[str, Any]) -> None:
        node = body["tree"]["loops"]["content"]
        for key in path[:-1]:
            node = _field(node, key)[1]
        _field(node, path[-1])[1] = value

    return change


_STEPS = ("epoch_loop.automatic_optimization.optim_progress", "optimizer", "step", "total")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _crafted_loop(("epoch_progress", "current", "ready"), "x"),
            r"epoch_progress.current.ready is 'x', not an int >= 0",
        ),
        (
            _crafted_loop(("epoch_loop.batch_progress", "total", "ready"), None),
            r"epoch_loop.batch_progress.total.ready is None, not an int >= 0",
        ),
        (
            _crafted_loop(("epoch_loop.batch_progress", "total", "started"), []),
            r"batch_progress.total.started is \[\], not an int >= 0",
        ),
        (
            _crafted_loop(("epoch_loop.batch_progress", "is_last_batch"), 1),
            r"batch_progress.is_last_batch is 1, not a bool",
        ),
        (
            _crafted_loop(("epoch_progress", "total", "completed"), -3),
            r"epoch_progress.total.completed is -3, not an int >= 0",
        ),
        (_crafted_loop((*_STEPS, "completed"), 99), r"the global step it gives is 99, not 8"),
    ],
    ids=["ready-a-string", "ready-null", "started-a-list", "last-batch-an-int", "negative",
         "global-step-of-another-step"],
)  # fmt: skip
def test_a_crafted_fit_loop_is_a_corrupt_checkpoint(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    """Lightning's loops take any value their checkpoint holds: resumed, such a crafted
    manifest (checksum valid) made `fit` fail with a TypeError deep inside Lightning, or
    carry on at another step's position."""
    with Checkpointer(tmp_path) as ckpt:
        fit(make_module(), HaltpointCallback(EarlyStopping("val_loss", patience=50), ckpt), 2)
    path = tmp_path / f"step-{2 * BATCHES_PER_EPOCH:09d}" / "manifest.json"
    body = json.loads(path.read_bytes())
    change(body)
    path.write_bytes(_sealed(body))
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(CorruptCheckpointError, match=rf"step 8 in .*fit loop .*run: .*{message}"),
    ):
        fit(make_module(), HaltpointCallback(None, ckpt, resume=True), max_epochs=4)


def test_a_resumed_run_that_had_stopped_trains_no_further(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Checkpointer(tmp_path) as ckpt:
        fit(make_module(), HaltpointCallback(EarlyStopping("val_loss", patience=1), ckpt), 20)
        stopped_at = ckpt.list()[-1].step
    module = make_module()
    stopper = EarlyStopping("val_loss", patience=1)
    with Checkpointer(tmp_path) as ckpt:
        trainer = fit(module, HaltpointCallback(stopper, ckpt, resume=True), max_epochs=20)
    assert stopper.stopped and module.train_epochs == []
    assert trainer.global_step == stopped_at
    resumed = [line for line in capsys.readouterr().err.splitlines() if "resumed" in line]
    assert resumed == [
        f"haltpoint: resumed from step {stopped_at} in {ckpt.directory}; the run had already "
        f"stopped: {stopper.reason}"
    ]


def test_a_rerun_of_a_stopped_run_restores_the_best_weights(tmp_path: Path) -> None:
    first = make_module()
    with Checkpointer(tmp_path, monitor="val_loss", keep_best=1) as ckpt:
        callback = HaltpointCallback(EarlyStopping("val_loss", patience=1), ckpt, restore_best=True)
        fit(first, callback, 20)
        steps = [info.step for info in ckpt.list()]
    module, stopper = make_module(), EarlyStopping("val_loss", patience=1)
    with Checkpointer(tmp_path, monitor="val_loss", keep_best=1) as ckpt:
        rerun = HaltpointCallback(stopper, ckpt, resume=True, restore_best=True)
        fit(module, rerun, max_epochs=20)
        assert [info.step for info in ckpt.list()] == steps  # nothing trained, nothing saved
    assert module.train_epochs == [] and rerun.best_step == callback.best_step
    assert stopper.reason == callback.stopper.reason  # type: ignore[union-attr]
    for got, want in zip(module.parameters(), first.parameters(), strict=True):
        assert torch.equal(got, want)


def test_a_metric_that_was_never_logged_is_named_with_the_keys_that_were(tmp_path: Path) -> None:
    callback = HaltpointCallback(EarlyStopping("val_acc", mode="max", patience=2))
    with pytest.raises(ValueError, match=r"'val_acc' was not logged.*\['val_loss'\].*#374"):
        fit(make_module(), callback, max_epochs=3)


def test_no_validation_at_all_is_reported(tmp_path: Path) -> None:
    callback = HaltpointCallback(EarlyStopping("val_loss", patience=2))
    with pytest.warns(UserWarning, match="no validation ran during fit.*'val_loss'"):
        fit(make_module(), callback, max_epochs=1, limit_val_batches=0)


def test_a_stop_decided_by_another_rank_stops_this_one(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[bool, bool]] = []

    def reduce(self: Any, decision: bool, all: bool = True) -> bool:
        asked.append((decision, all))
        return True  # as if another rank had decided to stop

    monkeypatch.setattr(pl.strategies.SingleDeviceStrategy, "reduce_boolean_decision", reduce)
    module = make_module()
    fit(module, HaltpointCallback(EarlyStopping("val_loss", patience=50)), max_epochs=5)
    assert asked == [(False, False)]
    assert len(module.val_losses) == 1


@pytest.mark.parametrize("name", ["FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"])
def test_strategies_that_shard_the_model_are_refused_with_a_checkpointer(
    tmp_path: Path, name: str
) -> None:
    from types import SimpleNamespace

    sharding = type(name, (pl.strategies.DDPStrategy,), {})  # the check reads the class names
    callback = HaltpointCallback(None, Checkpointer(tmp_path, async_save=False))
    with pytest.raises(ValueError, match=rf"replicate the model .* not {name}: .*rank 0"):
        callback.on_fit_start(SimpleNamespace(strategy=sharding()), make_module())
    callback.on_fit_start(SimpleNamespace(strategy=pl.strategies.DDPStrategy()), make_module())
    real = pl.strategies.FSDPStrategy()  # the real class, as Lightning builds it
    with pytest.raises(ValueError, match="not FSDPStrategy"):
        callback.on_fit_start(SimpleNamespace(strategy=real), make_module())
    callback.checkpointer.close()  # type: ignore[union-attr]


def test_a_used_directory_needs_resume(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt:
        fit(make_module(), HaltpointCallback(None, ckpt), max_epochs=1)
    with (
        Checkpointer(tmp_path) as ckpt,
        pytest.raises(CheckpointExistsError, match=r"already holds checkpoints.*resume=True"),
    ):
        fit(make_module(), HaltpointCallback(None, ckpt), max_epochs=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stopper": "val_loss"}, TypeError, "stopper must be a haltpoint.EarlyStopping"),
        ({"stopper": EarlyStopping(patience=1)}, ValueError, "needs a monitor"),
        ({"restore_best": True}, ValueError, "restore_best=True needs a checkpointer"),
        ({"resume": True}, ValueError, "resume=True needs a checkpointer"),
        ({"resume": 1}, TypeError, "resume must be True or False"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        HaltpointCallback(**kwargs)


def test_restore_best_needs_a_monitor_and_directions_must_agree(tmp_path: Path) -> None:
    with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match=r"monitor=\.\.\."):
        HaltpointCallback(None, ckpt, restore_best=True)
    with (
        Checkpointer(tmp_path, monitor="val_loss", mode="max") as ckpt,
        pytest.raises(ValueError, match="disagree on the direction"),
    ):
        HaltpointCallback(EarlyStopping("val_loss", patience=1), ckpt)


def test_works_with_the_standalone_pytorch_lightning_package(tmp_path: Path) -> None:
    base = pytest.importorskip("pytorch_lightning")
    module = make_module(base)
    stopper = EarlyStopping("val_loss", patience=1)
    with Checkpointer(tmp_path) as ckpt:
        fit(module, HaltpointCallback(stopper, ckpt), max_epochs=20, base=base)
        assert ckpt.list()
    assert stopper.stopped and len(module.val_losses) < 20


def test_the_stopper_rides_in_lightnings_own_checkpoints() -> None:
    stopper = EarlyStopping("val_loss", patience=3)
    stopper.step(1.0)
    saved = HaltpointCallback(stopper).state_dict()
    fresh = EarlyStopping("val_loss", patience=3)
    HaltpointCallback(fresh).load_state_dict(json.loads(json.dumps(saved)))
    assert fresh.state_dict() == stopper.state_dict()


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        (5, r"is 5, not the \{'stopper': ...\} it saves"),
        ({"stopper": "x"}, r"state must be a mapping"),
        ({"stopper": {"version": 1}}, r"missing keys"),
    ],
)
def test_a_crafted_stopper_state_in_a_lightning_checkpoint_is_one_state_mismatch_line(
    saved: Any, message: str
) -> None:
    """What a Lightning checkpoint holds for the callback was an AttributeError or a
    TypeError from inside the callback when altered."""
    fresh = EarlyStopping("val_loss", patience=3)
    with pytest.raises(StateMismatchError, match=message) as raised:
        HaltpointCallback(fresh).load_state_dict(saved)
    assert "\n" not in str(raised.value) and fresh.evaluations == 0


def test_module_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, "haltpoint.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'haltpoint\[lightning\]'"):
        importlib.import_module("haltpoint.integrations.lightning")


def test_two_callbacks_with_different_settings_share_a_trainer(tmp_path: Path) -> None:
    loss = HaltpointCallback(EarlyStopping("val_loss", patience=50))
    other = HaltpointCallback(EarlyStopping("val_loss", patience=1))
    assert loss.state_key != other.state_key
    assert "val_loss" in loss.state_key and "'patience': 50" in loss.state_key
    module = make_module()
    with Checkpointer(tmp_path / "run") as ckpt:
        saver = HaltpointCallback(None, ckpt)
        pl_ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "pl")
        trainer = fit(module, [loss, other, saver, pl_ckpt], 5, enable_checkpointing=True)
    assert other.stopper.stopped and not loss.stopper.stopped  # type: ignore[union-attr]
    keys = {loss.state_key, other.state_key, saver.state_key}
    assert len(keys) == 3
    lightning_ckpt = torch.load(
        trainer.checkpoint_callback.best_model_path, weights_only=False, map_location="cpu"
    )
    assert keys <= set(lightning_ckpt["callbacks"])


def test_a_missing_metric_at_train_epoch_end_names_the_training_hooks() -> None:
    callback = HaltpointCallback(
        EarlyStopping("train_acc", mode="max", patience=2), check_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with pytest.raises(ValueError, match=r"'train_acc' was not logged.*on_train_epoch_end") as info:
        trainer.fit(make_module(), make_data(1.0), make_data(-1.0))
    assert "validation_step" not in str(info.value)
    assert trainer.callbacks == [callback]  # the fit raised: its epoch-end check is gone too


def test_a_metric_logged_in_the_modules_train_epoch_end_is_checked(tmp_path: Path) -> None:
    """The check runs among Lightning's checkpoint callbacks, only during fit, before them."""

    class Logged(type(make_module())):  # type: ignore[misc]
        def on_train_epoch_end(self) -> None:
            self.log("train_metric", float(self.current_epoch))  # never improves after 0

    stopper = EarlyStopping("train_metric", patience=1)
    callback = HaltpointCallback(stopper, check_on_train_epoch_end=True)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_top_k=-1)
    during: list[list[str]] = []

    class Peek(pl.Callback):  # type: ignore[misc]
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            during.append([type(cb).__name__ for cb in trainer.callbacks])

    callbacks = [saver, callback, Peek()]
    trainer = fit(Logged(), callbacks, 20, limit_val_batches=0, enable_checkpointing=True)
    assert stopper.stopped and stopper.evaluations == 2 and trainer.current_epoch == 2
    assert during == [["HaltpointCallback", "Peek", "HaltpointEpochEndCheck", "ModelCheckpoint"]]
    assert trainer.callbacks == [callback, callbacks[2], saver]
    assert trainer.checkpoint_callback is saver
    paths = sorted(tmp_path.glob("epoch=*.ckpt"))
    assert len(paths) == 2
    for path in paths:  # each saved after the stopper's step of its epoch
        epoch = int(path.name.split("-")[0].removeprefix("epoch="))
        saved = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
        assert saved["stopper"]["evaluations"] == epoch + 1


def test_a_metric_logged_in_train_epoch_end_with_pytorch_lightning() -> None:
    base = pytest.importorskip("pytorch_lightning")

    class Logged(type(make_module(base))):  # type: ignore[misc]
        def on_train_epoch_end(self) -> None:
            self.log("train_metric", float(self.current_epoch))

    stopper = EarlyStopping("train_metric", patience=1)
    callback = HaltpointCallback(stopper, check_on_train_epoch_end=True)
    trainer = fit(Logged(), callback, max_epochs=20, base=base)
    assert stopper.stopped and stopper.evaluations == 2 and trainer.current_epoch == 2


def test_check_on_train_epoch_end_stops_a_run_without_validation(tmp_path: Path) -> None:
    class TrainLogged(type(make_module())):  # type: ignore[misc]
        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            loss = super().training_step(batch, i)
            self.log("train_metric", float(self.current_epoch), on_epoch=True, on_step=False)
            return loss

    module = TrainLogged()
    stopper = EarlyStopping("train_metric", mode="min", patience=2)  # never improves after 0
    with Checkpointer(tmp_path / "run", keep_last=10) as ckpt:
        callback = HaltpointCallback(stopper, ckpt, check_on_train_epoch_end=True)
        trainer = fit(module, callback, max_epochs=20, limit_val_batches=0)
        steps = [info.step for info in ckpt.list()]
    assert stopper.stopped and stopper.evaluations == 3
    assert module.train_epochs == [0, 1, 2] and trainer.current_epoch == 3
    assert steps == [BATCHES_PER_EPOCH * e for e in (1, 2, 3)]


class Kill(pl.Callback):  # type: ignore[misc]
    """Raises at the start of the batch after global step `step`, as a kill would end the run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("killed")


@pytest.mark.parametrize("check_on_train_epoch_end", [False, True])
@pytest.mark.parametrize("killed_at_epoch", [1, 2])
@pytest.mark.parametrize(
    "length",
    [{"max_epochs": 4}, {"max_epochs": -1, "max_steps": 4 * BATCHES_PER_EPOCH}],
    ids=["max_epochs", "max_steps"],
)
def test_a_killed_and_resumed_fit_matches_an_uninterrupted_one(
    tmp_path: Path,
    recwarn: pytest.WarningsRecorder,
    check_on_train_epoch_end: bool,
    killed_at_epoch: int,
    length: dict[str, Any],
) -> None:
    """Same batch order (shuffled), weights, stopper, checkpoints and scheduler, bit for bit."""

    def callback(directory: Path, resume: bool) -> Any:
        stopper = EarlyStopping("val_loss", patience=50)
        ckpt = Checkpointer(directory, keep_last=10)
        return HaltpointCallback(
            stopper, ckpt, resume=resume, check_on_train_epoch_end=check_on_train_epoch_end
        )

    straight = make_module()
    uninterrupted = callback(tmp_path / "straight", resume=False)
    with uninterrupted.checkpointer:
        fit(straight, uninterrupted, **length)
        straight_steps = [info.step for info in uninterrupted.checkpointer.list()]

    killed = callback(tmp_path / "split", resume=False)
    kill = Kill(killed_at_epoch * BATCHES_PER_EPOCH + 1)  # one batch into the next epoch
    with killed.checkpointer, pytest.raises(RuntimeError, match="killed"):
        fit(make_module(), [killed, kill], **length)
    recwarn.clear()
    resumed_module = make_module()
    resumed = callback(tmp_path / "split", resume=True)
    with resumed.checkpointer:
        trainer = fit(resumed_module, resumed, **length)
        steps = [info.step for info in resumed.checkpointer.list()]
    assert [str(w.message) for w in recwarn if "haltpoint" in str(w.message)] == []
    assert resumed_module.train_epochs == list(range(killed_at_epoch, 4))
    assert steps == straight_steps
    assert resumed.stopper.state_dict() == uninterrupted.stopper.state_dict()
    assert trainer.global_step == 4 * BATCHES_PER_EPOCH
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4
    for got, want in zip(resumed_module.parameters(), straight.parameters(), strict=True):
        assert torch.equal(got, want)


def _files(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` but the writer's lock, by its path there, with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".haltpoint.lock"
    }


@pytest.mark.parametrize("check_on_train_epoch_end", [False, True])
@pytest.mark.parametrize(
    ("length", "finished"),
    [
        ({"max_epochs": 2}, "it reached max_epochs=2"),
        ({"max_epochs": -1, "max_steps": 2 * BATCHES_PER_EPOCH}, "it reached max_steps=8"),
        ({"max_epochs": 20}, None),  # stopped early
    ],
    ids=["max_epochs", "max_steps", "stopped"],
)
def test_a_rerun_of_a_finished_fit_says_so_and_changes_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
    check_on_train_epoch_end: bool,
    length: dict[str, Any],
    finished: str | None,
) -> None:
    def run() -> tuple[Any, HaltpointCallback, Any]:
        module = make_module()
        with Checkpointer(tmp_path, monitor="val_loss", keep_best=1) as ckpt:
            callback = HaltpointCallback(
                EarlyStopping("val_loss", patience=1 if finished is None else 50),
                ckpt,
                resume=True,
                check_on_train_epoch_end=check_on_train_epoch_end,
            )
            trainer = fit(module, callback, **length)
        return module, callback, trainer

    first, callback, trainer = run()
    assert callback.stopper is not None and callback.stopper.stopped == (finished is None)
    files, state = _files(tmp_path), callback.stopper.state_dict()
    capsys.readouterr()
    recwarn.clear()
    module, rerun, retrainer = run()
    assert [str(w.message) for w in recwarn if "haltpoint" in str(w.message)] == []
    assert retrainer.current_epoch == trainer.current_epoch  # the epochs the run trained
    assert _files(tmp_path) == files
    assert module.train_epochs == []
    assert rerun.stopper is not None and rerun.stopper.state_dict() == state
    for got, want in zip(module.parameters(), first.parameters(), strict=True):
        assert torch.equal(got, want)
    step = max(int(name.split("/")[0].split("-")[-1]) for name in files if "/" in name)
    ending = f"stopped: {rerun.stopper.reason}" if finished is None else f"finished: {finished}"
    lines = [line for line in capsys.readouterr().err.splitlines() if "haltpoint" in line]
    assert lines == [
        f"haltpoint: resumed from step {step} in {tmp_path}; the run had already {ending}"
    ]


def test_a_rerun_of_a_fit_that_ended_after_its_last_check_trains_those_batches_only(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    """max_steps=10 with a validation every 4 steps: the run's last checkpoint is step 8, so a
    rerun resumes there and trains steps 9 and 10 again (docs/integrations.md), saving
    nothing, without warning that no validation ran (the run was checked before)."""

    def run() -> tuple[Any, Any]:
        module = make_module()
        with Checkpointer(tmp_path, monitor="val_loss", keep_best=1) as ckpt:
            callback = HaltpointCallback(EarlyStopping("val_loss", patience=50), ckpt, resume=True)
            return module, fit(module, callback, max_epochs=-1, max_steps=10)

    run()
    files = _files(tmp_path)
    recwarn.clear()
    module, trainer = run()
    assert [str(w.message) for w in recwarn if "haltpoint" in str(w.message)] == []
    assert module.train_epochs == [2] and trainer.global_step == 10
    assert _files(tmp_path) == files


def test_a_stopped_run_resumed_by_ckpt_path_last_beside_a_best_checkpoint_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lightning 2.6 writes `last.ckpt` of a `ModelCheckpoint(monitor=..., save_last=True)`
    only at the steps it saves a top-k checkpoint: with `save_top_k=1` it is the best's copy,
    and `fit(ckpt_path="last")` of a stopped run trained the epochs after the best again. The
    setup docs/integrations.md gives, `last.ckpt` from a second ModelCheckpoint without a
    monitor, holds the stop: run again, and a third time, it trains nothing."""

    def run() -> tuple[Any, Any, Any]:
        best = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
        last = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
        callback = HaltpointCallback(EarlyStopping("val_loss", patience=1))
        module = make_module()
        options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
        trainer = pl.Trainer(max_epochs=20, callbacks=[callback, best, last], **options)
        trainer.fit(module, make_data(1.0), make_data(-1.0), ckpt_path="last")
        return module, callback, trainer

    first, callback, trainer = run()
    assert callback.stopper is not None and callback.stopper.stopped
    assert first.val_losses.index(min(first.val_losses)) < len(first.val_losses) - 1
    state = callback.stopper.state_dict()
    for _ in range(2):
        capsys.readouterr()
        module, callback, retrainer = run()
        assert module.train_epochs == []
        assert retrainer.global_step == trainer.global_step
        assert callback.stopper is not None and callback.stopper.state_dict() == state
        for got, want in zip(module.parameters(), first.parameters(), strict=True):
            assert torch.equal(got, want)
        lines = [line for line in capsys.readouterr().err.splitlines() if "haltpoint" in line]
        assert lines == [
            f"haltpoint: resumed from {tmp_path / 'last.ckpt'}; the run had already stopped: "
            f"{callback.stopper.reason}"
        ]


@pytest.mark.parametrize("again", ["ckpt_path", "second_fit"])
def test_a_stopped_run_resumed_by_lightning_or_fit_again_trains_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
    again: str,
) -> None:
    """The stopper rides in Lightning's own checkpoint: `fit(ckpt_path=last.ckpt)` of a run it
    stopped trained one more epoch (and wrote its checkpoint) before the check stopped it
    again; so did a second `fit` with the stopped stopper. Now neither trains, and one line
    says why."""

    def saver() -> Any:
        return pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "pl", save_last=True, save_top_k=-1)

    callback = HaltpointCallback(EarlyStopping("val_loss", patience=1))
    first = make_module()
    trainer = fit(first, [callback, saver()], 20, enable_checkpointing=True)
    assert callback.stopper is not None and callback.stopper.stopped
    files, state = _files(tmp_path / "pl"), callback.stopper.state_dict()
    capsys.readouterr()
    recwarn.clear()
    module = make_module()
    if again == "ckpt_path":
        callback = HaltpointCallback(EarlyStopping("val_loss", patience=1))
        options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
        retrainer = pl.Trainer(max_epochs=20, callbacks=[callback, saver()], **options)
        retrainer.fit(module, make_data(1.0), make_data(-1.0), ckpt_path=tmp_path / "pl/last.ckpt")
        where = f"resumed from {tmp_path / 'pl/last.ckpt'}; "
        ending = ""
    else:
        retrainer = fit(module, [callback, saver()], 20, enable_checkpointing=True)
        where, ending = "", "; nothing to train (stopper.clear_stop() trains on past the stop)"
    assert module.train_epochs == []
    assert retrainer.global_step == (trainer.global_step if again == "ckpt_path" else 0)
    # no epoch's checkpoint is new (Lightning's ModelCheckpoint writes its last.ckpt at the
    # end of every fit, trained or not)
    assert [n for n in _files(tmp_path / "pl") if n.startswith("epoch=")] == [
        n for n in files if n.startswith("epoch=")
    ]
    assert callback.stopper is not None and callback.stopper.state_dict() == state
    assert [str(w.message) for w in recwarn if "haltpoint" in str(w.message)] == []
    lines = [line for line in capsys.readouterr().err.splitlines() if "haltpoint" in line]
    assert lines == [
        f"haltpoint: {where}the run had already stopped: {callback.stopper.reason}{ending}"
    ]
