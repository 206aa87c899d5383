"""Clients of the ``instgenie_edit`` Triton model (see :mod:`instgenie_client.protocol`).

- :class:`InstGenIEClient`: blocking gRPC client; :meth:`~InstGenIEClient.submit` returns
  an :class:`EditJob` handle (progress, cancel, result).
- :class:`AsyncInstGenIEClient`: the same over ``asyncio``.
- :class:`SseInstGenIEClient`: HTTP server-sent events, standard library only.

The result and error types below are shared by all three and import nothing heavy:
the server's Python stub imports :mod:`instgenie_client.protocol`, which runs this
file, so the client classes load lazily (gRPC only when one is used).
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .protocol import ServerError

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
    template_id: str | None  # None for an edit of a raw image (full computation)
    computed_tokens: int
    num_tokens: int
    total_steps: int

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
    """The server could not be reached, or the connection broke before the final response."""


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
