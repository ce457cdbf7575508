"""A reader of the results that goes away (`haltpoint ls DIR | head -1`): no line, no
traceback, exit status 141, for every command that prints results."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.test_cli_inspect import make_run

from haltpoint.cli.app import EXIT_BROKEN_PIPE, EXIT_FAILURE, reader_gone, run
from haltpoint.cli.output import Output

COMMANDS = [
    ["ls"],
    ["ls", "--json"],
    ["show"],
    ["show", "--json"],
    ["verify"],
    ["replay"],
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pipe") / "run"
    make_run(path, values=tuple(0.5 - i / 1000 for i in range(40)))
    return path


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_closed_pipe_ends_the_command_quietly_with_141(run_dir: Path, command: list[str]):
    """Before, rich ended `show` and `replay` with SystemExit(1) and `ls` printed
    'haltpoint: error: [Errno 32] Broken pipe' with status 1."""
    child = subprocess.Popen(
        [sys.executable, "-m", "haltpoint", command[0], str(run_dir), *command[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # the reader is gone before the first line
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == EXIT_BROKEN_PIPE
    assert "Traceback" not in err and "Broken pipe" not in err, err
    if command[0] != "replay":  # replay's legend is a note on stderr, printed first
        assert err == ""


def test_a_broken_pipe_that_is_not_the_results_reader_is_an_error_line(
    monkeypatch: pytest.MonkeyPatch,
):
    """A BrokenPipeError from elsewhere (a socket of an object store) is not taken for the
    reader leaving: one error line, status 1."""

    def broken(args: argparse.Namespace, out: Output) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def parser() -> argparse.ArgumentParser:
        fake = argparse.ArgumentParser()
        fake.set_defaults(handler=broken)
        return fake

    monkeypatch.setattr("haltpoint.cli.app.build_parser", parser)
    out = Output(stdout=io.StringIO(), stderr=io.StringIO())
    assert run([], out) == EXIT_FAILURE
    assert out.stderr.getvalue().strip() == "haltpoint: error: Broken pipe"


def test_reader_gone_tells_a_closed_pipe_from_an_open_one_and_from_no_file():
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stream:
        assert not reader_gone(stream)
        os.close(read_end)
        assert reader_gone(stream)
    assert not reader_gone(io.StringIO())
