"""A Lightning trial pruned by HaltpointPruner, through an optuna-integration-style pruning
callback beside haltpoint's own callback, stops with a reason at a verified checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

optuna = pytest.importorskip("optuna")
pl = pytest.importorskip("lightning.pytorch")

from haltpoint import Checkpointer, EarlyStopping  # noqa: E402
from haltpoint.integrations.lightning import HaltpointCallback  # noqa: E402
from haltpoint.integrations.optuna import prune_reason  # noqa: E402
from test_tuning_checkpoints import CURVES, EPOCHS, SMALL, enqueue, intact_latest, pruned_trial  # noqa: E402


class PruningCallback(pl.Callback):  # type: ignore[misc]
    """What optuna-integration's PyTorchLightningPruningCallback does: report the monitored
    value after each validation and stop the trainer when the trial should be pruned."""

    def __init__(self, trial: optuna.Trial, monitor: str) -> None:
        self.trial, self.monitor, self.pruned = trial, monitor, False

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if trainer.sanity_checking:
            return
        self.trial.report(float(trainer.callback_metrics[self.monitor]), trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned = trainer.should_stop = True


class Scripted(pl.LightningModule):  # type: ignore[misc]
    """A tiny model that trains for real but logs a scripted validation loss per epoch."""

    def __init__(self, curve: list[float]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(2, 1)
        self.curve = curve

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, _: int) -> None:
        self.log("val_loss", torch.tensor(self.curve[self.current_epoch]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader() -> torch.utils.data.DataLoader:
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1]), batch_size=4)


def test_a_lightning_trial_pruned_beside_haltpoints_callback_stops_with_a_reason(
    tmp_path: Path,
) -> None:
    def objective(trial: optuna.Trial) -> float:
        name = trial.suggest_categorical("curve", list(CURVES))
        pruning = PruningCallback(trial, "val_loss")
        with Checkpointer(tmp_path / name, monitor="val_loss", keep_last=2) as ckpt:
            saving = HaltpointCallback(EarlyStopping("val_loss", patience=3), ckpt)
            trainer = pl.Trainer(
                max_epochs=EPOCHS,
                callbacks=[saving, pruning],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
                accelerator="cpu",
            )
            trainer.fit(Scripted(CURVES[name]), loader(), loader())
        if pruning.pruned:
            raise optuna.TrialPruned(prune_reason(trial))
        return min(CURVES[name])

    study = enqueue(optuna.create_study(pruner=SMALL))
    study.optimize(objective, n_trials=len(CURVES))
    trial = pruned_trial(study)
    assert trial.params == {"curve": "bad"} and trial.last_step == 2
    assert "worse than leading trial 0" in prune_reason(trial)
    # Saved under the global step: 2 batches an epoch, epochs 0..2 trained, nothing after.
    assert intact_latest(tmp_path / "bad") == 3 * 2
    assert intact_latest(tmp_path / "good") == EPOCHS * 2
