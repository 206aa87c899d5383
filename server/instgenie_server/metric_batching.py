"""Custom-metric updates kept in memory and sent to the server in batches, off the step loop.

In python_backend every ``Metric.set``/``increment``/``observe`` is a synchronous round
trip to the server process, and each one wakes the server thread that reads the stub's
messages. The step loop reports about five per step (step counters, the step-duration
histogram, the load gauges); on a few-core CPU those round trips and wake-ups preempt
the loop's OpenMP team and stretched a served masked edit by ~6% against the same edit
in process (``docs/benchmarks/serving.md``). A :class:`MetricFlusher` keeps the updates
instead and sends them every ``interval_s`` from a thread of its own: counter
increments summed, only a gauge's last value, histogram
observations all of them. Prometheus scrapes at intervals of seconds and the router
every 0.5 s, so a batch every 0.2 s shows them the same series. The step loop also
flushes just before it answers a request (``LoopObserver.flush``): a client that reads
the metrics after its answer finds the request counted, as without batching.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

log = logging.getLogger(__name__)


class Metric(Protocol):
    """What a flusher sends to: a ``LockedMetric`` (one pb_utils metric series)."""

    def set(self, value: float) -> None: ...

    def increment(self, value: float) -> None: ...

    def observe(self, value: float) -> None: ...


class BatchedMetric:
    """One series' updates since the last flush; same methods as the series."""

    def __init__(self, metric: Metric, flusher: "MetricFlusher") -> None:
        self._metric = metric
        self._flusher = flusher
        self._gauge: float | None = None  # the last value set, not sent yet
        self._increment = 0.0
        self._observations: list[float] = []

    def set(self, value: float) -> None:
        with self._flusher.lock:
            self._gauge = value
            self._flusher.mark(self)

    def increment(self, value: float) -> None:
        with self._flusher.lock:
            self._increment += value
            self._flusher.mark(self)

    def observe(self, value: float) -> None:
        with self._flusher.lock:
            self._observations.append(value)
            self._flusher.mark(self)

    def take(self) -> tuple[float | None, float, list[float]]:
        """The pending updates, cleared; the caller holds the flusher's lock."""
        pending = (self._gauge, self._increment, self._observations)
        self._gauge, self._increment, self._observations = None, 0.0, []
        return pending

    def send(self, pending: tuple[float | None, float, list[float]]) -> None:
        gauge, increment, observations = pending
        if gauge is not None:
            self._metric.set(gauge)  # a LockedMetric drops a value the server holds already
        if increment:
            self._metric.increment(increment)
        for value in observations:
            self._metric.observe(value)


class MetricFlusher:
    """Sends its :class:`BatchedMetric` series' updates every ``interval_s`` from one daemon thread."""

    def __init__(self, interval_s: float, name: str = "instgenie-metrics") -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.lock = threading.Lock()  # guards every series' pending updates
        self._dirty: dict[int, BatchedMetric] = {}
        self._flushing = threading.Lock()  # one flush at a time: the thread's or close()'s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def batched(self, metric: Metric) -> BatchedMetric:
        return BatchedMetric(metric, self)

    def mark(self, series: BatchedMetric) -> None:
        """``series`` has updates to send; the caller holds :attr:`lock`."""
        self._dirty[id(series)] = series

    def flush(self) -> None:
        """Send every pending update now."""
        with self._flushing:
            with self.lock:
                dirty, self._dirty = self._dirty, {}
                pending = [(series, series.take()) for series in dirty.values()]
            for series, updates in pending:
                try:
                    series.send(updates)
                except Exception:  # one series the server refuses must not stop the others
                    log.exception("metric update failed")

    def close(self) -> None:
        """Stop the thread and send what is pending (stop whatever reports first: later updates stay unsent)."""
        self._stop.set()
        self._thread.join(timeout=max(10 * self.interval_s, 1.0))
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()
