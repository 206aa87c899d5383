"""The stub's outbox: calls to the server leave the step loop's thread in posted order."""

from __future__ import annotations

import threading
import time

from instgenie_server.outbox import Outbox


def test_calls_run_in_posted_order_off_the_posting_thread() -> None:
    outbox, seen, threads = Outbox(), [], set()
    try:
        for index in range(200):
            outbox.post(lambda i=index: (seen.append(i), threads.add(threading.current_thread().name)))
        assert outbox.drain(10)
    finally:
        outbox.close(5)
    assert seen == list(range(200))
    assert threads == {"instgenie-outbox"}


def test_a_failing_call_is_logged_and_the_rest_still_run(caplog) -> None:
    outbox, seen = Outbox(), []
    try:
        outbox.post(seen.append, 1)
        outbox.post(lambda: 1 / 0)
        outbox.post(seen.append, 2)
        assert outbox.drain(10)
    finally:
        outbox.close(5)
    assert seen == [1, 2]
    assert "ZeroDivisionError" in caplog.text


def test_drain_has_a_deadline_and_close_runs_later_calls_inline() -> None:
    release, outbox, seen = threading.Event(), Outbox(), []
    outbox.post(release.wait, 30)  # a round trip that hangs
    outbox.post(seen.append, "queued behind it")
    started = time.monotonic()
    assert outbox.drain(0.2) is False
    assert 0.2 <= time.monotonic() - started < 5
    outbox.close(0.2)  # gives up on the hung call: the stub is going away
    release.set()
    outbox.post(seen.append, "after close")  # e.g. requests failed while the model unloads
    assert seen == ["after close"]
