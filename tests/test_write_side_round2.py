"""Write-side safety, second round: what `haltpoint gc`, a writer's retention and clean-up,
`import` and `demo --fresh` must not lose, on run directories the first round did not try
(tests/test_write_side_safety.py, tests/test_write_side_crashes.py)."""

from __future__ import annotations

import errno
import io
import json
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from crafted import hostile
from haltpoint import Checkpointer
from haltpoint.cli import importer, main
from haltpoint.cli.app import build_parser
from haltpoint.cli.output import Output
from haltpoint.errors import (
    HistoryNotWrittenError,
    InsufficientSpaceError,
    UnreadableCheckpointError,
    UnwritableRunError,
)
from haltpoint.store import history
from haltpoint.store import lock as lock_module
from haltpoint.store.storage import LocalStorage, open_storage


def craft(run: Path, step: int, change: Callable[[dict[str, Any]], None]) -> None:
    path = hostile.manifest_path(run, step)
    body = json.loads(path.read_bytes())
    change(body)
    path.write_bytes(hostile.seal(body))


def _numpy_position(value: int) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        pairs = body["tree"]["__rng__"]["content"]["items"]
        numpy = next(v for k, v in pairs if k == "numpy")
        dict(numpy["items"])["state"]["pos"] = value

    return change


def _adam_state_of(value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        adam = dict(body["tree"]["optimizer"]["content"]["items"])
        adam["state"]["items"][0][1] = value  # the state of the first parameter

    return change


# checkpoints whose tensors all match their hashes, but that restore refuses as damaged
# (`reader.check_payloads`): `haltpoint verify` reports them damaged
REFUSED = [
    pytest.param(_numpy_position(-1), id="random-state"),
    pytest.param(_adam_state_of(True), id="optimizer-state"),
]


def _restore(run: Path, which: str = "latest") -> int:
    model = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning):  # falling back past the crafted step
        info = Checkpointer(run, read_only=True, monitor="val_loss").restore(
            {"model": model}, which, strict=False
        )
    assert info is not None
    return info.step


@pytest.mark.parametrize("change", REFUSED)
def test_gc_never_removes_the_last_loadable_checkpoint_for_one_restore_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: Any
) -> None:
    """gc's check of what it keeps is restore's: before, it checked the tensor hashes only,
    kept the crafted step 2 as the newest intact one and removed step 1, the only checkpoint
    restore could load (it then raised CorruptCheckpointError)."""
    run = tmp_path / "run"
    hostile.make_run(run)
    craft(run, 2, change)
    assert main(["gc", str(run), "--keep-last", "1"]) == 0
    captured = capsys.readouterr()
    assert "step 2 is damaged" in captured.err
    assert "removed 0 checkpoint(s)" in captured.out
    assert _restore(run) == 1


@pytest.mark.parametrize("change", REFUSED)
def test_retention_never_evicts_the_best_for_a_best_restore_refuses(
    tmp_path: Path, change: Any
) -> None:
    """A writer's retention checks what it keeps as restore does: the crafted step 2 (the
    best by val_loss) is set aside, not kept in place of step 1, the best restore can load.
    Before, step 1 was evicted and restore("best") gave step 3, the worst."""
    run = tmp_path / "run"
    hostile.make_run(run)  # steps 1 and 2, val_loss 1.0 and 0.5
    craft(run, 2, change)
    model = torch.nn.Linear(3, 2)
    with (
        pytest.warns(UserWarning, match="set the damaged checkpoint of step 2 aside"),
        Checkpointer(run, monitor="val_loss", keep_last=2, keep_best=1, async_save=False) as ckpt,
    ):
        ckpt.save(3, {"model": model}, {"val_loss": 2.0})
    assert _steps(run) == [1, 3]
    info = Checkpointer(run, read_only=True, monitor="val_loss").restore(
        {"model": model}, "best", strict=False
    )
    assert info is not None and info.step == 1


def _steps(run: Path) -> list[int]:
    return [c.step for c in Checkpointer(run, read_only=True).list()]


def _full(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_an_import_whose_history_line_fails_says_it_is_committed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the history line, after the import's commit: one line saying the
    checkpoint is committed (`HistoryNotWrittenError`), not to import it again, and the next
    writer writes the line back. Before, the bare `...history.jsonl: No space left on device`
    read as a failed import, and importing again was refused: "--step 5 is not newer than
    the newest checkpoint (step 5)"."""
    run = tmp_path / "run"
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(1, {"model": torch.nn.Linear(2, 1)})
    torch.save(torch.nn.Linear(2, 1).state_dict(), tmp_path / "model.pt")
    monkeypatch.setattr(history, "_append_local", _full)
    assert main(["import", str(tmp_path / "model.pt"), "-o", str(run), "--step", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "step 5" in err and "is committed" in err, err
    with pytest.raises(HistoryNotWrittenError, match="is committed"):
        importer._write_import(str(run), 6, {"model": torch.nn.Linear(2, 1).state_dict()})
    monkeypatch.undo()
    assert _steps(run) == [1, 5, 6]
    Checkpointer(run).close()  # a writer's open writes the lines back
    assert [r["step"] for r in history.read_history(LocalStorage(run))] == [1, 5, 6]


def test_import_and_gc_on_a_full_disk_at_the_lock_are_insufficient_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking the lock (its file created, its record written) on a full disk: one
    `InsufficientSpaceError`, as a writer's open says it; before, a bare OSError."""
    run = tmp_path / "run"
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(1, {"model": torch.nn.Linear(2, 1)})
    (run / ".haltpoint.lock").unlink()
    monkeypatch.setattr(lock_module, "open_unlinked", _full)
    with pytest.raises(InsufficientSpaceError, match="disk is full"):
        importer._write_import(str(run), 2, {"model": torch.nn.Linear(2, 1).state_dict()})
    args = build_parser().parse_args(["gc", str(run), "--keep-last", "1"])
    with pytest.raises(InsufficientSpaceError, match="disk is full"):
        args.handler(args, Output(io.StringIO(), io.StringIO(), terminal=False))
    monkeypatch.undo()
    assert _steps(run) == [1]


def _plant_quarantine_link(run: Path, where: str) -> None:
    if where == "inside":
        (run / "inner").mkdir()
        os.symlink("inner", run / "quarantine")
    else:
        (run.parent / "outside").mkdir()
        os.symlink(run.parent / "outside", run / "quarantine")


@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("damaged", [False, True], ids=["plain", "damaged"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_quarantine_link_planted_while_a_writer_is_open_never_fails_a_committed_save(
    tmp_path: Path, where: str, damaged: bool, async_save: bool
) -> None:
    """Retention meets a link at `quarantine` (planted after the writer opened): it warns and
    removes nothing, and the committed save returns. Before, the save raised the link's
    CorruptCheckpointError (listing the quarantine) or LinkedFileError (setting the damaged
    step 2 aside), read as a failed save, and saving it again was CheckpointExistsError."""
    run = tmp_path / "run"
    model = torch.nn.Linear(2, 1)
    saved = [1, 2] if damaged else [1]
    keep = len(saved)
    with Checkpointer(run, keep_last=keep, async_save=False) as ckpt:
        for step in saved:
            ckpt.save(step, {"model": model})
    if damaged:
        tensors = run / "step-000000002" / "tensors.safetensors"
        data = bytearray(tensors.read_bytes())
        data[-2] ^= 0x01
        tensors.write_bytes(bytes(data))
    ckpt = Checkpointer(run, keep_last=keep, async_save=async_save)
    _plant_quarantine_link(run, where)
    with pytest.warns(UserWarning, match="the save is committed|removed no checkpoint"):
        info = ckpt.save(3, {"model": model})
        ckpt.close()
    assert info.step == 3
    assert _steps(run) == [*saved, 3]  # nothing removed, nothing set aside: committed


def _fail_stat_of(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """`os.stat` and `os.lstat` of `folder` itself, and of anything in it, fail with `code`
    (an NFS stale handle, a failing disk): the folder is listed in its parent, nothing more."""
    real_stat, real_lstat = os.stat, os.lstat

    def failing(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(path, int):
                full = os.path.abspath(os.fspath(path))
                if full == str(folder) or full.startswith(f"{folder}{os.sep}"):
                    raise OSError(code, os.strerror(code), full)
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", failing(real_stat))
    monkeypatch.setattr(os, "lstat", failing(real_lstat))


@pytest.mark.parametrize("code", [errno.ESTALE, errno.EIO], ids=errno.errorcode.get)
def test_a_step_folder_that_cannot_be_looked_up_is_unreadable_not_absent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """The newest step's folder cannot even be stat'd: it may hold the run's newest
    checkpoint. Before, `isdir` read the error as "not a folder" and the step vanished: a
    writer's restore("latest") resumed from step 2 without a word, `verify` said "all 2
    checkpoints are intact" (exit 0) and `ls` did not list it."""
    run = tmp_path / "run"
    model = torch.nn.Linear(2, 1)
    with Checkpointer(run, keep_last=3, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"model": model})
    _fail_stat_of(monkeypatch, run / "step-000000003", code)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unreadable folder is warned about at open
        with (
            Checkpointer(run, keep_last=3) as ckpt,
            pytest.raises(UnreadableCheckpointError, match="newer than step 2"),
        ):
            ckpt.restore({"model": model})
    assert main(["verify", str(run), "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(c["step"], c["status"]) for c in checks] == [
        (1, "intact"),
        (2, "intact"),
        (3, "unreadable"),
    ]
    monkeypatch.undo()
    assert _steps(run) == [1, 2, 3]


@pytest.mark.parametrize("url", ["local", "memory"])
@pytest.mark.parametrize(
    ("code", "error"),
    [(errno.ENOSPC, InsufficientSpaceError), (errno.EIO, UnwritableRunError)],
    ids=["ENOSPC", "EIO"],
)
def test_a_writer_s_restore_that_cannot_set_damage_aside_is_one_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, code: int, error: type
) -> None:
    """A writer's restore falls back past the damaged step 2, and moving its manifest into
    quarantine/ fails (a full disk: on an object store the move is a copy; an I/O error):
    one CheckpointError saying nothing was loaded or deleted. Before, a bare OSError."""
    where = str(tmp_path / "run") if url == "local" else f"memory://q-{uuid.uuid4().hex}/run"
    model = torch.nn.Linear(2, 1)
    with Checkpointer(where, keep_last=3, async_save=False) as ckpt:
        for step in (1, 2):
            ckpt.save(step, {"model": model})
    storage = open_storage(where)
    data = bytearray(storage.read_bytes("step-000000002/tensors.safetensors"))
    data[-2] ^= 0x01
    with storage.open_write("step-000000002/tensors.safetensors") as f:
        f.write(bytes(data))

    def rename(self: Any, rel: str, new: str) -> None:
        raise OSError(code, os.strerror(code))

    with Checkpointer(where, keep_last=3) as ckpt:
        monkeypatch.setattr(type(ckpt._storage), "rename", rename)
        with (
            pytest.warns(UserWarning, match="falling back"),
            pytest.raises(error, match="could not set it aside") as raised,
        ):
            ckpt.restore({"model": model})
        monkeypatch.undo()
    message = str(raised.value)
    assert "\n" not in message and "step 2" in message and os.strerror(code) in message
    assert _steps(where) == [1, 2]  # nothing moved, nothing deleted
