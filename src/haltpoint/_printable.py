"""Text read from a run directory, made safe to show on one line."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: object) -> str:
    r"""`str(text)` with every character that is not printable, space aside, written as its
    escape: line breaks, terminal controls (ESC, BEL, CSI), the bidirectional overrides that
    reorder what a terminal shows, and lone surrogates (JSON's "\ud800" decodes to one, which
    no UTF-8 stream can write). So nothing shown can move the cursor, hide what follows or
    break a message into two lines.

    >>> print(printable("loss\x1b[2J \x1b]0;owned\x07 \u202eok \ud800 a\nb"))
    loss\x1b[2J \x1b]0;owned\x07 \u202eok \ud800 a\nb
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
