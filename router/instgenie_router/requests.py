"""What the router reads of a KServe v2 inference request: action, template, mask size.

The edit model's inputs (:mod:`instgenie_protocol.names`) travel either as raw bytes
(``raw_input_contents``, tritonclient's default: BYTES elements length-prefixed,
numbers little-endian) or as typed ``contents``; both are read. The mask is decoded
only to count the latent tokens it touches (:mod:`instgenie_protocol.tokens`, on the
instances' own token grid), the unit of their load gauge. An edit of a raw image is
keyed by the image's content hash for template affinity (:func:`image_affinity`).
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from instgenie_protocol import (
    DEFAULT_PIXELS_PER_TOKEN,
    check_template_id,
    decode_blob,
    error_message,
    image_work,
    mask_work,
    StepCost,
)

from .instances import RequestCost

__all__ = ["EditRequestInfo", "image_affinity", "input_values", "inspect", "inspect_json", "template_id_error"]

@dataclass(frozen=True)
class EditRequestInfo:
    action: str  # edit | register | list | other (a model other than the edit model)
    template_id: str | None
    cost: RequestCost


def inspect(
    request: object, default_steps: int = 28, pixels_per_token: int = DEFAULT_PIXELS_PER_TOKEN, cost: StepCost = StepCost()
) -> EditRequestInfo:
    """Routing facts of a ``ModelInferRequest``; its cost is ``cost``'s work on the instances' grid."""
    return _facts(input_values(request), default_steps, pixels_per_token, cost)


def inspect_json(
    body: dict, default_steps: int = 28, pixels_per_token: int = DEFAULT_PIXELS_PER_TOKEN, cost: StepCost = StepCost()
) -> EditRequestInfo:
    """Routing facts of a ``generate``/``generate_stream`` JSON body (inputs by name)."""
    values: dict[str, bytes] = {}
    for name, value in body.items():
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            values[name] = struct.pack("<i", value)
        elif isinstance(value, str):
            values[name] = value.encode()
    return _facts(values, default_steps, pixels_per_token, cost)


def _facts(values: dict[str, bytes], default_steps: int, pixels_per_token: int, cost: StepCost) -> EditRequestInfo:
    action = (values.get("ACTION") or b"edit").decode(errors="replace") if "ACTION" in values else "edit"
    template = values.get("TEMPLATE_ID")
    template_id = template.decode(errors="replace") if template else None
    steps = values.get("STEPS")
    step_count = int(np.frombuffer(steps, "<i4")[0]) if isinstance(steps, bytes) and len(steps) >= 4 else default_steps
    mask = values.get("MASK")
    tokens = _mask_work(mask, pixels_per_token, cost) if isinstance(mask, bytes) else 0.0
    affinity = template_id
    image = values.get("IMAGE")
    if action == "register" or (template_id is None and image):
        tokens = _image_work(image, pixels_per_token, cost) if isinstance(image, bytes) else tokens
        if action == "edit" and isinstance(image, bytes):
            affinity = image_affinity(image)
    steps = max(step_count, 1)
    return EditRequestInfo(action, template_id, RequestCost(max(tokens, 1.0) * steps, affinity, steps))


def image_affinity(image: bytes) -> str:
    """The routing key of an edit of a raw image: its content hash, so that every edit of
    one picture goes where its auto-registered template (instances record a raw image
    edited again, ``auto_register``) is; the same pixels in another encoding hash apart."""
    return "image-" + hashlib.sha256(decode_blob(image)).hexdigest()[:32]


def template_id_error(info: EditRequestInfo, request_id: str) -> str | None:
    """The error text for a request whose ``TEMPLATE_ID`` is not a template id (else ``None``).

    Checked here so that a path or other hostile value never reaches an instance.
    """
    if info.template_id is None:
        return None
    try:
        check_template_id(info.template_id)
    except LookupError as error:  # UnknownTemplate
        return error_message(request_id, "unknown_template", str(error))
    return None


def input_values(request: object) -> dict[str, bytes]:
    """First element of each input as bytes (BYTES: the element; numbers: raw little-endian)."""
    values: dict[str, bytes] = {}
    raw = list(getattr(request, "raw_input_contents", []))
    for index, tensor in enumerate(getattr(request, "inputs", [])):
        if index < len(raw):
            data = raw[index]
            if tensor.datatype == "BYTES":
                if len(data) >= 4:
                    (length,) = struct.unpack_from("<I", data)
                    values[tensor.name] = data[4 : 4 + length]
            else:
                values[tensor.name] = data
            continue
        contents = tensor.contents
        if contents.bytes_contents:
            values[tensor.name] = contents.bytes_contents[0]
        elif contents.int_contents:
            values[tensor.name] = struct.pack("<i", contents.int_contents[0])
        elif contents.int64_contents:
            values[tensor.name] = struct.pack("<q", contents.int64_contents[0])
    return values


def _decode(data: bytes) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(decode_blob(data)))  # raw, or base64 text (SSE/JSON clients)
        image.load()
        return image
    except Exception:  # a bad image is the instance's to refuse, with its clear error
        return None


def _mask_work(data: bytes, pixels_per_token: int, cost: StepCost) -> float:
    image = _decode(data)
    if image is None:
        return 0.0
    return mask_work(np.asarray(image.convert("L")) > 127, pixels_per_token, cost)


def _image_work(data: bytes, pixels_per_token: int, cost: StepCost) -> float:
    image = _decode(data)
    return 0.0 if image is None else image_work(*image.size, pixels_per_token, cost)
