"""Optuna pruner backed by `haltpoint.tuning`: a trial is pruned when it cannot catch the leader.

>>> import optuna
>>> optuna.logging.set_verbosity(optuna.logging.WARNING)
>>> study = optuna.create_study(pruner=HaltpointPruner())
>>> def objective(trial):
...     rate = trial.suggest_float("rate", 0.1, 1.0)
...     for epoch in range(20):
...         trial.report(1.0 / (1 + rate * epoch), epoch)
...         if trial.should_prune():
...             raise optuna.TrialPruned(prune_reason(trial))
...     return 1.0 / (1 + rate * 19)
>>> study.optimize(objective, n_trials=8)
>>> len(study.trials)
8
"""

from __future__ import annotations

from optuna.pruners import BasePruner
from optuna.study import Study, StudyDirection
from optuna.trial import FixedTrial, FrozenTrial, Trial, TrialState

from haltpoint.tuning import DEFAULT_SETTINGS, PruneSettings, _judge

REASON_ATTR = "haltpoint_prune_reason"

_COMPARED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class HaltpointPruner(BasePruner):
    """Prune a trial whose best value so far trails the leading trial's by more than the trials
    of the study recovered later and more than its own recent progress would close, once enough
    of them ran on past its step (see `haltpoint.tuning.judge`).

    The reason of each decision to prune is stored on the trial as the user attribute
    ``haltpoint_prune_reason`` (it survives in RDB storage); read it with `prune_reason`.
    ``settings`` (`haltpoint.tuning.PruneSettings`) holds the rule's constants; the defaults
    are the ones judged in docs/tuning.md.
    """

    def __init__(self, settings: PruneSettings = DEFAULT_SETTINGS) -> None:
        if not isinstance(settings, PruneSettings):
            raise TypeError(f"settings must be a PruneSettings, got {type(settings).__name__}")
        self._settings = settings
        #: Trials given a reason to prune (the FrozenTrial Optuna passes lacks it).
        self._reasoned: set[int] = set()

    def prune(self, study: Study, trial: FrozenTrial) -> bool:
        """Optuna's hook: True when ``trial`` should stop now."""
        if len(study.directions) != 1:
            raise ValueError("HaltpointPruner supports single-objective studies only")
        if not trial.intermediate_values:
            return False
        mode = "max" if study.direction == StudyDirection.MAXIMIZE else "min"
        others = {
            t.number: t.intermediate_values
            for t in study.get_trials(deepcopy=False, states=_COMPARED)
            if t.number != trial.number and t.intermediate_values
        }
        # Optuna's report stores int steps >= 0 and float values: judge's checks are skipped.
        verdict = _judge(others, trial.intermediate_values, mode, self._settings, "value")
        if verdict.prune:
            study._storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, verdict.reason)
            self._reasoned.add(trial._trial_id)
        elif trial._trial_id in self._reasoned:  # an earlier verdict no longer holds
            study._storage.set_trial_user_attr(trial._trial_id, REASON_ATTR, "")
            self._reasoned.discard(trial._trial_id)
        return verdict.prune


def prune_reason(trial: Trial | FrozenTrial | FixedTrial) -> str:
    """The sentence `HaltpointPruner` stored when it pruned ``trial`` ('' if it did not: a
    trial completed or failed despite the verdict, or whose last verdict was to keep it)."""
    if isinstance(trial, Trial):
        trial = trial.study._storage.get_trial(trial._trial_id)
    if isinstance(trial, FrozenTrial):
        if trial.state not in (TrialState.PRUNED, TrialState.RUNNING):
            return ""  # told a value (or failed) despite the verdict: it was not pruned
        attrs = trial.user_attrs
    elif isinstance(trial, FixedTrial):
        attrs = trial.user_attrs
    else:
        raise TypeError(
            "prune_reason takes a Trial or FrozenTrial (the objective's trial, one of "
            f"study.trials), got {type(trial).__name__}"
        )
    return str(attrs.get(REASON_ATTR, ""))


__all__ = ["REASON_ATTR", "HaltpointPruner", "prune_reason"]
