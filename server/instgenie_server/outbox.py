"""One thread per stub that makes every round trip to the Triton server, in order.

In python_backend each response sent and each ``is_cancelled`` query is a
synchronous round trip to the server process through shared memory (0.1-1.5 ms
each). The step loop makes a few of them per step for every request in the batch
(progress responses, cancellation checks); made on its own thread they stretch every
step, which is most of a masked step on a GPU. Posted here they happen while the next
step computes. (Custom-metric updates, also round trips, are batched instead:
:mod:`~instgenie_server.metric_batching`.)

Calls run in the order they were posted, from any thread: a request's progress
responses go out before its final one.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


class Outbox:
    """A FIFO of calls run on one daemon thread; after :meth:`close` they run inline."""

    def __init__(self, name: str = "instgenie-outbox") -> None:
        self._calls: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, call: Callable[..., Any], *args: Any) -> None:
        """Run ``call(*args)`` on the outbox thread after everything posted before it."""
        with self._cond:
            if not self._closed:
                self._calls.append((call, args))
                self._cond.notify_all()
                return
        _run_logged(call, args)  # closing: the stub is going away, nothing may be lost

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` until every posted call has run."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._calls or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float) -> None:
        """Run what is queued (for up to ``timeout_s``); later posts run in the caller's thread."""
        if not self.drain(timeout_s):
            log.warning("outbox: %d calls to the server still queued after %.1f s; dropped", len(self._calls), timeout_s)
        with self._cond:
            self._closed = True
            self._calls.clear()
            self._cond.notify_all()
        self._thread.join(timeout=max(timeout_s, 0.1))

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._calls and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                call, args = self._calls.popleft()
                self._busy = True
            _run_logged(call, args)


def _run_logged(call: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        call(*args)
    except Exception:  # a client gone or a server refusing one message must not stop the rest
        log.exception("outbox: %s failed", getattr(call, "__qualname__", call))
