"""`haltpoint plot`: metric curves of a run from its history, best and stop marked."""

from __future__ import annotations

import argparse
import os
from typing import Any

from haltpoint.cli.command import add_command
from haltpoint.cli.output import Output
from haltpoint.cli.runinfo import guess_monitor, open_run
from haltpoint.plotting import plot_history
from haltpoint.store.history import HISTORY_NAME, read_history

__all__ = ["register", "run"]

_EPILOG = """\
  haltpoint plot runs/demo                          writes runs/demo/curves.png
  haltpoint plot runs/demo -o curves.png --metric val_loss --metric train_loss
  haltpoint plot runs/demo --monitor val_acc --mode max    mark the best accuracy instead

Needs matplotlib: pip install 'haltpoint[plot]'."""


def run(args: argparse.Namespace, out: Output) -> int:
    """Plot the curves of `args.directory`."""
    run_dir = open_run(args.directory)
    records = read_history(run_dir.storage)
    if not records:
        raise FileNotFoundError(
            f"{args.directory} has no {HISTORY_NAME} (or it is empty): nothing to plot; "
            "a Checkpointer writes one line per save"
        )
    monitor, mode = args.monitor, args.mode
    if monitor is None:
        guessed = guess_monitor(records)
        if guessed is not None:
            monitor, mode = guessed[0], mode or guessed[1]
    if args.monitor is None and args.metric and monitor not in args.metric:
        monitor = None  # the stopper's metric is not plotted: no best to mark
    target = args.output
    if target is None:
        local = run_dir.storage.write_path("curves.png")
        if local is None:
            raise ValueError("the run is not on a local disk: pass -o FILE.png")
        target = local
    summary = plot_history(
        records,
        target,
        metrics=args.metric,
        monitor=monitor,
        mode=mode,
        title=os.path.basename(os.path.normpath(args.directory)),
    )
    marks = []
    if summary.best_step is not None and summary.best_value is not None:
        marks.append(f"best {summary.monitor} {summary.best_value:.4g} at step {summary.best_step}")
    if summary.stop_step is not None:
        marks.append(f"stopped at step {summary.stop_step}")
    detail = f" ({'; '.join(marks)})" if marks else ""
    out.line(f"wrote {summary.path}: {', '.join(summary.metrics)}{detail}")
    return 0


def register(commands: Any) -> None:
    """Add `plot` to the subcommands."""
    parser = add_command(
        commands,
        "plot",
        run,
        help="plot a run's metric curves from history.jsonl, best and stop marked",
        epilog=_EPILOG,
    )
    parser.add_argument("directory", metavar="DIR", help="the run directory (a path or URL)")
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE.png",
        help="where to write; the suffix picks the format: .png, .svg, .pdf, ... "
        "(default: DIR/curves.png)",
    )
    parser.add_argument(
        "--metric", action="append", metavar="M", help="a metric to plot (repeat; default: all)"
    )
    parser.add_argument(
        "--monitor",
        metavar="NAME",
        help="the metric whose best is marked (default: the one the run's stopper watched)",
    )
    parser.add_argument("--mode", choices=("min", "max"), help="whether lower or higher is better")
