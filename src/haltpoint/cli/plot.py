"""`haltpoint plot`: metric curves of a run from its history, best and stop marked."""

from __future__ import annotations

import argparse
import os
from typing import Any

from haltpoint.cli.command import add_command
from haltpoint.cli.flags import UsageError, check_output_file, user_path, write_failed
from haltpoint.cli.output import Output
from haltpoint.cli.runinfo import check_mode, history_records, mode_of, open_run, watched_metric
from haltpoint.errors import CheckpointNotFoundError
from haltpoint.plotting import curves, image_formats, plot_history
from haltpoint.store.history import HISTORY_NAME, read_history_bytes

__all__ = ["register", "run"]

_EPILOG = """\
  haltpoint plot runs/demo                          writes runs/demo/curves.png
  haltpoint plot runs/demo -o curves.png --metric val_loss --metric train_loss
  haltpoint plot runs/demo --monitor val_acc --mode max    mark the best accuracy instead

Needs matplotlib: pip install 'haltpoint[plot]'."""


def run(args: argparse.Namespace, out: Output) -> int:
    """Plot the curves of `args.directory`."""
    suffixes = ["." + f for f in image_formats()]
    if args.output is not None:
        check_output_file(args.output, "-o", suffixes)
    run_dir = open_run(args.directory)
    records = history_records(
        read_history_bytes(run_dir.storage),
        f"{run_dir.storage.url}/{HISTORY_NAME}",
        missing=f"{args.directory} has no {HISTORY_NAME} (or it is empty): nothing to plot; "
        "a Checkpointer writes one line per save",
    )
    names = list(curves(records))
    missing = [m for m in args.metric or [] if m not in names]
    if missing:
        raise UsageError(
            f"--metric {', '.join(map(repr, missing))} is not in the history; it holds "
            f"{', '.join(map(repr, names)) or 'no metrics'}"
        )
    plotted = [n for n, (steps, _) in curves(records, args.metric).items() if steps]
    if not plotted:
        raise CheckpointNotFoundError(
            f"the history of {args.directory} holds no metric values (numbers at steps that "
            "are ints >= 0), so there is nothing to plot; a Checkpointer records them with "
            "save(step, state, metrics)",
            path=args.directory,
        )
    if args.monitor is not None and args.monitor not in plotted:
        raise UsageError(
            f"--monitor {args.monitor!r} is not among the plotted metrics "
            f"({', '.join(plotted) or 'none'}); pass one of them"
        )
    monitor, mode = args.monitor, args.mode
    if monitor is None:
        guessed = watched_metric(run_dir, records)
        if guessed is not None:
            check_mode(mode, *guessed)
            monitor, mode = guessed
    if args.monitor is None and monitor not in plotted:
        monitor = None  # the stopper's metric is not plotted: no best to mark
    if monitor is not None and mode is None:
        mode = mode_of(monitor)
    target = args.output
    if target is None:
        local = run_dir.storage.write_path("curves.png")
        if local is None:
            raise UsageError("the run is not on a local disk: pass -o FILE.png")
        check_output_file(local, "-o (default)")
        target = local
    try:
        summary = plot_history(
            records,
            target,
            metrics=args.metric,
            monitor=monitor,
            mode=mode,
            title=os.path.basename(os.path.normpath(args.directory)),
        )
    except OSError as exc:
        raise write_failed("-o", target, exc) from None
    marks = []
    if summary.best_step is not None and summary.best_value is not None:
        marks.append(f"best {summary.monitor} {summary.best_value:.4g} at step {summary.best_step}")
    if summary.stop_step is not None:
        marks.append(f"stopped at step {summary.stop_step}")
    if summary.left_out:
        marks.append(f"{summary.left_out} values beyond +-1e300 left out")
    if summary.not_plotted:
        marks.append(f"{summary.not_plotted} more metrics not plotted: pick them with --metric")
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
        interrupted="interrupted; the plot file may be incomplete (run plot again); nothing "
        "else was changed",
    )
    parser.add_argument(
        "directory", type=user_path, metavar="DIR", help="the run directory (a path or URL)"
    )
    parser.add_argument(
        "-o",
        "--output",
        type=user_path,
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
        help="the metric whose best is marked (default: the one ranking the checkpoints)",
    )
    parser.add_argument("--mode", choices=("min", "max"), help="whether lower or higher is better")
