"""Preemption: turn SIGTERM / SIGUSR1 into "save at the next safe point"; no I/O in the handler.

Spot instances and SLURM warn a job with a signal some seconds before they kill it. The
handler here only records which signal came; the training loop checks the flag at a safe
point (after an optimizer step), saves, and exits cleanly. A second signal of the same kind
restores the previous handler and re-delivers the signal, so a loop that never checks can
still be stopped the usual way.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

__all__ = ["SignalFlag", "check_signals"]

_UNCATCHABLE = frozenset({signal.SIGKILL, signal.SIGSTOP})  # no process may catch them


def check_signals(signals: int | Iterable[int]) -> list[signal.Signals]:
    """The signals `save_on_signal` names, checked without installing anything: each a
    signal, at least one, none that cannot be caught, and from the main thread.

    Raises:
        ValueError: saying which of these does not hold.

    >>> check_signals(signal.SIGTERM)
    [<Signals.SIGTERM: 15>]
    """
    try:
        wanted = [signal.Signals(s) for s in ([signals] if isinstance(signals, int) else signals)]
    except (TypeError, ValueError):
        raise ValueError(
            "save_on_signal must be a signal or a list of signals such as "
            f"[signal.SIGTERM, signal.SIGUSR1], got {signals!r}"
        ) from None
    if not wanted:
        raise ValueError("save_on_signal must name at least one signal, got an empty list")
    if threading.current_thread() is not threading.main_thread():
        raise ValueError(
            "save_on_signal needs the Checkpointer to be created in the main thread "
            "(Python only lets the main thread install signal handlers)"
        )
    for sig in wanted:
        if sig in _UNCATCHABLE:
            raise _uncatchable(sig)
    return wanted


def _uncatchable(sig: signal.Signals) -> ValueError:
    return ValueError(
        f"save_on_signal names {sig.name}, which cannot be caught; pass signals a job is "
        "warned with, such as signal.SIGTERM or signal.SIGUSR1"
    )


class SignalFlag:
    """Records the first of `signals` to arrive; truthy from then on.

    Install it from the main thread; `uninstall()` puts the previous handlers back.

    >>> import signal, os
    >>> flag = SignalFlag([signal.SIGUSR1])
    >>> bool(flag), flag.received
    (False, None)
    >>> os.kill(os.getpid(), signal.SIGUSR1)
    >>> bool(flag), flag.received
    (True, 'SIGUSR1')
    >>> flag.uninstall()
    """

    def __init__(self, signals: int | Iterable[int]) -> None:
        wanted = check_signals(signals)
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        for sig in wanted:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (OSError, ValueError):  # one this platform does not let a process catch
                self.uninstall()  # the handlers installed so far, as if none had been
                raise _uncatchable(sig) from None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received == sig.name:  # asked twice: behave as if we were never installed
            signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.received = sig.name

    def __bool__(self) -> bool:
        return self.received is not None

    def uninstall(self) -> None:
        """Put back the handlers that were there before."""
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may; it will be gone with the process anyway
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
