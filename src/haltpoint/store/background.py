"""One background writer thread with back-pressure and errors that are never lost."""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = ["BackgroundWriter", "warn_user"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../haltpoint
_job = threading.local()  # on a writer's thread: `site`, where the job in flight came from


@dataclass(frozen=True)
class _Site:
    """A line of the user's code, as `warnings.warn` would name it."""

    filename: str
    lineno: int
    globals: dict[str, Any]


def _user_site(frame: FrameType | None) -> _Site | None:
    """The first frame from `frame` outward that is not haltpoint's own code, or None."""
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE + os.sep):
        frame = frame.f_back
    return (
        None if frame is None else _Site(frame.f_code.co_filename, frame.f_lineno, frame.f_globals)
    )


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` pointing at the user's code: the first caller outside
    haltpoint; on a `BackgroundWriter`'s thread, the line that submitted the job (that thread's
    own callers are `concurrent.futures`)."""
    site = getattr(_job, "site", None) or _user_site(sys._getframe(1))
    if site is None:  # called from nothing but haltpoint (an atexit hook)
        warnings.warn(message, category, stacklevel=2)
        return
    warnings.warn_explicit(
        message,
        category,
        site.filename,
        site.lineno,
        module=site.globals.get("__name__", "<string>"),
        registry=site.globals.setdefault("__warningregistry__", {}),
    )  # no module_globals: warnings asks its __loader__ for the source, and the loader of
    # `python -c`, of stdin and of the REPL raises ImportError there instead of the warning


class BackgroundWriter:
    """Runs jobs one at a time off the training thread.

    At most one job is in flight: `submit` first waits for the previous one (back-pressure).
    An exception raised by a job is raised again by the next `submit`, `wait` or `close`. At
    interpreter exit a job still running is finished, and a failure is printed to stderr. A
    job's `warn_user` warnings point at the line of the user's code that submitted it.
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
        site = _user_site(sys._getframe(1))

        def timed() -> Any:
            start = time.perf_counter()
            _job.site = site
            try:
                return job()
            finally:
                _job.site = None
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
