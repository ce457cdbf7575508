"""Terminal output: rich tables and colour on a terminal, plain aligned text when piped, JSON.

Every subcommand writes through an `Output`, so tests (and pipes) get plain text without
escape codes, and `--json` gets strict JSON (non-finite floats as the strings `"NaN"`,
`"Infinity"` and `"-Infinity"`, as in `history.jsonl`). Names, values, paths and reasons
come from run directories that may be crafted: `Output` shows every text it is given through
`printable`, and never as rich markup; a character the stream's encoding lacks (a metric
named `损失` on an ASCII stdout, `LC_ALL=C PYTHONUTF8=0`) is written as its escape, as
`printable` writes control characters, instead of failing the command.
"""

from __future__ import annotations

import codecs
import datetime
import errno
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from haltpoint._printable import printable

__all__ = [
    "Output",
    "encodable",
    "format_bytes",
    "format_metrics",
    "format_time",
    "printable",
    "to_strict_json",
]


def encodable(text: str, stream: object) -> str:
    r"""`text` with every character that `stream`'s encoding cannot write as its escape
    (`\u635f`), so that writing it never raises `UnicodeEncodeError`; as it is for a stream
    without an encoding (`io.StringIO`) or one of UTF-8.

    >>> import io
    >>> ascii_out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    >>> print(encodable("val_loss 损失 précision", ascii_out))
    val_loss \u635f\u5931 pr\xe9cision
    """
    encoding = getattr(stream, "encoding", None)
    if not isinstance(encoding, str):
        return text
    try:
        if codecs.lookup(encoding).name == "utf-8":
            return text
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # a name codecs does not know: the stream will say so itself
        return text


def format_bytes(n: int | float) -> str:
    """A size in bytes for people.

    >>> format_bytes(512), format_bytes(469976), format_bytes(3 * 2**30)
    ('512 B', '459.0 KiB', '3.0 GiB')
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_time(unix: float) -> str:
    """A unix time as local `YYYY-MM-DD HH:MM:SS`."""
    try:
        return datetime.datetime.fromtimestamp(unix).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return repr(unix)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """Metrics as `name=value` pairs with 4 significant digits.

    >>> format_metrics({"val_loss": 0.061976, "val_acc": 0.99164})
    'val_loss=0.06198 val_acc=0.9916'
    """
    return " ".join(f"{name}={value:.4g}" for name, value in metrics.items())


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def to_strict_json(value: Any) -> str:
    """Strict JSON text of `value`, non-finite floats written as strings.

    >>> to_strict_json({"loss": float("nan"), "steps": (1, 2)})
    '{"loss": "NaN", "steps": [1, 2]}'
    """
    return json.dumps(_jsonable(value), allow_nan=False)


class _Console(Console):
    """A rich console that, when its reader goes away, raises `BrokenPipeError` to the
    command's error boundary instead of rich's own `SystemExit(1)`, and prints no more."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


class Output:
    """Where a subcommand writes: `stdout` for results, `stderr` for notes and errors.

    `terminal` overrides whether they are treated as a terminal (default: ask the files).

    >>> import io
    >>> out = Output(stdout=io.StringIO(), stderr=io.StringIO())
    >>> out.table(["step", "loss"], [["1", "0.5"], ["12", "0.25"]])
    >>> print(out.stdout.getvalue(), end="")
    step  loss
       1   0.5
      12  0.25
    """

    def __init__(
        self,
        stdout: IO[str] | None = None,
        stderr: IO[str] | None = None,
        *,
        terminal: bool | None = None,
    ) -> None:
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        options: dict[str, Any] = {"highlight": False, "soft_wrap": True}
        if terminal is not None:  # None: rich asks the file whether it is a terminal
            options["force_terminal"] = terminal
        self.console = _Console(file=self.stdout, **options)
        self.err_console = _Console(file=self.stderr, **options)

    def _out(self, text: object, stream: object = None) -> str:
        """`text` as it is shown on `stream` (stdout by default): `printable`, then
        `encodable` there."""
        return encodable(printable(text), self.stdout if stream is None else stream)

    @property
    def is_terminal(self) -> bool:
        """Whether results go to a terminal (then tables and colour are used)."""
        return self.console.is_terminal

    def line(self, text: str = "", style: str | None = None) -> None:
        """Print one line of results (no markup is interpreted in `text`)."""
        self.console.print(Text(self._out(text), style=style or ""))

    def note(self, text: str, style: str | None = None) -> None:
        """Print a line for people on stderr (progress, hints), never mixed into results."""
        self.err_console.print(Text(self._out(text, self.stderr), style=style or ""))

    def error(self, text: str) -> None:
        """Print `haltpoint: error: TEXT` on one line of stderr."""
        one_line = self._out(" ".join(str(text).split()), self.stderr)
        self.err_console.print(Text(f"haltpoint: error: {one_line}", style="bold red"))

    def json(self, value: Any) -> None:
        """Print `value` as strict JSON on stdout."""
        self.stdout.write(to_strict_json(value) + "\n")
        self.stdout.flush()

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[str]],
        *,
        title: str | None = None,
        styles: Sequence[str | None] | None = None,
        numeric: Sequence[str] = (),
        header: bool = True,
    ) -> None:
        """A table: rich on a terminal, else a header line and aligned plain columns.

        Args:
            columns: header names.
            rows: cells as text.
            title: a caption above the table (terminal only).
            styles: a rich style per row (terminal only), e.g. "red" for damaged ones.
            numeric: columns aligned right (default: those whose cells all look numeric).
            header: print the column names (off for key-value tables).
        """
        columns = [self._out(c) for c in columns]
        rows = [[self._out(cell) for cell in row] for row in rows]
        right = set(numeric) or {c for i, c in enumerate(columns) if _numeric(rows, i)}
        if self.is_terminal:
            table = Table(
                title=Text(self._out(title)) if title is not None else None,
                title_justify="left",
                header_style="bold",
                show_header=header,
            )
            # rich cuts a cell too wide with "\u2026", which an ASCII terminal cannot take
            overflow: Literal["fold", "ellipsis"] = (
                "fold" if self.console.options.ascii_only else "ellipsis"
            )
            for col in columns:
                table.add_column(
                    Text(col), justify="right" if col in right else "left", overflow=overflow
                )
            for index, row in enumerate(rows):
                texts = [Text(cell) for cell in row]  # Text: never read as markup
                table.add_row(*texts, style=(styles[index] if styles else None) or None)
            self.console.print(table)
            return
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
        for row in [list(columns), *rows] if header else rows:
            cells = [
                cell.rjust(w) if col in right else cell.ljust(w)
                for cell, w, col in zip(row, widths, columns, strict=True)
            ]
            self.stdout.write("  ".join(cells).rstrip() + "\n")
        self.stdout.flush()


def _numeric(rows: Sequence[Sequence[str]], index: int) -> bool:
    cells = [r[index] for r in rows if r[index] not in ("", "-")]
    if not cells:
        return False
    try:
        for cell in cells:
            float(cell.split()[0].rstrip("%"))
    except (ValueError, IndexError):
        return False
    return True
