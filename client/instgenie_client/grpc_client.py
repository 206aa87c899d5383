"""Blocking gRPC client of ``instgenie_edit``: one request per job, one stream per job.

Triton cancels every request on a gRPC stream when the stream is cancelled, so each
job opens its own :class:`tritonclient.grpc.InferenceServerClient` stream: cancelling a
job touches no other. Streams are always closed when a job settles, because an open
stream that carried a request keeps Triton from shutting down.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from . import (
    DEFAULT_STALL_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    EditResult,
    ImageSource,
    InstGenIEConnectionError,
    InstGenIEServerError,
    JobCancelled,
    Progress,
    RequestTimeout,
    ResponseClock,
    new_request_id,
    register_inputs,
    request_inputs,
)
from instgenie_protocol import EDIT_MODEL, INPUTS

ProgressCallback = Callable[[Progress], None]

_NUMPY_TYPES = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_, "BYTES": np.object_}


def infer_inputs(values: dict[str, Any]) -> list[grpcclient.InferInput]:
    """One-element tensors (the model has no batch dimension) typed as the protocol says."""
    inputs = []
    for name, value in values.items():
        datatype = INPUTS[name]
        if isinstance(value, str):
            value = value.encode()
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=_NUMPY_TYPES[datatype]))
        inputs.append(tensor)
    return inputs


def response_outputs(result: grpcclient.InferResult) -> dict[str, Any]:
    """A response's outputs as Python values: ``TEMPLATES`` a list of str, other texts str,
    ``EDITED_IMAGE`` bytes, numbers int."""
    outputs: dict[str, Any] = {}
    for output in result.get_response().outputs:
        array = result.as_numpy(output.name).reshape(-1)
        if output.name == "TEMPLATES":
            outputs[output.name] = [bytes(item).decode() for item in array]
        elif output.name == "EDITED_IMAGE":
            outputs[output.name] = bytes(array[0])
        elif array.dtype == np.object_:
            outputs[output.name] = bytes(array[0]).decode()
        else:
            outputs[output.name] = array[0].item()
    return outputs


def is_final(result: grpcclient.InferResult) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


def stream_error(error: InferenceServerException, url: str, request_id: str) -> Exception:
    """An error the stream reported: a server error response (no gRPC status), else transport."""
    if error.status() is None:
        parsed = InstGenIEServerError.parse(error.message() or str(error))
        return parsed if parsed.request_id else dataclasses.replace(parsed, request_id=request_id)
    return InstGenIEConnectionError(f"the gRPC stream to {url} failed: {error.message()}", request_id)


class EditJob:
    """A running request: wait with :meth:`result`, stop with :meth:`cancel`, watch with :attr:`progress`.

    Responses arrive on tritonclient's reader thread, which only queues them; a
    dispatcher thread of the job runs ``on_progress`` callbacks and closes the stream,
    so a callback may call :meth:`cancel` (the reader thread could not close its own
    stream), and a callback that raises cancels the job and its exception comes out of
    :meth:`result`. Use the job as a context manager to cancel it on any way out.
    """

    def __init__(
        self,
        url: str,
        model: str,
        values: dict[str, Any],
        request_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        clock: ResponseClock | None = None,
    ) -> None:
        self.request_id = request_id
        self._url = url
        self._on_progress = on_progress
        self._clock = clock or ResponseClock(None, None)
        self._events: queue.Queue[Progress | dict[str, Any] | Exception] = queue.Queue()
        self._progress: queue.Queue[Progress | None] = queue.Queue()
        self._lock = threading.Lock()  # orders cancel() against settling
        self._cancelled = False
        self._settled = False
        self._done = threading.Event()
        self._outcome: dict[str, Any] | BaseException | None = None
        self._client = grpcclient.InferenceServerClient(url)
        try:
            self._client.start_stream(callback=self._on_response)
            self._client.async_stream_infer(
                model, infer_inputs(values), request_id=request_id, enable_empty_final_response=True
            )
        except InferenceServerException:
            # The stream broke already (server unreachable): tritonclient hands the cause
            # to our callback, so the dispatcher settles the job with it.
            pass
        except BaseException:  # e.g. Ctrl-C: no stream may outlive the constructor
            self._client.stop_stream(cancel_requests=True)
            self._client.close()
            raise
        threading.Thread(target=self._dispatch, name=f"instgenie-job-{request_id}", daemon=True).start()

    # -- public -----------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> EditResult:
        """Wait for the edited image.

        Args:
            timeout: seconds to wait now (default: until the client's ``timeout_s``
                since the start, or ``stall_timeout_s`` without any response, passes).

        Raises:
            InstGenIEServerError: the server refused or failed the request.
            JobCancelled: :meth:`cancel` was called before the job finished.
            RequestTimeout: (a ``TimeoutError``) no final response in time, or no
                response for too long; the job is cancelled.
            InstGenIEConnectionError: the server is unreachable or the stream broke.
        """
        return EditResult.from_outputs(self.outputs(timeout), self.request_id)

    def outputs(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the final response and return its outputs (see :meth:`result`)."""
        try:
            if timeout is not None:
                finished = self._done.wait(timeout)
                expired = None if finished else RequestTimeout(
                    self.request_id, "timeout", f"no final response within {timeout:g} s; the request was cancelled"
                )
            else:
                while not (finished := self._done.wait(self._clock.left_s())):
                    left = self._clock.left_s()
                    if left is not None and left <= 0:
                        break
                expired = None if finished else self._clock.expired(self.request_id)
        except BaseException:  # Ctrl-C while waiting: do not leave the request running
            self.cancel()
            raise
        if expired is not None:
            self.cancel()
            raise expired
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome

    def cancel(self) -> bool:
        """Cancel the request on the server; ``False`` if the job had already finished.

        Once it returns ``True``, :meth:`result` raises :class:`JobCancelled`.
        """
        with self._lock:
            if self._settled or self._cancelled:
                return False
            self._cancelled = True
            self._client.stop_stream(cancel_requests=True)
        return True

    @property
    def progress(self) -> Iterator[Progress]:
        """Progress updates as they arrive; the iteration ends when the job finishes."""
        while (update := self._progress.get()) is not None:
            yield update

    def done(self) -> bool:
        """Whether the job has finished (with a result, an error or a cancellation)."""
        return self._done.is_set()

    def __enter__(self) -> EditJob:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    # -- threads ------------------------------------------------------------------------------
    def _on_response(self, result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
        """tritonclient's reader thread: classify and queue, nothing else (it must never block)."""
        self._clock.heard()
        if error is not None:
            self._events.put(stream_error(error, self._url, self.request_id))
        elif result is not None:
            outputs = response_outputs(result)
            if is_final(result):
                self._events.put(outputs)
            elif "STEP" in outputs:
                self._events.put(Progress(int(outputs["STEP"]), int(outputs["TOTAL_STEPS"]), self.request_id))

    def _dispatch(self) -> None:
        callback_error: Exception | None = None
        while isinstance(event := self._events.get(), Progress):
            if self._cancelled:
                continue
            self._progress.put(event)
            if self._on_progress is None:
                continue
            try:
                self._on_progress(event)
            except Exception as exc:  # whatever the caller's callback raises ends the job, in result()
                callback_error = exc
                self.cancel()
        try:
            with self._lock:
                if callback_error is not None:
                    self._outcome = callback_error
                elif self._cancelled or (isinstance(event, InstGenIEServerError) and event.reason == "cancelled"):
                    self._outcome = JobCancelled(self.request_id)
                else:
                    self._outcome = event
                self._settled = True
                # Half-close (Triton then ends the stream: the request has finished), or just
                # release the channel after a cancel.
                self._client.close()
        finally:  # waiters must wake even if closing failed
            self._done.set()
            self._progress.put(None)


class InstGenIEClient:
    """Blocking client of the ``instgenie_edit`` model over gRPC.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
        model: the decoupled edit model's name.
        timeout_s: seconds a request may take before it is cancelled (None: no limit).
        stall_timeout_s: seconds a request may go without any response (a progress
            step included) before it is cancelled (None: no limit). Requests always
            stream their steps, so a live server is never silent that long while it
            computes; a request queued behind others is, until it joins.
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        *,
        model: str = EDIT_MODEL,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.model = model
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s

    def register_template(
        self,
        image: ImageSource,
        prompt: str,
        *,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        mask: ImageSource | None = None,
        request_id: str | None = None,
    ) -> str:
        """Run the template once on the server and cache it; returns its id.

        Registration is idempotent: the same image, prompt, mask and settings give the same id.
        """
        values = register_inputs(image, prompt, seed=seed, steps=steps, guidance=guidance, mask=mask)
        return str(self._start(values, request_id, None).outputs()["TEMPLATE"])

    def list_templates(self) -> list[str]:
        """Ids of the templates the server holds."""
        return list(self._start(request_inputs(action="list"), None, None).outputs()["TEMPLATES"])

    def edit(
        self,
        mask: ImageSource,
        prompt: str,
        *,
        template_id: str | None = None,
        image: ImageSource | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        full_compute: bool = False,
        request_id: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> EditResult:
        """Edit the white region of ``mask`` on a registered template (or a raw ``image``) and wait.

        ``on_progress`` runs on a job thread after every denoising step. Raises as
        :meth:`EditJob.result`; interrupting the wait (Ctrl-C) cancels the request.
        """
        values = request_inputs(
            template_id=template_id, image=image, mask=mask, prompt=prompt, seed=seed, steps=steps,
            guidance=guidance, full_compute=full_compute, progress=True,
        )  # fmt: skip
        with self._start(values, request_id, on_progress) as job:
            return job.result()

    def submit(
        self,
        mask: ImageSource,
        prompt: str,
        *,
        template_id: str | None = None,
        image: ImageSource | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        full_compute: bool = False,
        request_id: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> EditJob:
        """Start an edit (arguments as :meth:`edit`) and return its handle at once.

        The job always streams progress, for :attr:`EditJob.progress` and ``on_progress``.
        """
        values = request_inputs(
            template_id=template_id, image=image, mask=mask, prompt=prompt, seed=seed, steps=steps,
            guidance=guidance, full_compute=full_compute, progress=True,
        )  # fmt: skip
        return self._start(values, request_id, on_progress)

    def _start(self, values: dict[str, Any], request_id: str | None, on_progress: ProgressCallback | None) -> EditJob:
        return EditJob(
            self.url,
            self.model,
            values,
            request_id or new_request_id(),
            on_progress=on_progress,
            clock=ResponseClock(self.timeout_s, self.stall_timeout_s),
        )
