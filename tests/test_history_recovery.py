"""A writer that opens a run writes back the history lines a kill (or a failed append) lost:
every committed save's step and metrics end up in `history.jsonl`."""

from __future__ import annotations

import errno
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer, checkpointer
from haltpoint.errors import HistoryNotWrittenError
from haltpoint.store.history import HISTORY_NAME, encode_record, read_history
from haltpoint.store.storage import LocalStorage


def make_run(run: Path, steps: tuple[int, ...] = (1, 2, 3)) -> None:
    model = torch.nn.Linear(3, 2)
    with Checkpointer(run, keep_last=2, async_save=False) as ckpt:
        for step in steps:
            ckpt.save(step, {"model": model}, metrics={"val_loss": 1.0 / step})


def history(run: Path) -> list[dict]:
    return read_history(LocalStorage(run, create=False))


def drop_last_lines(run: Path, count: int) -> None:
    """What a kill between a commit and its history append leaves (or `count` such saves)."""
    path = run / HISTORY_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-count]))


@pytest.fixture
def lost_line(tmp_path: Path) -> Path:
    """A run of steps 1-3 whose last save was killed between its commit and its line."""
    run = tmp_path / "run"
    make_run(run)
    drop_last_lines(run, 1)
    return run


def test_opening_a_writer_writes_back_the_line_a_kill_lost(lost_line: Path) -> None:
    run = lost_line
    assert [r["step"] for r in history(run)] == [1, 2]
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    records = history(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[-1]["metrics"] == {"val_loss": 1.0 / 3}
    assert records[-1]["time"] > 0
    with Checkpointer(run, keep_last=2, async_save=False):  # written once, not at every open
        pass
    assert [r["step"] for r in history(run)] == [1, 2, 3]


def test_lines_of_removed_checkpoints_cannot_come_back_but_kept_ones_do(tmp_path: Path) -> None:
    """keep_last=2 removed step 1: lines 2 and 3 come back from their manifests, in order."""
    run = tmp_path / "run"
    make_run(run)
    drop_last_lines(run, 2)
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    assert [r["step"] for r in history(run)] == [1, 2, 3]


def test_a_deleted_history_is_written_again_from_the_kept_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    (run / HISTORY_NAME).unlink()
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    assert [(r["step"], r["metrics"]) for r in history(run)] == [
        (2, {"val_loss": 0.5}),
        (3, {"val_loss": 1.0 / 3}),
    ]


def test_a_reader_never_writes_the_history(lost_line: Path) -> None:
    run = lost_line
    before = (run / HISTORY_NAME).read_bytes()
    with Checkpointer(run, read_only=True):
        pass
    assert (run / HISTORY_NAME).read_bytes() == before


def test_another_tools_file_under_the_name_is_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_run(run)
    (run / HISTORY_NAME).write_text('{"epoch": 1, "loss": 0.5}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a warning per line of another tool's file
        with Checkpointer(run, keep_last=2, async_save=False):
            pass
    assert (run / HISTORY_NAME).read_text() == '{"epoch": 1, "loss": 0.5}\n'


def test_an_unreadable_history_is_left_as_it_is_and_the_writer_opens(
    lost_line: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = lost_line
    before = (run / HISTORY_NAME).read_bytes()
    real_open = os.open

    def failing(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path).endswith(HISTORY_NAME) and not (args and args[0] & os.O_WRONLY):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing)
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    monkeypatch.undo()
    assert (run / HISTORY_NAME).read_bytes() == before


def test_a_failed_append_leaves_the_run_openable(
    lost_line: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at open: the lines stay missing (the next save's own append reports it)."""
    run = lost_line

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("haltpoint.store.history.append_history", full)
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    monkeypatch.undo()
    assert [r["step"] for r in history(run)] == [1, 2]


def test_only_the_end_of_a_long_history_is_read_and_a_torn_last_line_is_passed_over(
    lost_line: Path,
) -> None:
    """A history of many megabytes (only its end is read at open), its last append torn."""
    run = lost_line
    path = run / HISTORY_NAME
    kept = path.read_bytes()
    padding = encode_record({"step": 0, "metrics": {"pad": 0.0}, "note": "x" * 1000})
    count = 3 * (1 << 20) // len(padding)
    path.write_bytes(padding * count + kept + b'{"step":3,"metr')  # torn mid-append
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    steps = [r["step"] for r in history(run)]
    assert steps[count:] == [1, 2, 3] and len(steps) == count + 3


def test_after_a_rewind_the_old_runs_later_steps_are_not_taken_for_lost_lines(
    tmp_path: Path,
) -> None:
    """Steps 1-5 (the best, step 2, kept), then a restore of step 2 and a save of step 3: the
    history's last line is step 3, and step 5 of the old run, still on disk, lost no line."""
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3, 5: 0.2}
    opts = {"monitor": "val_loss", "keep_best": 1, "keep_last": 1, "async_save": False}
    with Checkpointer(run, **opts) as ckpt:
        for step, loss in losses.items():
            ckpt.save(step, {"model": model}, metrics={"val_loss": loss})
    with Checkpointer(run, **opts) as ckpt:
        ckpt.restore({"model": model}, which=2)
        ckpt.save(3, {"model": model}, metrics={"val_loss": 0.05})
    before = [r["step"] for r in history(run)]
    assert before == [1, 2, 3, 4, 5, 3]
    with Checkpointer(run, **opts):
        pass
    assert [r["step"] for r in history(run)] == before
    drop_last_lines(run, 1)  # now the rewound save's line is lost: it comes back, alone
    with Checkpointer(run, **opts):
        pass
    assert [r["step"] for r in history(run)] == before


def test_a_clock_behind_the_earlier_saves_does_not_bring_their_lines_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps 1-2 saved on a machine whose clock ran an hour ahead, step 3 on one with the
    right time (a resume elsewhere, an NTP step back): every line is there, and an open must
    not take the earlier saves, of a later time, for lines a kill lost."""
    run = tmp_path / "run"
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600.0)
    make_run(run, (1, 2))
    monkeypatch.undo()
    make_run(run, (3,))
    assert [r["step"] for r in history(run)] == [1, 2, 3]
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    assert [r["step"] for r in history(run)] == [1, 2, 3]


def test_a_last_line_whose_time_is_an_int_too_large_for_a_float_does_not_break_the_open(
    lost_line: Path,
) -> None:
    """A crafted line's time of 400 digits (JSON reads it as an int): the open must not fail
    with an OverflowError from comparing it as a float; nothing is written after it."""
    run = lost_line
    with (run / HISTORY_NAME).open("ab") as f:
        f.write(b'{"step": 3, "metrics": {}, "time": 1' + b"0" * 400 + b"}\n")
    before = (run / HISTORY_NAME).read_bytes()
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    assert (run / HISTORY_NAME).read_bytes() == before


def test_a_line_owed_across_a_rewind_is_written_in_commit_order_and_not_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 5's line failed (a full disk), then a restore of step 2 and a save of step 3: the
    owed line goes first (as it was committed), so the history does not end on the older
    save and the next open does not append the rewound save's line a second time."""
    run = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    opts = {"monitor": "val_loss", "keep_best": 1, "keep_last": 1, "async_save": False}
    real = checkpointer.append_history

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with Checkpointer(run, **opts) as ckpt:
        for step, loss in {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3}.items():
            ckpt.save(step, {"model": model}, metrics={"val_loss": loss})
        monkeypatch.setattr(checkpointer, "append_history", full)
        with pytest.raises(HistoryNotWrittenError):
            ckpt.save(5, {"model": model}, metrics={"val_loss": 0.2})
        monkeypatch.setattr(checkpointer, "append_history", real)
        ckpt.restore({"model": model}, which=2)
        ckpt.save(3, {"model": model}, metrics={"val_loss": 0.05})
    assert [r["step"] for r in history(run)] == [1, 2, 3, 4, 5, 3]
    with Checkpointer(run, **opts):
        pass
    assert [r["step"] for r in history(run)] == [1, 2, 3, 4, 5, 3]


def test_the_first_saves_line_torn_mid_append_is_written_back(tmp_path: Path) -> None:
    """A kill tore the very first append: the history holds only that fragment, which is
    haltpoint's (the next append drops it), so the open writes the line back."""
    run = tmp_path / "run"
    make_run(run, (1,))
    path = run / HISTORY_NAME
    path.write_bytes(path.read_bytes()[:20])  # b'{"step":1,"time":17...'
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    assert [(r["step"], r["metrics"]) for r in history(run)] == [(1, {"val_loss": 1.0})]


def test_another_tools_file_with_a_step_key_is_left_alone(tmp_path: Path) -> None:
    """Many loggers write {"step": ..., "loss": ...} lines: without haltpoint's metrics the
    line is not a save's, and nothing is appended to that file at open."""
    run = tmp_path / "run"
    make_run(run)
    (run / HISTORY_NAME).write_text('{"step": 1, "loss": 0.5}\n')
    with Checkpointer(run, keep_last=2, async_save=False):
        pass
    assert (run / HISTORY_NAME).read_text() == '{"step": 1, "loss": 0.5}\n'
