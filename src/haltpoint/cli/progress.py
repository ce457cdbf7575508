"""A one-line progress display that fits the terminal's width.

The epoch, the bar and the elapsed time always show; the fields (metrics) fill the room that
is left, and the least important are dropped first, so at 60 or 80 columns nothing that
matters is squeezed out.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressBar, ProgressColumn, Task, TimeElapsedColumn
from rich.text import Text

__all__ = ["Field", "epoch_progress", "fit_fields", "split_width"]

Field = tuple[str, int]
"""A text and its rank: rank 0 is the most important, the highest rank is dropped first."""

BAR_MIN, BAR_MAX = 10, 24
_TIME = len("0:00:00")
_GAP = "  "


def fit_fields(fields: Sequence[Field], width: int) -> str:
    """The fields that fit in `width` characters, in their order, least important dropped first.

    >>> fields = [("train 0.31", 2), ("val 0.25", 0), ("wait 1", 1)]
    >>> fit_fields(fields, 80), fit_fields(fields, 16), fit_fields(fields, 9), fit_fields(fields, 3)
    ('train 0.31  val 0.25  wait 1', 'val 0.25  wait 1', 'val 0.25', '')
    """
    kept = sorted(range(len(fields)), key=lambda i: fields[i][1])
    while kept:
        text = _GAP.join(fields[i][0] for i in sorted(kept))
        if len(text) <= width:
            return text
        kept.pop()
    return ""


def _label(task: Task) -> str:
    total = 0 if task.total is None else task.total
    return f"epoch {task.completed:>3.0f}/{total:.0f}"


def split_width(width: int, label: int) -> tuple[int, int]:
    """The bar's width and the room for fields on a line of `width` with a `label` this long.

    >>> split_width(80, 12), split_width(60, 12), split_width(120, 12)
    ((19, 39), (12, 26), (24, 74))
    """
    free = width - label - _TIME - 3  # one space between each of the four columns
    bar = max(BAR_MIN, min(BAR_MAX, free // 3))
    return bar, max(0, free - bar)


class _Label(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(_label(task), style="bold")


class _Bar(BarColumn):
    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def render(self, task: Task) -> ProgressBar:
        self.bar_width = split_width(self.console.width, len(_label(task)))[0]
        return super().render(task)


class _Fields(ProgressColumn):
    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def render(self, task: Task) -> Text:
        room = split_width(self.console.width, len(_label(task)))[1]
        return Text(fit_fields(task.fields.get("fields", ()), room), no_wrap=True)


def epoch_progress(console: Console) -> Progress:
    """A progress display for epochs; give each task a `fields` list of `Field`s to show."""
    return Progress(_Label(), _Bar(console), _Fields(console), TimeElapsedColumn(), console=console)
