"""The background writer: one job at a time, close() finishes the job in flight, errors kept."""

from __future__ import annotations

import sys
import threading
import time
import warnings

import pytest

from haltpoint.store.background import BackgroundWriter, warn_user


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
