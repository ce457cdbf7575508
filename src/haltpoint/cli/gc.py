"""`haltpoint gc`: apply retention rules to a run offline, under the writer lock."""

from __future__ import annotations

import argparse
from typing import Any

from haltpoint.cli.command import add_command
from haltpoint.cli.flags import UsageError, count, user_path
from haltpoint.cli.output import Output, format_bytes, format_metrics
from haltpoint.cli.runinfo import (
    Record,
    history_of,
    open_run,
    resolve_monitor,
)
from haltpoint.errors import CheckpointNotFoundError
from haltpoint.policies.retention import (
    KeepBest,
    RetentionRule,
    build_rules,
    recorded_best_rules,
    retained_steps,
)
from haltpoint.reader import RunReader
from haltpoint.store.lock import WriterLock
from haltpoint.store.manifest import recorded_rankings
from haltpoint.store.run_dir import Entry, RunDirectory, checkpoint_nbytes
from haltpoint.store.space import full_disk_on_open, unwritable_on_open

__all__ = ["plan_gc", "register", "run"]

_EPILOG = """\
  haltpoint gc runs/demo --keep-last 2 --dry-run         show what would go
  haltpoint gc runs/demo --keep-last 1 --keep-best 1     monitor: the run's, from its manifests
  haltpoint gc runs/demo --keep-best 3 --monitor val_acc --mode max --keep-every 10

The kept set is the union of the rules; the newest checkpoint and pinned ones always stay.
Refused while a training process holds the run's writer lock."""


def plan_gc(
    run: RunDirectory,
    *,
    keep_last: int,
    keep_best: int,
    keep_every: int | None,
    monitor: str | None,
    mode: str | None,
) -> tuple[list[Entry], list[Entry], list[tuple[Entry, str]]]:
    """The committed checkpoints to keep and to remove under the given rules.

    Only verified checkpoints count: every checkpoint the rules would keep has its data
    checked first, and a damaged one is set aside (neither counted nor removed) before the
    rules run again, so a damaged newest checkpoint never costs the newest intact one.
    Without `monitor`, keep-best also keeps the best by every other ranking the manifests
    record, as the writer's retention does: a monitor changed mid-run costs no run's best.

    Raises:
        ValueError, TypeError: the settings are invalid.
        CheckpointNotFoundError: best cannot be ranked (the checkpoints hold no metrics).
    """
    entries = all_entries = [e for e in run.scan() if e.manifest is not None]
    reader = RunReader(run, None, "min")
    others: list[KeepBest] = []
    if keep_best > 0:  # ranked once, by what the manifests record (see resolve_monitor)
        manifests = [e.manifest for e in entries if e.manifest is not None]
        given = monitor
        monitor, mode = resolve_monitor(
            manifests,
            monitor,
            mode,
            history=lambda: history_of(run),
            remedy="keep checkpoints by --keep-last N or --keep-every N instead",
        )
        if given is None:
            recorded = recorded_rankings(manifests)
            others = recorded_best_rules([KeepBest(keep_best, monitor, mode)], recorded)
    damaged: dict[int, str] = {}
    intact: set[int] = set()
    while True:
        kept, dropped = _plan(entries, keep_last, keep_best, keep_every, monitor, mode, others)
        unchecked = [e for e in kept if e.step not in intact]
        if not unchecked:
            found = [(e, damaged[e.step]) for e in all_entries if e.step in damaged]
            return kept, [e for e in dropped if e.step not in damaged], found
        for entry in unchecked:
            damage = reader.damage(entry)
            if damage is None:
                intact.add(entry.step)
            else:
                damaged[entry.step] = damage
        entries = [e for e in entries if e.step not in damaged]


def _plan(
    entries: list[Entry],
    keep_last: int,
    keep_best: int,
    keep_every: int | None,
    monitor: str | None,
    mode: str | None,
    others: list[KeepBest],
) -> tuple[list[Entry], list[Entry]]:
    rules: list[RetentionRule] = build_rules(
        keep_last=keep_last,
        keep_best=keep_best,
        monitor=monitor if keep_best > 0 else None,
        mode=mode or "min",
        keep_every=keep_every,
    )
    rules += others
    records = [
        Record(e.step, e.manifest.metrics, e.pinned, e.manifest.sequence)
        for e in entries
        if e.manifest
    ]
    kept_steps = retained_steps(records, rules)
    kept = [e for e in entries if e.step in kept_steps]
    dropped = [e for e in entries if e.step not in kept_steps]
    return kept, dropped


def run(args: argparse.Namespace, out: Output) -> int:
    """Remove (or with --dry-run list) the checkpoints the rules do not keep."""
    if args.keep_last is None and not args.keep_best and args.keep_every is None:
        if args.keep_best == 0:  # given, not left out: it keeps nothing by rank
            raise UsageError(
                "--keep-best 0 keeps no checkpoint (it turns the best-K rule off), and no other "
                "rule is given; say what to keep: --keep-best K with K >= 1, --keep-last N or "
                "--keep-every N; gc never guesses, since it deletes"
            )
        raise UsageError(
            "say what to keep: --keep-last N, --keep-best K (with --monitor) or --keep-every N; "
            "gc never guesses, since it deletes"
        )
    run_dir = open_run(args.directory)
    if not any(e.manifest is not None or e.error is not None for e in run_dir.scan()):
        raise CheckpointNotFoundError(
            f"{args.directory} holds no checkpoint: it is not a haltpoint run, or an empty "
            "one; gc changes nothing in it (and creates no lock file there)",
            path=args.directory,
        )
    lock = WriterLock(run_dir.storage)
    # a read-only run or a full disk: said as a writer says it
    with full_disk_on_open(run_dir.storage.url), unwritable_on_open(run_dir.storage.url):
        lock.acquire()  # LockedError names the live writer
    try:
        kept, dropped, damaged = plan_gc(
            run_dir,
            keep_last=1 if args.keep_last is None else args.keep_last,
            keep_best=args.keep_best or 0,
            keep_every=args.keep_every,
            monitor=args.monitor,
            mode=args.mode,
        )
        for entry, damage in damaged:
            out.note(
                f"step {entry.step} is damaged ({damage}): not counted as kept and not removed; "
                "`haltpoint verify` says more"
            )
        verb = "would remove" if args.dry_run else "removing"
        for entry in dropped:
            assert entry.manifest is not None
            metrics = format_metrics(entry.manifest.metrics)
            out.line(f"{verb} step {entry.step}  {metrics}".rstrip())
        leftovers: list[str] = []
        if not args.dry_run:  # a damaged checkpoint's files stay, as the checkpoint does
            protected = [e.manifest for e in [*kept, *(d for d, _ in damaged)] if e.manifest]
            lock.check()  # another writer since (its lock file deleted)? it may be saving
            if dropped:
                run_dir.remove(dropped, protected)
            else:
                leftovers = run_dir.collect_garbage(protected)
    finally:
        lock.release()
    freed = sum(checkpoint_nbytes(e.manifest) for e in dropped if e.manifest is not None)
    steps = ", ".join(str(e.step) for e in kept) or "none"
    if args.dry_run:
        out.line(
            f"dry run: would remove {len(dropped)} checkpoint(s) (up to {format_bytes(freed)}), "
            f"keep steps {steps}"
        )
    else:
        out.line(
            f"removed {len(dropped)} checkpoint(s) (up to {format_bytes(freed)}), "
            f"kept steps {steps}"
        )
        if leftovers:
            out.line(f"also removed {len(leftovers)} leftover file(s) of interrupted saves")
    return 0


def register(commands: Any) -> None:
    """Add `gc` to the subcommands."""
    parser = add_command(
        commands,
        "gc",
        run,
        help="remove the checkpoints that retention rules do not keep",
        epilog=_EPILOG,
        interrupted="interrupted; the checkpoints gc had not yet removed are intact (a removed "
        "one loses its manifest first); run gc again to finish",
    )
    parser.add_argument(
        "directory", type=user_path, metavar="DIR", help="the run directory (a path or URL)"
    )
    parser.add_argument("--keep-last", type=count(1), metavar="N", help="keep the N newest (>= 1)")
    parser.add_argument(
        "--keep-best", type=count(0), metavar="K", help="keep the K best by --monitor (0: none)"
    )
    parser.add_argument(
        "--keep-every", type=count(1), metavar="N", help="keep steps divisible by N"
    )
    parser.add_argument(
        "--monitor",
        metavar="NAME",
        help="the metric ranking --keep-best (default: the run's recorded one, or the only one)",
    )
    parser.add_argument("--mode", choices=("min", "max"), help="whether lower or higher is better")
    parser.add_argument("--dry-run", action="store_true", help="only print what would be removed")
