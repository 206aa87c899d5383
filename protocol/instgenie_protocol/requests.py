"""Reading a request's inputs (:mod:`.names`) into the engine's :class:`~instgenie.requests.EditRequest`.

Triton checks declared datatypes and shapes before a model sees a request; these are
checked again because the same parsing serves every model (edit, sync front,
baseline) and a batched baseline request arrives with a batch dimension. Errors are
the engine's ``InvalidInput`` (reason ``invalid_input``, HTTP 400).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Callable

import numpy as np

from instgenie.errors import InvalidInput
from instgenie.requests import EditRequest

from .names import ACTIONS, INPUTS

__all__ = ["Getter", "ParsedRequest", "decode_blob", "parse_request"]

# Triton datatype -> numpy kinds accepted for it
_KINDS = {"BYTES": "OSU", "INT64": "iu", "INT32": "iu", "FP32": "f", "BOOL": "b"}
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")

#: ``get(name)``: the input tensor of that name as a numpy array, or ``None`` if absent.
Getter = Callable[[str], "np.ndarray | None"]


@dataclass(frozen=True)
class ParsedRequest:
    """An edit/register request for the step loop, or a list request, plus response options."""

    action: str
    request: EditRequest
    progress: bool = False
    base64_output: bool = False


def decode_blob(data: bytes) -> bytes:
    """Image bytes, given raw or as base64 text (JSON/SSE clients can only send text).

    Neither: returned as is, for the image decoder to say what is wrong with it.
    """
    if not data or data.startswith(_IMAGE_MAGIC):
        return data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data


def parse_request(get: Getter, request_id: str) -> ParsedRequest:
    """Read the protocol's inputs from ``get(name)``."""
    action = (_text(get, "ACTION") or "edit").strip().lower()
    if action not in ACTIONS:
        raise InvalidInput(f"ACTION must be one of {', '.join(ACTIONS)}, got {action!r}")
    encoding = (_text(get, "OUTPUT_ENCODING") or "binary").strip().lower()
    if encoding not in ("binary", "base64"):
        raise InvalidInput(f"OUTPUT_ENCODING must be 'binary' or 'base64', got {encoding!r}")
    request = EditRequest(
        request_id=request_id,
        action=action,
        prompt=_text(get, "PROMPT") or "",
        mask=_blob(get, "MASK"),
        image=_blob(get, "IMAGE"),
        template_id=_text(get, "TEMPLATE_ID"),
        seed=_scalar(get, "SEED"),  # type: ignore[arg-type]
        steps=_scalar(get, "STEPS"),  # type: ignore[arg-type]
        guidance=_scalar(get, "GUIDANCE"),  # type: ignore[arg-type]
        full_compute=bool(_scalar(get, "FULL_COMPUTE") or False),
    )
    if action in ("edit", "register") and get("PROMPT") is None:
        raise InvalidInput(f"{action} needs PROMPT")
    return ParsedRequest(action, request, bool(_scalar(get, "PROGRESS") or False), encoding == "base64")


def _scalar(get: Getter, name: str) -> object | None:
    array = get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidInput(f"{name} must hold exactly one element, got shape {list(array.shape)}")
    kind = _KINDS[INPUTS[name]]
    if array.dtype.kind not in kind:
        raise InvalidInput(f"{name} must be {INPUTS[name]}, got {array.dtype}")
    value = array.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _text(get: Getter, name: str) -> str | None:
    value = _scalar(get, name)
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{name} is not valid UTF-8 text") from exc


def _blob(get: Getter, name: str) -> bytes | None:
    value = _scalar(get, name)
    if value is None:
        return None
    return decode_blob(value.encode() if isinstance(value, str) else bytes(value))
