"""Pruning a search: Optuna's pruners and `HaltpointPruner` side by side on 24 real sweeps.

Run from anywhere: `python benchmarks/tuning.py [path/to/curves.json.gz] [--order-seeds 0,1,2,3,4]
[--family deepobs|pooled]`
(a few minutes on 2 cores; measured in docs/benchmarks.md). The data (DeepOBS baselines v1.1,
per-epoch curves; see ../shared/data/README.md) is read from `../shared/data/` next to the
repository root and never copied into the repository; without it the benchmark says so and
exits 0.

Each sweep (one problem, one optimizer: 45 runs, 37 learning rates, one with 9 seeds) is run as
a real in-memory Optuna study whose sampler replays the trials in a random order fixed by an
order seed (`tuning_sweeps.py`), once for every seed of `--order-seeds`: no pruner,
`MedianPruner(5, 5)`, `PercentilePruner(25)`, `SuccessiveHalvingPruner()`, `HyperbandPruner()`
and `HaltpointPruner()`. Each trial reports its test loss every epoch (DeepOBS has no validation
split). Figures: the training epochs spent as a share of the full sweep's, and the regret (%) of
the best completed trial's test quality (accuracy at its best-loss epoch where the problem has
one, else that loss) against the full sweep's best trial; per pruner over the seeds: the mean
share of epochs, the worst regret of any sweep under any order, and how many (order, sweep)
pairs lose more than 0.5%. `--family pooled` replays instead 8 many-trial sweeps, one per
problem, pooling the trials of its three optimizers that trained (68-98 trials each; see
`tuning_sweeps.pooled_sweeps`): the nearest these curves come to an architecture search.

HaltpointPruner's constants are chosen by leave-one-problem-out from `GRID`: for each of the 8
problems, the setting is chosen on the other 7 problems' 21 sweeps under every order seed and
scored on its own 3. The chooser (declared before any held-out figure was looked at): the
fewest epochs among settings whose worst regret on the choosing sweep-orders is at most
`CHOOSE_REGRET`, half the goal's 0.5%. The grid is replayed by a NumPy copy of the rule
(`fast_stops`), checked here against the real pruner; the LOPO column itself runs the real
pruner with each problem's chosen settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stopping_curves
from haltpoint.integrations.optuna import HaltpointPruner
from haltpoint.tuning import DEFAULT_SETTINGS, PruneSettings
from tuning_sweeps import FAMILIES, Outcome, Sweep, replay

GOAL_REGRET = 0.5  # % on every sweep
CHOOSE_REGRET = 0.25  # worst-sweep regret (%) a setting may have on the choosing sweeps
ORDER_SEEDS = "0,1,2,3,4"  # the trial orders replayed (`sweeps` seeds)

Results = dict[str, dict[int, list[Outcome]]]  # pruner -> order seed -> one Outcome a sweep

#: The declared grid: every combination of these values.
GRID: dict[str, tuple[float, ...]] = {
    "margin": (0.5, 0.75, 1.0),
    "tolerance": (0.0, 0.01),
    "min_trials": (3, 4),
    "min_step": (2,),
    "min_share": (0.0, 0.1, 0.2, 0.3),
    "trend": (0.0, 0.5, 1.0),
    "band": (0.1,),
    "overall": (0.5, 1.0),
}

OPTUNA: list[tuple[str, Callable[[], optuna.pruners.BasePruner]]] = [
    ("none", optuna.pruners.NopPruner),
    ("Median(5, 5)", lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=5)),
    ("Percentile(25)", lambda: optuna.pruners.PercentilePruner(25.0)),
    ("SuccessiveHalving", optuna.pruners.SuccessiveHalvingPruner),
    ("Hyperband", optuna.pruners.HyperbandPruner),
]


def grid() -> list[PruneSettings]:
    """Every setting of the declared grid."""
    names = list(GRID)
    return [
        PruneSettings(**dict(zip(names, values, strict=True)))  # type: ignore[arg-type]
        for values in itertools.product(*(GRID[n] for n in names))
    ]


class Prepared:
    """One sweep's curves as the NumPy replay needs them: running best and the noise so far."""

    def __init__(self, sweep: Sweep) -> None:
        self.values = sweep.loss
        self.best = [np.fmin.accumulate(np.where(np.isfinite(v), v, np.inf)) for v in sweep.loss]
        self.noise = [_noise_so_far(v) for v in sweep.loss]


def _noise_so_far(values: np.ndarray) -> np.ndarray:
    """`haltpoint.tuning._noise` at every step: half the median |second difference| so far."""
    finite = values[np.isfinite(values)]
    bends = np.abs(finite[:-2] - 2 * finite[1:-1] + finite[2:])
    out = np.zeros(len(values))
    for t in range(len(values)):
        n = min(t + 1, len(finite)) - 2
        out[t] = np.median(bends[:n]) / 2 if n > 0 else 0.0
    return out


def _catch_up(
    best: np.ndarray, finals: np.ndarray, reached: np.ndarray, near: np.ndarray, band: float
) -> tuple[np.ndarray, np.ndarray]:
    """`haltpoint.tuning._catch_up` at every step (columns of ``best``, trials in rows): the
    most any trial caught up, and the most a trial within ``band`` of ``near`` did (NaN where
    no trial was that near)."""
    gained = np.where(reached, best - finals[:, None], np.nan)
    order = np.argsort(np.where(reached, best, np.inf), axis=0, kind="stable")
    ranked = np.take_along_axis(gained, order, axis=0)
    values = np.take_along_axis(np.where(reached, best, np.inf), order, axis=0)
    least = np.fmin.accumulate(np.where(np.isnan(ranked), np.inf, ranked), axis=0)
    ahead = np.vstack([np.full((1, ranked.shape[1]), np.inf), least[:-1]])
    caught = np.where(np.isnan(ranked) | ~np.isfinite(ahead), 0.0, ranked - ahead).clip(0)
    caught = np.where(np.isnan(ranked), -np.inf, caught)
    close = np.isfinite(values) & (np.abs(values - near) <= band * np.abs(near))
    most_near = np.where(close, caught, -np.inf).max(axis=0)
    return caught.max(axis=0).clip(0), np.where(close.any(axis=0), most_near, np.nan)


def fast_stops(prep: Prepared, s: PruneSettings) -> tuple[list[int], list[bool]]:
    """The step at which each trial of the sweep stops under ``HaltpointPruner(s)``, replayed
    in order (every earlier trial finished), and whether it was pruned there, as the real
    pruner decides (checked in `main`)."""
    stops: list[int] = []
    ends: list[int] = []  # each trial's last step with a finite value: how far it ran on
    pruned: list[bool] = []
    finals: list[float] = []
    longest = max(len(v) for v in prep.values)
    seen_best = np.full((len(prep.values), longest), np.inf)  # what the study holds so far
    seen_noise = np.zeros((len(prep.values), longest))
    for i, values in enumerate(prep.values):
        last = len(values) - 1
        stop, hits = last, np.zeros(0, dtype=np.int64)
        if i >= s.min_trials:
            steps = np.arange(last + 1)
            best, noise = seen_best[:i, : last + 1], seen_noise[:i, : last + 1]
            reached = np.isfinite(best)
            lead = np.argmin(best, axis=0)
            at_lead = best[lead, steps]
            mine = prep.best[i][: last + 1]
            most, most_near = _catch_up(best, np.array(finals), reached, mine, s.band)
            gain = np.where(np.isnan(most_near), most, np.fmax(most_near, s.overall * most))
            bound = np.maximum(s.margin * gain, noise[lead, steps])
            enough = reached.sum(axis=0) >= s.min_trials
            bound = np.maximum(bound, s.tolerance * np.abs(np.where(enough, at_lead, 0.0)))
            horizon = max(ends)
            progress = prep.best[i][steps // 2] - prep.best[i][: last + 1]
            progress = np.where(np.isfinite(progress), progress, 0.0)
            doublings = np.log2(max(horizon, 1) / np.maximum(steps, 1)).clip(0)
            bound = np.maximum(bound, s.trend * doublings * progress)
            far = np.minimum(2 * steps, horizon)
            ran_on = (np.array(ends)[None, :] >= far[:, None]).sum(axis=1)
            enough &= ran_on >= s.min_share * i
            prune = (prep.best[i] - at_lead > bound) & (steps >= s.min_step) & enough
            hits = np.flatnonzero(prune)
            stop = int(hits[0]) if len(hits) else last
        finite = np.flatnonzero(np.isfinite(values[: stop + 1]))
        end = int(finite[-1]) if len(finite) else -1
        stops.append(stop)
        ends.append(end)
        pruned.append(len(hits) > 0 or not np.isfinite(values[stop]))
        finals.append(float(prep.best[i][stop]))
        seen_best[i, : end + 1] = prep.best[i][: end + 1]  # reached: a finite value there or later
        seen_noise[i, : end + 1] = prep.noise[i][: end + 1]
    return stops, pruned


def outcome(stops_pruned: tuple[list[int], list[bool]]) -> Outcome:
    """Epochs spent and completed (never pruned, not diverged) trials, from `fast_stops`."""
    stops, pruned = stops_pruned
    return Outcome(int(sum(stops)), tuple(k for k, p in enumerate(pruned) if not p))


def choose(
    table: list[list[Outcome]], sweeps_: list[Sweep], rows: Sequence[int]
) -> tuple[int, float]:
    """The chosen setting's index on the sweeps ``rows`` (see the module docstring), and its
    worst regret there."""
    full = sum(sweeps_[r].epochs() for r in rows)
    scored = []
    for k, outs in enumerate(table):
        worst = max(sweeps_[r].regret(list(outs[r].complete)) for r in rows)
        share = sum(outs[r].epochs for r in rows) / full
        scored.append((worst > CHOOSE_REGRET, share if worst <= CHOOSE_REGRET else worst, k))
    _, _, k = min(scored)
    return k, max(sweeps_[r].regret(list(table[k][r].complete)) for r in rows)


def describe(s: PruneSettings) -> str:
    return ", ".join(f"{f.name}={getattr(s, f.name):g}" for f in dataclasses.fields(s))


def late_near_ties(
    prep: Prepared, stops: Sequence[int], pruned: Sequence[bool], sweep_best: float
) -> tuple[int, int]:
    """Trials pruned after half their run within 1% of the best value so far, and how many of
    those would have ended better than the sweep's best completed value (wrongly pruned)."""
    late = wrong = 0
    for i, (values, stop) in enumerate(zip(prep.values, stops, strict=True)):
        if not pruned[i] or not np.isfinite(values[stop]) or stop < (len(values) - 1) / 2:
            continue
        rivals = [prep.best[j][min(stop, stops[j])] for j in range(i)]
        if prep.best[i][stop] - min(rivals) <= 0.01 * abs(min(rivals)):
            late += 1
            wrong += bool(np.nanmin(values) < sweep_best)
    return late, wrong


def parse_seeds(text: str) -> list[int]:
    """``--order-seeds``: distinct non-negative integers separated by commas."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            "--order-seeds must be distinct non-negative integers separated by commas, "
            f"got {text!r}"
        )
    return seeds


def lopo_choice(
    table: list[list[Outcome]], all_sweeps: list[Sweep], settings: list[PruneSettings]
) -> dict[str, PruneSettings]:
    """Each problem's setting, chosen on the other problems' sweeps over every order seed."""
    problems = sorted({sw.problem for sw in all_sweeps})
    lopo: dict[str, PruneSettings] = {}
    print("#### Leave-one-problem-out choice of HaltpointPruner's settings (over every order)\n")
    print("| held-out problem | chosen on the other 7 | worst regret there (%) |")
    print("| --- | --- | ---: |")
    for p in problems:
        choosing = [r for r, sw in enumerate(all_sweeps) if sw.problem != p]
        k, worst = choose(table, all_sweeps, choosing)
        lopo[p] = settings[k]
        print(f"| {p} | {describe(settings[k])} | {worst:.3f} |")
    k, worst = choose(table, all_sweeps, list(range(len(all_sweeps))))
    print(f"\nchosen on all 8 problems: {describe(settings[k])} (worst regret {worst:.3f}%)")
    print(f"shipped default: {describe(DEFAULT_SETTINGS)}")
    if settings[k] != DEFAULT_SETTINGS:
        print("WARNING: the shipped default is not what the procedure chooses")
    return lopo


def per_sweep(names: list[str], by_seed: dict[int, list[Sweep]], results: Results) -> None:
    """Every sweep of the first order seed: epochs spent / regret under each pruner."""
    seed = min(by_seed)
    print(
        f"\n#### Per sweep, order seed {seed}: "
        "epochs spent (share of the full sweep) / regret (%)\n"
    )
    print("| sweep | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for r, sw in enumerate(by_seed[seed]):
        cells = []
        for name in names:
            out = results[name][seed][r]
            cells.append(f"{out.epochs / sw.epochs():.3f} / {sw.regret(list(out.complete)):.2f}")
        print(f"| {sw.name} | " + " | ".join(cells) + " |")


def per_seed(names: list[str], by_seed: dict[int, list[Sweep]], results: Results) -> None:
    """Each order seed: epochs spent / worst-sweep regret (%) / sweeps over the goal."""
    print("\n#### Per order seed: epochs spent / worst-sweep regret (%) / sweeps > 0.5%\n")
    print("| order seed | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for seed, sws in by_seed.items():
        cells = []
        for name in names:
            outs = results[name][seed]
            regrets = [sw.regret(list(o.complete)) for sw, o in zip(sws, outs, strict=True)]
            share = sum(o.epochs for o in outs) / sum(sw.epochs() for sw in sws)
            cells.append(
                f"{share:.1%} / {max(regrets):.2f} / {sum(x > GOAL_REGRET for x in regrets)}"
            )
        print(f"| {seed} | " + " | ".join(cells) + " |")


def overall(names: list[str], by_seed: dict[int, list[Sweep]], results: Results) -> None:
    """Per pruner over every order seed, and whether haltpoint meets the goal."""
    pairs = sum(len(s) for s in by_seed.values())
    print(f"\n#### Over {len(by_seed)} order seeds ({pairs} sweep-orders)\n")
    print(
        "| pruner | mean epochs spent | worst-sweep regret (%) | mean regret (%) "
        "| sweep-orders > 0.5% |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    summary = {}
    for name in names:
        shares, regrets = [], []
        for seed, sws in by_seed.items():
            outs = results[name][seed]
            regrets += [sw.regret(list(o.complete)) for sw, o in zip(sws, outs, strict=True)]
            shares.append(sum(o.epochs for o in outs) / sum(sw.epochs() for sw in sws))
        summary[name] = (statistics.mean(shares), max(regrets))
        print(
            f"| {name} | {statistics.mean(shares):.1%} | {max(regrets):.3f} | "
            f"{statistics.mean(regrets):.3f} | {sum(x > GOAL_REGRET for x in regrets)} |"
        )
    for name in ("haltpoint (LOPO)", "haltpoint default"):
        share, worst = summary[name]
        safe = [n for n, _ in OPTUNA[1:] if summary[n][1] <= worst]
        cheaper = [n for n in safe if summary[n][0] <= share]
        met = worst <= GOAL_REGRET and not cheaper
        print(
            f"\ngoal, {name}: worst regret {worst:.3f}% "
            f"({'<=' if worst <= GOAL_REGRET else '>'} {GOAL_REGRET}%) over every order; Optuna "
            f"pruners at least as safe: {', '.join(safe) or 'none'}; of them as cheap or cheaper: "
            f"{', '.join(cheaper) or 'none'}; goal {'met' if met else 'missed'}"
        )


def near_ties(by_seed: dict[int, list[Sweep]], results: Results) -> None:
    """Late near-ties pruned by the default, over every order seed."""
    late = wrong = 0
    for seed, sws in by_seed.items():
        for sw, out in zip(sws, results["haltpoint default"][seed], strict=True):
            prep = Prepared(sw)
            stops, pruned = fast_stops(prep, DEFAULT_SETTINGS)
            best = min(float(np.nanmin(sw.loss[k])) for k in out.complete)
            a, b = late_near_ties(prep, stops, pruned, best)
            late, wrong = late + a, wrong + b
    print(
        f"\nnear-ties pruned late (default, every order; after half the run, within 1% of the "
        f"best so far): {late}, of which would have ended best in their sweep: {wrong}"
    )


def main(argv: list[str]) -> int:
    """Print the tables; exit 0 (with a message) when the data is absent."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--order-seeds",
        type=parse_seeds,
        default=parse_seeds(ORDER_SEEDS),
        help=f"trial orders to replay, as seeds separated by commas (default {ORDER_SEEDS})",
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILIES),
        default="deepobs",
        help="the 24 DeepOBS sweeps as recorded (default), or 8 many-trial sweeps pooling each "
        "problem's trials that trained",
    )
    args = stopping_curves.parse_with_data(parser, argv[1:])
    curves = stopping_curves.load(args.data)
    if curves is None:
        return 0
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    by_seed = {seed: FAMILIES[args.family](curves, seed) for seed in args.order_seeds}
    all_sweeps = [sw for sws in by_seed.values() for sw in sws]
    preps = [Prepared(sw) for sw in all_sweeps]
    settings = grid()
    table = [[outcome(fast_stops(p, s)) for p in preps] for s in settings]
    lopo = lopo_choice(table, all_sweeps, settings)

    columns: list[tuple[str, Callable[[Sweep], optuna.pruners.BasePruner]]] = [
        (name, lambda sw, make=make: make()) for name, make in OPTUNA
    ]
    columns.append(("haltpoint (LOPO)", lambda sw: HaltpointPruner(lopo[sw.problem])))
    columns.append(("haltpoint default", lambda sw: HaltpointPruner()))
    results: Results = {}
    for name, make in columns:
        t = time.perf_counter()
        results[name] = {s: [replay(sw, make(sw)) for sw in sws] for s, sws in by_seed.items()}
        print(f"replayed {name} through Optuna ({time.perf_counter() - t:.0f} s)")
    fast = [outcome(fast_stops(p, DEFAULT_SETTINGS)) for p in preps]
    real = [o for outs in results["haltpoint default"].values() for o in outs]
    print(
        "NumPy replay agrees with the real pruner on every sweep-order: "
        f"{'yes' if fast == real else 'NO'}"
    )

    names = [name for name, _ in columns]
    per_sweep(names, by_seed, results)
    per_seed(names[1:], by_seed, results)
    overall(names, by_seed, results)
    near_ties(by_seed, results)
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
