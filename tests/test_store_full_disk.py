"""A disk that fills up after the commit, or before a writer opens: said as what it is.

ENOSPC is injected at the storage boundary (the history append, the lock file, the folder),
not by filling a real disk; `tests/test_store_space.py` does that on a tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from haltpoint import (
    Checkpointer,
    CheckpointExistsError,
    HistoryNotWrittenError,
    InsufficientSpaceError,
)
from haltpoint.store import history, lock
from haltpoint.store.history import read_history
from haltpoint.store.storage import LocalStorage


def _full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullOnce:
    """Calls `real`, except for the next `times` calls, which raise ENOSPC."""

    def __init__(self, real: Callable[..., None], times: int = 1) -> None:
        self.real, self.times = real, times

    def __call__(self, *args: object, **kwargs: object) -> None:
        if self.times > 0:
            self.times -= 1
            _full()
        self.real(*args, **kwargs)


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((8,), value)}


def history_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_history(LocalStorage(run))]


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_at_the_history_line_says_committed_and_the_retry_writes_it(
    tmp_path: Path, monkeypatch, async_save: bool
) -> None:
    monkeypatch.setattr(history, "_append_local", FullOnce(history._append_local))
    with Checkpointer(tmp_path, keep_last=2, capture_rng=False, async_save=async_save) as ckpt:
        with pytest.raises(
            HistoryNotWrittenError,
            match=r"^the checkpoint of step 3 is committed in .*, but the history.jsonl line "
            r"of step\(s\) 3 was not written \(\[Errno 28\]",
        ):
            ckpt.save(3, state(3.0), {"loss": 0.5}, pin=True)
            ckpt.wait()
        assert [(i.step, i.pinned) for i in ckpt.list()] == [(3, True)]  # committed, pinned
        assert history_steps(tmp_path) == []
        info = ckpt.save(3, state(3.0), {"loss": 0.5}, pin=True)  # the same call again
        ckpt.wait()
        assert (info.step, info.pinned, dict(info.metrics)) == (3, True, {"loss": 0.5})
        assert history_steps(tmp_path) == [3]
        with pytest.raises(CheckpointExistsError):  # once complete, the step is taken again
            ckpt.save(3, state(3.0), {"loss": 0.5})
        restored = {"w": torch.zeros(8)}
        assert ckpt.restore(restored).step == 3 and torch.equal(restored["w"], state(3.0)["w"])


def test_another_call_for_the_step_is_still_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(history, "_append_local", FullOnce(history._append_local))
    with Checkpointer(tmp_path, capture_rng=False, async_save=False) as ckpt:
        with pytest.raises(HistoryNotWrittenError):
            ckpt.save(3, state(3.0), {"loss": 0.5})
        with pytest.raises(CheckpointExistsError, match="step 3 already exists"):
            ckpt.save(3, state(4.0), {"loss": 0.4})  # other metrics: not the same save
        assert history_steps(tmp_path) == []


def test_the_next_save_writes_the_line_owed_first(tmp_path: Path, monkeypatch) -> None:
    with Checkpointer(tmp_path, keep_last=5, capture_rng=False, async_save=False) as ckpt:
        ckpt.save(1, state(1.0), {"loss": 0.7})
        monkeypatch.setattr(history, "_append_local", FullOnce(history._append_local))
        with pytest.raises(HistoryNotWrittenError):
            ckpt.save(2, state(2.0), {"loss": 0.6})
        ckpt.save(3, state(3.0), {"loss": 0.5})
    assert history_steps(tmp_path) == [1, 2, 3]


def test_retention_still_runs_when_the_history_line_fails(tmp_path: Path, monkeypatch) -> None:
    with Checkpointer(tmp_path, keep_last=1, capture_rng=False, async_save=False) as ckpt:
        ckpt.save(1, state(1.0))
        monkeypatch.setattr(history, "_append_local", _full)
        with pytest.raises(HistoryNotWrittenError):
            ckpt.save(2, state(2.0))
        assert [i.step for i in ckpt.list()] == [2]  # the space of step 1 is freed


def test_the_pin_marker_is_written_before_the_commit(tmp_path: Path, monkeypatch) -> None:
    real = LocalStorage.publish

    def publish(self: LocalStorage, rel: str, data: bytes) -> None:
        if rel.endswith("/pinned"):
            _full()
        real(self, rel, data)

    monkeypatch.setattr(LocalStorage, "publish", publish)
    with Checkpointer(tmp_path, capture_rng=False, async_save=False) as ckpt:
        with pytest.raises(InsufficientSpaceError, match="every earlier checkpoint is intact"):
            ckpt.save(3, state(3.0), pin=True)
        assert ckpt.list() == []  # never committed without its pin
        monkeypatch.setattr(LocalStorage, "publish", real)
        assert ckpt.save(3, state(3.0), pin=True).pinned
        assert [i.pinned for i in ckpt.list()] == [True]


def test_a_writer_opened_on_a_full_disk_raises_insufficient_space(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(lock, "open_unlinked", _full)
    with pytest.raises(
        InsufficientSpaceError,
        match=r"^cannot open .* for writing: the disk is full \(No space left on device\); "
        "free some space and open it again",
    ):
        Checkpointer(tmp_path / "run")


def test_a_run_folder_that_cannot_be_made_on_a_full_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "makedirs", _full)
    with pytest.raises(InsufficientSpaceError, match="the disk is full"):
        Checkpointer(tmp_path / "run")


def test_the_lines_written_late_are_ordinary_history_lines(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(history, "_append_local", FullOnce(history._append_local))
    with Checkpointer(tmp_path, capture_rng=False, async_save=False) as ckpt:
        with pytest.raises(HistoryNotWrittenError):
            ckpt.save(3, state(3.0), {"loss": float("nan")})
        ckpt.save(3, state(3.0), {"loss": float("nan")})  # NaN equals NaN for the retry
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [3]
