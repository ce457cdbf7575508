"""Crash injection and concurrent processes on the write side.

Every write-side operation (save + retention, a re-save that supersedes a tensor file, the
writer's clean-up at open, `haltpoint gc`, `haltpoint import`, `haltpoint demo --fresh`) runs
in a forked child that is SIGKILLed just before its N-th file-system mutation, for every N
(a write is torn: half of it lands first; fsyncs are counted, but a kill before one is the
kill before the next mutation). After each crash the run directory, read directly,
still holds every intact checkpoint the operation was not asked to remove, no committed
checkpoint that fails to verify, and every byte haltpoint did not write; readers load the
right intact checkpoint or raise a `CheckpointError`; the dead process's lock blocks nobody;
and the same operation run again ends where an uninterrupted one does.

Then processes at the same time: `gc`, `import` and `demo --fresh` are refused while a trainer
holds the run, a second writer is refused, a killed writer's lock is taken over, and a reader
process never loads a torn checkpoint while a writer's retention evicts under it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer, load_best
from haltpoint.cli import demo, main
from haltpoint.demo.model import DigitsNet
from haltpoint.errors import CheckpointError, LockedError
from haltpoint.plotting import MissingDependencyError
from haltpoint.reader import RunReader
from haltpoint.store.dedup import MIN_DEDUP_BYTES
from haltpoint.store.history import read_history
from haltpoint.store.lock import LOCK_NAME, LockHolder, read_holder
from haltpoint.store.manifest import MANIFEST_NAME
from haltpoint.store.run_dir import PINNED_NAME, RunDirectory, checkpoint_dirname, is_tensors_name
from haltpoint.store.storage import LocalStorage
from test_write_side_safety import hashes

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs fork, /proc/self/fd"),
    pytest.mark.filterwarnings("ignore"),
]

CHILD_TIMEOUT_S = 60
MAX_POINTS = 40  # crash points per operation: sampled evenly when it makes more mutations

# -- the crash harness ---------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BY_FD = ("write", "pwrite", "ftruncate", "fsync")
_BY_PATH = ("unlink", "remove", "rmdir", "mkdir", "truncate", "replace", "rename", "link")


class Mutations:
    """Counts the calls that change files under `root`; the `crash_at`-th kills the process
    (SIGKILL) before it runs or, for a write, once half of its bytes are written.

    Patched at the os layer, which every store path reaches (`LocalStorage`, the lock, the
    history, the direct-I/O tensor writer, `shutil.rmtree`), so no mutation escapes it."""

    def __init__(self, root: Path, crash_at: int | None) -> None:
        self.root = os.path.realpath(root)
        self.crash_at = crash_at
        self.count = 0
        self.armed = True
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def install(self) -> None:
        for name in ("open", *_BY_FD, *_BY_PATH):
            setattr(os, name, self._wrap(name, getattr(os, name)))

    @staticmethod
    def _fd_path(fd: int) -> str:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return ""

    def _target(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        first = args[0] if args else next(iter(kwargs.values()), "")
        if name in _BY_FD or isinstance(first, int):
            return self._fd_path(first)
        path = os.fsdecode(first)
        dir_fd = kwargs.get("dir_fd", kwargs.get("src_dir_fd"))
        if dir_fd is not None and not os.path.isabs(path):
            return os.path.join(self._fd_path(dir_fd), path)
        return os.path.abspath(path)

    def _wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.armed:
                return real(*args, **kwargs)
            if name == "open" and not (args[1] if len(args) > 1 else kwargs["flags"]) & (
                _WRITE_FLAGS
            ):
                return real(*args, **kwargs)
            target = self._target(name, args, kwargs)
            if target != self.root and not target.startswith(self.root + os.sep):
                return real(*args, **kwargs)
            with self._lock:
                self.count += 1
                self.calls.append(f"{name} {os.path.relpath(target, self.root)}")
                crash = self.count == self.crash_at
            if crash:
                if name in ("write", "pwrite") and len(args[1]) > 1:
                    data = memoryview(args[1]).cast("B")
                    real(args[0], data[: len(data) // 2], *args[2:])  # a torn write
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call


@dataclass
class ChildResult:
    killed: bool
    report: dict[str, Any]


def in_child(root: Path, crash_at: int | None, fn: Callable[[Mutations], Any]) -> ChildResult:
    """Run `fn` in a forked child whose mutations under `root` are counted (the `crash_at`-th
    kills it); what it returned or raised, and the mutations, come back by a pipe."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # a fork with threads alive
        pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's clean-up
        code = 0
        try:
            os.close(read_end)
            torch.set_num_threads(1)  # OpenMP's threads are the parent's: one would hang
            counter = Mutations(root, crash_at)
            counter.install()
            try:
                report: dict[str, Any] = {"result": fn(counter)}
            except BaseException as exc:
                report = {
                    "error": type(exc).__name__,
                    "message": str(exc),
                    "trace": traceback.format_exc(),
                }
            counter.armed = False
            report["count"], report["calls"] = counter.count, counter.calls
            data = json.dumps(report, default=repr).encode()
            while data:
                data = data[os.write(write_end, data) :]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"the child hung (crash_at={crash_at})")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    data = b"".join(chunks)
    return ChildResult(killed, json.loads(data) if data else {})


def crash_points(calls: list[str]) -> list[int]:
    """The mutations to kill before: every one but an fsync (a kill just before an fsync
    leaves what a kill just before the next mutation leaves: the page cache outlives the
    process), or MAX_POINTS of them evenly spread, the first and the last included."""
    points = [n for n, call in enumerate(calls, 1) if not call.startswith("fsync ")]
    if len(points) <= MAX_POINTS:
        return points
    return [points[round(i * (len(points) - 1) / (MAX_POINTS - 1))] for i in range(MAX_POINTS)]


def test_crash_points_are_every_mutation_but_fsyncs_or_an_even_sample():
    assert crash_points(["open a", "write a", "fsync a", "replace a"]) == [1, 2, 4]
    sample = crash_points([f"unlink {n}" for n in range(400)])
    assert len(set(sample)) == MAX_POINTS and sample[0] == 1 and sample[-1] == 400


# -- reading a run directly ----------------------------------------------------------------------


@dataclass
class Survey:
    """What a run directory holds, read without a writer."""

    committed: dict[int, dict[str, float]] = field(default_factory=dict)  # step: metrics
    intact: set[int] = field(default_factory=set)
    damaged: dict[int, str] = field(default_factory=dict)  # committed, not verifying
    broken: dict[int, str] = field(default_factory=dict)  # a manifest that does not read
    sequence: dict[int, int] = field(default_factory=dict)
    contents: dict[int, dict[str, str]] = field(default_factory=dict)  # the tensors' hashes
    referenced: set[str] = field(default_factory=set)  # by a manifest, quarantined ones too
    pinned: set[int] = field(default_factory=set)
    manifests: dict[int, bytes] = field(default_factory=dict)  # the manifests' own bytes
    held: set[bytes] = field(default_factory=set)  # the quarantined manifests' bytes


def survey(run: Path) -> Survey:
    out = Survey()
    if not run.exists():
        return out
    run_dir = RunDirectory(LocalStorage(run, create=False))
    reader = RunReader(run_dir, None, "min")
    for entry in run_dir.scan():
        if entry.error is not None:
            out.broken[entry.step] = str(entry.error)
        if entry.manifest is None:
            continue
        out.manifests[entry.step] = (run / entry.dirname / MANIFEST_NAME).read_bytes()
        if entry.pinned:
            out.pinned.add(entry.step)
        out.committed[entry.step] = dict(entry.manifest.metrics)
        out.sequence[entry.step] = entry.manifest.sequence or 0
        out.contents[entry.step] = {k: r.hash for k, r in entry.manifest.tensors.items()}
        out.referenced |= set(entry.manifest.files())
        damage = reader.damage(entry)
        if damage is None:
            out.intact.add(entry.step)
        else:
            out.damaged[entry.step] = damage
    for held in run_dir.quarantined():
        out.held.add((run / held.path).read_bytes())
        if held.manifest is not None:
            out.referenced |= set(held.manifest.files())
    return out


def garbage(run: Path) -> list[str]:
    """haltpoint's own files in step folders that nothing references: what a crash left."""
    if not run.exists():
        return []
    referenced = survey(run).referenced
    left = []
    for folder in sorted(p for p in run.iterdir() if p.name.startswith("step-") and p.is_dir()):
        for child in sorted(folder.iterdir()):
            rel = f"{folder.name}/{child.name}"
            if (is_tensors_name(child.name) and rel not in referenced) or (
                child.name.endswith(".tmp") and child.name.startswith((MANIFEST_NAME, PINNED_NAME))
            ):
                left.append(rel)
    return left


# -- the scenarios -------------------------------------------------------------------------------

LOSS = {1: 0.9, 2: 0.5, 3: 0.8, 4: 0.7, 5: 0.95}


FROZEN = torch.arange(float(MIN_DEDUP_BYTES // 4))  # large enough to be deduplicated


def values(step: int) -> dict[str, torch.Tensor]:
    """What the scenarios save at `step`: "w" changes, "frozen" never does (deduplicated: every
    later manifest references the first step's file, which retention must keep)."""
    return {"w": torch.full((4,), float(step)), "frozen": FROZEN}


SHAPES = tuple(values(0).items())


def save_steps(ckpt: Checkpointer, steps: Iterable[int], pin: Iterable[int] = ()) -> None:
    for step in steps:
        ckpt.save(step, values(step), {"loss": LOSS[step]}, pin=step in pin)


def writer(run: Path, **kwargs: Any) -> Checkpointer:
    settings = {"keep_last": 2, "keep_best": 1, "monitor": "loss", "async_save": False}
    return Checkpointer(run, capture_rng=False, **{**settings, **kwargs})


FOREIGN = [
    "README.md",
    "draft.tmp",
    f"{checkpoint_dirname(1)}/notes.txt",
    f"{checkpoint_dirname(0)}/plot.png",
]


def plant_foreign(run: Path) -> None:
    """The user's files: beside the run, a .tmp, in the folder of a step that goes."""
    (run / "README.md").write_text("precious")
    (run / "draft.tmp").write_text("someone's temp file")
    (run / checkpoint_dirname(1) / "notes.txt").write_text("my notes")


@dataclass
class Scenario:
    """One write-side operation on the run `build` makes.

    `op` runs in the crashing child; `again` is what a user runs after the crash (the same
    command, or the training script resuming) and must succeed. `removes`: the steps the
    operation is asked to remove; `kept_before`: the intact
    steps it starts from when `op` makes them itself; `keeps`: files besides the foreign ones
    whose bytes must survive; `state`: what a restore loads into; `compare`: whether loaded
    tensors are compared with `values`; `varies`: what of the end may differ from an
    uninterrupted run's, and why."""

    name: str
    build: Callable[[Path, Path], None]
    op: Callable[[Path, Path, Mutations], None]
    again: Callable[[Path, Path], None]
    removes: set[int] = field(default_factory=set)
    kept_before: set[int] | None = None
    keeps: list[str] = field(default_factory=list)
    monitor: str = "loss"
    state: Callable[[], dict[str, Any]] = lambda: {k: torch.zeros_like(v) for k, v in SHAPES}
    compare: bool = True
    varies: tuple[str, ...] = ()  # what of the `Outcome` may differ from an uninterrupted run


# save + retention: steps 1-3 (2 the best); saving 4 (pinned) with keep_last=2 evicts step 1,
# whose tensor file holds "frozen" for all of them (the file stays)
def build_save(run: Path, tmp: Path) -> None:
    with writer(run, keep_last=3) as ckpt:
        save_steps(ckpt, [1, 2, 3])
    plant_foreign(run)


def op_save(run: Path, tmp: Path, counter: Mutations) -> None:
    with writer(run) as ckpt:
        save_steps(ckpt, [4], pin=[4])


def again_save(run: Path, tmp: Path) -> None:
    """The training script resuming: restore the latest, save the steps left up to 4, and 5."""
    with writer(run) as ckpt:
        info = ckpt.restore(values(0))
        assert info is not None
        save_steps(ckpt, range(info.step + 1, 6), pin=[4])


# retention and restore set a damaged checkpoint aside: steps 1-3, step 3's tensors damaged;
# saving 4 verifies 3 (keep_last keeps it in place of 1), moves its manifest to quarantine/,
# and evicts 1; a writer's restore falls back past 3 to 2 and moves it aside too
def build_damaged(run: Path, tmp: Path) -> None:
    build_save(run, tmp)
    tensors = run / checkpoint_dirname(3) / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x10
    tensors.write_bytes(bytes(data))


def op_restore(run: Path, tmp: Path, counter: Mutations) -> None:
    with writer(run) as ckpt:
        info = ckpt.restore(values(0))
        assert info is not None and info.step == 2


def again_restore(run: Path, tmp: Path) -> None:
    op_restore(run, tmp, Mutations(run, None))


# a re-save: the commit of step 3 failed once (its tensor file stays), then step 3 is saved
# again in the same session under a fresh file name, and the superseded file goes
def build_resave(run: Path, tmp: Path) -> None:
    run.mkdir()
    (run / "README.md").write_text("precious")


def op_resave(run: Path, tmp: Path, counter: Mutations) -> None:
    counter.armed = False  # the set-up is not the operation
    ckpt = writer(run, keep_last=3)
    save_steps(ckpt, [2])
    real_commit = RunDirectory.commit

    def failing(self: RunDirectory, manifest: Any) -> str:
        raise OSError(5, "Input/output error")

    RunDirectory.commit = failing  # type: ignore[method-assign]
    with contextlib.suppress(OSError):
        ckpt.save(3, {"w": torch.full((4,), -1.0), "frozen": -FROZEN}, {"loss": 0.1})
    RunDirectory.commit = real_commit  # type: ignore[method-assign]
    assert (run / checkpoint_dirname(3) / "tensors.safetensors").exists()
    counter.armed = True
    save_steps(ckpt, [3])
    ckpt.close()


def again_resave(run: Path, tmp: Path) -> None:
    with writer(run, keep_last=3) as ckpt:
        info = ckpt.restore(values(0))
        save_steps(ckpt, range(2 if info is None else info.step + 1, 4))


# the writer's clean-up at open: stray temporary files, an interrupted save's leftovers, a
# removed step's leftover file, a quarantined manifest (its data stays), a dead writer's lock
def build_open(run: Path, tmp: Path) -> None:
    with writer(run, keep_last=5, keep_best=0) as ckpt:
        save_steps(ckpt, [1, 2, 3, 4])
    tensors = run / checkpoint_dirname(4) / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x10
    tensors.write_bytes(bytes(data))
    with writer(run, keep_last=5, keep_best=0) as ckpt:  # falls back past step 4: set aside
        ckpt.restore(values(0))
    assert (run / "quarantine" / f"{checkpoint_dirname(4)}-1.json").exists()
    plant_foreign(run)
    (run / "history.jsonl.0a1b2c3d.tmp").write_text("half")
    (run / checkpoint_dirname(3) / "manifest.json.deadbeef.tmp").write_text("half")
    (run / checkpoint_dirname(2) / "pinned.12345678.tmp").write_text("")
    for step in (0, 5):  # an interrupted save, and a save whose manifest retention removed
        (run / checkpoint_dirname(step)).mkdir()
        (run / checkpoint_dirname(step) / "tensors.safetensors").write_bytes(b"leftover")
    (run / checkpoint_dirname(0) / "plot.png").write_bytes(b"\x89PNG precious")
    dead = LockHolder(pid=dead_pid(), host=os.uname().nodename, since=time.time())
    (run / LOCK_NAME).write_bytes(dead.to_json())


def op_open(run: Path, tmp: Path, counter: Mutations) -> None:
    writer(run, keep_last=5, keep_best=0).close()


def again_open(run: Path, tmp: Path) -> None:
    writer(run, keep_last=5, keep_best=0).close()


# gc: steps 1-5; --keep-last 1 --keep-best 1 keeps 5 and 2 (the best), removes 1, 3 and 4
GC_ARGS = ["--keep-last", "1", "--keep-best", "1", "--monitor", "loss"]


def build_gc(run: Path, tmp: Path) -> None:
    with writer(run, keep_last=5, keep_best=0) as ckpt:
        save_steps(ckpt, [1, 2, 3, 4, 5])
    plant_foreign(run)


def op_gc(run: Path, tmp: Path, counter: Mutations) -> None:
    assert main(["gc", str(run), *GC_ARGS]) == 0


def again_gc(run: Path, tmp: Path) -> None:
    assert main(["gc", str(run), *GC_ARGS]) == 0


# import: a torch.save file as step 11 of a run holding steps 1-3; run again after a kill, it
# imports (nothing was committed) or is refused in one line (step 11 is there)
def build_import(run: Path, tmp: Path) -> None:
    build_save(run, tmp)
    torch.save({**values(11), "epoch": 11}, tmp / "model.pt")


def run_import(run: Path, tmp: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["import", str(tmp / "model.pt"), "-o", str(run), "--step", "11"])
    return code, err.getvalue()


def op_import(run: Path, tmp: Path, counter: Mutations) -> None:
    assert run_import(run, tmp)[0] == 0


def again_import(run: Path, tmp: Path) -> None:
    committed = 11 in survey(run).intact
    code, err = run_import(run, tmp)
    if committed:
        assert code == 1 and err.count("\n") == 1 and "is not newer than" in err, err
    else:
        assert code == 0, err


# demo --fresh: deletes a previous demo run whole (as asked: no step is to stay), then trains
# from scratch. The kills come in the deletion (the training is the save scenario's), with the
# folder listed in name order, so that the history goes before the step folder
def build_fresh(run: Path, tmp: Path) -> None:
    assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0


def op_fresh(run: Path, tmp: Path, counter: Mutations) -> None:
    real_listdir = os.listdir
    os.listdir = lambda path=".": sorted(real_listdir(path))  # type: ignore[assignment]
    demo._delete_run(str(run))


def again_fresh(run: Path, tmp: Path) -> None:
    def no_plot(*args: Any, **kwargs: Any) -> None:
        raise MissingDependencyError("no plot in this test")  # half the demo's time

    real, demo.plot_history = demo.plot_history, no_plot  # type: ignore[assignment]
    try:
        assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 0
    finally:
        demo.plot_history = real  # type: ignore[assignment]


def dead_pid() -> int:
    """The id of a process that has exited."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


SCENARIOS = [
    Scenario("save", build_save, op_save, again_save, removes={1}),
    Scenario(
        "retention-quarantine",
        build_damaged,
        op_save,
        again_save,
        removes={1},
        keeps=[f"{checkpoint_dirname(3)}/tensors.safetensors"],
        # killed after step 4's commit, before it set 3 aside: the resumed run's save of 5
        # keeps 4 and 5, not 3, and removes it (damaged, kept by no rule) instead
        varies=("files",),
    ),
    Scenario(
        "restore-quarantine",
        build_damaged,
        op_restore,
        again_restore,
        keeps=[f"{checkpoint_dirname(3)}/tensors.safetensors"],
    ),
    Scenario("resave", build_resave, op_resave, again_resave, kept_before={2}),
    Scenario(
        "open",
        build_open,
        op_open,
        again_open,
        keeps=[
            f"quarantine/{checkpoint_dirname(4)}-1.json",
            f"{checkpoint_dirname(4)}/tensors.safetensors",
        ],
    ),
    Scenario("gc", build_gc, op_gc, again_gc, removes={1, 3, 4}),
    Scenario("import", build_import, op_import, again_import),
    Scenario(
        "fresh",
        build_fresh,
        op_fresh,
        again_fresh,
        removes={0},
        monitor="val_loss",
        state=lambda: {"model": DigitsNet()},
        compare=False,
    ),
]


# -- the checks ----------------------------------------------------------------------------------


def loaded(run: Path, which: str | int, scenario: Scenario) -> tuple[int | str, dict[str, Any]]:
    """Restore `which` with a fresh read-only Checkpointer: (its step, the state), (-1, {}) for
    no checkpoint, or (the name of the CheckpointError it raised, {}); any other exception
    propagates and fails the test."""
    state = scenario.state()
    try:
        with Checkpointer(run, read_only=True, monitor=scenario.monitor, capture_rng=False) as r:
            info = r.restore(state, which, strict=False)
    except CheckpointError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
        return type(exc).__name__, {}
    return (-1, {}) if info is None else (info.step, state)


def check_loaded(scenario: Scenario, step: int | str, state: dict[str, Any]) -> None:
    if scenario.compare:
        assert isinstance(step, int)
        for key, value in values(step).items():
            assert torch.equal(state[key], value), (step, key, state[key])


def check_after_crash(scenario: Scenario, run: Path, before: Survey, foreign: dict[str, str]):
    after = survey(run)
    # (a) nothing committed is half there; what was not to go is still intact
    assert not after.broken, after.broken
    assert set(after.damaged) <= set(before.damaged), after.damaged  # damaged before: stays
    kept_before = before.intact if scenario.kept_before is None else scenario.kept_before
    assert kept_before - scenario.removes <= after.intact, kept_before - after.intact
    assert before.pinned <= after.pinned
    # ... and every manifest not to go is in its folder, or set aside in quarantine/
    for step, manifest in before.manifests.items():
        if step not in scenario.removes:
            assert manifest in {after.manifests.get(step), *after.held}, step
    # (b) no byte haltpoint did not write, nor a quarantined checkpoint's, is lost
    now = hashes(run) if run.exists() else {}
    assert {k: now.get(k) for k in foreign} == foreign
    # (c) a reader loads the newest intact checkpoint and the true best, or raises a
    # CheckpointError when there is none
    latest, state = loaded(run, "latest", scenario)
    if after.intact:
        assert latest == max(after.intact, key=lambda s: (after.sequence[s], s))
        check_loaded(scenario, latest, state)
    else:
        assert latest == -1 or isinstance(latest, str), latest
    best, state = loaded(run, "best", scenario)
    ranked = [s for s in after.intact if scenario.monitor in after.committed[s]]
    if ranked:
        assert best == min(ranked, key=lambda s: after.committed[s][scenario.monitor])
        check_loaded(scenario, best, state)
    else:
        assert isinstance(best, str), best


@dataclass
class Outcome:
    """Where a run ends up: compared between a recovered run and an uninterrupted one."""

    steps: dict[int, dict[str, float]]
    pinned: set[int]
    contents: dict[int, dict[str, str]]  # step: the hash of each tensor
    garbage: list[str]
    history: set[int]  # the steps with a line (a resumed run may save a step twice)
    files: set[str]  # outside step folders (those hold tensor files under varying names)


def outcome(run: Path) -> Outcome:
    found = survey(run)
    assert not found.damaged and not found.broken, (found.damaged, found.broken)
    files = {k for k in (hashes(run) if run.exists() else {}) if not k.startswith("step-")}
    return Outcome(
        steps=found.committed,
        pinned=found.pinned,
        contents={s: found.contents[s] for s in sorted(found.intact)},
        garbage=garbage(run),
        history={r["step"] for r in read_history(LocalStorage(run, create=False))},
        files=files,
    )


def fresh_copy(template: Path, where: Path) -> Path:
    shutil.copytree(template, where, symlinks=True)
    return where / "run"


def crash_and_recover(
    scenario: Scenario,
    template: Path,
    where: Path,
    n: int,
    before: Survey,
    foreign: dict[str, str],
    reference: Outcome,
) -> None:
    run = fresh_copy(template, where)
    result = in_child(run, n, lambda counter: scenario.op(run, where, counter))
    assert result.killed, result.report
    check_after_crash(scenario, run, before, foreign)
    # (d) the dead process's lock blocks nobody, and the same operation again finishes the job
    started = time.monotonic()
    scenario.again(run, where)
    assert time.monotonic() - started < 30
    got = outcome(run)
    # a kill between a commit and its history line lost that line: the operation again (a
    # writer's open, an import under the lock) writes it back from the manifest
    assert got.history == reference.history, (scenario.name, got.history, reference.history)
    for name in scenario.varies:
        setattr(got, name, getattr(reference, name))
    assert got == reference, (got, reference)
    shutil.rmtree(where)


def run_campaign(scenario: Scenario, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "template"
    template.mkdir()
    scenario.build(template / "run", template)
    # the uninterrupted operation: how many mutations it makes, and where it ends
    clean_dir = tmp_path / "clean"
    run = fresh_copy(template, clean_dir)
    before = survey(run)
    everything = hashes(run)
    foreign = {k: everything[k] for k in [*FOREIGN, *scenario.keeps] if k in everything}
    clean = in_child(run, None, lambda counter: scenario.op(run, clean_dir, counter))
    assert not clean.killed and "error" not in clean.report, clean.report
    calls = clean.report["calls"]
    assert calls
    scenario.again(run, clean_dir)  # what running it again after it finished does
    reference = outcome(run)
    assert reference.garbage == [], reference.garbage
    failures = []
    for n in crash_points(calls):
        try:
            crash_and_recover(
                scenario, template, tmp_path / f"crash-{n}", n, before, foreign, reference
            )
        except AssertionError as exc:
            failures.append(f"killed before mutation {n} ({calls[n - 1]}): {str(exc)[:400]}")
        capsys.readouterr()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_kill_at_any_mutation_loses_nothing_and_the_operation_again_recovers(
    scenario: Scenario, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_campaign(scenario, tmp_path, capsys)


# -- processes at the same time ------------------------------------------------------------------


@contextlib.contextmanager
def trainer(run: Path) -> Iterator[int]:
    """A training process (forked) holding a writer on `run` until the block ends; its pid."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            torch.set_num_threads(1)
            with writer(run, keep_last=5, keep_best=0):
                os.write(ready_w, b"1")
                os.read(done_r, 1)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        assert select.select([ready_r], [], [], CHILD_TIMEOUT_S)[0], "the trainer did not start"
        assert os.read(ready_r, 1) == b"1", "the trainer failed to open the run"
        yield pid
    finally:
        os.close(done_w)
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("haltpoint: error: "), lines
    return lines[0]


def test_gc_import_and_demo_fresh_are_refused_while_a_trainer_holds_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = tmp_path / "run"
    build_gc(run, tmp_path)
    torch.save({"w": torch.ones(4)}, tmp_path / "model.pt")
    with trainer(run) as pid:
        before = hashes(run)
        assert main(["gc", str(run), *GC_ARGS]) == 1
        assert f"is locked by process {pid} on host" in one_error_line(capsys)
        assert main(["import", str(tmp_path / "model.pt"), "-o", str(run), "--step", "9"]) == 1
        assert f"is locked by process {pid} on host" in one_error_line(capsys)
        assert hashes(run) == before
    demo = tmp_path / "demo"
    assert main(["demo", "--run-dir", str(demo), "--epochs", "1"]) == 0
    capsys.readouterr()
    with trainer(demo) as pid:
        before = hashes(demo)
        assert main(["demo", "--run-dir", str(demo), "--epochs", "1", "--fresh"]) == 1
        assert f"process {pid} on host" in one_error_line(capsys)
        assert hashes(demo) == before
    assert main(["gc", str(run), *GC_ARGS]) == 0  # once the trainer is gone
    assert sorted(survey(run).intact) == [2, 5]


def test_a_second_writer_is_refused_naming_the_first(tmp_path: Path):
    run = tmp_path / "run"
    build_gc(run, tmp_path)
    with trainer(run) as pid:
        before = hashes(run)
        second = in_child(run, None, lambda counter: writer(run).close())
        assert second.report["error"] == "LockedError", second.report
        assert f"is locked by process {pid} on host" in second.report["message"]
        assert "\n" not in second.report["message"]
        with pytest.raises(LockedError, match=f"is locked by process {pid} on host"):
            writer(run)
        assert hashes(run) == before


def test_a_killed_writer_s_lock_is_taken_over_by_the_next_writer_and_gc(tmp_path: Path):
    run = tmp_path / "run"

    def killed_writer(counter: Mutations) -> None:
        ckpt = writer(run)
        save_steps(ckpt, [1])
        os.kill(os.getpid(), signal.SIGKILL)  # while it holds the lock

    result = in_child(run, None, killed_writer)
    assert result.killed
    holder = LockHolder.from_json((run / LOCK_NAME).read_bytes())
    assert holder is not None and holder.pid != os.getpid()  # its record stays behind
    assert read_holder(LocalStorage(run, create=False)) is None  # but nobody holds the lock
    started = time.monotonic()
    with (
        pytest.warns(UserWarning, match=f"previous holder, process {holder.pid} on host"),
        writer(run) as ckpt,
    ):
        save_steps(ckpt, [2])
    assert time.monotonic() - started < 5
    assert main(["gc", str(run), "--keep-last", "1"]) == 0
    assert survey(run).intact == {2}


def test_a_reader_process_never_loads_a_torn_checkpoint_while_a_writer_evicts(tmp_path: Path):
    """The writer (a forked process) saves steps 0-59 with keep_last=2, keep_best=1; each
    step's weights are its step number. A reader in this process loops over `load_best` and a
    read-only `restore`: each load is the exact weights saved for the step it names, and each
    failure is a CheckpointError (a checkpoint removed while it was read)."""
    run = tmp_path / "run"
    steps = 60

    def loss(step: int) -> float:
        return 1.0 + (step * 37 % 23) / 10 - step / 100

    def model_at(step: int) -> torch.nn.Linear:
        model = torch.nn.Linear(64, 64)
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(-float(step))
        return model

    with writer(run) as ckpt:  # one checkpoint before the reader starts
        ckpt.save(0, {"model": model_at(0)}, {"loss": loss(0)})

    def write(counter: Mutations) -> None:
        counter.armed = False
        with writer(run) as ckpt:
            for step in range(1, steps):
                ckpt.save(step, {"model": model_at(step)}, {"loss": loss(step)})

    outcome: list[ChildResult] = []
    thread = threading.Thread(target=lambda: outcome.append(in_child(run, None, write)))
    thread.start()
    loads, refusals, last = 0, 0, -1
    try:
        while thread.is_alive() or loads < 20:
            model = torch.nn.Linear(64, 64)
            try:
                if loads % 2:
                    info = load_best(run, model, monitor="loss")
                else:
                    with Checkpointer(run, read_only=True, capture_rng=False) as reader:
                        info = reader.restore({"model": model})
                    assert info is not None and info.step >= last  # latest never goes back
                    last = info.step
            except CheckpointError as exc:
                assert "\n" not in str(exc)
                refusals += 1
                continue
            assert torch.equal(model.weight, torch.full((64, 64), float(info.step)))
            assert torch.equal(model.bias, torch.full((64,), -float(info.step)))
            assert info.metrics["loss"] == loss(info.step)
            loads += 1
    finally:
        thread.join()
    assert "error" not in outcome[0].report, outcome[0].report
    assert loads >= 20
    assert refusals <= loads  # the odd race, not a reader that cannot read
    with Checkpointer(run, read_only=True, monitor="loss") as reader:
        kept = [c.step for c in reader.list()]
    best = min(range(steps), key=loss)
    assert sorted(kept) == sorted({best, steps - 2, steps - 1}), kept


@pytest.mark.parametrize("killed", ["demo --fresh before its last unlink", "a new writer"])
def test_demo_fresh_deletes_a_folder_holding_only_a_killed_process_s_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], killed: str
):
    """All a --fresh killed just before it removed the lock file leaves is that lock file (a
    writer killed before its first save leaves the same): --fresh again was refused, "it does
    not look like a haltpoint run", and the user had to delete the folder by hand."""
    run = tmp_path / "run"
    if killed == "a new writer":

        def kill(counter: Mutations) -> None:
            writer(run)
            os.kill(os.getpid(), signal.SIGKILL)

        assert in_child(run, None, kill).killed
    else:
        assert main(["demo", "--run-dir", str(run), "--epochs", "1"]) == 0
        first = tmp_path / "first"
        shutil.copytree(run, first)
        clean = in_child(first, None, lambda counter: demo._delete_run(str(first)))
        n = clean.report["calls"].index(f"unlink {LOCK_NAME}") + 1
        assert in_child(run, n, lambda counter: demo._delete_run(str(run))).killed
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    capsys.readouterr()
    assert main(["demo", "--run-dir", str(run), "--epochs", "1", "--fresh"]) == 0
    assert capsys.readouterr().out.startswith("training from scratch")
    assert survey(run).intact == {0}
