"""Metric updates batched off the step loop: what reaches a series, and when.

The series here records the calls a flusher makes (the interface of a ``LockedMetric``);
``tests/test_metric_threads.py`` runs the same flusher inside a real Triton stub.
"""

from __future__ import annotations

import threading
import time

import pytest

from instgenie_server.metric_batching import MetricFlusher


class Series:
    """Records the calls, as a pb_utils series would receive them."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, float]] = []
        self.fail = fail

    def set(self, value: float) -> None:
        self._record("set", value)

    def increment(self, value: float) -> None:
        self._record("increment", value)

    def observe(self, value: float) -> None:
        self._record("observe", value)

    def _record(self, method: str, value: float) -> None:
        if self.fail:
            raise RuntimeError("the server refused the update")
        self.calls.append((method, value))


def _until(condition, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not so in time"
        time.sleep(0.01)


def test_a_batch_sums_increments_keeps_a_gauges_last_value_and_every_observation() -> None:
    flusher = MetricFlusher(interval_s=60)  # only explicit flushes here
    try:
        counter, gauge, histogram = Series(), Series(), Series()
        batched = [flusher.batched(series) for series in (counter, gauge, histogram)]
        for step in range(5):
            batched[0].increment(2)
            batched[1].set(float(step))
            batched[2].observe(step / 10)
        assert counter.calls == gauge.calls == histogram.calls == []  # nothing sent on the reporting thread
        flusher.flush()
        assert counter.calls == [("increment", 10.0)]
        assert gauge.calls == [("set", 4.0)]
        assert histogram.calls == [("observe", step / 10) for step in range(5)]

        batched[1].set(7.0)
        batched[1].set(5.0)
        flusher.flush()  # only the last value; series without updates hear nothing
        assert gauge.calls == [("set", 4.0), ("set", 5.0)] and counter.calls == [("increment", 10.0)]
    finally:
        flusher.close()


def test_updates_reach_the_series_within_the_interval_from_the_flusher_thread() -> None:
    seen: list[str] = []

    class Named(Series):
        def _record(self, method: str, value: float) -> None:
            seen.append(threading.current_thread().name)
            super()._record(method, value)

    series = Named()
    flusher = MetricFlusher(interval_s=0.05)
    try:
        flusher.batched(series).increment(1)
        started = time.monotonic()
        _until(lambda: series.calls == [("increment", 1.0)])
        assert time.monotonic() - started < 2.0  # a few intervals at most, on a loaded machine
        assert seen == ["instgenie-metrics"]
    finally:
        flusher.close()


def test_close_sends_what_is_pending_and_a_refused_series_spares_the_others(caplog) -> None:  # type: ignore[no-untyped-def]
    refused, kept = Series(fail=True), Series()
    flusher = MetricFlusher(interval_s=60)
    flusher.batched(refused).increment(1)
    flusher.batched(kept).observe(0.5)
    flusher.close()
    assert kept.calls == [("observe", 0.5)]
    assert "metric update failed" in caplog.text


def test_increments_from_many_threads_are_counted_exactly() -> None:
    series = Series()
    flusher = MetricFlusher(interval_s=0.001)  # flushes racing the increments
    batched = flusher.batched(series)

    def report() -> None:
        for _ in range(2000):
            batched.increment(1)

    threads = [threading.Thread(target=report) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    flusher.close()
    assert sum(value for _, value in series.calls) == 8 * 2000


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        MetricFlusher(interval_s=0)
