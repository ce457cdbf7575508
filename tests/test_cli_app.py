"""The `haltpoint` command as a whole: help with examples, exit statuses, the entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer, __version__
from haltpoint.cli import main
from haltpoint.cli.output import Output

COMMANDS = ["demo", "ls", "show", "verify", "export", "gc", "plot", "replay", "import"]


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"\n    {command} " in out
    assert "examples:" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: haltpoint {command}")
    assert "examples:\n" in out
    assert f"haltpoint {command}" in out.split("examples:")[1]


def test_version_and_usage_errors(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"haltpoint {__version__}\n"
    assert main(["frobnicate"]) == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err
    assert main([]) == 2
    assert "usage: haltpoint" in capsys.readouterr().out
    assert main(["ls"]) == 2
    assert "the following arguments are required: DIR" in capsys.readouterr().err
    assert main(["ls", "a", "b"]) == 2
    assert "unrecognized arguments: b (see: haltpoint ls --help)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "{missing}"],
        ["show", "{missing}"],
        ["verify", "{missing}"],
        ["export", "{missing}", "-o", "m.safetensors"],
        ["gc", "{missing}", "--keep-last", "1"],
        ["plot", "{missing}"],
        ["replay", "{missing}"],
    ],
)
def test_a_missing_run_is_one_line_without_traceback(tmp_path: Path, argv: list[str], capsys):
    missing = str(tmp_path / "missing")
    assert main([a.replace("{missing}", missing) for a in argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"haltpoint: error: run directory {missing} does not exist; pass the folder a "
        "Checkpointer wrote (it holds step-* folders and history.jsonl)\n"
    )
    assert not os.path.exists(missing)


def test_output_is_plain_when_piped_and_a_table_on_a_terminal(tmp_path: Path):
    import io

    piped = Output(stdout=io.StringIO(), stderr=io.StringIO())
    piped.table(["step", "tags"], [["3", "best"]])
    piped.error("something\nwent wrong")
    assert piped.stdout.getvalue() == "step  tags\n   3  best\n"  # type: ignore[attr-defined]
    assert piped.stderr.getvalue() == "haltpoint: error: something went wrong\n"  # type: ignore[attr-defined]
    terminal = Output(stdout=io.StringIO(), stderr=io.StringIO(), terminal=True)
    terminal.table(["step", "tags"], [["3", "best"]], title="checkpoints")
    text = terminal.stdout.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[" in text and "checkpoints" in text and "┏━━━━━━┳━━━━━━┓" in text


def make_run(path: Path) -> None:
    with Checkpointer(path, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(5, {"w": torch.ones(3)}, {"loss": 0.25})


def test_entry_points_run_as_processes(tmp_path: Path):
    make_run(tmp_path / "run")
    env = {**os.environ, "NO_COLOR": "1"}
    module = subprocess.run(
        [sys.executable, "-m", "haltpoint", "ls", str(tmp_path / "run"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert module.returncode == 0, module.stderr
    assert [r["step"] for r in json.loads(module.stdout)] == [5]
    script = shutil.which("haltpoint") or pytest.skip("the haltpoint script is not installed")
    failed = subprocess.run(
        [script, "verify", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert failed.returncode == 1
    assert failed.stderr.startswith("haltpoint: error: run directory")
    assert "Traceback" not in failed.stderr


def test_a_leading_tilde_in_any_path_is_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """A shell expands `~` in `-o ~/x`, not in `--run-dir=~/x` or a quoted `'~/x'`: the
    command does, for every path it takes, as the library does for a run directory."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    make_run(home / "run")
    for argv in (
        ["ls", "~/run"],
        ["show", "~/run"],
        ["verify", "~/run"],
        ["export", "~/run", "--key", "w", "-o", "~/model.safetensors"],
        ["import", "~/model.safetensors", "-o", "~/imported"],
        ["gc", "~/imported", "--keep-last", "1"],
    ):
        assert main(argv) == 0, (argv, capsys.readouterr().err)
    assert (home / "model.safetensors").is_file()
    assert (home / "imported" / "step-000000000" / "manifest.json").is_file()
    assert os.listdir(cwd) == []
