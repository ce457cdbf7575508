"""Crafted run directories, round 5: what the earlier campaigns left. Text from a run that the
command line's own output stream cannot encode, and a tensor file swapped for a FIFO between
haltpoint's check of it and its read. Each ends in the command's result or one line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli.app import run as cli_run
from haltpoint.cli.output import Output

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
