"""How well stopping rules stop real training runs, short and long: savings and regret per band.

Run from anywhere: `python benchmarks/stopping_quality.py [path/to/curves.json.gz]` (about two
minutes). The data (DeepOBS baselines v1.1, per-epoch curves; see ../shared/data/README.md) is
read from `../shared/data/` next to the repository root and never copied into the repository;
without it there the benchmark says so and exits 0 (a path given that does not exist is an
error, exit 2).

Curves: every run as recorded and its honest short and long variants (`stopping_curves.py`:
every k-th epoch, the first share of epochs, the best among those the reference), 7,020
curves of 20 to 351 evaluations, reported per run-length band (<= 30, 31-100, > 100) and for
the runs as recorded.

Method: each rule watches the test loss (DeepOBS has no validation split) one evaluation at a
time. Where it stops at index s, the run returns its best checkpoint by test loss among 0..s.
Regret is judged on the test accuracy where the problem has one (five of eight) and on the
test loss elsewhere: the relative gap between that checkpoint and the one the whole run would
have returned (its best test loss); "test-loss regret" judges every run on the test loss.
"% epochs saved" counts training epochs (epoch 0 is the untrained model: `1 - s / (len - 1)`).
Runs that diverge hold NaN and are replayed as recorded: every rule stops at the first NaN.
Prechelt's criteria run with no patience. The "out-of-sample (LOPO)" rows replay every curve
with the default rule's constants chosen without its problem (`stopping_tuning.py`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stopping_curves
from haltpoint.stopping import (
    ConsecutiveIncreases,
    EarlyStopping,
    GeneralizationLoss,
    ProgressQuotient,
)
from haltpoint.stopping.adaptive import DEFAULT_SETTINGS, PLANNED_SETTINGS, describe_default_rule
from haltpoint.stopping.patience import default_patience
from haltpoint.stopping.rules import Observation, Stop
from stopping_curves import BANDS, Curves
from stopping_fast import Outcomes, Prepared, patience_stops, trend_stops
from stopping_tuning import HEADER, Table, grid, leave_one_problem_out, pooled, summarize

NO_PATIENCE = sys.maxsize  # Prechelt's criteria alone: patience never ends the run


class OldDefault:
    """An earlier default, patience max(20, ceil(0.5 * (best_step + 1))), for comparison."""

    def check(self, obs: Observation) -> Stop | None:
        """Stop when the wait reaches the old default patience."""
        if not obs.improved and obs.wait >= default_patience(obs.best_step):
            return Stop("old default patience")
        return None


def replay_stops(curves: Curves, make: Callable[[], EarlyStopping], train: bool) -> np.ndarray:
    """Where a stopper from `make` stops every curve (a Python replay, one step at a time)."""
    stops = np.zeros(len(curves), dtype=np.int64)
    for c in range(len(curves)):
        values = curves.series(c)
        trains = curves.series(c, curves.train) if train else None
        stopper = make()
        stops[c] = len(values) - 1
        for i, value in enumerate(values):
            step = {"loss": value, "train_loss": trains[i]} if trains else value
            if stopper.step(step):
                stops[c] = i
                break
    return stops


def prechelt(make_rule: Callable[[], object]) -> Callable[[], EarlyStopping]:
    """A factory of stoppers that watch only a fresh rule from `make_rule` (no patience)."""
    return lambda: EarlyStopping("loss", patience=NO_PATIENCE, rules=[make_rule()])  # type: ignore[list-item]


#: (row name, stopper factory, needs the training loss) for every replayed classic rule.
CLASSIC: list[tuple[str, Callable[[], EarlyStopping], bool]] = [
    ("GL2", prechelt(lambda: GeneralizationLoss(2.0)), False),
    ("GL5", prechelt(lambda: GeneralizationLoss(5.0)), False),
    ("UP2 (strips of 5)", prechelt(lambda: ConsecutiveIncreases(2, strip=5)), False),
    ("UP3 (strips of 5)", prechelt(lambda: ConsecutiveIncreases(3, strip=5)), False),
    ("UP4 (strips of 5)", prechelt(lambda: ConsecutiveIncreases(4, strip=5)), False),
    ("PQ1 (strips of 5)", prechelt(lambda: ProgressQuotient(1.0, strip=5)), True),
    ("PQ2 (strips of 5)", prechelt(lambda: ProgressQuotient(2.0, strip=5)), True),
    ("old default, max(20, 50% to best)", prechelt(OldDefault), False),
]


def main(argv: list[str]) -> int:
    """Print the table; exit 0 (with a message) when the data is absent."""
    path = stopping_curves.data_argument(__doc__.split("\n", 1)[0], argv[1:])
    curves = stopping_curves.load(path)
    if curves is None:
        return 0
    started = time.perf_counter()
    prepared = Prepared(curves)
    oracle = prepared.oracle()
    print(f"{len(curves)} curves from {len(curves.originals())} runs; watching test loss")
    print(f"haltpoint default: {describe_default_rule()}")
    print(f"with horizon: {describe_default_rule(100)} (for a horizon of 100)")
    rows: list[tuple[str, Outcomes]] = []
    for p in (1, 3, 5, 10, 20):
        rows.append((f"patience={p}", prepared.outcomes(patience_stops(prepared, p))))
    for name, make, train in CLASSIC:
        rows.append((name, prepared.outcomes(replay_stops(curves, make, train))))
    settings = grid()
    for horizon, shipped in ((False, DEFAULT_SETTINGS), (True, PLANNED_SETTINGS)):
        tag = ", horizon" if horizon else ""
        outs = [prepared.outcomes(trend_stops(prepared, s, horizon)) for s in settings]
        lopo = leave_one_problem_out(Table(outs, oracle, curves), curves)
        rows.append((f"**default{tag}, out-of-sample (LOPO)**", pooled(outs, lopo)))
        rows.append((f"default{tag}, shipped (in-sample)", outs[settings.index(shipped)]))
    exact = np.array([0.0] * len(curves))
    rows.append(("zero-regret oracle", Outcomes(oracle, exact, exact)))
    band = curves.band()
    parts = [(f"runs of {label} evaluations", band == k) for k, (label, _, _) in enumerate(BANDS)]
    parts.append(("runs as recorded", np.isin(np.arange(len(curves)), curves.originals())))
    for title, sel in parts:
        print(f"\n#### {title} ({int(sel.sum())} curves)\n")
        print(HEADER.replace("| rule | runs |", "| rule |").replace("| --- | --- |", "| --- |"))
        for name, out in rows:
            print(f"| {name} | {summarize(out, oracle, sel).cells()} |")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
