"""How often the edit model asks the server whether a request was cancelled.

``is_cancelled`` on a decoupled response sender is a round trip from the stub to the
server; the step loop asks every step, so :class:`TritonJobSink` asks the sender at most
every ``cancel_poll_s`` and answers from its last reply in between. The sender here
counts the questions (the one method the sink asks); that a real cancellation still
lands is tested against real servers (``test_client.py``, ``test_openai_api.py``).
"""

from __future__ import annotations

import time

from instgenie_server.responses import TritonJobSink


class CountingSender:
    def __init__(self) -> None:
        self.asked = 0
        self.cancelled = False

    def is_cancelled(self) -> bool:
        self.asked += 1
        return self.cancelled


class Request:
    def __init__(self, sender: CountingSender) -> None:
        self._sender = sender

    def get_response_sender(self) -> CountingSender:
        return self._sender


def _sink(sender: CountingSender, cancel_poll_s: float) -> TritonJobSink:
    return TritonJobSink(None, Request(sender), "r1", progress=False, base64_output=False, cancel_poll_s=cancel_poll_s)


def test_cancellation_is_asked_at_most_once_per_poll_interval_and_never_missed() -> None:
    sender = CountingSender()
    sink = _sink(sender, cancel_poll_s=0.5)
    assert not any(sink.cancelled() for _ in range(100))  # a step loop asking every step
    assert sender.asked == 1
    sender.cancelled = True
    assert not sink.cancelled()  # within the interval: the last reply
    deadline = time.monotonic() + 5
    while not sink.cancelled():
        assert time.monotonic() < deadline, "the cancellation was never seen"
        time.sleep(0.01)
    assert 2 <= sender.asked <= 3  # one more question per interval, not one per call
    asked = sender.asked
    assert all(sink.cancelled() for _ in range(10)) and sender.asked == asked  # cancelled for good: no more questions


def test_a_zero_interval_asks_every_time() -> None:
    sender = CountingSender()
    sink = _sink(sender, cancel_poll_s=0.0)
    for _ in range(5):
        sink.cancelled()
    assert sender.asked == 5
