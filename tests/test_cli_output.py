"""What a crafted run directory holds reaches the terminal as text: no markup, no escapes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from haltpoint import Checkpointer
from haltpoint.cli.app import run
from haltpoint.cli.output import Output

MARKUP = "[bold green]intact[/]"
ESCAPES = "loss\x1b[2J\x1b]0;owned\x07\x9b31m\x7f"


@pytest.fixture
def crafted(tmp_path: Path) -> Path:
    """A run whose metric names and values hold rich markup and terminal escape sequences."""
    run_dir = tmp_path / "[red]run[/]\x1b[1m"
    with Checkpointer(run_dir, async_save=False, capture_rng=False) as ckpt:
        ckpt.save(1, {"model": torch.nn.Linear(2, 2)}, metrics={MARKUP: 0.5, ESCAPES: 0.25})
    return run_dir


def _cli(*argv: str, terminal: bool) -> str:
    out = Output(stdout=io.StringIO(), stderr=io.StringIO(), terminal=terminal)
    run(list(argv), out)
    return out.stdout.getvalue() + out.stderr.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize("terminal", [True, False])
@pytest.mark.parametrize("command", ["ls", "show", "verify"])
def test_markup_and_escapes_from_a_run_are_shown_as_text(
    crafted: Path, command: str, terminal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps no cell
    shown = _cli(command, str(crafted), terminal=terminal)
    if command != "verify":  # verify names no metrics
        assert MARKUP in shown  # the literal brackets: not bold green "intact"
        assert r"loss\x1b[2J\x1b]0;owned\x07\x9b31m\x7f" in shown
    if terminal or command == "show":  # piped, ls and verify print no title
        assert r"[red]run[/]\x1b[1m" in shown  # the directory, as text
    for raw in ("\x1b]", "\x1b[2J", "\x07", "\x9b", "\x7f"):
        assert raw not in shown
    assert terminal or "\x1b" not in shown  # piped: no escape at all


def test_errors_and_notes_show_control_characters_as_escapes(tmp_path: Path) -> None:
    missing = tmp_path / "gone\x1b]0;owned\x07[bold]x"
    shown = _cli("ls", str(missing), terminal=True)
    assert r"gone\x1b]0;owned\x07[bold]x" in shown
    assert "\x1b]" not in shown
