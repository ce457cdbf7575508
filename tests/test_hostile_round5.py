"""Crafted run directories, round 5: what the earlier campaigns left. Text from a run that the
command line's own output stream cannot encode, and a tensor file swapped for a FIFO between
haltpoint's check of it and its read. Each ends in the command's result or one line."""

from __future__ import annotations

import io
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from haltpoint import Checkpointer
from haltpoint.cli.app import run as cli_run
from haltpoint.cli.output import Output
from haltpoint.store import tensor_reader

# -- text a non-UTF-8 stdout cannot encode ----------------------------------------------------


@pytest.fixture
def named_run(tmp_path: Path) -> Path:
    """One checkpoint whose monitor and metric names are not ASCII (a user's own language)."""
    run = tmp_path / "run"
    with Checkpointer(run, monitor="损失", mode="min", async_save=False) as ckpt:
        ckpt.save(1, {"model": torch.nn.Linear(2, 1)}, {"损失": 0.5, "précision": 0.9})
    return run


def _stream(encoding: str) -> io.TextIOWrapper:
    """A text stream of `encoding` with Python's default `strict` errors, as `sys.stdout` is
    under `LC_ALL=C PYTHONUTF8=0` (ASCII) or `PYTHONIOENCODING=latin-1`."""
    return io.TextIOWrapper(io.BytesIO(), encoding=encoding, write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    buffer = stream.buffer
    assert isinstance(buffer, io.BytesIO)
    return buffer.getvalue().decode(stream.encoding)


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
@pytest.mark.parametrize(
    "command",
    [
        ["ls"],
        ["show"],
        ["replay"],
        ["verify"],
        ["gc", "--keep-last", "1", "--dry-run"],
        ["export", "--which", "latest", "-o", "{tmp}/m.safetensors"],
    ],
    ids=lambda command: command[0],
)
def test_names_the_output_stream_cannot_encode_are_escaped_not_fatal(
    named_run: Path, tmp_path: Path, command: list[str], encoding: str, terminal: bool
) -> None:
    """A metric named `损失` (or `précision`) is an ordinary name, and every command printed
    it: on a stdout that is not UTF-8 (`LC_ALL=C PYTHONUTF8=0`, `PYTHONIOENCODING=ascii`, a
    latin-1 terminal) `ls` printed its header and then failed with `haltpoint: error: 'ascii'
    codec can't encode character '\\xe9'` (exit status 1, the table cut off), and so did
    `show` and `replay`. A character the stream cannot take is now written as its escape
    (`\\u635f`), as `printable` writes control characters, and the command does its job. On
    a terminal, the ellipsis (U+2026) rich puts in a cell it cuts failed the same way: there
    cells now fold."""
    stdout, stderr = _stream(encoding), _stream(encoding)
    argv = [command[0], str(named_run), *(a.format(tmp=tmp_path) for a in command[1:])]
    code = cli_run(argv, Output(stdout, stderr, terminal=terminal))
    out, err = _text(stdout), _text(stderr)
    assert code == 0, err
    assert "codec can't encode" not in out + err
    if command[0] in ("ls", "show", "replay") and not terminal:  # a terminal's table folds it
        assert "\\u635f\\u5931" in out  # 损失, escaped


# -- a tensor file swapped between haltpoint's check of it and its read -----------------------


def _swap_for_fifo(path: str) -> None:
    os.mkfifo(path)


def _swap_for_link(path: str) -> None:
    outside = path + ".outside"  # the same bytes, every tensor zeroed: its hashes fail
    with open(path + ".moved", "rb") as f:
        data = bytearray(f.read())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n :] = bytes(len(data) - 8 - n)
    with open(outside, "wb") as f:
        f.write(data)
    os.symlink(outside, path)


@pytest.mark.parametrize("swap", [_swap_for_fifo, _swap_for_link], ids=["fifo", "link-out"])
def test_a_tensor_file_swapped_after_it_was_checked_is_never_opened_again_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: Callable[[str], None]
) -> None:
    """A tensor of 1 MiB or more read into fresh memory (`export`, a restore into a new
    entry) is read with O_DIRECT through a second descriptor, which the reader opened by the
    file's name after `open_regular` had checked the first: without O_NONBLOCK or
    O_NOFOLLOW. A file swapped for a FIFO in between (a tool rewriting the run, an attacker
    racing the reader) made `export` wait forever in that open; one swapped for a link
    out of the run was read through it. The second descriptor now opens the file the first
    one holds, never the name again: the export reads the bytes it checked."""
    run = tmp_path / "run"
    weights = {"w": torch.arange(1 << 18, dtype=torch.float32)}  # 1 MiB
    with Checkpointer(run, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(1, {"model": _Weights(weights)})
    opened: list[str] = []

    def open_then_swap(path: str, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, *args, **kwargs)
        opened.append(path)
        if len(opened) == 2:  # the reader's own descriptor: its header was checked through #1
            os.rename(path, path + ".moved")
            swap(path)
        return fd

    real_open = tensor_reader.open_regular
    monkeypatch.setattr(tensor_reader, "open_regular", open_then_swap)
    out = tmp_path / "w.safetensors"
    argv = ["export", str(run), "--which", "latest", "-o", str(out)]
    done: list[tuple[int, str]] = []

    def export() -> None:
        stdout, stderr = io.StringIO(), io.StringIO()
        done.append((cli_run(argv, Output(stdout, stderr)), stderr.getvalue()))

    thread = threading.Thread(target=export, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():  # let it go: open the FIFO's other end
        os.close(os.open(run / "step-000000001" / "tensors.safetensors", os.O_WRONLY))
        thread.join(30)
        pytest.fail("export waited on a FIFO swapped in for the tensor file")
    assert len(opened) == 2
    code, err = done[0]
    assert code == 0, err
    assert torch.equal(safetensors.torch.load_file(out)["w"], weights["w"])


class _Weights:
    """A stateful object holding plain tensors (no module: nothing is read in place)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = state
