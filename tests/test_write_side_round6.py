"""Write-side safety, sixth round: concurrency and interleaving.

A writer saving with retention beside readers, `gc`, `import`, `verify`, `export` and
`demo --fresh` in other processes; a race made deterministic where it is narrow (a real
writer's save run at the moment a reader is between two reads), and real processes where
it is not. What earlier rounds hold is in tests/test_write_side_safety.py,
tests/test_write_side_crashes.py and tests/test_write_side_round2.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from crafted import model_at, saved_step, writer
from haltpoint import Checkpointer, load_best
from haltpoint import reader as reader_module
from haltpoint.cli import main
from haltpoint.errors import CheckpointNotFoundError, LockedError, UnwritableRunError
from haltpoint.reader import RunReader
from haltpoint.store.dedup import MIN_DEDUP_BYTES
from haltpoint.store.lock import LOCK_NAME, LockHolder, read_holder
from haltpoint.store.run_dir import TENSORS_NAME as TENSORS
from haltpoint.store.run_dir import RunDirectory, checkpoint_dirname
from haltpoint.store.storage import LocalStorage

pytestmark = pytest.mark.filterwarnings("ignore")


def saving_first(
    real: Callable[..., Any], saves: Iterator[Callable[[], None]]
) -> Callable[..., Any]:
    """`real`, except that each call first runs the next of `saves` (a real writer's save:
    its commit and retention), while it lasts: the writer's retention lands between the
    reader's listing of the run and its read of the checkpoint it chose."""

    def patched(*args: Any, **kwargs: Any) -> Any:
        save = next(saves, None)
        if save is not None:
            save()
        return real(*args, **kwargs)

    return patched


RESTORES = {
    "latest": lambda run: Checkpointer(run, read_only=True, capture_rng=False),
    "best": lambda run: Checkpointer(run, read_only=True, capture_rng=False, monitor="loss"),
}


@pytest.mark.parametrize("removals", [1, 3], ids=["once", "three-in-a-row"])
@pytest.mark.parametrize("which", ["latest", "best", "load_best"])
def test_a_reader_chooses_again_when_retention_removed_every_checkpoint_it_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str, removals: int
) -> None:
    """A reader (a read-only `restore`, `load_best`) lists the run (one checkpoint: the
    writer keeps one, keep_last=1 and keep_best=1), and before it reads the one it chose,
    the writer commits a better step and its retention removes the one listed. A loadable
    checkpoint exists at every moment, but restore raised `CheckpointNotFoundError` ("was
    removed by the writer's retention while it was being read; restore again"): about 1 in
    100 reads beside a writer saving 4 MiB checkpoints (measured with two processes).
    `export --which latest|best` chose again already; now restore does too, and loads the
    step committed meanwhile."""
    run = tmp_path / "run"
    losses = iter([1.0 / (1 + n) for n in range(10)])
    with writer(run, keep_best=1) as ckpt:
        ckpt.save(0, {"model": model_at(0)}, {"loss": next(losses)})

        def save(step: int) -> Callable[[], None]:
            return lambda: ckpt.save(step, {"model": model_at(step)}, {"loss": next(losses)})

        saves = iter([save(step) for step in range(1, 1 + removals)])
        monkeypatch.setattr(
            reader_module, "read_tensors", saving_first(reader_module.read_tensors, saves)
        )
        model = torch.nn.Linear(4, 3)
        if which == "load_best":
            info = load_best(run, model, monitor="loss")
        else:
            with RESTORES[which](run) as reader:
                info = reader.restore({"model": model}, which)
        assert info is not None and info.step == removals == saved_step(model)
        assert [c.step for c in ckpt.list()] == [removals]


def test_latest_removed_while_read_never_falls_back_to_an_older_kept_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run holds step 0, the best, and step 1, the latest (keep_last=1, keep_best=1). A
    reader lists both and reads step 1; meanwhile the writer commits step 2 and its
    retention removes step 1. The reader then passed on to the next candidate it had listed,
    step 0, and returned it as the latest: older than step 2, committed by then, and than
    step 1, the latest when it listed the run (a reader following a run went back in time,
    to the best checkpoint's weights). Now a removal makes it choose again among the
    checkpoints committed now: step 2."""
    run = tmp_path / "run"
    with writer(run, keep_best=1) as ckpt:
        ckpt.save(0, {"model": model_at(0)}, {"loss": 0.1})
        ckpt.save(1, {"model": model_at(1)}, {"loss": 0.5})
        saves = iter([lambda: ckpt.save(2, {"model": model_at(2)}, {"loss": 0.6})])
        monkeypatch.setattr(
            reader_module, "read_tensors", saving_first(reader_module.read_tensors, saves)
        )
        model = torch.nn.Linear(4, 3)
        with Checkpointer(run, read_only=True, capture_rng=False) as reader:
            info = reader.restore({"model": model})
        assert info is not None and info.step == 2 == saved_step(model)
        assert [c.step for c in ckpt.list()] == [0, 2]


def test_best_removed_while_read_never_falls_back_to_a_worse_kept_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run holds steps 0 (the best), 1 and 2 (keep_last=2, keep_best=1). A reader of the
    best reads step 0; meanwhile the writer commits step 3, better still, and its retention
    removes steps 0 and 1. The reader passed on down its list and returned step 2 as the
    best, though step 3 was committed, better than any it had listed. Now: step 3."""
    run = tmp_path / "run"
    with writer(run, keep_last=2, keep_best=1) as ckpt:
        for step, loss in enumerate([0.5, 0.6, 0.7]):
            ckpt.save(step, {"model": model_at(step)}, {"loss": loss})
        saves = iter([lambda: ckpt.save(3, {"model": model_at(3)}, {"loss": 0.1})])
        monkeypatch.setattr(
            reader_module, "read_tensors", saving_first(reader_module.read_tensors, saves)
        )
        model = torch.nn.Linear(4, 3)
        info = load_best(run, model, monitor="loss")
        assert info.step == 3 == saved_step(model)
        assert [c.step for c in ckpt.list()] == [2, 3]


def test_a_step_asked_for_and_removed_while_read_is_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step asked for by number is not chosen again: removed while read, it is gone."""
    run = tmp_path / "run"
    with writer(run) as ckpt:
        ckpt.save(0, {"model": model_at(0)}, {"loss": 1.0})
        saves = iter([lambda: ckpt.save(1, {"model": model_at(1)}, {"loss": 0.5})])
        monkeypatch.setattr(
            reader_module, "read_tensors", saving_first(reader_module.read_tensors, saves)
        )
        with (
            Checkpointer(run, read_only=True, capture_rng=False) as reader,
            pytest.raises(CheckpointNotFoundError, match="step 0 was removed by the writer"),
        ):
            reader.restore({"model": torch.nn.Linear(4, 3)}, 0)


def test_a_reader_slower_than_the_writer_gives_up_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that removes every checkpoint the reader picks, each time it picks one
    (it saves faster than the reader reads, keep_last=1), makes restore give up after a
    few tries, in one line saying why, instead of looping for as long as training runs."""
    run = tmp_path / "run"
    with writer(run) as ckpt:
        ckpt.save(0, {"model": model_at(0)}, {"loss": 1.0})
        endless = (
            (lambda step=step: ckpt.save(step, {"model": model_at(step)}, {"loss": 1.0}))
            for step in range(1, 1000)
        )
        monkeypatch.setattr(
            reader_module, "read_tensors", saving_first(reader_module.read_tensors, endless)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a removed checkpoint is not warned about
            with (
                Checkpointer(run, read_only=True, capture_rng=False) as reader,
                pytest.raises(CheckpointNotFoundError, match="removed 10 checkpoints in") as caught,
            ):
                reader.restore({"model": torch.nn.Linear(4, 3)})
        assert "\n" not in str(caught.value)
        assert len(ckpt.list()) == 1


def rewrite_keeping_mtime(path: Path, offset: int) -> None:
    """Flip a byte of `path` in place, then set its modification time back, as `cp -p` of
    an older copy, `rsync -t --inplace` or `touch -r` leave a file: same inode, same size,
    same mtime, other bytes."""
    before = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_file_rewritten_with_its_mtime_kept_is_read_back_before_dedup_references_it(
    tmp_path: Path, async_save: bool
) -> None:
    """A writer session read back step 1's 1 MiB tensor to reference it from step 2 (dedup).
    Then the file is rewritten in place with its size and modification time kept (`cp -p`
    of a damaged copy). The session trusted the range while (size, mtime, inode) stayed the
    same, so step 3 referenced the changed bytes unread: a new checkpoint committed damaged
    from an intact live state, which retention then counted as intact. Now the stamp holds
    the inode's change time too (which no program can set back): step 3 reads the range
    back, finds it changed, warns, writes the tensor afresh, and restores exactly."""
    run = tmp_path / "run"
    frozen = torch.arange(MIN_DEDUP_BYTES // 4, dtype=torch.float32)  # 1 MiB, never changes

    def state(step: int) -> dict[str, Any]:
        return {"frozen": frozen, "step": step}

    with writer(run, keep_last=2, async_save=async_save) as ckpt:
        for step in (1, 2):
            ckpt.save(step, state(step), {"loss": 1.0})
        ckpt.wait()
        two = RunDirectory(LocalStorage(run, create=False)).read_manifest(checkpoint_dirname(2))
        record = two.tensors["frozen"]
        assert record.file == f"{checkpoint_dirname(1)}/tensors.safetensors"  # deduplicated
        rewrite_keeping_mtime(run / record.file, record.offset + 12)
        with pytest.warns(UserWarning, match="do not match the hash"):
            ckpt.save(3, state(3), {"loss": 1.0})
            ckpt.wait()
    run_dir = RunDirectory(LocalStorage(run, create=False))
    entries = {e.step: e for e in run_dir.committed()}
    assert RunReader(run_dir, None, "min").damage(entries[3]) is None
    assert entries[3].manifest is not None
    assert entries[3].manifest.tensors["frozen"].file == f"{checkpoint_dirname(3)}/{TENSORS}"
    got: dict[str, Any] = {"frozen": torch.zeros_like(frozen), "step": None}
    with Checkpointer(run, read_only=True, capture_rng=False) as reader:
        info = reader.restore(got)
    assert info is not None and info.step == 3 and got["step"] == 3
    assert torch.equal(got["frozen"], frozen)


def flip_a_tensor_byte(run: Path, step: int) -> None:
    path = run / checkpoint_dirname(step) / TENSORS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_writer_whose_lock_file_was_replaced_sets_nothing_aside(tmp_path: Path) -> None:
    """Writer A's lock file is deleted while A is open (a clean-up script; LockedError's
    advice for a holder on another host), and writer B takes a lock of its own. A's restore
    reads step 2, damaged; before A moves it aside, B (the run's writer now) sets it aside
    itself and saves step 2 again, intact. A then moved B's new manifest into quarantine/:
    an intact checkpoint, committed by the run's writer, gone from the run, by a process
    that no longer held the lock (A's commits were refused, its quarantine moves were not).
    Now A checks the lock before it moves anything, as before a commit: `LockedError`,
    nothing moved, nothing loaded."""
    run = tmp_path / "run"
    with writer(run, keep_last=5) as first:
        first.save(1, {"model": model_at(1)}, {"loss": 1.0})
        first.save(2, {"model": model_at(2)}, {"loss": 1.0})
    flip_a_tensor_byte(run, 2)
    a = writer(run, keep_last=5)
    (run / ".haltpoint.lock").unlink()
    b = writer(run, keep_last=5)
    real_read = a._reader.read

    def read_then_b_saves_again(*args: Any, **kwargs: Any) -> Any:
        found = real_read(*args, **kwargs)  # A found step 2 damaged and fell back to 1
        assert b.restore({"model": torch.nn.Linear(4, 3)}).step == 1  # B sets 2 aside
        b.save(2, {"model": model_at(22)}, {"loss": 1.0})
        return found

    a._reader.read = read_then_b_saves_again  # type: ignore[method-assign]
    model = torch.nn.Linear(4, 3)
    with pytest.raises(LockedError, match="deleted or replaced") as lost:
        a.restore({"model": model})
    assert "\n" not in str(lost.value)
    assert not torch.equal(model.weight, model_at(1).weight)  # nothing loaded
    b.close()
    with Checkpointer(run, read_only=True, capture_rng=False) as reader:
        restored = torch.nn.Linear(4, 3)
        assert reader.restore({"model": restored}).step == 2
    assert saved_step(restored) == 22  # B's step 2 is the run's latest, intact
    assert len(list((run / "quarantine").iterdir())) == 1  # only B's move
    a.close()


NO_FLOCK = [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP]  # NFS without lockd, Lustre, FUSE


@pytest.mark.parametrize("code", NO_FLOCK, ids=errno.errorcode.get)
def test_a_file_system_without_flock_refuses_every_writer_in_one_line_naming_the_lock(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
) -> None:
    """A run on a file system where `flock` fails (NFS mounted without a lock daemon:
    ENOLCK; Lustre without `-o flock`: ENOSYS; some FUSE file systems: EOPNOTSUPP). No
    writer can tell whether another one runs, so each is refused, before it changes
    anything: a writer's open, `gc`, `import` and `demo --fresh` with one `CheckpointError`
    line that names the lock file and says the file system lacks file locks (a writer said
    "cannot write DIR: No locks available ... pick a folder on an ordinary file system", and
    `demo --fresh` printed a bare "No locks available", an OSError naming nothing). Readers
    never lock, and restore as before."""
    run = tmp_path / "run"
    with writer(run) as ckpt:
        ckpt.save(1, {"model": model_at(1)}, {"loss": 1.0})
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "model.pt")
    only_lock = tmp_path / "demo"  # what a killed demo leaves: --fresh goes on to the lock
    only_lock.mkdir()
    (only_lock / LOCK_NAME).write_bytes(b"")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def flock(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    said = f"cannot lock {run / LOCK_NAME}: {os.strerror(code)}"
    with pytest.raises(UnwritableRunError, match=re.escape(said)) as refused:
        writer(run)
    assert "\n" not in str(refused.value) and "file locks" in str(refused.value)
    for argv, lock in [
        (["gc", str(run), "--keep-last", "1"], run / LOCK_NAME),
        (["import", str(tmp_path / "model.pt"), "-o", str(run), "--step", "9"], run / LOCK_NAME),
        (["demo", "--run-dir", str(only_lock), "--fresh", "--epochs", "1"], only_lock / LOCK_NAME),
    ]:
        assert main(argv) == 1, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("haltpoint: error: "), err
        assert f"cannot lock {lock}: {os.strerror(code)}" in err[0], err
    restored = torch.nn.Linear(4, 3)
    with Checkpointer(run, read_only=True, capture_rng=False) as reader:
        assert reader.restore({"model": restored}).step == 1
    assert saved_step(restored) == 1
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_a_stale_lock_naming_a_live_process_is_taken_over_on_a_local_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PID reuse: the lock file's record names a process id that is alive now, but that
    process is not the holder (the holder was killed and its id reused; here a `sleep`).
    On a local disk the kernel's flock, not the record, says who holds the run, so the next
    writer takes over with a warning and `gc` runs; nothing committed is lost. (Holds.)"""
    run = tmp_path / "run"
    with writer(run, keep_last=5) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"model": model_at(step)}, {"loss": 1.0 / step})
    with subprocess.Popen(["sleep", "30"]) as alive:
        try:
            record = LockHolder(alive.pid, socket.gethostname(), 1.0).to_json()
            (run / LOCK_NAME).write_bytes(record)
            assert read_holder(LocalStorage(run, create=False)) is None
            with (
                pytest.warns(UserWarning, match=f"previous holder, process {alive.pid} on"),
                writer(run, keep_last=5) as ckpt,
            ):
                ckpt.save(4, {"model": model_at(4)}, {"loss": 0.1})
            (run / LOCK_NAME).write_bytes(record)
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # gc prints it as a note
                assert main(["gc", str(run), "--keep-last", "1"]) == 0
        finally:
            alive.kill()
    said = capsys.readouterr()
    assert "kept steps 4" in said.out
    assert f"previous holder, process {alive.pid} on" in said.err
    with Checkpointer(run, read_only=True, capture_rng=False) as reader:
        assert [c.step for c in reader.list()] == [4]


WRITER = """
import sys, torch, warnings
from haltpoint import Checkpointer
warnings.simplefilter("ignore")
run, log, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
loss = lambda s: 1.0 + (s * 37 % 23) / 10 - s / 100
model = torch.nn.Linear(256, 256)
with Checkpointer(run, monitor="loss", keep_last=1, keep_best=1, capture_rng=False) as ckpt:
    for step in range(1, steps):
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(-float(step))
        ckpt.save(step, {"model": model}, {"loss": loss(step)})
        ckpt.wait()
        with open(log, "a") as f:
            f.write(f"{step}\\n")
"""


def stress_loss(step: int) -> float:
    return 1.0 + (step * 37 % 23) / 10 - step / 100


@pytest.mark.slow
def test_readers_beside_a_writer_keeping_one_always_load_the_latest_and_the_best(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer process saves steps 1-59 (256 KiB each, async) with keep_last=1 and
    keep_best=1, so every save removes what a reader may be reading. This process loops
    over a read-only `restore` and `load_best`, with `verify` and a refused `gc` between:
    every restore succeeds (none raises, not even "removed while it was being read"), loads
    exactly the weights of the step it names, "latest" never goes back and is never older
    than a step the writer reported committed before the read began, and "best" is never
    worse than such a step. At the end the run holds the latest and the best, intact."""
    run, log = tmp_path / "run", tmp_path / "committed"
    with writer(run, keep_best=1) as ckpt:
        ckpt.save(0, {"model": torch.nn.Linear(256, 256)}, {"loss": stress_loss(0)})
    log.write_text("0\n")
    steps = 60
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(log), str(steps)])
    loads, last = 0, -1
    try:
        while proc.poll() is None or loads < 10:
            committed = [int(s) for s in log.read_text().split()]
            model = torch.nn.Linear(256, 256)
            if loads % 2:
                info = load_best(run, model, monitor="loss")
                assert stress_loss(info.step) <= min(map(stress_loss, committed))
            else:
                with Checkpointer(run, read_only=True, capture_rng=False) as reader:
                    info = reader.restore({"model": model})
                assert info is not None and info.step >= max(last, max(committed))
                last = info.step
            if info.step:
                assert torch.equal(model.weight, torch.full((256, 256), float(info.step)))
            loads += 1
            if loads % 7 == 0:
                assert main(["verify", str(run)]) == 0
                capsys.readouterr()
                code = main(["gc", str(run), "--keep-last", "1", "--keep-best", "1"])
                assert code == 0 or "is locked by process" in capsys.readouterr().err
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0
    capsys.readouterr()
    best = min(range(steps), key=stress_loss)
    with Checkpointer(run, read_only=True, monitor="loss") as reader:
        assert sorted(c.step for c in reader.list()) == sorted({best, steps - 1})
    assert main(["verify", str(run)]) == 0
