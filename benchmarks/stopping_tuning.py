"""Choosing the default rule's constants honestly: leave-one-problem-out cross-validation.

Run from anywhere: `python benchmarks/stopping_tuning.py [path/to/curves.json.gz]`. It reads
the DeepOBS curves from `../shared/data/` (see `stopping_quality.py`; exits 0 without them).

Every setting in `GRID` (a small, declared grid around the shipped constants) is replayed over
all 1,080 runs once; then settings are *chosen* on some problems and *scored* on others:

- Leave one problem out (LOPO): for each of the 8 problems, choose the setting on the other 7
  and score it on the one left out. The pooled out-of-sample figures (every run scored with
  the setting chosen without its problem) are the honest estimate of how the rule does on a
  new kind of curve.
- The fixed split of `stopping_quality.py`: choose on its five tuning problems, score on the
  three held-out ones.
- Leave one optimizer out: choose on two optimizers (all problems), score on the third.
- A ceiling, not a result: the held-out problems' setting chosen on those problems
  themselves, to show whether the grid holds a setting that meets the targets there at all.

How a setting is chosen (declared before looking at any out-of-sample figure): the one with
the most headroom on its tightest target, `min(share / 0.75, 0.3 / regret, 1.5 / harmful)`
on the choosing runs, where share is the share of the oracle's saving, regret the mean
regret in % and harmful the % of runs losing more than 1%. A value >= 1 meets every target.

The rule is replayed by `stop_index`, a lean copy of `EarlyStopping`'s loop for the default
rule (no min_delta, warmup or rules); `check()` here, and `tests/test_stopping_tuning.py`,
confirm that it stops where `EarlyStopping` does.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from haltpoint.stopping import EarlyStopping
from haltpoint.stopping.adaptive import (
    DEFAULT_SETTINGS,
    TrendRule,
    TrendSettings,
    fit_line,
    window_size,
)
from haltpoint.stopping.replay import best_index, relative_regret, replay

DATA = (
    Path(__file__).resolve().parent.parent.parent
    / "shared"
    / "data"
    / "deepobs_baselines_v1.1_epoch_curves.json.gz"
)
HELD_OUT = ("cifar100_allcnnc", "fmnist_vae", "tolstoi_char_rnn")  # the first tuning split
TARGET_SHARE = 0.75  # of the oracle's saving, at least
TARGET_REGRET = 0.3  # mean regret in %, at most
TARGET_HARM = 1.5  # % of runs with regret > 1%, at most
#: Settings are judged on figures this many standard errors (across problems) worse.
Z = 1.0

#: The declared grid: every combination of these values, the rest as in DEFAULT_SETTINGS.
GRID: dict[str, tuple[Any, ...]] = {
    "min_wait": (10, 15, 20),
    "lookahead": (0.5, 1.0, 2.0),
    "noise_k": (1.0, 1.25, 1.5),
    "tolerance": (0.0025, 0.005, 0.01),
    "diverged_wait": (0, 30, 60),
}

#: Restrictions of the grid whose leave-one-problem-out figures show what a knob adds.
ABLATIONS: list[tuple[str, tuple[tuple[str, Any], ...]]] = [
    ("full grid", ()),
    ("without diverged_wait (= 0)", (("diverged_wait", 0),)),
    (
        "only diverged_wait (others as first shipped)",
        tuple(
            (n, v)
            for n, v in (
                ("min_wait", 15),
                ("lookahead", 1.0),
                ("noise_k", 1.25),
                ("tolerance", 0.005),
            )
        ),
    ),
]

Outcome = tuple[float, float]  # (share of training epochs saved, relative regret)


def grid() -> list[TrendSettings]:
    """Every setting of the declared grid; the shipped one is among them."""
    names = list(GRID)
    settings = [
        dataclasses.replace(DEFAULT_SETTINGS, **dict(zip(names, values, strict=True)))
        for values in itertools.product(*(GRID[name] for name in names))
    ]
    if DEFAULT_SETTINGS not in settings:
        settings.append(DEFAULT_SETTINGS)
    return settings


def stop_index(
    curve: Sequence[float], settings: TrendSettings = DEFAULT_SETTINGS, horizon: int | None = None
) -> int:
    """Where `EarlyStopping(mode="min", horizon=horizon)` with these settings stops (or the
    last index): at the first non-finite value, or when the default rule says so."""
    rule = TrendRule(1.0, horizon, settings)
    best: float | None = None
    wait = 0
    for i, x in enumerate(curve):
        if not math.isfinite(x):
            return i
        if best is None or x < best:
            best, wait = x, 0
        else:
            wait += 1
        rule.observe(i, x)
        if wait and rule.check(i, best, wait) is not None:
            return i
    return len(curve) - 1


def outcome(curve: Sequence[float], stop: int) -> Outcome:
    """(share of training epochs saved, relative regret of the best checkpoint kept)."""
    kept = best_index(curve, "min", stop + 1)
    return 1 - stop / (len(curve) - 1), relative_regret(curve, kept, "min")


def _replay_all(job: tuple[TrendSettings, bool, list[list[float]]]) -> list[Outcome]:
    settings, horizon, curves = job
    return [outcome(c, stop_index(c, settings, len(c) if horizon else None)) for c in curves]


def replay_grid(
    curves: list[list[float]], settings: list[TrendSettings], horizon: bool = False
) -> list[list[Outcome]]:
    """Outcomes of every setting on every curve (two processes)."""
    with Pool(2) as pool:
        return pool.map(_replay_all, [(s, horizon, curves) for s in settings], chunksize=4)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Pooled figures over some runs: % epochs saved, share of the oracle's, regret, harm."""

    runs: int
    saved: float
    share: float
    regret: float
    harmful: float

    def headroom(self) -> float:
        """min(share / 0.75, 0.3 / regret, 1.5 / harmful): >= 1 meets every target."""
        return min(
            self.share / TARGET_SHARE,
            TARGET_REGRET / max(self.regret, 1e-9),
            TARGET_HARM / max(self.harmful, 1e-9),
        )

    def meets(self) -> str:
        """Which targets are met, in words."""
        missed = [
            name
            for name, ok in (
                ("saving", self.share >= TARGET_SHARE),
                ("regret", self.regret <= TARGET_REGRET),
                ("harm", self.harmful <= TARGET_HARM),
            )
            if not ok
        ]
        return "meets all" if not missed else "misses " + ", ".join(missed)

    def row(self) -> str:
        return (
            f"{self.saved:.1f} | {100 * self.share:.0f}% | {self.regret:.2f} | "
            f"{self.harmful:.1f}% | {self.meets()}"
        )


def summarize(outcomes: Iterable[Outcome], oracle: Iterable[float]) -> Summary:
    """Pool outcomes of runs whose oracle savings are `oracle` (same order)."""
    pairs = list(outcomes)
    total_oracle = sum(oracle)
    n = len(pairs)
    saved = sum(s for s, _ in pairs)
    regret = sum(r for _, r in pairs)
    harmful = sum(r > 0.01 for _, r in pairs)
    return Summary(n, 100 * saved / n, saved / total_oracle, 100 * regret / n, 100 * harmful / n)


def oracle_saving(curve: Sequence[float]) -> float:
    """Share of training epochs the zero-regret oracle saves."""
    best = best_index(curve, "min")
    assert best is not None
    return 1 - best / (len(curve) - 1)


def choose(
    results: list[list[Outcome]], runs: list[int], oracle: list[float], groups: list[str]
) -> int:
    """The index of the setting with the most headroom on `runs` (ties: the earlier one),
    judged on confidence bounds: each figure moved by `Z` standard errors toward missing its
    target, the standard error taken across the groups (problems) of `runs`."""
    scores = [bounded(r, runs, oracle, groups).headroom() for r in results]
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


def bounded(
    outcomes: list[Outcome], runs: list[int], oracle: list[float], groups: list[str]
) -> Summary:
    """The pooled summary of `runs`, each figure moved `Z` standard errors (across the
    groups) toward missing its target."""
    pooled = summarize((outcomes[i] for i in runs), (oracle[i] for i in runs))
    if Z == 0:
        return pooled
    members: dict[str, list[int]] = {}
    for i in runs:
        members.setdefault(groups[i], []).append(i)
    parts = [summarize((outcomes[i] for i in m), (oracle[i] for i in m)) for m in members.values()]
    if len(parts) < 2:
        return pooled

    def se(values: list[float]) -> float:
        return Z * statistics.stdev(values) / math.sqrt(len(values))

    return dataclasses.replace(
        pooled,
        share=pooled.share - se([p.share for p in parts]),
        regret=pooled.regret + se([p.regret for p in parts]),
        harmful=pooled.harmful + se([p.harmful for p in parts]),
    )


def cross_validate(
    results: list[list[Outcome]],
    oracle: list[float],
    folds: list[tuple[str, list[int], list[int]]],
    groups: list[str],
    scored: list[list[Outcome]] | None = None,
) -> tuple[list[tuple[str, int, Summary, Summary]], Summary]:
    """For each (name, choosing runs, scored runs): the setting chosen on `results`, its
    figures on the choosing runs and on the scored runs (from `scored`, e.g. replays told the
    horizon, else from `results`); and the scored runs pooled over all folds."""
    scored = results if scored is None else scored
    rows = []
    pooled: list[Outcome] = []
    pooled_oracle: list[float] = []
    for name, train, test in folds:
        k = choose(results, train, oracle, groups)
        inside = summarize((results[k][i] for i in train), (oracle[i] for i in train))
        outside = summarize((scored[k][i] for i in test), (oracle[i] for i in test))
        rows.append((name, k, inside, outside))
        pooled += [scored[k][i] for i in test]
        pooled_oracle += [oracle[i] for i in test]
    return rows, summarize(pooled, pooled_oracle)


def leave_one_problem_out(runs: list[dict[str, Any]]) -> dict[str, TrendSettings]:
    """For each problem, the grid setting chosen on all the other problems."""
    curves = [run["test_losses"] for run in runs]
    oracle = [oracle_saving(c) for c in curves]
    groups = [run["testproblem"] for run in runs]
    settings = grid()
    results = replay_grid(curves, settings)
    return {
        p: settings[choose(results, [i for i, g in enumerate(groups) if g != p], oracle, groups)]
        for p in sorted(set(groups))
    }


def describe(settings: TrendSettings) -> str:
    """The settings that differ from nothing: every grid knob, `name=value`."""
    return ", ".join(f"{name}={getattr(settings, name):g}" for name in GRID)


def log_slope_t(curve: Sequence[float], first: int, last: int) -> float:
    """The t-statistic of the least-squares slope of log(value) over `curve[first:last + 1]`
    (finite, positive values only; nan when fewer than 3)."""
    points = [(t, math.log(curve[t])) for t in range(first, last + 1) if curve[t] > 0]
    if len(points) < 3:
        return math.nan
    _, slope, noise, se = fit_line(points)
    if noise == 0:  # an exact line: a flat one (a stuck run) has no trend at all
        return 0.0 if slope == 0 else math.copysign(math.inf, slope)
    return slope / (noise * se)


def far_above_stops(curves: list[list[float]], ratio: float = 1.3) -> None:
    """Print whether the slope of log(value) at the stop tells the runs the shipped rule stops
    far above their best (fitted level > `ratio` x best) that later recover past it by more
    than 1% from those that do not."""
    groups: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for curve in curves:
        stop = stop_index(curve)
        if stop == len(curve) - 1 or not math.isfinite(curve[stop]):
            continue
        kept = best_index(curve, "min", stop + 1)
        assert kept is not None
        best = curve[kept]
        window = max(0, stop - window_size(stop) + 1)
        level, _, _, _ = fit_line([(t, curve[t]) for t in range(window, stop + 1)])
        if level <= ratio * best:
            continue
        t_window = log_slope_t(curve, window, stop)
        t_since = log_slope_t(curve, kept + 1, stop)
        groups[relative_regret(curve, kept, "min") > 0.01].append((t_window, t_since))
    print(
        f"\nStopped with the fitted level over {ratio}x the best: t-statistic of the slope of "
        "log(loss), over the fitted window / over the evaluations since the best"
    )
    for recovers, values in groups.items():
        label = "later recover by > 1%" if recovers else "do not"
        spans = []
        for k in (0, 1):
            finite = [v[k] for v in values if not math.isnan(v[k])]
            spans.append(f"{min(finite):.1f} to {max(finite):.1f}")
        print(f"- {len(values)} runs {label}: {spans[0]} / {spans[1]}")


def check(runs: list[dict[str, Any]], every: int = 7) -> None:
    """Assert that `stop_index` stops where `EarlyStopping` does, on every `every`-th run."""
    for run in runs[::every]:
        loss = run["test_losses"]
        for horizon in (None, len(loss)):
            expected = replay(lambda h=horizon: EarlyStopping("loss", horizon=h), loss)
            assert stop_index(loss, DEFAULT_SETTINGS, horizon) == expected.last_index


def report(
    title: str,
    results: list[list[Outcome]],
    settings: list[TrendSettings],
    oracle: list[float],
    folds: list[tuple[str, list[int], list[int]]],
    groups: list[str],
    scored: list[list[Outcome]] | None = None,
) -> Summary:
    """Print one cross-validation: the choice per fold and the pooled out-of-sample row."""
    rows, pooled = cross_validate(results, oracle, folds, groups, scored)
    print(f"\n#### {title}\n")
    print(
        "| left out | chosen on the others | others: saved / share / regret / harm "
        "| left out: % epochs saved | share of oracle | mean regret % | regret > 1% | targets |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for name, k, inside, outside in rows:
        print(
            f"| {name} | {describe(settings[k])} | {inside.saved:.1f} / "
            f"{100 * inside.share:.0f}% / {inside.regret:.2f} / {inside.harmful:.1f}% "
            f"| {outside.row()} |"
        )
    print(f"| **pooled out-of-sample** ({pooled.runs} runs) | | | {pooled.row()} |")
    return pooled


def load_runs(argv: list[str]) -> list[dict[str, Any]] | None:
    """The runs of the file named in `argv[1]` (default `DATA`); None, with a message, when
    it is absent."""
    path = Path(argv[1]) if len(argv) > 1 else DATA
    if not path.exists():
        print(f"skipped: DeepOBS curves not found at {path} (see shared/data/README.md)")
        return None
    with gzip.open(path, "rt") as f:
        runs: list[dict[str, Any]] = json.load(f)
    return runs


def main(argv: list[str]) -> int:
    """Replay the grid, print the cross-validations; exit 0 when the data is absent."""
    runs = load_runs(argv)
    if runs is None:
        return 0
    started = time.perf_counter()
    check(runs)
    curves = [run["test_losses"] for run in runs]
    oracle = [oracle_saving(c) for c in curves]
    settings = grid()
    groups = [run["testproblem"] for run in runs]
    problems = sorted({run["testproblem"] for run in runs})
    optimizers = sorted({run["optimizer"] for run in runs})
    by: Callable[[str, str], list[int]] = lambda key, value: [  # noqa: E731
        i for i, run in enumerate(runs) if run[key] == value
    ]
    everything = range(len(runs))
    lopo = [
        (p, [i for i in everything if runs[i]["testproblem"] != p], by("testproblem", p))
        for p in problems
    ]
    held = [i for i in everything if runs[i]["testproblem"] in HELD_OUT]
    split = [("held-out problems", [i for i in everything if i not in set(held)], held)]
    lozo = [
        (o, [i for i in everything if runs[i]["optimizer"] != o], by("optimizer", o))
        for o in optimizers
    ]
    print(
        f"{len(runs)} runs; {len(settings)} settings: "
        + "; ".join(f"{k} in {list(v)}" for k, v in GRID.items())
    )
    print(f"shipped: {describe(DEFAULT_SETTINGS)}")
    results = replay_grid(curves, settings)
    told = replay_grid(curves, settings, horizon=True)
    final = choose(results, list(everything), oracle, groups)
    print(f"chosen on all {len(problems)} problems: {describe(settings[final])}")
    for name, outcomes in (("", results), (", horizon", told)):
        for label, k in (("shipped", settings.index(DEFAULT_SETTINGS)), ("chosen", final)):
            whole = summarize(outcomes[k], oracle)
            print(f"{label} setting{name}, in-sample on all runs: {whole.row()}")
    for name, scored in (("", results), (", horizon", told)):
        report(f"Leave one problem out{name}", results, settings, oracle, lopo, groups, scored)
        report(f"Fixed split{name}", results, settings, oracle, split, groups, scored)
        report(f"Leave one optimizer out{name}", results, settings, oracle, lozo, groups, scored)
    top = choose(results, held, oracle, groups)
    tuning_runs = [i for i in everything if i not in set(held)]

    def on(ids: list[int]) -> str:
        return summarize((results[top][i] for i in ids), (oracle[i] for i in ids)).row()

    print(
        "\nCeiling (in-sample, not a result): chosen on the held-out problems themselves, "
        f"{describe(settings[top])}\n- on the held-out problems: {on(held)}\n"
        f"- on the tuning problems: {on(tuning_runs)}"
    )
    far_above_stops(curves)
    print("\n#### What each knob adds: leave one problem out with the grid restricted\n")
    print("| grid | % epochs saved | share of oracle | mean regret % | regret > 1% | targets |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for title, fixed in ABLATIONS:
        keep = [k for k, s in enumerate(settings) if all(getattr(s, n) == v for n, v in fixed)]
        _, pooled = cross_validate([results[k] for k in keep], oracle, lopo, groups)
        print(f"| {title} ({len(keep)} settings) | {pooled.row()} |")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
