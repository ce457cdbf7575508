"""A trial pruned by HaltpointPruner stops with a reason and leaves a consistent run directory
(a plain loop here; Lightning in test_tuning_lightning.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

optuna = pytest.importorskip("optuna")

from haltpoint import Checkpointer, EarlyStopping  # noqa: E402
from haltpoint.cli import main  # noqa: E402
from haltpoint.integrations.optuna import HaltpointPruner, prune_reason  # noqa: E402
from haltpoint.tuning import PruneSettings  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
EPOCHS = 8
#: Validation losses by trial: two good trials, then a hopeless one.
CURVES = {
    "good": [1.0 / (1 + e) for e in range(EPOCHS)],
    "close": [1.05 / (1 + e) for e in range(EPOCHS)],
    "bad": [3.0 - 0.01 * e for e in range(EPOCHS)],
}
SMALL = HaltpointPruner(PruneSettings(min_trials=2, min_step=2))


def enqueue(study: optuna.Study) -> optuna.Study:
    for name in CURVES:
        study.enqueue_trial({"curve": name})
    return study


def pruned_trial(study: optuna.Study) -> Any:
    (trial,) = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    return trial


def intact_latest(run: Path) -> int:
    """The step of the latest checkpoint, after `haltpoint verify` passes and it restores."""
    assert main(["verify", str(run)]) == 0
    model = torch.nn.Linear(2, 1)
    with Checkpointer(run, read_only=True) as reader:
        info = reader.restore({"model": model}, strict=False)
    assert info is not None
    return info.step


def test_a_pruned_trial_of_a_plain_loop_ends_at_an_intact_checkpoint(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        name = trial.suggest_categorical("curve", list(CURVES))
        model = torch.nn.Linear(2, 1)
        stopper = EarlyStopping("val_loss", patience=3)
        with Checkpointer(tmp_path / name, monitor="val_loss", keep_last=2) as ckpt:
            for epoch, value in enumerate(CURVES[name]):
                with torch.no_grad():
                    model.weight.add_(1.0)
                stopper.step({"val_loss": value})
                ckpt.save(epoch, {"model": model, "stopper": stopper}, {"val_loss": value})
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(prune_reason(trial))
        return min(CURVES[name])

    study = enqueue(optuna.create_study(pruner=SMALL))
    study.optimize(objective, n_trials=len(CURVES))
    trial = pruned_trial(study)
    assert trial.params == {"curve": "bad"} and trial.last_step == 2
    assert "worse than leading trial 0" in prune_reason(trial)
    assert intact_latest(tmp_path / "bad") == 2
    assert intact_latest(tmp_path / "good") == EPOCHS - 1
