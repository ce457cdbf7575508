"""One background writer thread with back-pressure and errors that are never lost."""

from __future__ import annotations

import atexit
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

    >>> writer = BackgroundWriter(name="doctest")
    >>> writer.submit(lambda: None, "a job")
    >>> writer.close()
    """

    def __init__(self, *, name: str = "haltpoint-writer") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[Any] | None = None
        self._pending_what = ""
        self._closed = False
        self.last_seconds: float | None = None
        """How long the last job that finished ran (None before one has)."""
        atexit.register(_finish_at_exit, weakref.ref(self))

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
    if writer is None or writer._pending is None:
        return
    what = writer._pending_what
    try:
        writer.close()
    except BaseException as exc:  # report, never swallow: the interpreter is exiting
        print(f"haltpoint: {what} did not complete before exit: {exc!r}", file=sys.stderr)
