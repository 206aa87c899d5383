"""Clients of the ``instgenie_edit`` Triton model (its wire: :mod:`instgenie_protocol`).

- :class:`InstGenIEClient`: blocking gRPC client; :meth:`~InstGenIEClient.submit` returns
  an :class:`EditJob` handle (progress, cancel, result).
- :class:`AsyncInstGenIEClient`: the same over ``asyncio``.
- :class:`SseInstGenIEClient`: HTTP server-sent events, standard library only.

The result and error types below are shared by all three and import nothing heavy;
the client classes load lazily (gRPC only when one is used).
"""

from __future__ import annotations

import importlib
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instgenie_protocol import ServerError, error_message

#: Seconds a request may take in all, and may go without any response, before a client
#: cancels it (a server that died silently must not hang a caller). A request waiting
#: in the server's queue hears nothing until it joins the batch: raise the stall
#: timeout where queues are long.
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_STALL_TIMEOUT_S = 120.0

#: An image argument: encoded PNG/JPEG bytes, or the path of such a file.
ImageSource = bytes | str | os.PathLike

_LAZY = {
    "InstGenIEClient": "grpc_client",
    "EditJob": "grpc_client",
    "AsyncInstGenIEClient": "aio",
    "SseInstGenIEClient": "http_client",
}

__all__ = [
    "AsyncInstGenIEClient",
    "EditJob",
    "EditResult",
    "ImageSource",
    "InstGenIEClient",
    "InstGenIEConnectionError",
    "InstGenIEServerError",
    "JobCancelled",
    "Progress",
    "RequestTimeout",
    "ResponseClock",
    "SseInstGenIEClient",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One finished denoising step of a running request."""

    step: int
    total_steps: int
    request_id: str


@dataclass(frozen=True)
class EditResult:
    """The final response of an edit."""

    image: bytes = field(repr=False)  # PNG
    request_id: str
    template_id: str | None  # None for an edit of a raw image computed in full; else the template it used
    computed_tokens: int
    num_tokens: int
    total_steps: int
    # Seconds per phase on the server (prepare, admission, steps, finish), when it says.
    timeline: dict[str, float] | None = field(default=None, compare=False)

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, Any], request_id: str) -> EditResult:
        """Build from a final response's outputs (scalars; ``EDITED_IMAGE`` already as PNG bytes)."""
        if "EDITED_IMAGE" not in outputs:
            raise InstGenIEServerError(request_id, "server_error", f"the final response has no EDITED_IMAGE: {sorted(outputs)}")
        template_id = outputs.get("TEMPLATE")
        return cls(
            image=outputs["EDITED_IMAGE"],
            request_id=str(outputs.get("REQUEST_ID") or request_id),
            template_id=None if template_id is None else str(template_id),
            computed_tokens=int(outputs["COMPUTED_TOKENS"]),
            num_tokens=int(outputs["NUM_TOKENS"]),
            total_steps=int(outputs["TOTAL_STEPS"]),
            timeline=json.loads(outputs["TIMELINE"]) if outputs.get("TIMELINE") else None,
        )


# -- errors -----------------------------------------------------------------------------


class InstGenIEServerError(ServerError, Exception):
    """The server answered a request with an error: ``.reason``, ``.request_id``, ``.message``.

    Build it with :meth:`ServerError.parse` from the error text
    (``[request <id>] <reason>: <message>``); text in another format gets reason
    ``server_error``.
    """


class JobCancelled(Exception):
    """The request was cancelled by this client before it finished."""

    def __init__(self, request_id: str) -> None:
        super().__init__(f"request {request_id} was cancelled")
        self.request_id = request_id


class InstGenIEConnectionError(ConnectionError):
    """The server could not be reached, or the connection broke before the final response.

    ``reason`` is ``unavailable`` (as a server's refusal to take work is): the request
    may be retried, here after a while or on another instance. The message names the
    request as server errors do: ``[request <id>] unavailable: ...``.
    """

    reason = "unavailable"

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(error_message(request_id, self.reason, message) if request_id else message)
        self.request_id = request_id


class RequestTimeout(TimeoutError):
    """No final response in time (``reason`` ``timeout``), or none at all for too long
    (``stalled``); the request was cancelled on the server."""

    def __init__(self, request_id: str, reason: str, message: str) -> None:
        super().__init__(error_message(request_id, reason, message))
        self.request_id = request_id
        self.reason = reason


class ResponseClock:
    """A request's two limits: its whole duration and the silence between two responses.

    Args:
        timeout_s: seconds from now to the final response (None: no limit).
        stall_timeout_s: seconds without any response (None: no limit).
    """

    def __init__(self, timeout_s: float | None, stall_timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._started = self._heard = time.monotonic()

    def heard(self) -> None:
        """A response arrived."""
        self._heard = time.monotonic()

    def left_s(self) -> float | None:
        """Seconds until a limit passes (<= 0: passed); None without limits."""
        now = time.monotonic()
        limits = []
        if self.timeout_s is not None:
            limits.append(self._started + self.timeout_s - now)
        if self.stall_timeout_s is not None:
            limits.append(self._heard + self.stall_timeout_s - now)
        return min(limits) if limits else None

    def expired(self, request_id: str) -> RequestTimeout:
        """The error for the limit that passed."""
        now = time.monotonic()
        if self.timeout_s is not None and now - self._started >= self.timeout_s - 1e-3:
            return RequestTimeout(
                request_id, "timeout", f"no final response within {self.timeout_s:g} s; the request was cancelled"
            )
        return RequestTimeout(
            request_id,
            "stalled",
            f"no response from the server for {self.stall_timeout_s:g} s (its step loop or connection may be dead); "
            "the request was cancelled",
        )


# -- request helpers shared by the clients ----------------------------------------------


def new_request_id() -> str:
    """A fresh request id (the server would make one too, but then we could not name it in errors)."""
    return uuid.uuid4().hex


def read_image(image: ImageSource) -> bytes:
    """Image bytes from bytes or a file path."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


def request_inputs(
    *,
    action: str | None = None,
    template_id: str | None = None,
    image: ImageSource | None = None,
    mask: ImageSource | None = None,
    prompt: str | None = None,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    full_compute: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Protocol input name -> value, only for what was given: every input is optional on
    the server, whose defaults (the template's settings) must win over ours."""
    values: dict[str, Any] = {
        "ACTION": action,
        "TEMPLATE_ID": template_id,
        "IMAGE": None if image is None else read_image(image),
        "MASK": None if mask is None else read_image(mask),
        "PROMPT": prompt,
        "SEED": None if seed is None else int(seed),
        "STEPS": None if steps is None else int(steps),
        "GUIDANCE": None if guidance is None else float(guidance),
        "FULL_COMPUTE": True if full_compute else None,
        "PROGRESS": True if progress else None,
    }
    return {name: value for name, value in values.items() if value is not None}


def register_inputs(
    image: ImageSource,
    prompt: str,
    *,
    seed: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    mask: ImageSource | None = None,
) -> dict[str, Any]:
    """The inputs of a registration (every client's ``register_template``)."""
    return request_inputs(
        action="register", image=image, prompt=prompt, seed=seed, steps=steps, guidance=guidance, mask=mask,
        progress=True,  # steps keep the stall clock from firing on a long recording
    )  # fmt: skip
