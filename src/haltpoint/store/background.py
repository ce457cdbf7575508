"""One background writer thread with back-pressure and errors that are never lost."""

from __future__ import annotations

import atexit
import os
import sys
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """Runs jobs one at a time off the training thread.

    At most one job is in flight: `submit` first waits for the previous one (back-pressure).
    An exception raised by a job is raised again by the next `submit`, `wait` or `close`. At
    interpreter exit a job still running is finished, and a failure is printed to stderr.
    The thread belongs to the process that made the writer: in a child made by `os.fork`,
    waiting for the parent's job raises `RuntimeError` (it would never finish there), and the
    child's exit leaves it to the parent.

    >>> writer = BackgroundWriter(name="doctest")
    >>> writer.submit(lambda: None, "a job")
    >>> writer.close()
    """

    def __init__(self, *, name: str = "haltpoint-writer") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pid = os.getpid()
        self._pending: Future[Any] | None = None
        self._pending_what = ""
        self._closed = False
        self.last_seconds: float | None = None
        """How long the last job that finished ran (None before one has)."""
        atexit.register(_finish_at_exit, weakref.ref(self))

    @property
    def pending(self) -> bool:
        """Whether a job was submitted and not yet waited for (running or done)."""
        return self._pending is not None

    @property
    def busy(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def submit(self, job: Callable[[], Any], what: str) -> None:
        """Wait for the job in flight (raising its error), then start `job` in the background."""
        if self._closed:
            raise RuntimeError("the background writer is closed; create a new Checkpointer")
        self.wait()

        def timed() -> Any:
            start = time.perf_counter()
            try:
                return job()
            finally:
                self.last_seconds = time.perf_counter() - start

        self._pending = self._executor.submit(timed)
        self._pending_what = what

    def wait(self) -> None:
        """Block until the job in flight is done; raise its error if it failed."""
        if self._pending is not None and os.getpid() != self._pid:
            raise RuntimeError(
                f"{self._pending_what} belongs to process {self._pid}, whose thread writes it; "
                f"this process ({os.getpid()}) was forked from it and cannot wait for it"
            )
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the job in flight, then stop the thread; raise its error if it failed."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)


def _finish_at_exit(ref: weakref.ReferenceType[BackgroundWriter]) -> None:
    writer = ref()
    if writer is None or writer._pending is None or writer._pid != os.getpid():
        return  # nothing in flight, or the job of the process this one was forked from
    what = writer._pending_what
    try:
        writer.close()
    except BaseException as exc:  # report, never swallow: the interpreter is exiting
        print(f"haltpoint: {what} did not complete before exit: {exc!r}", file=sys.stderr)
