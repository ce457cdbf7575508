"""Reading a run directory for the command line: read-only, never taking the writer lock."""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from haltpoint.cli.flags import UsageError, ascii_int
from haltpoint.errors import (
    CheckpointNotFoundError,
    CorruptHistoryError,
    UnreadableCheckpointError,
)
from haltpoint.policies.retention import best_record, commit_order
from haltpoint.stopping.modes import infer_mode
from haltpoint.store.history import HISTORY_NAME, parse_history, read_history
from haltpoint.store.manifest import MANIFEST_NAME, Manifest, Ranking
from haltpoint.store.run_dir import Entry, RunDirectory, checkpoint_dirname, parse_step
from haltpoint.store.storage import dangling_link, open_storage

__all__ = [
    "Record",
    "check_mode",
    "committed",
    "folder_status",
    "guess_monitor",
    "history_of",
    "history_records",
    "metric_names",
    "mode_of",
    "open_run",
    "ranking_text",
    "recorded_ranking",
    "referenced_dirs",
    "resolve_monitor",
    "select_entry",
    "steps_text",
    "watched_metric",
]


@dataclass(frozen=True)
class Record:
    """What retention rules and `best_record` read about one committed checkpoint."""

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    pinned: bool = False
    sequence: int | None = None  # its place in commit order (None: an older haltpoint's)


def open_run(directory: str, *, must_exist: bool = True) -> RunDirectory:
    """The run at `directory` (a path or fsspec URL), opened without the writer lock.

    Raises:
        UsageError: `directory` is empty.
        FileNotFoundError: a local `directory` does not exist (it is never created here).
        ValueError: a URL that no installed fsspec file system opens (the message says why).
    """
    if not directory:
        raise UsageError("DIR must name a run directory, got ''")
    local = directory[len("file://") :] if directory.startswith("file://") else directory
    if must_exist and "://" not in local and not os.path.isdir(local):
        if os.path.exists(local):
            what = "is not a folder"
        else:
            what = f"is {dangling_link(local)}" if os.path.islink(local) else "does not exist"
        raise FileNotFoundError(
            f"run directory {directory} {what}; pass the folder a Checkpointer wrote "
            "(it holds step-* folders and history.jsonl)"
        )
    if must_exist and "://" not in local:
        _refuse_step_folder(directory, local)
    try:
        return RunDirectory(open_storage(directory, create=False))
    except (ValueError, ImportError) as exc:  # fsspec: an unknown protocol, a missing package
        raise ValueError(f"cannot open run directory {directory}: {exc}") from None


def _refuse_step_folder(directory: str, local: str) -> None:
    """Refuse a local `directory` that is one checkpoint's `step-*` folder (what `ls --json`
    and `show` print as a checkpoint's path): read as a run, it holds no checkpoint, and
    `ls` said `no checkpoints` with status 0.

    Raises:
        ValueError: `local` is a step folder with a manifest, naming the run that holds it.
    """
    normal = os.path.normpath(local)
    absolute = os.path.abspath(normal)
    step = parse_step(os.path.basename(absolute))
    if step is None or not os.path.isfile(os.path.join(absolute, MANIFEST_NAME)):
        return
    parent = os.path.dirname(normal)
    if os.path.basename(normal) != os.path.basename(absolute) or not parent:  # '.', '..'
        parent = os.path.dirname(absolute)
    raise ValueError(
        f"{directory} is the folder of one checkpoint (step {step}), not a run directory; "
        f"pass the run directory that holds it, {parent} (show --step {step} and export "
        f"--which {step} pick this checkpoint there)"
    )


def history_of(run: RunDirectory) -> list[dict[str, Any]]:
    """The records of the run's `history.jsonl` (`[]` when there is none)."""
    return read_history(run.storage)


def history_records(data: bytes | None, source: str, *, missing: str) -> list[dict[str, Any]]:
    """The records of the history bytes `data` (None: there is none) of `source`, for the
    commands that need some (`plot`, `replay`); each line skipped is still warned about.

    Raises:
        CheckpointNotFoundError: there is no history, or it is blank (`missing` says so).
        CorruptHistoryError: it holds text, but no line of it is a history record (one
            error, not a warning per line of what may be some other file).
    """
    if data is None or not data.strip():
        raise CheckpointNotFoundError(missing, path=source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = parse_history(data, source)
    if not records:
        raise CorruptHistoryError(
            f"{source} is not a haltpoint history: no line of it is a history record; pass "
            f"a run directory or the {HISTORY_NAME} a Checkpointer wrote",
            path=source,
        )
    for warning in caught:  # a history with some bad lines: each is still told
        warnings.warn(warning.message, stacklevel=2)
    return records


def committed(entries: Iterable[Entry]) -> list[Entry]:
    """The entries with a valid manifest, oldest first."""
    return [e for e in entries if e.manifest is not None]


def referenced_dirs(manifests: Iterable[Manifest]) -> set[str]:
    """The checkpoint folders holding tensor files that `manifests` reference.

    A folder without a manifest among them is the data of a removed checkpoint that later
    checkpoints still use (dedup), not an interrupted save.
    """
    return {file.split("/", 1)[0] for m in manifests for file in m.files()}


def folder_status(entry: Entry, referenced: set[str]) -> str:
    """ "committed", "damaged", "unreadable" (no permission to list its folder or read its
    manifest), "removed" (by a writer while this reader read it), "data-only" (no manifest;
    files used by others) or "uncommitted".

    "committed" says the manifest is valid, not that the data was checked: `verify` says
    "intact" once it has read every byte.
    """
    if entry.manifest is not None:
        return "committed"
    if isinstance(entry.error, UnreadableCheckpointError):
        return "unreadable"
    if entry.error is not None:
        return "damaged"
    if entry.removed:
        return "removed"
    return "data-only" if entry.dirname in referenced else "uncommitted"


def metric_names(manifests: Iterable[Manifest]) -> list[str]:
    """Every metric name in `manifests`, first seen first (in time linear in their number: a
    crafted manifest may hold millions)."""
    names: dict[str, None] = {}
    for manifest in manifests:
        names.update(dict.fromkeys(manifest.metrics))
    return list(names)


def guess_monitor(history: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """The metric and mode the run's own stopper watched, read back from its decisions.

    The stopper's decisions in the history carry the watched value: the monitor is the one
    metric equal to it at every evaluation. The mode is read from how `best` moved (down for
    "min", up for "max"), else from the metric's name.

    >>> rows = [{"metrics": {"a": 1.0, "b": 3.0}, "stopper": {"value": 3.0, "best": 3.0}},
    ...         {"metrics": {"a": 1.0, "b": 2.0}, "stopper": {"value": 2.0, "best": 2.0}}]
    >>> guess_monitor(rows)
    ('b', 'min')
    """
    candidates: set[str] | None = None
    bests: list[float] = []
    for record in history:
        stopper, metrics = record.get("stopper"), record.get("metrics")
        if not isinstance(stopper, Mapping) or not isinstance(metrics, Mapping):
            continue
        value = stopper.get("value")
        if not isinstance(value, float) or not math.isfinite(value):
            continue
        equal = {name for name, v in metrics.items() if v == value}
        candidates = equal if candidates is None else candidates & equal
        best = stopper.get("best")
        if isinstance(best, float) and math.isfinite(best):
            bests.append(best)
    if not candidates or len(candidates) != 1:
        return None
    monitor = candidates.pop()
    for before, after in itertools.pairwise(bests):
        if after != before:
            return monitor, "min" if after < before else "max"
    try:
        return monitor, infer_mode(monitor)
    except ValueError:
        return None


def recorded_ranking(manifests: Sequence[Manifest]) -> Ranking | None:
    """The monitor and mode recorded by the newest committed of `manifests` that names one.

    A record without one (a writer that had none) gives way to an older one that has one;
    `Ranking(None, ...)` when none names one; None when none records any (checkpoints of an
    older haltpoint).
    """
    ordered = sorted(manifests, key=commit_order)  # after a rewind, the new branch last
    recorded = [m.ranking for m in ordered if m.ranking is not None]
    named = [r for r in recorded if r.monitor is not None]
    return (named or recorded)[-1] if recorded else None


def _warn_if_changed(manifests: Sequence[Manifest], newest: Ranking) -> None:
    """Say so when older checkpoints record another monitor than `newest` (changed mid-run)."""
    older: dict[Ranking, list[str]] = {}
    for m in manifests:
        if m.ranking is not None and m.ranking.monitor is not None and m.ranking != newest:
            older.setdefault(m.ranking, []).append(str(m.step))
    if older:
        before = "; ".join(f"step(s) {', '.join(s)} by {ranking_text(r)}" for r, s in older.items())
        warnings.warn(
            f"the run's monitor changed: {before}, the newer ones by {ranking_text(newest)}; "
            "ranking by the newest (gc --keep-best also keeps the best by each older one, as "
            "the writer's retention does; pass --monitor and --mode to choose)",
            stacklevel=3,
        )


def ranking_text(ranking: Ranking) -> str:
    """ "val_loss (min)", or "no monitor".

    >>> ranking_text(Ranking("val_acc", "max"))
    'val_acc (max)'
    """
    return "no monitor" if ranking.monitor is None else f"{ranking.monitor} ({ranking.mode})"


def watched_metric(
    run: RunDirectory | None, history: Sequence[Mapping[str, Any]]
) -> tuple[str, str] | None:
    """The metric and mode that rank the checkpoints of `run`, as its manifests record them
    (checksummed); else, for checkpoints of an older haltpoint or a bare history file (`run`
    None), the ones the run's stopper watched, read back from `history` (`guess_monitor`)."""
    if run is not None:
        manifests = [e.manifest for e in committed(run.scan()) if e.manifest is not None]
        recorded = recorded_ranking(manifests)
        if recorded is not None and recorded.monitor is not None:
            return recorded.monitor, recorded.mode
    return guess_monitor(history)


def resolve_monitor(
    manifests: Sequence[Manifest],
    monitor: str | None,
    mode: str | None,
    *,
    history: Callable[[], Sequence[Mapping[str, Any]]],
    remedy: str = "choose latest or a step",
) -> tuple[str, str]:
    """The metric and mode that rank checkpoints: given, else the ones the run's writer
    recorded in its manifests, else the only metric there is.

    Checkpoints of an older haltpoint do not record them: then, and only then, the metric
    the run's stopper watched is read back from `history()`, with a warning saying so.

    Raises:
        UsageError: `monitor` is not a metric there, or several are and none was given (the
            message lists the metrics and names --monitor).
        CheckpointNotFoundError: the checkpoints hold no metrics, so none is best (the
            message ends with `remedy`: what the command can do instead).
    """
    names = metric_names(manifests)
    recorded = recorded_ranking(manifests)
    if monitor is None and recorded is not None and recorded.monitor is not None:
        check_mode(mode, recorded.monitor, recorded.mode)
        _warn_if_changed(manifests, recorded)
        return recorded.monitor, recorded.mode
    if monitor is None and recorded is None:
        guessed = guess_monitor(history())
        if guessed is not None and guessed[0] in names:
            warnings.warn(
                "these checkpoints do not record what ranks them (written by an older "
                f"haltpoint): ranking by {guessed[0]} ({mode or guessed[1]}), read back from "
                "the history; pass --monitor and --mode to be sure",
                stacklevel=2,
            )
            return guessed[0], mode or guessed[1]
    if monitor is None:
        unrecorded = "" if recorded is None else " (and their writer recorded no monitor)"
        if not names:
            raise CheckpointNotFoundError(
                f"the checkpoints hold no metrics{unrecorded}, so none is best; {remedy}"
            )
        if len(names) > 1:
            raise UsageError(
                f"cannot tell which metric ranks the checkpoints: they hold {', '.join(names)}"
                f"{unrecorded}; pick one with --monitor NAME (and --mode min|max)"
            )
        monitor = names[0]
    elif monitor not in names:
        raise UsageError(
            f"--monitor {monitor!r} is not a metric of these checkpoints; they hold "
            f"{', '.join(names) or 'no metrics'}"
        )
    if mode is None and recorded is not None and recorded.monitor == monitor:
        mode = recorded.mode
    return monitor, mode if mode is not None else mode_of(monitor)


def check_mode(mode: str | None, monitor: str, recorded: str, flag: str = "--monitor") -> None:
    """Refuse a `--mode` given without `--monitor` that contradicts the mode recorded for the
    run's `monitor`: it would take the worst checkpoint for the best. `flag` is the command's
    own option naming the metric (`replay` calls it `--metric`).

    >>> check_mode(None, "val_loss", "min"); check_mode("min", "val_loss", "min")
    """
    if mode is not None and mode != recorded:
        raise UsageError(
            f"--mode {mode} contradicts the run's recorded monitor, {monitor} ({recorded}); "
            f"name the metric it is meant for with {flag} NAME --mode {mode}"
        )


def mode_of(monitor: str) -> str:
    """ "min" or "max" for a metric name, or a one-line error asking for `--mode`.

    >>> mode_of("val_loss")
    'min'
    """
    try:
        return infer_mode(monitor)
    except ValueError:
        raise UsageError(
            f"cannot tell whether a lower or a higher {monitor!r} is better; "
            "pass --mode min or --mode max"
        ) from None


def steps_text(entries: Sequence[Entry]) -> str:
    """The steps of `entries` for messages ("none" when empty)."""
    steps = [str(e.step) for e in entries]
    return ", ".join(steps) if steps else "none"


def select_entry(
    run: RunDirectory,
    which: str,
    *,
    monitor: str | None = None,
    mode: str | None = None,
) -> Entry:
    """The committed checkpoint named by `which`: "latest", "best" or a step number.

    Raises:
        CheckpointNotFoundError: no such intact checkpoint (the message lists the steps).
        CorruptCheckpointError: the step's manifest is damaged (the message says how).
        UsageError: `which` is malformed (it names --which).
        CheckpointNotFoundError: "best" cannot be ranked (see `resolve_monitor`).
    """
    scanned = run.scan()
    entries = committed(scanned)
    if not entries and which in ("latest", "best"):
        raise CheckpointNotFoundError(
            f"no intact checkpoint in {run.storage.url}; run `haltpoint ls` to see what is there",
            path=run.storage.url,
        )
    if which == "latest":  # the newest committed: after a rewind, the branch saved last
        return max(entries, key=commit_order)
    if which == "best":
        manifests = [e.manifest for e in entries if e.manifest is not None]
        name, direction = resolve_monitor(manifests, monitor, mode, history=lambda: history_of(run))
        records = [Record(e.step, e.manifest.metrics) for e in entries if e.manifest]
        best = best_record(records, name, direction)
        if best is None:
            raise CheckpointNotFoundError(
                f"no checkpoint in {run.storage.url} has a finite {name!r}; "
                f"choose latest or a step ({steps_text(entries)})",
                path=run.storage.url,
            )
        return next(e for e in entries if e.step == best.step)
    step = ascii_int(which)
    if step is None:
        raise UsageError(
            f"--which must be 'best', 'latest' or a step number (digits 0-9 only), got {which!r}"
        )
    for entry in scanned:
        if entry.step == step and entry.error is not None:
            raise entry.error  # what is wrong with it, naming the field
        if entry.step == step and entry.committed:
            return entry
    raise CheckpointNotFoundError(
        f"no intact checkpoint for step {step} in {run.storage.url}; "
        f"available: {steps_text(entries)}",
        path=f"{run.storage.url}/{checkpoint_dirname(step)}",
    )
