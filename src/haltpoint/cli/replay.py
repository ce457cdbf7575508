"""`haltpoint replay`: where other early-stopping settings would have stopped a recorded run."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any

from haltpoint.cli.command import add_command
from haltpoint.cli.flags import UsageError, ascii_int, count, finite_at_least, user_path
from haltpoint.cli.output import Output
from haltpoint.cli.runinfo import check_mode, history_records, mode_of, open_run, watched_metric
from haltpoint.errors import CheckpointNotFoundError
from haltpoint.plotting import curves
from haltpoint.stopping import EarlyStopping
from haltpoint.stopping._text import evaluations
from haltpoint.stopping.bands import band_of, summarize_bands
from haltpoint.stopping.modes import Mode
from haltpoint.stopping.replay import ReplayResult, best_index, replay
from haltpoint.store.history import HISTORY_NAME, read_history_bytes, read_history_file

__all__ = [
    "ReplayRow",
    "ReplayedRun",
    "load_records",
    "register",
    "replay_patiences",
    "replay_source",
    "run",
]

_EPILOG = """\
  haltpoint replay runs/demo
  haltpoint replay runs/demo/history.jsonl --metric val_acc --mode max --patience 2,4,8
  haltpoint replay runs/demo --patience default,10,20 --horizon 100
  haltpoint replay runs/demo --min-delta 0.001 --json
  haltpoint replay runs/*/ --patience default,10,20     # several runs: figures per band

A run that was itself stopped early is recorded only up to its stop: a setting that would
have gone on longer shows "end of record" (its true stop is later and unknown)."""


@dataclass(frozen=True)
class ReplayRow:
    """One setting replayed over the curve, with indices turned into steps.

    `patience` None is haltpoint's default rule (no fixed patience). `explanation` is the
    stopper's `explain()` after the last evaluation replayed: its stop reason, or, at the end
    of the record, why it had not stopped.
    """

    patience: int | None
    min_delta: float
    stop_step: int | None
    last_step: int
    best_step: int | None
    best_value: float | None
    saving: float
    regret: float
    explanation: str = ""

    def to_json(self) -> dict[str, Any]:
        """The object `replay --json` prints for this setting."""
        return {
            "patience": self.patience,
            "min_delta": self.min_delta,
            "stop_step": self.stop_step,
            "last_step": self.last_step,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "saving": self.saving,
            "regret": self.regret,
            "explain": self.explanation,
        }


def load_records(source: str) -> list[dict[str, Any]]:
    """The history records of a run directory, or of a `history.jsonl` file.

    Raises:
        FileNotFoundError: `source` does not exist.
        CheckpointNotFoundError: the run has no history, or it is empty.
        CorruptHistoryError: the history is no regular file, cannot be read, or no line of
            it is a history record.
        UnreadableCheckpointError: it cannot be read for lack of permission.
    """
    if os.path.exists(source) and not os.path.isdir(source):  # a FIFO or device: said so
        return history_records(
            read_history_file(source),
            source,
            missing=f"{source} is empty: nothing to replay; pass a run directory or the "
            f"{HISTORY_NAME} a Checkpointer wrote",
        )
    run = open_run(source)
    return history_records(
        read_history_bytes(run.storage),
        f"{run.storage.url}/{HISTORY_NAME}",
        missing=f"{source} has no {HISTORY_NAME} (or it is empty): nothing to replay; pass a "
        "run directory a Checkpointer wrote, or a history.jsonl file",
    )


def replay_patiences(
    steps: list[int],
    values: list[float],
    monitor: str,
    mode: Mode,
    patiences: list[int | None],
    min_delta: float,
    horizon: int | None = None,
) -> list[ReplayRow]:
    """Replay `EarlyStopping(monitor, mode, patience=p, min_delta)` for each p over the curve.

    A patience of None replays haltpoint's default rule, told `horizon` when given.

    >>> rows = replay_patiences([0, 1, 2, 3], [3.0, 2.0, 2.5, 1.0], "loss", "min", [1], 0.0)
    >>> rows[0].stop_step, rows[0].best_step, rows[0].saving, round(rows[0].regret, 2)
    (2, 1, 0.25, 1.0)
    """
    rows = []
    for patience in patiences:
        made: list[EarlyStopping] = []

        def make(p: int | None = patience, made: list[EarlyStopping] = made) -> EarlyStopping:
            if p is None:
                stopper = EarlyStopping(monitor, mode=mode, min_delta=min_delta, horizon=horizon)
            else:
                stopper = EarlyStopping(monitor, mode=mode, patience=p, min_delta=min_delta)
            made.append(stopper)
            return stopper

        result: ReplayResult = replay(make, values, judge_mode=mode)
        best = result.best_index
        rows.append(
            ReplayRow(
                patience=patience,
                min_delta=min_delta,
                stop_step=steps[result.last_index] if result.stopped else None,
                last_step=steps[result.last_index],
                best_step=None if best is None else steps[best],
                best_value=None if best is None else values[best],
                saving=result.saving,
                regret=result.regret,
                explanation=made[-1].explain(),
            )
        )
    return rows


def _patiences(text: str) -> list[int | None]:
    """The argparse type of --patience: ints >= 0 (digits 0-9) or 'default', separated by
    commas (spaces around them allowed)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    values = [None if part == "default" else ascii_int(part) for part in parts]
    malformed = [part for part, value in zip(parts, values, strict=True) if value is None]
    if not values or any(part != "default" for part in malformed):
        raise argparse.ArgumentTypeError(
            f"must be integers >= 0 or 'default' separated by commas (digits 0-9 only), "
            f"got {text!r}"
        )
    return values


def _percent(x: float) -> str:
    return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{100 * x:.1f}%")


@dataclass(frozen=True)
class ReplayedRun:
    """One source replayed: its curve and a row per setting."""

    source: str
    monitor: str
    mode: str
    steps: list[int]
    values: list[float]
    rows: list[ReplayRow]

    def oracle(self) -> float:
        """The share of evaluations the zero-regret oracle (stop right after the best) saves."""
        best = best_index(self.values, "max" if self.mode == "max" else "min")
        return 0.0 if best is None else 1.0 - (best + 1) / len(self.values)

    def to_json(self) -> dict[str, Any]:
        """The object `replay --json` prints for this run."""
        best = best_index(self.values, "max" if self.mode == "max" else "min")
        return {
            "metric": self.monitor,
            "mode": self.mode,
            "evaluations": len(self.values),
            "band": band_of(len(self.values)),
            "best_step": None if best is None else self.steps[best],
            "best_value": None if best is None else self.values[best],
            "settings": [r.to_json() for r in self.rows],
        }


def replay_source(
    source: str, args: argparse.Namespace, patiences: list[int | None]
) -> ReplayedRun:
    """Replay every setting over the history of `source` (a run directory or history file)."""
    records = load_records(source)
    monitor, mode = args.metric, args.mode
    guessed = watched_metric(None if os.path.isfile(source) else open_run(source), records)
    if monitor is None:
        if guessed is None:
            names = list(curves(records))
            if not names:
                raise CheckpointNotFoundError(
                    f"the history of {source} holds no metric values, so there is nothing to "
                    "replay; a Checkpointer records them with save(step, state, metrics)",
                    path=source,
                )
            if len(names) != 1:
                raise UsageError(
                    f"cannot tell which metric to replay: the history holds {', '.join(names)}; "
                    "pick one with --metric NAME (and --mode min|max)"
                )
            monitor = names[0]
        else:
            check_mode(mode, *guessed, flag="--metric")
            monitor = guessed[0]
    if monitor not in curves(records):
        raise UsageError(
            f"--metric {monitor!r} is not in the history of {source}; it holds "
            f"{', '.join(curves(records)) or 'no metrics'}"
        )
    steps, values = curves(records, [monitor])[monitor]
    if not values:
        raise CheckpointNotFoundError(
            f"the history of {source} holds no number for {monitor!r} (its values are not "
            "numbers, or its steps are not ints >= 0): nothing to replay",
            path=source,
        )
    if mode is None:
        mode = guessed[1] if guessed is not None and guessed[0] == monitor else mode_of(monitor)
    direction: Mode = "max" if mode == "max" else "min"
    rows = replay_patiences(
        steps, values, monitor, direction, patiences, args.min_delta, args.horizon
    )
    return ReplayedRun(source, monitor, mode, steps, values, rows)


def run(args: argparse.Namespace, out: Output) -> int:
    """Replay stopping settings over the history of each of `args.source`."""
    patiences = args.patience
    if args.horizon is not None and None not in patiences:
        raise UsageError(
            "--horizon is told only to the default rule, and --patience has no 'default'; "
            "add it (--patience default,...) or leave --horizon out"
        )
    runs = [replay_source(source, args, patiences) for source in args.source]
    if len(runs) > 1:
        return _summary(runs, patiences, args, out)
    (one,) = runs
    if args.json:
        out.json(one.to_json())
        return 0
    steps, values, monitor = one.steps, one.values, one.monitor
    run_best = best_index(values, "max" if one.mode == "max" else "min")
    best_text = (
        "no finite value"
        if run_best is None
        else (f"best {values[run_best]:.4g} at step {steps[run_best]}")
    )
    out.line(
        f"{monitor} ({one.mode}) over {evaluations(len(values))}, steps {steps[0]}-{steps[-1]}; "
        f"{best_text}"
    )
    out.table(
        ["patience", "stop step", "best step", f"best {monitor}", "saved", "regret"],
        [
            [
                _setting(r.patience),
                "end of record" if r.stop_step is None else str(r.stop_step),
                "-" if r.best_step is None else str(r.best_step),
                "-" if r.best_value is None else f"{r.best_value:.4g}",
                _percent(r.saving),
                _percent(r.regret),
            ]
            for r in one.rows
        ],
        title=f"replay of {args.source[0]} (min_delta {args.min_delta:g})",
        numeric=["patience", "best step", f"best {monitor}", "saved", "regret"],
    )
    for row in one.rows:  # why the default rule ran to the end, the question users ask
        if row.patience is None and row.stop_step is None:
            out.line(
                f"default at the end of the record (evaluation {len(values) - 1}, step "
                f"{steps[-1]}): {row.explanation}"
            )
    out.note(
        "saved: share of the recorded evaluations not run; regret: how much worse the best "
        "checkpoint at that stop is than the run's best (relative)"
    )
    return 0


def _setting(patience: int | None) -> str:
    return "default" if patience is None else str(patience)


def _summary(
    runs: list[ReplayedRun], patiences: list[int | None], args: argparse.Namespace, out: Output
) -> int:
    """Every setting's figures per run-length band, pooled over `runs`."""
    table = []
    for k, patience in enumerate(patiences):
        pooled = [(len(r.values), r.rows[k].saving, r.rows[k].regret, r.oracle()) for r in runs]
        table += [(patience, band) for band in summarize_bands(pooled)]
    if args.json:
        out.json(
            {
                "runs": [r.to_json() | {"source": r.source} for r in runs],
                "bands": [
                    {"patience": p, **{f: getattr(b, f) for f in b.__slots__}} for p, b in table
                ],
            }
        )
        return 0
    out.line(f"{len(runs)} runs replayed; figures pooled per run-length band")
    out.table(
        ["patience", "band", "runs", "saved", "of oracle", "mean regret", "regret > 1%"],
        [
            [
                _setting(p),
                b.band,
                str(b.runs),
                _percent(b.saved),
                _percent(b.share),
                _percent(b.regret),
                _percent(b.harmful),
            ]
            for p, b in table
        ],
        title=f"replay of {len(runs)} runs (min_delta {args.min_delta:g})",
        numeric=["runs", "saved", "of oracle", "mean regret", "regret > 1%"],
    )
    out.note(
        "band: evaluations in the run; saved: mean share of evaluations not run; of oracle: "
        "that over what stopping right after each run's best saves; regret: how much worse "
        "the best checkpoint at the stop is than the run's best (relative)"
    )
    return 0


def register(commands: Any) -> None:
    """Add `replay` to the subcommands."""
    parser = add_command(
        commands,
        "replay",
        run,
        help="replay early-stopping settings over a recorded run: where each would stop",
        epilog=_EPILOG,
    )
    parser.add_argument(
        "source",
        type=user_path,
        nargs="+",
        metavar="DIR|history.jsonl",
        help="a run directory or its history file; several: figures per run-length band",
    )
    parser.add_argument(
        "--metric",
        metavar="M",
        help="the metric to watch (default: the one ranking the checkpoints)",
    )
    parser.add_argument("--mode", choices=("min", "max"), help="whether lower or higher is better")
    parser.add_argument(
        "--patience",
        type=_patiences,
        default="default,1,3,5,10,20",
        metavar="P1,P2,...",
        help="patiences to try; 'default' is haltpoint's default rule "
        "(default: default,1,3,5,10,20)",
    )
    parser.add_argument(
        "--horizon",
        type=count(1),
        metavar="N",
        help="planned number of evaluations, told to the default rule (e.g. max epochs)",
    )
    parser.add_argument(
        "--min-delta",
        type=finite_at_least(0.0),
        default=0.0,
        metavar="X",
        help="improvement to beat (default 0)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
