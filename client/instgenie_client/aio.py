"""``asyncio`` client of ``instgenie_edit`` over :mod:`tritonclient.grpc.aio`.

Each job is its own gRPC stream (its own channel too, so a client object is not tied
to one event loop). The request side of the stream ends right after the one request:
Triton then ends the response side after the final response, which closes the stream
without any flag to watch. Cancelling the task that awaits a job cancels its stream,
and with it the request on the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import tritonclient.grpc.aio as grpcaio
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
    ResponseClock,
    new_request_id,
    register_inputs,
    request_inputs,
)
from .grpc_client import infer_inputs, response_outputs, stream_error
from instgenie_protocol import EDIT_MODEL

ProgressCallback = Callable[[Progress], "None | Awaitable[None]"]

_T = TypeVar("_T")


class AsyncInstGenIEClient:
    """Coroutine twin of :class:`~instgenie_client.InstGenIEClient` (same arguments, same errors).

    Cancel a request by cancelling the task awaiting it (``asyncio.CancelledError``, not
    :class:`JobCancelled`, comes out, as usual in asyncio).
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

    async def register_template(
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
        """Register a template; returns its id (see the blocking client)."""
        values = register_inputs(image, prompt, seed=seed, steps=steps, guidance=guidance, mask=mask)
        return str((await self._final(values, request_id or new_request_id()))["TEMPLATE"])

    async def list_templates(self) -> list[str]:
        """Ids of the templates the server holds."""
        return list((await self._final(request_inputs(action="list"), new_request_id()))["TEMPLATES"])

    async def edit(
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
        """Edit and return the result; ``on_progress`` (a function or a coroutine function) runs after every step."""
        updates = self.edit_stream(
            mask, prompt, template_id=template_id, image=image, seed=seed, steps=steps, guidance=guidance,
            full_compute=full_compute, request_id=request_id, progress=True,  # the stall clock hears every step
        )  # fmt: skip
        async with contextlib.aclosing(updates):
            async for update in updates:
                if isinstance(update, EditResult):
                    return update
                if on_progress is not None and (pending := on_progress(update)) is not None:
                    await pending
        raise AssertionError("edit_stream ends with an EditResult")  # it raises otherwise

    async def edit_stream(
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
        progress: bool = True,
    ) -> AsyncIterator[Progress | EditResult]:
        """Yield a :class:`Progress` per denoising step (unless ``progress=False``), then the :class:`EditResult`.

        Leaving the iteration early cancels the request once the generator is closed:
        wrap it in :func:`contextlib.aclosing` to make that immediate. Without progress
        the stall timeout counts the whole computation as silence.
        """
        request_id = request_id or new_request_id()
        values = request_inputs(
            template_id=template_id, image=image, mask=mask, prompt=prompt, seed=seed, steps=steps,
            guidance=guidance, full_compute=full_compute, progress=progress,
        )  # fmt: skip
        updates = self._responses(values, request_id)
        async with contextlib.aclosing(updates):
            async for update in updates:
                yield update if isinstance(update, Progress) else EditResult.from_outputs(update, request_id)

    async def _final(self, values: dict[str, Any], request_id: str) -> dict[str, Any]:
        updates = self._responses(values, request_id)
        async with contextlib.aclosing(updates):
            async for update in updates:
                if not isinstance(update, Progress):
                    return update
        raise AssertionError("_responses ends with the final outputs")  # it raises otherwise

    async def _responses(self, values: dict[str, Any], request_id: str) -> AsyncIterator[Progress | dict[str, Any]]:
        """One request on its own stream: progress updates, then the final outputs (last)."""
        clock = ResponseClock(self.timeout_s, self.stall_timeout_s)
        request = {"model_name": self.model, "inputs": infer_inputs(values), "request_id": request_id}

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request  # and end: Triton ends the stream after the final response

        client = grpcaio.InferenceServerClient(self.url)
        responses = None
        finished = False
        try:
            responses = client.stream_infer(requests())
            final: dict[str, Any] | None = None
            while True:
                try:
                    result, error = await _within(responses.__anext__(), clock, request_id)
                except StopAsyncIteration:
                    break
                clock.heard()
                if error is not None:
                    failure = stream_error(error, self.url, request_id)
                    if isinstance(failure, InstGenIEServerError) and failure.reason == "cancelled":
                        raise JobCancelled(request_id)
                    raise failure
                outputs = response_outputs(result)
                if "COMPUTED_TOKENS" in outputs or "TEMPLATES" in outputs:
                    final = outputs  # the protocol's final outputs; progress responses lack them
                elif "STEP" in outputs:
                    yield Progress(int(outputs["STEP"]), int(outputs["TOTAL_STEPS"]), request_id)
            if final is None:
                raise InstGenIEConnectionError(f"the stream to {self.url} ended before the request finished", request_id)
            finished = True
            yield final
        except (grpc.RpcError, InferenceServerException) as exc:
            raise InstGenIEConnectionError(f"the gRPC stream to {self.url} failed: {_describe(exc)}", request_id) from exc
        finally:
            if responses is not None and not finished:
                responses.cancel()  # cancels the request on the server too
            await client.close()


async def _within(step: Awaitable[_T], clock: ResponseClock, request_id: str) -> _T:
    """Await ``step`` until a limit of ``clock`` passes; then its :class:`RequestTimeout`."""
    left = clock.left_s()
    if left is None:
        return await step
    try:
        return await asyncio.wait_for(step, max(0.0, left))
    except asyncio.TimeoutError:
        raise clock.expired(request_id) from None


def _describe(exc: grpc.RpcError | InferenceServerException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
