"""The 24 DeepOBS sweeps as a search sees them, and their replay through a real Optuna study.

A sweep is one problem and one optimizer: its 45 runs (37 learning rates, one of them with 9
seeds) are its trials, fed in a fixed random order. A trial reports its test loss every epoch
(step 0 is the untrained model, so a trial stopped at step s spent s training epochs); every
trial, under every pruner, also stops at its first non-finite loss, as a user's own check
would. The trial's value is its best test loss (the checkpoint it returns); its quality is the
test accuracy at that epoch where the problem has one, else that test loss.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stopping_curves import Curves

ORDER_SEED = 0  # the order in which every sweep's trials are fed


@dataclass(frozen=True)
class Sweep:
    """One problem and optimizer: ``loss[k]`` is trial k's test loss up to its first non-finite
    value (included), ``quality[k]`` the judged series, in the order the search feeds them."""

    problem: str
    optimizer: str
    loss: tuple[np.ndarray, ...]
    quality: tuple[np.ndarray, ...]
    has_acc: bool

    @property
    def name(self) -> str:
        return f"{self.problem}/{self.optimizer.removesuffix('Optimizer')}"

    def epochs(self) -> int:
        """Training epochs of the full sweep (every trial to its end or its divergence)."""
        return sum(len(v) - 1 for v in self.loss)

    def regret(self, complete: list[int]) -> float:
        """Regret in % of the best of the ``complete`` trials against the full sweep's best."""
        if not complete:
            return 100.0
        full = self._quality(range(len(self.loss)))
        kept = self._quality(complete)
        gap = full - kept if self.has_acc else kept - full
        return 100.0 * gap / abs(full)

    def _quality(self, trials: range | list[int]) -> float:
        best = min(trials, key=lambda k: np.nanmin(self.loss[k]))
        return float(self.quality[best][np.nanargmin(self.loss[best])])


def sweeps(curves: Curves, seed: int = ORDER_SEED) -> list[Sweep]:
    """The 24 sweeps of the runs as recorded, each in a fixed random order."""
    rng = np.random.default_rng(seed)
    out = []
    originals = curves.originals()
    for p, problem in enumerate(curves.problems):
        for o, optimizer in enumerate(curves.optimizers):
            runs = [c for c in originals if curves.problem[c] == p and curves.optimizer[c] == o]
            runs = [runs[k] for k in rng.permutation(len(runs))]
            losses, qualities = [], []
            for c in runs:
                s, n = int(curves.start[c]), int(curves.length[c])
                loss = curves.x[s : s + n]
                bad = np.flatnonzero(~np.isfinite(loss))
                end = int(bad[0]) + 1 if len(bad) else n
                losses.append(loss[:end].copy())
                judged = curves.acc if curves.has_acc()[c] else curves.x
                qualities.append(judged[s : s + end].copy())
            has_acc = bool(curves.has_acc()[runs[0]])
            out.append(Sweep(problem, optimizer, tuple(losses), tuple(qualities), has_acc))
    return out


def trained(sweep: Sweep) -> list[int]:
    """The trials of ``sweep`` that trained: finite throughout, and their best loss below their
    untrained one by more than half of what the sweep's most improved trial gained."""
    gains = [float(v[0] - np.nanmin(v)) for v in sweep.loss if np.all(np.isfinite(v))]
    most = max(gains, default=0.0)
    return [
        k
        for k, v in enumerate(sweep.loss)
        if np.all(np.isfinite(v)) and v[0] - np.nanmin(v) > 0.5 * most
    ]


def pooled_sweeps(curves: Curves, seed: int = ORDER_SEED) -> list[Sweep]:
    """Eight many-trial sweeps: per problem, the trials that trained (`trained`) of its three
    optimizers' sweeps, pooled (68-98 trials) and fed in a fixed random order. Closer to an
    architecture search than a learning-rate sweep: every trial is a sound configuration, and
    their curves run side by side more than they cross."""
    rng = np.random.default_rng(1_000 + seed)
    by_problem: dict[str, list[Sweep]] = {}
    for sw in sweeps(curves, seed):
        by_problem.setdefault(sw.problem, []).append(sw)
    out = []
    for problem, group in by_problem.items():
        picked = [(sw.loss[k], sw.quality[k]) for sw in group for k in trained(sw)]
        picked = [picked[k] for k in rng.permutation(len(picked))]
        loss = tuple(v for v, _ in picked)
        quality = tuple(q for _, q in picked)
        out.append(Sweep(problem, "pooled", loss, quality, group[0].has_acc))
    return out


#: The families of sweeps `benchmarks/tuning.py --family` replays.
FAMILIES = {"deepobs": sweeps, "pooled": pooled_sweeps}


@dataclass(frozen=True)
class Outcome:
    """What a pruner did on one sweep: training epochs spent and the completed trials."""

    epochs: int
    complete: tuple[int, ...]


def replay(sweep: Sweep, pruner: optuna.pruners.BasePruner) -> Outcome:
    """Run the sweep as a real in-memory Optuna study, the sampler replaying the fixed order."""
    study = optuna.create_study(
        study_name="replay",  # Hyperband's brackets hash the study's name: keep them fixed
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=pruner,
    )
    for k in range(len(sweep.loss)):
        study.enqueue_trial({"trial": k})
    spent = [0]

    def objective(trial: optuna.Trial) -> float:
        loss = sweep.loss[trial.suggest_int("trial", 0, len(sweep.loss) - 1)]
        for step, value in enumerate(loss):
            spent[0] += step > 0
            trial.report(float(value), step)
            if not math.isfinite(value):
                raise optuna.TrialPruned("diverged")
            if trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.min(loss))

    study.optimize(objective, n_trials=len(sweep.loss))
    complete = tuple(
        t.params["trial"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
    )
    return Outcome(spent[0], complete)


PrunerFactory = Callable[[], optuna.pruners.BasePruner]
