"""`haltpoint demo`: train a small conv net on real digits, stop early, checkpoint, resume."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shlex
import shutil
import stat
import time
from collections.abc import Iterator
from typing import Any

from rich.progress import Progress, TaskID

from haltpoint.checkpointer import CheckpointInfo
from haltpoint.cli.command import add_command
from haltpoint.cli.flags import check_output_dir, count, seed, user_path
from haltpoint.cli.output import Output, format_bytes
from haltpoint.cli.progress import Field, epoch_progress
from haltpoint.cli.runinfo import open_run
from haltpoint.demo.scores import score
from haltpoint.demo.train import (
    MONITOR,
    DemoConfig,
    DemoOutcome,
    EpochResult,
    is_demo_checkpoint,
    train_demo,
)
from haltpoint.errors import CheckpointError, LockedError, UnreadableCheckpointError, first_line
from haltpoint.plotting import MissingDependencyError, plot_history
from haltpoint.stopping import EarlyStopping
from haltpoint.store.history import (
    HISTORY_NAME,
    decode_record,
    is_checked_record,
    read_history,
    read_history_file,
)
from haltpoint.store.lock import LOCK_NAME, WriterLock, read_holder
from haltpoint.store.manifest import MANIFEST_NAME
from haltpoint.store.quarantine import QUARANTINE_DIR, is_quarantined_name
from haltpoint.store.run_dir import (
    DCP_NAME,
    ROOT_TEMP_OF,
    STEP_TEMP_OF,
    Entry,
    RunDirectory,
    is_own_step_name,
    is_temp_name,
    parse_step,
)
from haltpoint.store.storage import LocalStorage

__all__ = ["DEFAULT_RUN_DIR", "PLOT_NAME", "register", "run"]

DEFAULT_RUN_DIR = os.path.join("runs", "demo")
PLOT_NAME = "curves.png"
_METRICS = frozenset({"train_loss", MONITOR, "val_acc"})  # what the demo saves every epoch

_EPILOG = """\
  haltpoint demo                              train into runs/demo (about 20 s on a laptop)
  haltpoint demo                              again: resumes, or shows the finished run
  haltpoint demo --run-dir /tmp/d --fresh     delete /tmp/d first, start from scratch
  haltpoint demo --epochs 3                   a quick look

Press Ctrl-C at any time: the last committed checkpoint stays, and the same command resumes.
Then try: haltpoint ls runs/demo; haltpoint verify runs/demo; haltpoint replay runs/demo"""


def _looks_like_run(path: str) -> bool:
    """Whether `path` is empty or a run: it holds a committed manifest, or a history with a
    line whose checksum verifies.

    A stray `.haltpoint.lock` (left by `gc` or a writer opened on a wrong folder) is not
    evidence of a run, and neither is a `step-*` folder without a valid manifest, nor a
    `history.jsonl` of another tool (JSON lines without haltpoint's checksum). A folder
    holding nothing but the lock is as good as empty: a --fresh killed just before its end
    leaves one (so does a writer killed before its first save), and the next --fresh must
    finish the job.
    """
    names = os.listdir(path)
    if names in ([], [LOCK_NAME]) or _has_checked_history(os.path.join(path, HISTORY_NAME)):
        return True
    return any(e.manifest is not None for e in RunDirectory(LocalStorage(path)).scan())


def _has_checked_history(path: str) -> bool:
    """Whether the file `path` holds a history line with a checksum that verifies.

    Raises:
        CorruptHistoryError: it is larger than any history (`read_history_file`), or reading
            it fails; so --fresh deletes nothing.
        UnreadableCheckpointError: it cannot be read for lack of permission.
    """
    if not os.path.isfile(path):  # a folder or a FIFO there is no history haltpoint wrote
        return False
    return any(is_checked_record(line) for line in read_history_file(path).split(b"\n"))


def _foreign_entry(path: str) -> str | None:
    """The first entry under `path` that neither haltpoint nor the demo writes, or None.

    --fresh deletes the whole folder, so a file of anybody else (notes beside the run, a
    file in a step folder) makes it refuse: it deletes only what it would itself rewrite. A
    folder, FIFO, socket or device at the name of one of haltpoint's files is not haltpoint's
    either (a folder named `history.jsonl` may hold anything).
    """
    own_root = ROOT_TEMP_OF | {PLOT_NAME}  # the history, the lock and the plot
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.islink(full):
            return full
        if name in own_root or is_temp_name(name, own_root):
            if not _is_regular(full):
                return full
            continue
        if name == QUARANTINE_DIR and os.path.isdir(full):
            for child in sorted(os.listdir(full)):  # a folder at a manifest's name may hold any
                inner = os.path.join(full, child)
                if not is_quarantined_name(child) or not _is_regular(inner):
                    return inner
            continue
        if parse_step(name) is None or not os.path.isdir(full):
            return full
        for child in sorted(os.listdir(full)):
            inner = os.path.join(full, child)  # dcp/ too: the demo saves no sharded state
            if not _is_regular(inner) or not (
                (is_own_step_name(child) and child != DCP_NAME) or is_temp_name(child, STEP_TEMP_OF)
            ):
                return inner
    return None


def _is_regular(path: str) -> bool:
    """Whether `path` is a regular file (not a link, folder, FIFO, socket or device)."""
    return stat.S_ISREG(os.lstat(path).st_mode)


def _delete_run(path: str) -> str | None:
    """Delete the run directory `path` for --fresh, holding its writer lock throughout, and
    say what was deleted (None when there was nothing: no folder, or an empty one).

    The checks run first without the lock (so a folder that is no run gets no lock file),
    then the lock is taken and the contents checked again: from then on a trainer that opens
    the run is refused with `LockedError` until the folder is gone. Each checkpoint loses
    its manifest before its data, and the history goes after every checkpoint: a --fresh
    killed midway leaves no damaged checkpoint, and a run the next --fresh recognises. The
    lock file goes last, while still locked; a writer waiting on it then finds it deleted and
    starts a new one.

    Raises:
        CheckpointError: `path` is a symbolic link, no haltpoint run, holds a foreign entry,
            or a checkpoint the demo did not save (or whose manifest cannot be read).
        LockedError: a writer holds the run (naming it); nothing was deleted.
        UnreadableCheckpointError: what it holds cannot be listed or read to be checked;
            nothing was deleted.
    """
    if not os.path.lexists(path):
        return None
    with _checking(path):
        _refuse_a_link(path)
        if not os.path.isdir(path) or not _looks_like_run(path):
            raise CheckpointError(
                f"--fresh deletes {path}, but it does not look like a haltpoint run (no "
                f"{HISTORY_NAME} and no committed checkpoint); delete it yourself or pick "
                "another --run-dir",
                path=path,
            )
        _refuse_foreign(path)
        _refuse_other_runs(path)
    storage = LocalStorage(path, create=False)
    holder = read_holder(storage)
    if holder is not None:
        raise LockedError(
            f"--fresh cannot delete {path}: {holder.describe()} is training in it; stop that "
            "process first",
            path=path,
        )
    with WriterLock(storage):  # one that took the lock since read_holder: LockedError
        with _checking(path):  # again: what changed before the lock was ours
            _refuse_a_link(path)
            _refuse_foreign(path)
            _refuse_other_runs(path)
        names = [name for name in os.listdir(path) if name != LOCK_NAME]
        deleted = _what_is_deleted(path, names)
        for name in sorted(names, key=lambda name: (name == HISTORY_NAME, name)):  # history last
            full = os.path.join(path, name)
            if os.path.isdir(full) and not os.path.islink(full):
                if parse_step(name) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(full, MANIFEST_NAME))
                shutil.rmtree(full)
            else:
                os.unlink(full)
        os.unlink(os.path.join(path, LOCK_NAME))
        try:
            os.rmdir(path)
        except OSError as exc:  # a writer created a new lock file since: its run is empty
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EINVAL, errno.EBUSY):
                raise  # EINVAL: `.` (or `DIR/.`), EBUSY: a mount point; both left empty
    return deleted


def _what_is_deleted(path: str, names: list[str]) -> str | None:
    """One line naming what --fresh is about to delete of `path` (its checkpoints, the best
    among them, its history), or None when `names` (its entries but the lock) is empty."""
    if not names:
        return None
    entries = RunDirectory(LocalStorage(path, create=False)).committed()
    parts = []
    if entries:
        count = f"{len(entries)} checkpoint" + ("" if len(entries) == 1 else "s")
        steps = f"step {entries[0].step}"
        if len(entries) > 1:
            steps = f"steps {entries[0].step}-{entries[-1].step}"
        scored = [
            (e.manifest.metrics[MONITOR], e.step)
            for e in entries
            if e.manifest is not None and isinstance(e.manifest.metrics.get(MONITOR), int | float)
        ]
        if scored:
            value, step = min(scored)
            steps += f"; best {MONITOR} {value:.4f} at step {step}"
        parts.append(f"{count} ({steps})")
    if HISTORY_NAME in names:
        parts.append("its history")
    what = " and ".join(parts) if parts else "its leftovers (no committed checkpoint)"
    return f"--fresh deleted {path}: {what}"


@contextlib.contextmanager
def _checking(path: str) -> Iterator[None]:
    """Turn an OS error of --fresh's checks (a folder that cannot be listed, a file that
    cannot be read) into one line saying that nothing was deleted."""
    try:
        yield
    except OSError as exc:
        where = exc.filename if exc.filename is not None else path
        raise UnreadableCheckpointError(
            f"--fresh deletes {path}, but cannot read {where} to check that it is the demo's "
            f"({exc.strerror or exc}); nothing was deleted: fix its permissions or the disk, "
            "or delete the folder yourself",
            path=path,
        ) from None


def _refuse_a_link(path: str) -> None:
    if os.path.islink(os.path.normpath(path)):  # `link/` and `link/.` lead through it too
        raise CheckpointError(
            f"--fresh deletes {path}, but it is a symbolic link; delete the run it points to "
            "yourself or pick another --run-dir",
            path=path,
        )


def _refuse_foreign(path: str) -> None:
    foreign = _foreign_entry(path)
    if foreign is not None:
        raise CheckpointError(
            f"--fresh deletes {path}, but it holds {foreign}, which haltpoint did not write; "
            "move it out, or delete the folder yourself",
            path=path,
        )


def _refuse_other_runs(path: str) -> None:
    """Refuse a run holding a checkpoint the demo did not save, or one it cannot read; and
    so for a quarantined manifest (its data is in the run's step folders too), and for a
    history record of another run (a history may be all that is left of one)."""
    run = RunDirectory(LocalStorage(path, create=False))
    if os.path.isdir(os.path.join(path, QUARANTINE_DIR)):
        for held in run.quarantined():
            where = os.path.join(path, held.path)
            if held.manifest is None:  # `error` says why
                raise CheckpointError(
                    f"--fresh deletes {path}, but the quarantined manifest {where} cannot be "
                    f"read ({first_line(held.error) if held.error else ''}), so it may be another "
                    "run's; nothing was deleted: delete the folder yourself or pick another "
                    "--run-dir",
                    path=path,
                )
            if not is_demo_checkpoint(held.manifest):
                raise CheckpointError(
                    f"--fresh deletes {path}, but the quarantined manifest {where} is not the "
                    f"demo's (it holds {', '.join(sorted(held.manifest.tree))}); nothing was "
                    "deleted: delete the folder yourself or pick another --run-dir",
                    path=path,
                )
    for entry in run.scan():
        if entry.error is not None:
            raise CheckpointError(
                f"--fresh deletes {path}, but the manifest of {entry.dirname} cannot be read "
                f"({first_line(entry.error)}), so it may be another run's; nothing was "
                "deleted: delete the folder yourself or pick another --run-dir",
                path=path,
            )
        foreign = _not_the_demos(entry)
        if foreign is not None:
            raise CheckpointError(
                f"--fresh deletes {path}, but {foreign}; nothing was deleted: delete the "
                "folder yourself or pick another --run-dir",
                path=path,
            )
    history = os.path.join(path, HISTORY_NAME)
    lines = read_history_file(history).split(b"\n") if os.path.isfile(history) else []
    for number, line in enumerate(lines, 1):
        if not is_checked_record(line):  # a torn line, or another tool's: no evidence
            continue
        metrics = decode_record(line).get("metrics")
        if not isinstance(metrics, dict) or set(metrics) != _METRICS:
            names = ", ".join(sorted(map(str, metrics))) if isinstance(metrics, dict) else ""
            raise CheckpointError(
                f"--fresh deletes {path}, but line {number} of its {HISTORY_NAME} is another "
                f"run's (its metrics are {names or 'none'}, not the demo's); nothing was "
                "deleted: delete the folder yourself or pick another --run-dir",
                path=path,
            )


def _refuse_to_resume_another_run(path: str) -> None:
    """Refuse to resume a run directory holding a checkpoint the demo did not save: its
    restore failed with the library's advice (`missing from the checkpoint: 'settings'; ...
    pass strict=False`), which no flag of the command can follow. Checked before the writer
    opens the folder, so another run's directory is left as it was."""
    if not os.path.isdir(path):
        return
    for entry in RunDirectory(LocalStorage(path, create=False)).scan():
        foreign = _not_the_demos(entry)
        if foreign is not None:
            raise CheckpointError(
                f"--run-dir {path} holds another run: {foreign}; the demo resumes only its "
                "own runs: pick another --run-dir",
                path=path,
            )


def _not_the_demos(entry: Entry) -> str | None:
    """What says that `entry` is another run's checkpoint, or None when it is the demo's (or
    holds no manifest that reads)."""
    if entry.manifest is None or is_demo_checkpoint(entry.manifest):
        return None
    entries = ", ".join(sorted(entry.manifest.tree))
    return f"its checkpoint of step {entry.step} is not the demo's (it holds {entries})"


def _disk_usage(path: str) -> tuple[int, int]:
    """Bytes under `path`, and how many committed checkpoints it holds (not folders: a
    quarantined checkpoint's data, or a leftover, is no checkpoint)."""
    total = sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )
    return total, len(RunDirectory(LocalStorage(path, create=False)).committed())


class _Display:
    """Shows progress: a live bar on a terminal, one plain line per epoch otherwise."""

    def __init__(self, out: Output, run_dir: str, config: DemoConfig) -> None:
        self.out, self.run_dir, self.config = out, run_dir, config
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.resumed = False

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        if not self.out.is_terminal:
            yield
            return
        self.progress = epoch_progress(self.out.console)
        with self.progress:
            self.task = self.progress.add_task("train", total=self.config.max_epochs, fields=[])
            yield

    def start(self, info: CheckpointInfo | None, stopper: EarlyStopping) -> None:
        if info is None:
            self.out.line(f"training from scratch into {self.run_dir}")
        else:
            self.resumed = True
            self.out.line(f"resumed from step {info.step}", style="bold")
            if stopper.stopped:
                self.out.line(
                    f"the run had already stopped: {stopper.reason}; nothing to train "
                    "(--fresh deletes it and starts over)"
                )
            elif info.step + 1 >= self.config.max_epochs:
                self.out.line(
                    f"the run had already trained {info.step + 1} epochs (--epochs "
                    f"{self.config.max_epochs}); pass --epochs N with N > {info.step + 1} to "
                    "train longer"
                )
        if self.progress is not None and self.task is not None:
            done = 0 if info is None else info.step + 1
            self.progress.update(self.task, completed=min(done, self.config.max_epochs))

    def epoch(self, result: EpochResult) -> None:
        d = result.decision
        fields: list[Field] = [  # ranked: the bar drops the highest rank first
            (f"train_loss {result.train_loss:.4f}", 4),
            (f"{MONITOR} {result.val_loss:.4f}", 0),
            (f"val_acc {100 * result.val_acc:.1f}%", 3),
            (f"best {d.best:.4f}@{d.best_step}", 1),
            (f"wait {d.wait}", 2),
        ]
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=result.epoch + 1, fields=fields)
        else:
            self.out.line(f"step {result.epoch:>3}  " + "  ".join(text for text, _ in fields))


def _test_rows(outcome: DemoOutcome) -> list[list[str]]:
    """The restored best model's scores on the test split, by scikit-learn when installed."""
    n = len(outcome.test_labels)
    loss = f"(best model restored; test loss {outcome.test_loss:.4f})"
    try:
        s = score(outcome.test_labels, outcome.test_predicted)
    except MissingDependencyError as exc:
        accuracy = f"{100 * outcome.test_acc:.2f}% of {n} digits {loss}"
        return [["test accuracy", accuracy], ["test macro avg", f"skipped: {exc}"]]
    return [
        ["test accuracy", f"{100 * s.accuracy:.2f}% of {n} digits {loss}"],
        [
            "test macro avg",
            f"precision {100 * s.precision:.2f}%, recall {100 * s.recall:.2f}%, "
            f"F1 {100 * s.f1:.2f}% (scikit-learn)",
        ],
    ]


def _summary(out: Output, run_dir: str, outcome: DemoOutcome, seconds: float, plot: str) -> None:
    size, checkpoints = _disk_usage(run_dir)
    stopped = "stopped early" if outcome.stopped_early else "did not stop early"
    kept = f"{checkpoints} checkpoint" + ("" if checkpoints == 1 else "s")
    rows = [
        ["why it stopped" if outcome.stopped_early else "why it ended", outcome.reason],
        ["epochs trained", f"{outcome.last_epoch + 1} (steps 0-{outcome.last_epoch}), {stopped}"],
        ["best", f"step {outcome.best_epoch}: {MONITOR} {outcome.best_val_loss:.4f}"],
        *_test_rows(outcome),
        ["wall time", f"{seconds:.1f} s"],
        ["disk used", f"{format_bytes(size)} in {run_dir} ({kept} kept)"],
        ["plot", plot],
    ]
    out.line()
    out.table(["", ""], rows, title="haltpoint demo", numeric=(), header=False)


def run(args: argparse.Namespace, out: Output) -> int:
    """Train, resume or summarise the demo run in `args.run_dir`."""
    run_dir = args.run_dir
    check_output_dir(run_dir, "--run-dir")
    config = DemoConfig(max_epochs=args.epochs, seed=args.seed)
    deleted = _delete_run(run_dir) if args.fresh else None
    if not args.fresh:
        _refuse_to_resume_another_run(run_dir)
    display = _Display(out, run_dir, config)
    out.note(
        "haltpoint demo: a small conv net on 1,797 handwritten 8x8 digits "
        "(UCI, CC BY 4.0); each epoch N ends with one evaluation (early stopping on val_loss) "
        "and one checkpoint, saved as step N"
    )
    if deleted is not None:
        out.note(deleted)
    started = time.perf_counter()
    with display.live():  # Ctrl-C: the save in flight is committed, then `_interrupted` says so
        outcome = train_demo(run_dir, config, on_start=display.start, on_epoch=display.epoch)
    plot_path = os.path.join(run_dir, PLOT_NAME)
    try:
        drawn = plot_history(
            read_history(LocalStorage(run_dir)),
            plot_path,
            monitor=MONITOR,
            mode="min",
            title="haltpoint demo: digits",
        )
        marks = "best and stop" if drawn.stop_step is not None else "best"
        plot = f"{plot_path} ({marks} marked)"
    except MissingDependencyError as exc:
        plot = f"skipped: {exc}"
    _summary(out, run_dir, outcome, time.perf_counter() - started, plot)
    return 0


def _interrupted(args: argparse.Namespace) -> str:
    """What a Ctrl-C kept of the demo run: its last committed checkpoint, or nothing."""
    run_dir = args.run_dir
    scanned = open_run(run_dir).scan() if os.path.isdir(run_dir) else []
    steps = [e.step for e in scanned if e.manifest is not None]
    if not steps:
        return (
            "interrupted before the first checkpoint; nothing saved; start again with: "
            f"{_same_command(args)}"
        )
    return (
        f"interrupted: the last committed checkpoint is step {steps[-1]}; resume with: "
        f"{_same_command(args)}"
    )


def _same_command(args: argparse.Namespace) -> str:
    """The command line that resumes the run of `args`, quoted for a shell: its --epochs and
    --seed where not the defaults (without this --seed, the resume is refused; without this
    --epochs, it trains to the default maximum), and never --fresh."""
    words = ["haltpoint", "demo", "--run-dir", args.run_dir]
    if args.epochs != DemoConfig.max_epochs:
        words += ["--epochs", str(args.epochs)]
    if args.seed != DemoConfig.seed:
        words += ["--seed", str(args.seed)]
    return shlex.join(words)


def register(commands: Any) -> None:
    """Add `demo` to the subcommands."""
    parser = add_command(
        commands,
        "demo",
        run,
        help="train a small conv net on handwritten digits with early stopping and checkpoints",
        epilog=_EPILOG,
        interrupted=_interrupted,
    )
    parser.add_argument(
        "--run-dir",
        type=user_path,
        default=DEFAULT_RUN_DIR,
        metavar="DIR",
        help=f"where checkpoints, history and the plot go (default: {DEFAULT_RUN_DIR})",
    )
    parser.add_argument(
        "--epochs",
        type=count(1),
        default=DemoConfig.max_epochs,
        metavar="N",
        help=f"maximum epochs (default: {DemoConfig.max_epochs}; early stopping ends it sooner)",
    )
    parser.add_argument(
        "--seed",
        type=seed,
        default=0,
        metavar="S",
        help="from 0 to 2**32 - 1; fixes the split, the init and the shuffles (default: 0)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete the run directory first and start over"
    )
