"""HaltpointPruner in real Optuna studies: optimize, ask/tell, SQLite storage, a resumed study."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from haltpoint import EarlyStopping  # noqa: E402
from haltpoint.integrations.optuna import HaltpointPruner, prune_reason  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
RATES = [1.0, 0.9, 0.8, 0.7, 0.05, 0.95, 0.01, 0.85]


def curve(rate: float, epoch: int) -> float:
    return 1.0 / (1.0 + rate * epoch)


def replayed(study: optuna.Study, rates: list[float] = RATES) -> optuna.Study:
    """Queue the rates in this order, as a replayed search."""
    for rate in rates:
        study.enqueue_trial({"rate": rate})
    return study


def objective(trial: optuna.Trial) -> float:
    rate = trial.suggest_categorical("rate", RATES)
    for epoch in range(30):
        trial.report(curve(rate, epoch), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(prune_reason(trial))
    return curve(rate, 29)


def pruned(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]


def test_optimize_prunes_the_slow_rates_and_keeps_the_best() -> None:
    study = replayed(optuna.create_study(pruner=HaltpointPruner()))
    study.optimize(objective, n_trials=len(RATES))
    early = {t.params["rate"] for t in pruned(study) if t.last_step == 2}
    assert early == {0.05, 0.01}
    assert study.best_params == {"rate": 1.0}
    assert all("leading trial 0" in prune_reason(t) for t in pruned(study))


def test_ask_tell_and_a_maximised_metric() -> None:
    study = optuna.create_study(direction="maximize", pruner=HaltpointPruner())
    stopped = []
    for rate in RATES:
        trial = study.ask()
        for epoch in range(30):
            trial.report(-curve(rate, epoch), epoch)
            if trial.should_prune():
                stopped.append(rate)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, -curve(rate, 29))
    assert {0.05, 0.01} <= set(stopped) and 1.0 not in stopped


def test_sqlite_storage_keeps_reasons_and_a_killed_study_resumes(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, pruner=HaltpointPruner())
    replayed(study, RATES[:5])
    study.optimize(objective, n_trials=5)
    killed = study.ask({"rate": optuna.distributions.CategoricalDistribution(RATES)})
    for epoch in range(3):
        killed.report(curve(0.5, epoch), epoch)  # the process dies here: the trial stays RUNNING
    resumed = optuna.load_study(study_name="s", storage=storage, pruner=HaltpointPruner())
    replayed(resumed, RATES[5:])
    resumed.optimize(objective, n_trials=3)
    assert {0.05, 0.01} <= {t.params["rate"] for t in pruned(resumed)}
    assert resumed.best_params == {"rate": 1.0}
    assert "worse than leading trial 0" in prune_reason(pruned(resumed)[-1])


def test_early_stopping_inside_a_trial_keeps_working() -> None:
    def stopped_early(trial: optuna.Trial) -> float:
        rate = trial.suggest_categorical("rate", RATES)
        stopper = EarlyStopping("loss", patience=2, min_delta=0.01)
        for epoch in range(30):
            value = curve(rate, epoch)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(prune_reason(trial))
            if stopper.step(value):
                break
        trial.set_user_attr("epochs", epoch + 1)
        return value

    study = replayed(optuna.create_study(pruner=HaltpointPruner()))
    study.optimize(stopped_early, n_trials=len(RATES))
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert any(t.user_attrs["epochs"] < 30 for t in finished)
    assert {0.05, 0.01} <= {t.params["rate"] for t in pruned(study)}


def test_multi_objective_studies_are_refused() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    with pytest.raises(ValueError, match="single-objective"):
        HaltpointPruner().prune(study, study._storage.get_trial(trial._trial_id))


def test_settings_must_be_prune_settings() -> None:
    with pytest.raises(TypeError, match="settings must be a PruneSettings"):
        HaltpointPruner({"min_trials": 2})  # type: ignore[arg-type]


@pytest.mark.parametrize("thing", [None, 0, "trial 3", [], "study"])
def test_prune_reason_of_something_not_a_trial_is_named(thing: object) -> None:
    if thing == "study":
        thing = optuna.create_study()  # it has user_attrs too: it used to answer ''
    with pytest.raises(TypeError, match="prune_reason takes a Trial or FrozenTrial"):
        prune_reason(thing)  # type: ignore[arg-type]


def test_prune_reason_of_study_trials_and_a_fixed_trial() -> None:
    study = replayed(optuna.create_study(pruner=HaltpointPruner()))
    study.optimize(objective, n_trials=len(RATES))
    assert all(bool(prune_reason(t)) == (t in pruned(study)) for t in study.trials)
    assert prune_reason(optuna.trial.FixedTrial({"rate": 1.0})) == ""


def test_a_trial_completed_despite_a_verdict_to_prune_has_no_reason() -> None:
    """ask/tell: should_prune said True, the loop went on and told a value, or a later
    should_prune said False; the trial was not pruned, so prune_reason is '' (it returned the
    stale sentence)."""
    study = replayed(optuna.create_study(pruner=HaltpointPruner()), RATES[:4])
    study.optimize(objective, n_trials=4)
    trial = study.ask()
    verdicts = []
    for epoch in range(5):
        trial.report(3.0, epoch)
        verdicts.append(trial.should_prune())
    assert verdicts[-1] and prune_reason(trial)
    study.tell(trial, 3.0)
    assert prune_reason(trial) == "" and prune_reason(study.trials[-1]) == ""
    trial = study.ask()
    for epoch in range(5):
        trial.report(3.0, epoch)
    assert trial.should_prune() and prune_reason(trial)
    trial.report(0.0, 5)  # it leads now: the last verdict is to keep it
    assert not trial.should_prune() and prune_reason(trial) == ""


WORKER = """
import sys
import optuna
from haltpoint.integrations.optuna import HaltpointPruner, prune_reason
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(
    study_name="s", storage=sys.argv[1], load_if_exists=True, pruner=HaltpointPruner()
)
def objective(trial):
    rate = trial.suggest_float("rate", 0.01, 1.0, log=True)
    for epoch in range(20):
        trial.report(1.0 / (1.0 + rate * epoch), epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(prune_reason(trial))
    return 1.0 / (1.0 + rate * 19)
study.optimize(objective, n_trials=10)
"""


def test_two_worker_processes_share_a_sqlite_study(tmp_path: Path) -> None:
    """As docs/tuning.md says: the file's tables are made once (two processes making them at
    once fail inside Optuna, optuna/optuna#1092), then both workers load the study."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="s", storage=storage)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [
        subprocess.Popen([sys.executable, str(script), storage], env=env, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err.decode()
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 20
    assert all(prune_reason(t).startswith("at step") for t in pruned(study))
    assert study.best_trial.state == optuna.trial.TrialState.COMPLETE


def test_a_failed_trial_never_sets_the_bar() -> None:
    """Trials that crashed (state FAIL) are not compared: their fast curves prune no one, while
    the same curve, told as a COMPLETE trial, prunes the slow rate."""

    def run(final_state: optuna.trial.TrialState) -> list[float]:
        study = optuna.create_study(pruner=HaltpointPruner())
        for rate in (1.0, 0.9, 0.8, 0.7):
            fast = study.ask()
            for epoch in range(30):
                fast.report(curve(rate, epoch), epoch)
            if final_state == optuna.trial.TrialState.FAIL:
                study.tell(fast, state=final_state)
            else:
                study.tell(fast, curve(rate, 29))
        stopped = []
        for rate in (0.01, 0.01):
            trial = study.ask()
            for epoch in range(30):
                trial.report(curve(rate, epoch), epoch)
                if trial.should_prune():
                    stopped.append(rate)
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    break
            else:
                study.tell(trial, curve(rate, 29))
        return stopped

    assert run(optuna.trial.TrialState.COMPLETE) == [0.01, 0.01]
    assert run(optuna.trial.TrialState.FAIL) == []
