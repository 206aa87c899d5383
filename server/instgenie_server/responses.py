"""A step-loop job sink that answers through a Triton decoupled response sender."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from instgenie.errors import InstGenIEError
from instgenie.step_loop import JobOutcome
from instgenie_protocol import error_code, error_message

from .outbox import Outbox
from .tensors import outcome_outputs, progress_outputs

log = logging.getLogger(__name__)

def triton_error(pb_utils: Any, request_id: str, error: InstGenIEError) -> Any:
    return triton_error_from_text(pb_utils, error_message(request_id, error.reason, str(error)), error.reason)


def triton_error_from_text(pb_utils: Any, text: str, reason: str) -> Any:
    """A ``pb_utils.TritonError`` with the status :func:`~instgenie_protocol.error_code` gives ``reason``."""
    code = getattr(pb_utils.TritonError, error_code(reason), pb_utils.TritonError.INTERNAL)
    return pb_utils.TritonError(text, code)


def response(pb_utils: Any, outputs: dict[str, np.ndarray]) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()])


# The step loop and the worker threads answer different requests at the same time;
# every call into the stub's sender is serialized here (each is a short IPC message).
_SENDER_LOCK = threading.Lock()


class TritonJobSink:
    """Progress responses (when asked for) and exactly one final response per request.

    ``is_cancelled`` is a round trip to the server: ``cancelled()`` asks it at most every
    ``cancel_poll_s`` and answers from the last reply in between (the loop asks every
    step). With an :class:`~instgenie_server.outbox.Outbox` every message to the server
    goes through it, so the step loop never waits on a round trip: responses are sent in
    the order posted, and a query's reply is seen one step later. A cancellation is
    never missed, only seen up to ``cancel_poll_s`` (plus a step) late.
    """

    def __init__(
        self,
        pb_utils: Any,
        request: Any,
        request_id: str,
        *,
        progress: bool,
        base64_output: bool,
        outbox: Outbox | None = None,
        cancel_poll_s: float = 0.0,
    ) -> None:
        self._pb = pb_utils
        self._request = request  # keeps the request alive until it is answered
        self._sender = request.get_response_sender()
        self.request_id = request_id
        self._progress = progress
        self._base64_output = base64_output
        self._outbox = outbox
        # The server deletes the response factory when it sends the final response
        # (python_backend ResponseSendDecoupled); is_cancelled() asks about that factory,
        # so nothing touches the sender once the final response is out.
        self._closed = False
        self._cancelled = False
        self._asking = False  # a cancellation query is in the outbox
        self._cancel_poll_s = cancel_poll_s
        self._asked_at = float("-inf")

    def cancelled(self) -> bool:
        now = time.monotonic()
        if self._cancelled or now - self._asked_at < self._cancel_poll_s:
            return self._cancelled
        self._asked_at = now
        if self._outbox is None:
            self._cancelled = self._ask_cancelled()
        elif not self._asking:
            self._asking = True
            self._outbox.post(self._refresh_cancelled)
        return self._cancelled

    def progress(self, step: int, total_steps: int) -> None:
        if self._progress:
            self._post(self._send_outputs, progress_outputs(self.request_id, step, total_steps), 0)

    def finish(self, outcome: JobOutcome) -> None:
        self._post(self._send_outputs, outcome_outputs(outcome, self._base64_output), self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def send_outputs(self, outputs: dict[str, np.ndarray]) -> None:
        """A final response outside the step loop (e.g. the template list)."""
        self._post(self._send_outputs, outputs, self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def fail(self, error: InstGenIEError) -> None:
        self._post(self._send_error, error)

    def _post(self, call: Any, *args: Any) -> None:
        if self._outbox is None:
            call(*args)
        else:
            self._outbox.post(call, *args)

    def _ask_cancelled(self) -> bool:
        with _SENDER_LOCK:
            return not self._closed and bool(self._sender.is_cancelled())

    def _refresh_cancelled(self) -> None:
        try:
            self._cancelled = self._cancelled or self._ask_cancelled()
        finally:
            self._asking = False

    def _send_outputs(self, outputs: dict[str, np.ndarray], flags: int) -> None:
        self._send(response(self._pb, outputs), flags)

    def _send_error(self, error: InstGenIEError) -> None:
        message = self._pb.InferenceResponse(error=triton_error(self._pb, self.request_id, error))
        self._send(message, self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _send(self, message: Any, flags: int = 0) -> None:
        with _SENDER_LOCK:
            if self._closed:
                log.warning("request %s: response after the final one dropped", self.request_id)
                return
            self._closed = bool(flags & self._pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            self._sender.send(message, flags=flags)
