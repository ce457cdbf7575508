"""Run directories haltpoint may not fully read or write: a step folder without permissions
(`chmod 000`), a read-only run directory. Every failure is one `CheckpointError` line, never a
bare `PermissionError`, and nothing that cannot be read is deleted (it cannot be verified).

The tests run as root in CI, where chmod denies nothing: each case then injects the
`PermissionError` the kernel would raise for a non-root user, at the `os` calls (listing,
opening, stat); as a non-root user the same cases also run with a real chmod.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer, load_best
from haltpoint.cli import main
from haltpoint.errors import CheckpointError, UnreadableCheckpointError, UnwritableRunError
from haltpoint.store.run_dir import checkpoint_dirname

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _denied(path: Any) -> PermissionError:
    return PermissionError(errno.EACCES, "Permission denied", os.fspath(path))


def deny_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """What `chmod 000 folder` does to a non-root user: it cannot be listed, nothing inside
    can be opened or stat-ed (the folder itself still can, through its parent)."""
    inside = str(folder) + os.sep

    def under(path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(inside)

    def at(path: Any) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(path) == str(folder)

    def guard(real: Any, check: Any) -> Any:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            if check(path):
                raise _denied(path)
            return real(path, *args, **kwargs)

        return guarded

    for name, check in (
        ("listdir", lambda p: at(p) or under(p)),
        ("scandir", lambda p: at(p) or under(p)),
        ("open", under),
        ("stat", under),
        ("lstat", under),
    ):
        monkeypatch.setattr(os, name, guard(getattr(os, name), check))
    monkeypatch.setattr(builtins, "open", guard(builtins.open, under))


def read_only_folder(
    monkeypatch: pytest.MonkeyPatch, folder: Path, writable: Path | None = None
) -> None:
    """What a read-only run directory (`chmod -R a-w`) does to a non-root user: nothing in
    it can be created, opened for writing, renamed or removed; everything reads. The file
    `writable` (if given) still opens for writing, as a file left writable would."""
    inside = str(folder)

    def under(path: Any) -> bool:
        return (
            isinstance(path, (str, os.PathLike))
            and os.path.abspath(path).startswith(inside)
            and (writable is None or os.path.abspath(path) != str(writable))
        )

    real_open, real_builtin = os.open, builtins.open

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & WRITES and under(path):
            raise _denied(path)
        return real_open(path, flags, *args, **kwargs)

    def builtin_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+") and under(path):
            raise _denied(path)
        return real_builtin(path, mode, *args, **kwargs)

    def refuse(real: Any) -> Any:
        def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
            if under(path):
                raise _denied(path)
            return real(path, *args, **kwargs)

        return guarded

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", builtin_open)
    for name in ("mkdir", "rename", "replace", "unlink", "remove", "rmdir"):
        monkeypatch.setattr(os, name, refuse(getattr(os, name)))


@pytest.fixture(params=["injected", "chmod"])
def how(request: pytest.FixtureRequest) -> str:
    if request.param == "chmod" and (ROOT or not hasattr(os, "geteuid")):
        pytest.skip("root ignores chmod: covered by the injected PermissionError")
    return str(request.param)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """Steps 1, 2, 3 (losses 0.3, 0.1, 0.2: step 2 the best), keep_last=3."""
    run = tmp_path / "run"
    model = torch.nn.Linear(2, 1)
    with Checkpointer(run, monitor="loss", keep_last=3, async_save=False) as ckpt:
        for step, loss in ((1, 0.3), (2, 0.1), (3, 0.2)):
            with torch.no_grad():
                model.weight.add_(1.0)
            ckpt.save(step, {"model": model}, {"loss": loss})
    return run


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@contextlib.contextmanager
def unreadable(how: str, monkeypatch: pytest.MonkeyPatch, folder: Path) -> Iterator[None]:
    """`folder` as `chmod 000` leaves it, for the body of the block."""
    if how == "chmod":
        folder.chmod(0)
    else:
        deny_folder(monkeypatch, folder)
    try:
        yield
    finally:
        monkeypatch.undo()
        folder.chmod(0o755)


@contextlib.contextmanager
def read_only(
    how: str, monkeypatch: pytest.MonkeyPatch, folder: Path, writable: Path | None = None
) -> Iterator[None]:
    """`folder` and everything in it but `writable` as `chmod -R a-w` leaves them, for the
    block."""
    paths = [p for p in [folder, *folder.rglob("*")] if p != writable]
    if how == "chmod":
        for path in paths:
            path.chmod(path.stat().st_mode & 0o555)
    else:
        read_only_folder(monkeypatch, folder, writable)
    try:
        yield
    finally:
        monkeypatch.undo()
        for path in paths:
            path.chmod(path.stat().st_mode | 0o200)


def said(caught: list[warnings.WarningMessage]) -> str:
    return "\n".join(str(w.message) for w in caught)


# -- one step folder that cannot be read ------------------------------------------------


def test_a_reader_falls_back_past_an_unreadable_newest_step_with_a_warning(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with unreadable(how, monkeypatch, run / checkpoint_dirname(3)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Checkpointer(run, read_only=True) as ckpt:
                info = ckpt.restore({"model": torch.nn.Linear(2, 1)})
        assert info is not None and info.step == 2
        assert "permission denied" in said(caught).lower()
        assert checkpoint_dirname(3) in said(caught)
    assert (run / checkpoint_dirname(3) / "manifest.json").exists()
    assert not (run / "quarantine").exists()


def test_a_writer_never_resumes_behind_an_unreadable_newest_step(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 3 may hold a stopped run: resuming from step 2 would train again what it holds
    (and then find step 3 taken); an older step is restored only when asked for by number."""
    model = torch.nn.Linear(2, 1)
    warned = pytest.warns(UserWarning, match="(?i)permission denied")
    with (
        unreadable(how, monkeypatch, run / checkpoint_dirname(3)),
        warned,
        Checkpointer(run) as ckpt,
    ):
        with pytest.raises(UnreadableCheckpointError) as raised:
            ckpt.restore({"model": model})
        assert str(raised.value).startswith(f"cannot read {run / checkpoint_dirname(3)}")
        assert "newer than step 2" in str(raised.value)
        assert "restore which=2 to resume from step 2 on purpose" in str(raised.value)
        assert "\n" not in str(raised.value)
        info = ckpt.restore({"model": model}, which=2)
        assert info is not None and info.step == 2
    assert (run / checkpoint_dirname(3) / "manifest.json").exists()
    assert not (run / "quarantine").exists()
    with Checkpointer(run) as ckpt:  # readable again: the newest, as always
        info = ckpt.restore({"model": model})
        assert info is not None and info.step == 3


def test_restore_of_the_unreadable_step_is_unreadable_not_damaged(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with unreadable(how, monkeypatch, run / checkpoint_dirname(2)):
        with Checkpointer(run, read_only=True) as reader:
            with pytest.raises(UnreadableCheckpointError, match="permission denied") as raised:
                reader.restore({"model": torch.nn.Linear(2, 1)}, which=2)
            assert "\n" not in str(raised.value)
            assert [i.step for i in reader.list()] == [1, 3]
        with pytest.warns(UserWarning, match="permission denied"):
            info = load_best(run, torch.nn.Linear(2, 1), monitor="loss")
        assert info.step == 3  # the best that can be read


def test_a_writer_never_deletes_an_unreadable_step(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening (clean-up), saving with retention that would drop it, and gc: the step cannot
    be verified, so it stays, files and all."""
    folder = run / checkpoint_dirname(1)
    before = files(folder)
    with unreadable(how, monkeypatch, folder):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Checkpointer(run, keep_last=1, async_save=False) as ckpt:
                ckpt.save(4, {"model": torch.nn.Linear(2, 1)})
                ckpt.save(5, {"model": torch.nn.Linear(2, 1)})
            assert main(["gc", str(run), "--keep-last", "1"]) in (0, 1)
        assert "permission denied" in said(caught).lower()
    assert files(folder) == before
    assert (run / checkpoint_dirname(5) / "manifest.json").exists()


def test_ls_and_verify_show_the_unreadable_step_as_unreadable(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    with unreadable(how, monkeypatch, run / checkpoint_dirname(2)):
        assert main(["ls", str(run), "--json"]) == 0
        rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows[2]["status"] == "unreadable" and "permission denied" in rows[2]["error"]
        assert rows[1]["status"] == rows[3]["status"] == "committed"
        assert main(["verify", str(run), "--json"]) == 1  # not everything could be checked
        result = json.loads(capsys.readouterr().out)
        assert result["ok"] is False
        checks = {c["step"]: c for c in result["checkpoints"]}
        assert checks[2]["status"] == "unreadable"
        assert checks[1]["status"] == checks[3]["status"] == "intact"
        assert main(["verify", str(run)]) == 1
        assert "step 2 was not verified" in capsys.readouterr().out


def test_a_step_folder_listed_but_not_searchable_is_unreadable_not_removed(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`chmod 400` on a step folder: its names list, but nothing in it opens or stats, so
    every lookup by name fails as if the manifest were gone. (It passed for a checkpoint a
    writer removed meanwhile: `ls` said "removed", `restore(which=2)` "no intact checkpoint",
    and "latest" passed over it without a warning.)"""
    import json

    folder = run / checkpoint_dirname(2)
    if how == "chmod":
        folder.chmod(0o400)
    else:
        inside = str(folder) + os.sep

        def guard(real: Any) -> Any:
            def guarded(path: Any, *args: Any, **kwargs: Any) -> Any:
                if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(
                    inside
                ):
                    raise _denied(path)
                return real(path, *args, **kwargs)

            return guarded

        for name in ("open", "stat", "lstat"):  # listdir and scandir of the folder still work
            monkeypatch.setattr(os, name, guard(getattr(os, name)))
    try:
        assert main(["ls", str(run), "--json"]) == 0
        rows = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows[2]["status"] == "unreadable" and "permission denied" in rows[2]["error"]
        reader = Checkpointer(run, read_only=True)
        with pytest.raises(UnreadableCheckpointError, match="permission denied"):
            reader.restore({"model": torch.nn.Linear(2, 1)}, which=2)
    finally:
        monkeypatch.undo()
        folder.chmod(0o755)


# -- a read-only run directory without a lock file --------------------------------------


def test_a_read_only_run_reads_and_refuses_a_writer_in_one_line(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / ".haltpoint.lock").unlink()
    before = files(run)
    with read_only(how, monkeypatch, run):
        with Checkpointer(run, read_only=True) as reader:
            assert reader.restore({"model": torch.nn.Linear(2, 1)}).step == 3
            assert [i.step for i in reader.list()] == [1, 2, 3]
        assert load_best(run, torch.nn.Linear(2, 1), monitor="loss").step == 2
        for argv in (["ls", str(run)], ["show", str(run)], ["verify", str(run)]):
            assert main(argv) == 0, capsys.readouterr().err
        capsys.readouterr()
        for async_save in (True, False):
            with pytest.raises(UnwritableRunError, match=f"cannot write {run}") as raised:
                Checkpointer(run, async_save=async_save)
            assert "\n" not in str(raised.value) and "read_only=True" in str(raised.value)
            assert isinstance(raised.value, CheckpointError)
    assert files(run) == before


# -- a read-only run directory whose lock file can still be written ---------------------


def test_a_read_only_run_with_a_writable_lock_file_refuses_a_writer_at_open(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock can be taken, but no checkpoint could be written: said at open, in the
    same one line as without a lock file, not as a bare `PermissionError` at the first
    save."""
    lock = run / ".haltpoint.lock"
    assert lock.exists()
    before = files(run)
    with read_only(how, monkeypatch, run, writable=lock):
        for async_save in (True, False):
            with pytest.raises(UnwritableRunError, match=f"cannot write {run}") as raised:
                Checkpointer(run, async_save=async_save)
            assert "\n" not in str(raised.value) and "read_only=True" in str(raised.value)
        with Checkpointer(run, read_only=True) as reader:
            assert reader.restore({"model": torch.nn.Linear(2, 1)}).step == 3
    assert files(run) == before
    with Checkpointer(run, async_save=False) as writer:  # the lock was let go
        writer.save(4, {"model": torch.nn.Linear(2, 1)})


# -- any other OS error while reading a run directory; special file systems ------------


def failing_listing(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """Listing `folder` fails with the OS error `code`, as on a special file system or a
    failing disk (`os.listdir` and `os.scandir`)."""

    def guard(real: Any) -> Any:
        def guarded(path: Any = ".", *args: Any, **kwargs: Any) -> Any:
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(path) == str(folder):
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real(path, *args, **kwargs)

        return guarded

    for name in ("listdir", "scandir"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


OS_ERRORS = [errno.EIO, errno.EINVAL, errno.ELOOP, errno.EACCES]
READS = {
    "list": lambda run: Checkpointer(run, read_only=True).list(),
    "restore": lambda run: Checkpointer(run, read_only=True).restore(
        {"model": torch.nn.Linear(2, 1)}
    ),
    "restore step": lambda run: Checkpointer(run, read_only=True).restore(
        {"model": torch.nn.Linear(2, 1)}, which=3
    ),
    "load_best": lambda run: load_best(run, torch.nn.Linear(2, 1), monitor="loss"),
    "writer": lambda run: Checkpointer(run, async_save=False).close(),
}


@pytest.mark.parametrize("code", OS_ERRORS, ids=errno.errorcode.get)
@pytest.mark.parametrize("read", READS)
def test_an_os_error_listing_the_run_directory_is_one_checkpoint_error_line(
    run: Path, monkeypatch: pytest.MonkeyPatch, read: str, code: int
) -> None:
    before = files(run)
    failing_listing(monkeypatch, run, code)
    with pytest.raises(CheckpointError, match=re.escape(str(run))) as raised:
        READS[read](run)
    assert "\n" not in str(raised.value) and os.strerror(code) in str(raised.value)
    monkeypatch.undo()
    assert files(run) == before


@pytest.mark.parametrize("code", OS_ERRORS, ids=errno.errorcode.get)
def test_a_step_folder_that_cannot_be_listed_is_skipped_unread_and_kept(
    run: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Like a `chmod 000` folder: not damage, never deleted, named in a warning."""
    folder = run / checkpoint_dirname(3)
    before = files(folder)
    failing_listing(monkeypatch, folder, code)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(run, read_only=True) as reader:
            assert [i.step for i in reader.list()] == [1, 2]
            assert reader.restore({"model": torch.nn.Linear(2, 1)}).step == 2
            with pytest.raises(UnreadableCheckpointError, match=checkpoint_dirname(3)) as raised:
                reader.restore({"model": torch.nn.Linear(2, 1)}, which=3)
            assert "\n" not in str(raised.value)
        with Checkpointer(run, keep_last=1, async_save=False) as writer:
            writer.save(4, {"model": torch.nn.Linear(2, 1)})
    assert os.strerror(code) in said(caught) or "permission denied" in said(caught).lower()
    monkeypatch.undo()
    assert files(folder) == before  # nothing of step 3 deleted: it could not be verified


CLI_READS = [
    ["ls"],
    ["show"],
    ["verify"],
    ["export", "-o", "{out}/model.safetensors"],
    ["gc", "--keep-last", "1"],
    ["replay"],
    ["plot", "-o", "{out}/curves.png"],
]


@pytest.mark.parametrize("code", OS_ERRORS, ids=errno.errorcode.get)
@pytest.mark.parametrize("argv", CLI_READS, ids=lambda a: a[0])
def test_the_command_line_says_an_os_error_in_one_line(
    run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
) -> None:
    failing_listing(monkeypatch, run, code)
    args = [argv[0], str(run), *(a.format(out=tmp_path) for a in argv[1:])]
    status = main(args)
    err = capsys.readouterr().err
    monkeypatch.undo()
    lines = err.strip().splitlines()
    assert status == 1 and lines, err
    assert lines[-1].startswith("haltpoint: error: ") and str(run) in lines[-1], err
    assert "unexpected" not in err and "Traceback" not in err


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux's /proc")
@pytest.mark.parametrize("path", ["/proc/self", "/proc/self/fd", "/proc"])
def test_a_writer_on_a_special_file_system_is_refused_at_open_in_one_line(path: str) -> None:
    with pytest.raises(UnwritableRunError, match=f"cannot write {re.escape(path)}") as raised:
        Checkpointer(path, async_save=False)
    assert "\n" not in str(raised.value) and "read_only=True" in str(raised.value)
    with Checkpointer(path, read_only=True) as reader:  # a reader finds no checkpoint there
        assert reader.list() == []


def test_gc_and_import_on_a_read_only_run_say_so_as_a_writer_does(
    run: Path, how: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """They take the writer lock: its file could not be created, and the bare OSError came
    out as `haltpoint: error: RUN/.haltpoint.lock: Permission denied`, without a remedy."""
    (run / ".haltpoint.lock").unlink()
    weights = run.parent / "w.pt"
    torch.save({"w": torch.ones(2)}, weights)
    before = files(run)
    with read_only(how, monkeypatch, run):
        monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)  # -o checks pass
        for argv in (
            ["gc", str(run), "--keep-last", "1"],
            ["import", str(weights), "-o", str(run), "--step", "9"],
        ):
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"haltpoint: error: cannot write {run}")
            assert "Permission denied" in err and "lock file" in err, err
    assert files(run) == before
