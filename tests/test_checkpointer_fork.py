"""A `Checkpointer` inherited by a forked child: it writes nothing and never hangs there.

The writer lock and the background thread belong to the process that opened the writer; a
child made by `os.fork` (or multiprocessing's "fork" start method) has neither. Every write
in the child is refused with one `LockedError` line naming the owner, reads still work, and
the child's `close()` leaves the parent's lock and checkpoints alone.
"""

from __future__ import annotations

import json
import os
import select
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.errors import LockedError
from haltpoint.store.run_dir import checkpoint_dirname

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

CHILD_TIMEOUT_S = 30


def in_child(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run `fn` in a forked child; its result, or the error it raised, comes back by a pipe.
    A child still running after `CHILD_TIMEOUT_S` is killed and reported as hung."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's clean-up
        code = 0
        try:
            os.close(read_end)
            try:
                report: dict[str, Any] = {"result": fn()}
            except BaseException as exc:
                report = {
                    "error": type(exc).__name__,
                    "message": str(exc),
                    "base": [c.__name__ for c in type(exc).__mro__],
                    "trace": traceback.format_exc(),
                }
            os.write(write_end, json.dumps(report, default=repr).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    data = b""
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, 9)
                pytest.fail("the child hung")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return json.loads(data)


def steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step-*") if (p / "manifest.json").exists())


def refused(report: dict[str, Any]) -> str:
    assert report.get("error") == "LockedError", report
    assert "CheckpointError" in report["base"]
    message: str = report["message"]
    assert "\n" not in message
    assert f"belongs to process {os.getpid()}" in message
    assert "open a new Checkpointer in the child" in message
    return message


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize(
    "write",
    [
        lambda c, m: c.save(2, {"model": m}),
        lambda c, m: c.save(2, {"model": m}, pin=True),
        lambda c, m: c.maybe_save(2, {"model": m}),
        lambda c, m: c.pin(1),
        lambda c, m: c.unpin(1),
    ],
    ids=["save", "save_pinned", "maybe_save", "pin", "unpin"],
)
def test_every_write_in_a_forked_child_is_refused_and_the_parent_is_untouched(
    tmp_path: Path, async_save: bool, write: Callable[[Checkpointer, torch.nn.Module], Any]
) -> None:
    run, model = tmp_path / "run", torch.nn.Linear(2, 1)
    with Checkpointer(run, keep_last=1, async_save=async_save, every=1) as ckpt:
        ckpt.save(1, {"model": model})
        ckpt.wait()
        refused(in_child(lambda: write(ckpt, model)))
        report = in_child(lambda: ckpt.close())  # the child's close: nothing to finish
        assert report == {"result": None}
        assert steps(run) == [1]
        with pytest.raises(LockedError, match=f"process {os.getpid()}"):
            Checkpointer(run)  # the parent still holds the lock
        ckpt.save(3, {"model": model})  # and writes on as before
    assert steps(run) == [3]


def test_reads_in_a_forked_child_work_and_set_nothing_aside(tmp_path: Path) -> None:
    run, model = tmp_path / "run", torch.nn.Linear(2, 1)
    with Checkpointer(run, monitor="loss", keep_last=2, async_save=False) as ckpt:
        ckpt.save(1, {"model": model}, {"loss": 0.5})
        ckpt.save(2, {"model": model}, {"loss": 0.7})
        tensors = run / checkpoint_dirname(2) / "tensors.safetensors"
        data = bytearray(tensors.read_bytes())
        data[-1] ^= 0x01  # the newest is damaged: a writer would set it aside
        tensors.write_bytes(bytes(data))

        def read() -> list[Any]:
            with pytest.warns(UserWarning, match="falling back"):
                latest = ckpt.restore({"model": torch.nn.Linear(2, 1)})
            best = ckpt.restore({"model": torch.nn.Linear(2, 1)}, "best")
            assert latest is not None and best is not None
            return [latest.step, best.step, [i.step for i in ckpt.list()]]

        assert in_child(read) == {"result": [1, 1, [1, 2]]}
        assert not (run / "quarantine").exists() and steps(run) == [1, 2]


def test_a_save_in_flight_at_the_fork_neither_hangs_nor_commits_in_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The background thread does not exist in the child: waiting there for its job would
    wait forever, so `wait`, `close` and the next `save` refuse; reads do not wait."""
    import haltpoint.checkpointer as checkpointer

    run, model = tmp_path / "run", torch.nn.Linear(2, 1)
    release, started = threading.Event(), threading.Event()
    real = checkpointer.write_checkpoint

    def held(*args: Any, **kwargs: Any) -> Any:
        started.set()
        assert release.wait(CHILD_TIMEOUT_S)
        return real(*args, **kwargs)

    with Checkpointer(run, keep_last=1, async_save=True) as ckpt:
        ckpt.save(1, {"model": model})
        ckpt.wait()
        monkeypatch.setattr(checkpointer, "write_checkpoint", held)
        ckpt.save(2, {"model": model})
        assert started.wait(CHILD_TIMEOUT_S)
        try:
            for act in (ckpt.wait, ckpt.close, lambda: ckpt.save(3, {"model": model})):
                refused(in_child(act))
            report = in_child(lambda: [i.step for i in ckpt.list()])
            assert report == {"result": [1]}  # what is committed on disk
        finally:
            release.set()
        ckpt.wait()
        assert steps(run) == [2]
    assert steps(run) == [2]


def test_a_read_only_checkpointer_reads_in_a_forked_child(tmp_path: Path) -> None:
    run, model = tmp_path / "run", torch.nn.Linear(2, 1)
    with Checkpointer(run, async_save=False) as ckpt:
        ckpt.save(1, {"model": model})
    with Checkpointer(run, read_only=True) as reader:
        report = in_child(lambda: reader.restore({"model": torch.nn.Linear(2, 1)}).step)
    assert report == {"result": 1}
