"""`Checkpointer`: when to save, what to keep, and where to restore from.

The manager decides; the store writes bytes. Everything it reports (`list`, which checkpoint
is best or latest, what retention keeps) is derived from the manifests on disk, so a resumed
run, another process or a copied directory sees the same answers.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from types import TracebackType
from typing import Any, NoReturn

import torch

from haltpoint._arguments import check_device, check_step, coerce_metrics
from haltpoint.distributed.collectives import OPENING, refuse_together
from haltpoint.distributed.strategy import strategy_for
from haltpoint.errors import (
    CheckpointError,
    CorruptCheckpointError,
    HistoryNotWrittenError,
    InsufficientSpaceError,
    LinkedFileError,
    LockedError,
    NotRegularFileError,
    StepBehindError,
    UnreadableCheckpointError,
    UnwritableRunError,
)
from haltpoint.eviction import Evictor
from haltpoint.policies.interval import parse_every
from haltpoint.policies.retention import (
    build_rules,
    commit_order,
)
from haltpoint.preemption import SignalFlag, check_signals
from haltpoint.reader import RNG_ENTRY, CheckpointInfo, Found, RunReader
from haltpoint.schedule import SaveSchedule
from haltpoint.state.rng import capture_rng
from haltpoint.state.tree import flatten_state
from haltpoint.stopping import EarlyStopping
from haltpoint.stopping.modes import resolve_mode
from haltpoint.store.background import BackgroundWriter, warn_user
from haltpoint.store.dedup import ReferenceCheck
from haltpoint.store.history import (
    append_history,
    check_appendable,
    recover_history,
    save_record,
)
from haltpoint.store.info import Planned
from haltpoint.store.lock import WriterLock
from haltpoint.store.manifest import (
    RANKING_KEY,
    DamagedManifestError,
    Manifest,
    NewerFormatError,
    Ranking,
    check_save_time,
    next_sequence,
)
from haltpoint.store.overlap import OptimizerGate, deferred_copy, optimizer_owned
from haltpoint.store.run_dir import (
    PINNED_NAME,
    Entry,
    RunDirectory,
    checkpoint_dirname,
)
from haltpoint.store.space import check_creatable, full_disk_on_open, unwritable_on_open
from haltpoint.store.staging import StagingPool, staged_nbytes
from haltpoint.store.storage import open_storage
from haltpoint.store.writer import write_checkpoint

Extra = Callable[[], Mapping[str, Any]]

__all__ = ["RNG_ENTRY", "CheckpointInfo", "Checkpointer"]  # the first two from haltpoint.reader


class Checkpointer:
    """Saves complete training state atomically and restores it, verified.

    Args:
        directory: a local path or an fsspec URL (`memory://run`, `s3://bucket/run`, ...).
        monitor: the metric that ranks checkpoints for `keep_best` and `restore(which="best")`.
        mode: "min" or "max": whether a lower or a higher `monitor` is better; "auto" infers
            it from the name. Left out, it is "min", and refused for a monitor named like a
            metric where higher is better (`val_acc`), whose best checkpoints a "min" would
            rank last: pass `mode="max"` there. Left out, `restore(which="best")` ranks by
            the mode the run's checkpoints record for `monitor`, if they record one.
            Retention also keeps the `keep_best` best by every other monitor and mode the
            run's checkpoints record (with a warning), so a resumed job that ranks otherwise
            never evicts the run's best.
        keep_best: keep the K best checkpoints by `monitor`.
        keep_last: keep the N newest checkpoints (at least 1: a resume needs it).
        keep_every: keep every checkpoint whose step is a multiple of this, forever.
        async_save: return from `save` once the state is copied; write in the background.
        overlap: with `async_save`, copy the tensors that only `optimizer.step()` changes
            (the parameters and state of the optimizers among `state`'s entries) in the
            background too, while the next forward and backward run: their `step()` waits
            for the copy. A change in place by anything else during the copy fails the save
            instead of committing a torn checkpoint (docs/guide.md, "Overlapped saves").
        max_staging_bytes: the most host memory async staging may hold (default: one copy
            of the state); a larger state is refused with a `ValueError` naming it.
        capture_rng: save and restore the Python, NumPy, torch and CUDA random states.
        read_only: open without the writer lock, for restoring or inspecting only.
        storage_options: passed to fsspec for URLs.
        save_on_signal: signals (e.g. `[signal.SIGTERM, signal.SIGUSR1]`) that set
            `preempted` instead of killing the process, so the loop can save and exit
            cleanly; a second one of the same signal acts as if none were installed.
        every: when `maybe_save` saves: a number of steps (`100`: at the steps that are
            multiples of 100, as Lightning and Orbax), a wall time (`"10min"`,
            `"30s"`, `"2h"`, a `timedelta`), or `"auto"`: the Young/Daly interval for the
            measured save cost, kept under `overhead` (default 0.02) of training time, for
            `mtbf` (a duration; default one day). An improvement of `monitor` and a
            preemption signal always save. None: `maybe_save` is refused.

    Concurrency: one writer process per directory (a second is refused with `LockedError`
    naming the holder), any number of readers. An instance is not thread-safe. A writer
    belongs to the process that made it: in a child made by `os.fork` (multiprocessing's
    "fork" start method) every write, and waiting for a save in flight, is `LockedError`;
    reads work, and `close()` there leaves the parent's lock and checkpoints alone. It cannot
    be pickled or copied (`TypeError`): create it in the process that uses it. Under an
    initialized `torch.distributed` process group, every rank creates the writer and calls
    the same methods; rank 0 alone writes replicated state, every rank its own shards of
    sharded state (the strategy chosen at construction: `haltpoint.distributed.strategy`).

    >>> import torch, tempfile
    >>> model = torch.nn.Linear(2, 1)
    >>> with Checkpointer(tempfile.mkdtemp(), monitor="loss", keep_best=1) as ckpt:
    ...     info = ckpt.save(0, {"model": model}, {"loss": 0.5})
    ...     ckpt.restore({"model": model}, "best").step
    0
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        monitor: str | None = None,
        mode: str | None = None,
        keep_best: int = 0,
        keep_last: int = 1,
        keep_every: int | None = None,
        async_save: bool = True,
        overlap: bool = False,
        capture_rng: bool = True,
        read_only: bool = False,
        storage_options: dict[str, Any] | None = None,
        max_staging_bytes: int | None = None,
        save_on_signal: int | Iterable[int] | None = None,
        every: int | str | timedelta | None = None,
        overhead: float | None = None,
        mtbf: float | str | timedelta | None = None,
    ) -> None:
        for name, flag in (
            ("async_save", async_save),
            ("overlap", overlap),
            ("capture_rng", capture_rng),
            ("read_only", read_only),  # read_only=None must not open a writer
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise TypeError(
                f"monitor must be a metric name (a non-empty str) or None, got {monitor!r}"
            )
        mode_given = mode is not None
        mode = resolve_mode(mode, monitor)
        rules = build_rules(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every=keep_every,
        )
        # every argument is checked before the run directory is created (a typo leaves no
        # empty folder, nor one holding a writer lock, at the run's path)
        if overlap and (not async_save or read_only):
            raise ValueError(
                "overlap=True overlaps the background copy of a save with training: it needs "
                "async_save=True and a writer (not read_only)"
            )
        if save_on_signal is not None:
            if read_only:
                raise ValueError("save_on_signal needs a writer: do not combine it with read_only")
            check_signals(save_on_signal)
        staging = StagingPool(max_staging_bytes=max_staging_bytes)
        schedule = (
            None
            if every is None and overhead is None and mtbf is None
            else SaveSchedule(
                parse_every(every, overhead=overhead, mtbf=mtbf), monitor=monitor, mode=mode
            )
        )
        self.monitor = monitor
        self.mode = mode
        self.capture_rng = capture_rng
        self.read_only = read_only
        opening = str(directory)  # open_storage checks its type
        with full_disk_on_open(opening), unwritable_on_open(opening):
            self._storage = open_storage(directory, storage_options, create=not read_only)
        self._run = RunDirectory(self._storage)
        self._references = ReferenceCheck(self._storage)  # dedup's read-back, once per file
        self._reader = RunReader(self._run, monitor, mode, mode_given)
        self._lock: WriterLock | None = None
        self._evictor = Evictor(
            self._run, self._reader, rules, monitor, mode, held=self._check_lock
        )
        self._last: int | None = None  # the step last saved or restored: saves go on from it
        # the checkpoint restored, with the stoppers in its state that had stopped and their
        # evaluation count then: a stop decided after it (past clear_stop) is a new one
        self._restored: tuple[CheckpointInfo, list[tuple[EarlyStopping, int]]] | None = None
        self._owed: dict[int, dict[str, Any]] = {}  # history lines of committed saves, unwritten
        self._writer: BackgroundWriter | None = None
        self._staging = staging
        self._gate = OptimizerGate() if overlap else None
        self._preemption: SignalFlag | None = None
        self._signalled: str | None = None  # the signal the ranks agreed on: set for good
        # chosen once: one process, or ranks where rank 0 writes replicated state
        self._ranks = strategy_for(
            self._run,
            self._reader.check_shard_part,
            self._wait,
            read_only=read_only,
            async_save=async_save,
        )
        self._closed = False
        self._pid = os.getpid()  # the process that holds the lock and the writer thread
        self._schedule = schedule

        def open_writer() -> None:
            self._lock = WriterLock(self._storage)
            self._lock.acquire()
            try:
                check_creatable(self._storage)
                check_appendable(self._storage)
                on_disk = [e.manifest for e in self._run.committed() if e.manifest]
                self._run.collect_garbage(on_disk)
                recover_history(self._storage, on_disk)
                if save_on_signal is not None:
                    self._preemption = SignalFlag(save_on_signal)
            except BaseException:
                self._lock.release()
                raise
            if async_save:
                self._writer = BackgroundWriter()

        if not read_only:
            with full_disk_on_open(self.directory), unwritable_on_open(self.directory):
                self._ranks.agree(open_writer, f"{OPENING}{self.directory}")
            if save_on_signal is not None and self._preemption is None:
                # the other ranks: a signal may reach any one of them (open_writer is rank 0's)
                self._preemption = SignalFlag(save_on_signal)

    @property
    def preempted(self) -> str | None:
        """The name of the signal named in `save_on_signal` that arrived ("SIGTERM"), or None.

        Check it at a safe point of the loop (after an optimizer step); when set, `save` and
        leave the loop: `close()` (or the `with` block) waits for the commit.

        Under a process group the ranks agree at the call: it is set on every rank once the
        signal reached any rank (SLURM, a node's agent or `kill` may signal only some), the
        same name on every rank (of the largest signal number received). That takes one
        all-reduce of one number per read, until it is set: every rank must read it at the
        same points, as it calls `save`. After `close()` it holds what the ranks agreed at
        the close, with no collective.
        """
        if self._preemption is None or self._signalled is not None:
            return self._signalled
        if self._closed:  # no collective after close: the ranks agreed on none at the close
            return None if self._ranks.group is not None else self._preemption.received
        return self._agree_on_signal()

    def _agree_on_signal(self) -> str | None:
        """The signal received by any rank (one all-reduce under a process group), kept."""
        assert self._preemption is not None
        received = self._preemption.received
        number = 0 if received is None else int(signal.Signals[received])
        agreed = self._ranks.largest(number, "reading ckpt.preempted")
        self._signalled = None if agreed == 0 else signal.Signals(agreed).name
        return self._signalled

    @property
    def directory(self) -> str:
        """The run directory, as a path or URL."""
        return self._storage.url

    # -- saving ---------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        *,
        pin: bool = False,
    ) -> CheckpointInfo:
        """Save `state` as the checkpoint of `step`.

        Returns once the tensors are copied to host memory when `async_save` is on (errors of
        the background write are raised by the next `save`, `wait` or `close`), else once the
        checkpoint is committed. Retention runs after the commit, never before.

        After `restore` loaded a stopper that had stopped, and while it stays stopped, nothing
        is saved: the step trained past the stop (a rerun of a finished job whose loop trains
        before it asks the stopper), so `save` warns, leaves the run as it was and
        returns the checkpoint restored (`maybe_save` returns None).

        Under a process group, entries whose state dict holds `DTensor` shards (FSDP2; save a
        model with its optimizers as `ShardedState(model, optimizer)`) are written by every
        rank through `torch.distributed.checkpoint` into the checkpoint's `dcp/` folder, and
        rank 0 commits once every rank's files are durable (see docs/distributed.md).

        Raises:
            CheckpointExistsError: a checkpoint for `step` is already committed (except by
                this writer's own save of `step`, with the same metrics, whose history line
                failed: calling it again writes that line and returns the committed one).
            HistoryNotWrittenError: the checkpoint is committed (and pinned), but its history
                line could not be written (a full disk): call the same `save` again.
            InsufficientSpaceError: the disk is full; nothing was committed.
            StepBehindError: `step` is older than the newest checkpoint on disk, or than
                this writer's last save or restore; nothing was written.
            UnsupportedStateError: a value in `state` cannot be stored without pickling.
            TypeError: an optimizer holds DTensor state directly (use `ShardedState`).
        """
        with self._refused_together(f"save({step})"):
            if not isinstance(pin, bool):
                raise TypeError(f"pin must be True or False, got {pin!r}")
            self._check_writable()
            step = check_step(step)
            coerce_metrics(metrics, self.monitor)
        restored = self._past_the_stop(step, state, "save")
        if restored is not None:
            return restored
        return self._submit(step, state, metrics, pin, None)

    def _past_the_stop(
        self, step: int, state: Mapping[str, Any], call: str
    ) -> CheckpointInfo | None:
        """The checkpoint restored, when its stopper had stopped and still holds that stop:
        the steps since trained past the stop (a rerun of a finished job whose loop trains
        before it asks the stopper), so they are not saved and the run stays as it was; else
        None. A stopper that `clear_stop()` let evaluate on and that stopped again has a new
        stop, decided by an evaluation since the restore: that save goes on.

        Under a process group the ranks agree (one all-gather, only while a restored stop may
        hold): a stop held on some ranks only (clear_stop() on one rank) raises
        `CheckpointError` on every rank; once no rank holds it, it is not asked again."""
        if self._restored is None or not isinstance(state, Mapping):
            return None
        info, stopped = self._restored
        held = None
        for value in state.values():
            same = [n for s, n in stopped if value is s]
            if same and value.stopped and value.evaluations == same[0]:
                held = value
                break
        if self._ranks.group is not None:
            ranks = self._ranks.gather(lambda: held is not None, f"{call}({step})")
            if not any(ranks):
                self._restored = None  # trained past it on every rank: saves go on
            elif not all(ranks):
                each = ", ".join(
                    f"rank {r} {'holds it' if h else 'trains past it (clear_stop())'}"
                    for r, h in enumerate(ranks)
                )
                raise CheckpointError(
                    f"{call}({step}): the ranks disagree on the stop restored from step "
                    f"{info.step} ({each}): call stopper.clear_stop() on every rank or on "
                    "none (every rank must take the same decision); nothing was saved",
                    path=self.directory,
                )
        if held is None:
            return None
        warn_user(
            f"haltpoint: step {step} not saved: the run restored from step {info.step} "
            f"had already stopped ({held.reason}); the checkpoints stay as they were "
            "(stopper.clear_stop() trains on past it)"
        )
        return info

    def maybe_save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None = None
    ) -> CheckpointInfo | None:
        """Save `state` as the checkpoint of `step` when the `every` policy says so.

        Call it after every optimizer step (or evaluation). Returns the saved checkpoint's
        info, or None when no save was due, or when `step` is the one this Checkpointer last
        saved or restored (it is on disk already, as Orbax's `should_save` is false at the
        latest step). The policy and its reason are recorded in the manifest (`haltpoint
        show` prints them).

        Under a process group every rank decides (its own clock, metrics and preemption
        signal) and one all-gather per call shares the decisions: a save due on any rank is
        made by every rank, so the ranks never part at a save.

        Raises:
            ValueError: the Checkpointer was made without `every`.
        """
        with self._refused_together(f"maybe_save({step})"):
            if self._schedule is None:
                raise ValueError(
                    "maybe_save needs a save interval: create the Checkpointer with every=100 "
                    '(steps), every="10min" (wall time) or every="auto"'
                )
            self._check_writable()
            step = check_step(step)
        if step == self._last:  # saved or restored already: nothing new
            return None
        if self._past_the_stop(step, state, "maybe_save") is not None:
            return None
        schedule = self._schedule

        def decide() -> dict[str, str] | None:
            # this rank's own signal: the gather below shares every rank's decision
            received = self._preemption.received if self._preemption is not None else None
            signalled = self._signalled or received
            return schedule.decide(step, coerce_metrics(metrics, self.monitor), signalled)

        # each rank decides on its own clock, metrics and signals: a save due on any rank is
        # made by every rank (rank 0's reason first), so no rank is left in the save's
        # collectives while another trains on
        due = [d for d in self._ranks.gather(decide, f"maybe_save({step})") if d is not None]
        if not due:
            return None
        saved_by = due[0]
        start = time.perf_counter()
        info = self._submit(step, state, metrics, False, saved_by)
        write = None if self._writer is None else self._writer.last_seconds
        self._schedule.saved(step, time.perf_counter() - start, write)
        return info

    def _submit(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        pin: bool,
        saved_by: Mapping[str, str] | None,
    ) -> CheckpointInfo:
        self._check_writable()
        step = check_step(step)
        coerce_metrics(metrics, self.monitor)

        # every manifest says what ranks it, so readers never guess from the history
        recorded = {RANKING_KEY: self._ranking(state).to_json()}
        if saved_by is not None:  # and which policy chose this save
            recorded["saved_by"] = dict(saved_by)

        def commit(part: Mapping[str, Any], extra: Extra | None) -> CheckpointInfo:
            given = extra
            return self._save(
                step, part, metrics, pin, lambda: {**(given() if given else {}), **recorded}
            )

        info = self._ranks.save(step, state, commit)
        # on every rank, once the ranks agreed the save went through (rank 0 also sets it at
        # its commit): maybe_save's "saved already" must be the same on every rank
        self._last = step
        return info

    def _ranking(self, state: Mapping[str, Any]) -> Ranking:
        """What ranks the checkpoint of `state`: the monitor, else the saved stopper's."""
        if self.monitor is None and isinstance(state, Mapping):
            for value in state.values():
                if isinstance(value, EarlyStopping) and value.monitor is not None:
                    return Ranking(value.monitor, value.mode)
        return Ranking(self.monitor, self.mode)

    def _save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None,
        pin: bool,
        extra: Callable[[], Mapping[str, Any]] | None = None,
    ) -> CheckpointInfo:
        """Write the checkpoint: in the background with `async_save`, else now. `extra()`
        gives the manifest's `extra` just before it is written (for sharded state, once every
        rank's shards are durable)."""
        step = check_step(step)
        metrics = coerce_metrics(metrics, self.monitor)
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a mapping of names to objects, got {type(state).__name__}"
            )
        if RNG_ENTRY in state:
            raise ValueError(f"state must not use the reserved name {RNG_ENTRY!r}")
        self._wait()
        if step in self._owed:  # this writer's own save of `step`, committed: called again?
            done = self._saved_again(step, metrics, pin)
            if done is not None:
                return done
        dirname = self._run.new_dirname(step)  # a step taken is CheckpointExistsError first
        self._check_ahead(step)
        now = check_save_time(time.time(), step, self.directory)  # before anything is written
        full = dict(state)
        if self.capture_rng:
            full[RNG_ENTRY] = capture_rng()
        flat = flatten_state(full)
        background = self._writer is not None
        copy_later: Callable[[], None] | None = None
        if background:  # private copies in reused buffers; training goes on
            optimizers, later = (
                optimizer_owned(state, flat.tensors) if self._gate is not None else ([], set())
            )
            tensors = self._staging.stage(flat.tensors, later=later)
            if later:  # copied in the background; the optimizers' step() waits for it
                assert self._gate is not None
                live = {k: (tensors[k], flat.tensors[k]) for k in later}
                copy_later = deferred_copy(live, step)
                self._gate.watch(optimizers)
                self._gate.hold()
        else:  # training waits for the commit: write straight from the live tensors
            tensors = {k: t if t.device.type == "cpu" else t.cpu() for k, t in flat.tensors.items()}
        history = save_record(step, now, metrics, state)
        written: list[Manifest] = []  # the manifest committed, once the job has run

        def job() -> None:
            try:
                if copy_later is not None:
                    assert self._gate is not None
                    try:
                        copy_later()
                    finally:
                        self._gate.open()
                # this commit comes after every one on disk; after a rewind, the old run's
                # steps above this one are no dedup source
                on_disk = self._run.committed()
                below = [e for e in on_disk if e.step < step]
                manifest = write_checkpoint(
                    self._run,
                    step=step,
                    time=now,
                    metrics=metrics,
                    tree=flat.tree,
                    tensors=tensors,
                    sequence=next_sequence(e.manifest for e in on_disk if e.manifest),
                    extra=None if extra is None else extra(),
                    previous=below[-1].manifest if below else None,
                    check=self._references,
                    pinned=pin,  # the marker is written before the manifest
                    held=None if self._lock is None else self._lock.check,
                )
            finally:
                if background:
                    self._staging.release()
            self._evictor.intact.add(step)
            self._last = step
            written.append(manifest)
            # only this writer changes the run (it holds the lock): no second scan needed
            saved = Entry(step, dirname, manifest, None, pin)
            try:  # committed: an error from here on must say so
                self._write_history(step, history)
            finally:  # retention runs anyway: it may free the space the history needs
                self._evictor.apply_retention([*on_disk, saved])
            self._evictor.remove_superseded(saved)

        if background:
            assert self._writer is not None
            try:
                self._writer.submit(job, f"the save of step {step}")
            except BaseException:
                self._staging.release()
                if self._gate is not None:
                    self._gate.open()
                raise
        else:
            job()
        return CheckpointInfo(
            step=step,
            time=now,
            metrics=metrics,
            size=staged_nbytes(tensors),
            path=f"{self.directory}/{dirname}",
            pinned=pin,
            sequence=None if background else written[0].sequence,  # async: not committed yet
        )

    def _write_history(self, step: int, record: dict[str, Any]) -> None:
        """Append the history lines owed by earlier saves, then `record` (of `step`, just
        committed), in commit order (after a rewind an owed line of a later step was committed
        first; the history's last line is the last commit's); one that fails stays owed for
        the next save."""
        self._owed[step] = record  # a step owed already keeps its place
        for owed in list(self._owed):
            try:
                append_history(self._storage, self._owed[owed])
            except (OSError, LinkedFileError, NotRegularFileError) as exc:
                missing = ", ".join(map(str, sorted(self._owed)))
                remedy = "free some space" if isinstance(exc, OSError) else "fix that"
                raise HistoryNotWrittenError(
                    f"the checkpoint of step {step} is committed in {self.directory}, but the "
                    f"history.jsonl line of step(s) {missing} was not written ({exc}); {remedy} "
                    f"and call save({step}, ...) again to write it (or save on: the next save "
                    "writes it first)",
                    path=self.directory,
                ) from exc
            del self._owed[owed]

    def _saved_again(
        self, step: int, metrics: Mapping[str, float], pin: bool
    ) -> CheckpointInfo | None:
        """The save of `step` called again after its history line failed: write that line
        and return the committed checkpoint, when its manifest is still there, intact, and
        holds these `metrics`; None when this is not that call (it then saves as usual)."""
        dirname = checkpoint_dirname(step)
        try:
            manifest = self._run.read_manifest(dirname)
        except CorruptCheckpointError:  # removed or damaged since: not the same checkpoint
            return None
        if manifest.step != step or not _same_metrics(manifest.metrics, metrics):
            return None
        if pin:
            self._run.set_pinned(step, True)
        self._write_history(step, self._owed[step])
        pinned = pin or self._storage.exists(f"{dirname}/{PINNED_NAME}")
        return self._reader.info(Entry(step, dirname, manifest, None, pinned))

    def pin(self, step: int) -> None:
        """Keep the checkpoint of `step` forever, whatever the retention rules say."""
        self._set_pinned(step, True)

    def unpin(self, step: int) -> None:
        """Let retention rules decide about `step` again (applied at the next save)."""
        self._set_pinned(step, False)

    def _set_pinned(self, step: int, pinned: bool) -> None:
        with self._refused_together(f"(un)pinning step {step}"):
            self._check_writable()
        self.wait()
        mark = lambda: self._run.set_pinned(self._reader.entry(check_step(step)).step, pinned)  # noqa: E731
        self._ranks.agree(mark, f"(un)pinning step {step}")

    def _check_ahead(self, step: int) -> None:
        """Refuse (StepBehindError) a save of a step older than this writer's last save or
        restore, or, before either, than the latest checkpoint on disk (the newest committed:
        after a rewind, the branch saved last): steps go on from where training is."""
        floor = self._last
        where = "this Checkpointer's last save or restore"
        if floor is None:
            latest = max(self._run.committed(), key=commit_order, default=None)
            floor = -1 if latest is None else latest.step
            where = f"the latest checkpoint in {self.directory}"
        if step < floor:
            raise StepBehindError(
                f"cannot save step {step}: it is older than step {floor}, {where}; save a "
                f"newer step, or restore(which={step}) or an older step first to rewind",
                path=self.directory,
            )

    def _passed(self, which: str | int, found: Found | None) -> list[Entry]:
        """The damaged checkpoints a restore of `which` passed over to reach `found` (and
        warned about): those whose data failed verification and, for "latest", every newer
        one whose manifest's bytes are damaged (not one unreadable now, or of a newer format)."""
        passed = [entry for entry, _ in found.passed] if found is not None else []
        if which == "latest":
            newer = self._newer_than(found)
            passed += [e for e in newer if isinstance(e.error, DamagedManifestError)]
        return passed

    def _newer_than(self, found: Found | None) -> list[Entry]:
        """The checkpoint folders of steps after `found`'s (every one when None).

        Raises:
            UnreadableCheckpointError: one of them cannot be read now (no permission, an I/O
                error, a manifest of a newer format): it may hold the run's newest
                checkpoint, a stopped stopper among it, and a writer that resumed behind it
                would train that part again, then find its step taken.
        """
        newest = -1 if found is None else found.entry.step
        newer = [e for e in self._run.scan() if e.step > newest]
        for entry in newer:
            if isinstance(entry.error, (UnreadableCheckpointError, NewerFormatError)):
                remedy = (
                    "upgrade haltpoint (pip install -U haltpoint)"
                    if isinstance(entry.error, NewerFormatError)
                    else "fix its permissions or the disk"
                )
                instead = (
                    f", or restore which={newest} to resume from step {newest} on purpose"
                    if found is not None
                    else ""
                )
                raise UnreadableCheckpointError(
                    f"cannot read {entry.error.path}, newer than "
                    f"{'every readable checkpoint' if found is None else f'step {newest}'}: a "
                    "writer does not resume behind a checkpoint it cannot read (it may hold the "
                    f"run's newest state); nothing was set aside or deleted: {remedy} and "
                    f"restore again{instead}",
                    path=entry.error.path,
                )
        return newer

    # -- restoring ------------------------------------------------------------------------

    def restore(
        self,
        state: MutableMapping[str, Any],
        which: str | int = "latest",
        *,
        strict: bool = True,
        map_location: str | torch.device | None = None,
    ) -> CheckpointInfo | None:
        """Load a checkpoint into the objects of `state`, verifying every tensor it reads.

        Args:
            state: the names to restore (all of those saved for a resume, or only some:
                `{"model": model}` to evaluate); objects are loaded in place, plain values
                are replaced in the mapping. What the checkpoint holds beyond them is
                verified (streamed, not held in memory) but not loaded, and named in the
                returned info's `report.unexpected`.
            which: "latest", "best" (by `monitor`) or a step.
            strict: refuse a name of `state` the checkpoint lacks, and module keys on one
                side only; with False they are reported in the returned info's `report`.
                Shapes and dtypes must match either way (nothing is converted), and every
                check, the random state's included, passes before anything is loaded
                (docs/format.md, "Restore checks").
            map_location: the device tensors are read onto before loading (default: CPU).

        Returns:
            The checkpoint restored, or None for "latest" when the run has no checkpoint yet.

        Raises:
            CheckpointNotFoundError: `which` names no intact checkpoint.
            CorruptCheckpointError: the checkpoint asked for by step is damaged.
            InsufficientSpaceError, UnwritableRunError: a writer fell back past a damaged
                checkpoint and could not set it aside (a full disk, an OS error); nothing
                was loaded.
            LockedError: a writer fell back past a damaged checkpoint, but its lock file was
                deleted or replaced since it took it (another writer may be using the run);
                nothing was set aside or loaded.

        A damaged checkpoint is never loaded: for "latest" and "best" haltpoint warns and falls
        back to the next newest (or next best) intact one. A writer (not `read_only`) also
        quarantines each damaged checkpoint it passed over (docs/format.md, "Quarantine"),
        so training goes on and that step can be saved again. Under `torch.distributed`, rank 0
        chooses the checkpoint and every rank loads that same step. Sharded entries load
        through `torch.distributed.checkpoint` onto this world size (or, without a process
        group, whole into unsharded objects); every rank must call `restore` for them.
        """
        with self._refused_together(f"restore({which!r})"):
            if self._closed:  # its lock is gone: a quarantine move could race another writer
                raise CheckpointError(
                    f"this Checkpointer for {self.directory} is closed; create a new one to "
                    "restore",
                    path=self.directory,
                )
            device = check_device(map_location)

        def read(which: str | int, skip: dict[int, str], check_shards: bool) -> Found | None:
            self._wait()  # this instance's save in flight commits first
            found = self._reader.read(
                which, check_shards=check_shards, skip=skip, state=state, strict=strict
            )
            if self._writes_here():  # the writer moves the damage it fell back past aside
                passed = self._passed(which, found)
                if passed:  # still the run's writer? (as at commit)
                    self._check_lock()
                for entry in passed:
                    try:
                        self._evictor.quarantine(entry, None)
                    except OSError as exc:
                        raise self._not_set_aside(entry, exc) from exc
            return found

        def prepare(found: Found) -> Planned:
            planned = self._reader.plan(
                found, state, strict=strict, device=device, rng=self.capture_rng
            )

            def load() -> CheckpointInfo:
                self._evictor.intact.add(found.entry.step)
                if self._writes_here():
                    self._last = found.entry.step
                info = planned.load()
                stopped = [
                    (v, v.evaluations)
                    for v in state.values()
                    if isinstance(v, EarlyStopping) and v.stopped
                ]
                self._restored = (info, stopped) if stopped else None
                return info

            return replace(planned, load=load)

        return self._ranks.restore(which, read, prepare)

    def _not_set_aside(self, entry: Entry, exc: OSError) -> CheckpointError:
        """The error of a restore that fell back past the damaged checkpoint `entry` and
        could not move its manifest into quarantine/ (so its step could not be saved again)."""
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        kind = InsufficientSpaceError if full else UnwritableRunError
        fix = "free some space" if full else "fix the disk or the folder's permissions"
        return kind(
            f"{self.directory}: restore passed over the damaged checkpoint of step {entry.step} "
            f"but could not set it aside in quarantine/ ({exc.strerror or exc}); nothing was "
            f"loaded or deleted: {fix} and restore again (read_only=True restores "
            "without setting it aside)",
            path=self.directory,
        )

    # -- listing --------------------------------------------------------------------------

    def list(self) -> list[CheckpointInfo]:
        """The committed checkpoints, oldest step first, as read from the directory.

        Waits for this instance's save in flight first, so a step just saved is listed (not
        in a process forked from the writer's: it lists what is committed).
        """
        if not self._forked():
            self.wait()
        return self._reader.checkpoints()

    # -- life cycle -----------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the save in flight is committed; raise its error if it failed.

        Under `torch.distributed` every rank returns once rank 0 has committed (or raises
        rank 0's error), so every rank can then `restore` what was saved.

        Raises:
            LockedError: in a process forked from the writer's, while a save is in flight
                (the thread writing it is the parent's).
        """
        if self._forked():
            if self._writer is not None and self._writer.pending:
                raise self._forked_error("wait for the save in flight")
            return
        self._ranks.wait()

    def _wait(self) -> None:
        """Wait for this writer's save in flight; in a forked child, for nothing (it is the
        parent's: reads go to what is committed, writes are refused first)."""
        if self._writer is not None and not self._forked():
            self._writer.wait()

    def _forked(self) -> bool:
        """Whether this is a writer inherited by a process forked from its own."""
        return not self.read_only and os.getpid() != self._pid

    def _writes_here(self) -> bool:
        """Whether this process may change the run: a writer, in the process that opened it."""
        return not self.read_only and not self._forked()

    def _forked_error(self, what: str) -> LockedError:
        return LockedError(
            f"this Checkpointer for {self.directory} belongs to process {self._pid}, which "
            f"holds its writer lock; process {os.getpid()} inherited it by fork and cannot "
            f"{what}: open a new Checkpointer in the child (read_only=True while process "
            f"{self._pid} writes)",
            path=self.directory,
        )

    def close(self) -> None:
        """Finish the save in flight, then release the directory. Safe to call twice."""
        self._close(sync=True)

    def _close(self, sync: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._forked():  # the lock, the thread and the signal handlers are the parent's
            if self._writer is not None and self._writer.pending:
                raise self._forked_error("finish the save in flight")
            return
        finish = self._writer.close if self._writer is not None else lambda: None
        try:  # leaving on an exception (maybe on one rank only): no collective
            if sync:
                self._ranks.agree(finish, "close()")
                if self._preemption is not None and self._signalled is None:
                    self._agree_on_signal()  # every rank is here: `preempted` after close
            else:
                finish()
        finally:
            if self._gate is not None:
                self._gate.close()
            self._ranks.close()
            if self._preemption is not None:
                self._preemption.uninstall()
            if self._lock is not None:
                self._lock.release()

    def __reduce__(self) -> NoReturn:
        """Refused: a copy would share (or, in another process, claim) this one's writer lock,
        background writer and signal handlers, which belong to the process that opened it."""
        raise TypeError(
            f"a Checkpointer cannot be pickled or copied: it belongs to the process that "
            f"opened {self.directory} (its writer lock, background writer and signal "
            "handlers); create the Checkpointer in the process that uses it (under "
            "multiprocessing's spawn or Lightning's ddp_spawn: inside the worker)"
        )

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close(sync=exc is None)

    @contextmanager
    def _refused_together(self, what: str) -> Iterator[None]:
        """The checks of a call before its first collective: under a process group, one that
        fails on this rank is raised on every rank at once (`collectives.refuse_together`),
        not left to the others' wait in that collective until the timeout."""
        try:
            yield
        except Exception as exc:
            if self._ranks.group is None or self._forked():
                raise
            refuse_together(self._ranks.group, what, exc)

    def _check_lock(self) -> None:
        """`WriterLock.check` of this writer's lock (nothing where this process holds none:
        a reader, a rank other than 0)."""
        if self._lock is not None:
            self._lock.check()

    def _check_writable(self) -> None:
        if self._forked():
            raise self._forked_error("write")
        if self._closed:
            raise CheckpointError(
                f"this Checkpointer for {self.directory} is closed; create a new one to save",
                path=self.directory,
            )
        if self.read_only:
            raise CheckpointError(
                f"this Checkpointer for {self.directory} was opened with read_only=True; "
                "open it without read_only to save",
                path=self.directory,
            )


def _same_metrics(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether two metric mappings hold the same names and values (NaN equals NaN)."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
    )
