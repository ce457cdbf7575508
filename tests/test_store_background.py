"""The background writer: one job at a time, close() finishes the job in flight, errors kept."""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
import weakref

import pytest

from haltpoint.store.background import BackgroundWriter, _finish_at_exit, warn_user


def test_close_waits_for_the_job_in_flight_and_it_completes() -> None:
    writer = BackgroundWriter(name="test-close")
    started, done = threading.Event(), []

    def slow() -> None:
        started.set()
        time.sleep(0.2)
        done.append(True)

    writer.submit(slow, "a slow job")
    assert started.wait(5) and writer.busy
    writer.close()
    assert done == [True] and not writer.busy
    assert writer.last_seconds is not None and writer.last_seconds >= 0.2


def test_close_raises_the_error_of_the_job_in_flight_then_refuses_new_jobs() -> None:
    writer = BackgroundWriter(name="test-error")

    def broken() -> None:
        time.sleep(0.05)
        raise OSError("disk gone")

    writer.submit(broken, "a broken job")
    with pytest.raises(OSError, match="disk gone"):
        writer.close()
    with pytest.raises(RuntimeError, match="closed; create a new Checkpointer"):
        writer.submit(lambda: None, "too late")


def test_submit_waits_for_the_previous_job_first() -> None:
    writer = BackgroundWriter(name="test-order")
    order: list[str] = []
    writer.submit(lambda: (time.sleep(0.1), order.append("first")), "first")
    writer.submit(lambda: order.append("second"), "second")
    assert order[0] == "first"  # back-pressure: the first was done before submit returned
    writer.close()
    assert order == ["first", "second"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_in_a_forked_child_the_job_in_flight_is_the_parent_s_and_nothing_waits_for_it() -> None:
    """The worker thread does not exist in a child made by `os.fork`: waiting there for the
    parent's job would hang forever, at `wait` or at interpreter exit."""
    writer = BackgroundWriter(name="test-fork")
    release = threading.Event()
    writer.submit(lambda: release.wait(30), "the parent's job")
    pid = os.fork()
    if pid == 0:  # the child: 0 when both return at once, 1 when wait() did not refuse
        code = 2
        try:
            _finish_at_exit(weakref.ref(writer))  # what the exit of the child runs
            try:
                writer.wait()
                code = 1
            except RuntimeError as exc:
                code = 0 if "belongs to process" in str(exc) else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    release.set()
    writer.close()
    assert done[0] == pid, "the child hung"
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_a_job_s_warning_points_at_the_line_that_submitted_it() -> None:
    writer = BackgroundWriter(name="test-warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer.submit(lambda: warn_user("from the job"), "a warning job")
        line = sys._getframe().f_lineno - 1
        writer.close()
        warn_user("from this thread")
        here = sys._getframe().f_lineno - 1
    assert [(str(w.message), w.filename, w.lineno) for w in caught] == [
        ("from the job", __file__, line),
        ("from this thread", __file__, here),
    ]
