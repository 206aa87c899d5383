"""The OpenAI Images API on the router: ``POST /v1/images/edits``, ``GET /v1/models``,
and the templates a browser may pick from (``GET /v1/templates``, ``.../<id>/image``).

An edit arrives as the API's multipart form and leaves as one KServe ``generate_stream``
request per image (``n``) to the instance the policy picks, exactly what
:class:`~instgenie_client.SseInstGenIEClient` sends; the instance's server-sent events
come back as the API's: ``image_edit.progress`` after every denoising step (InstGenIE's
own event type: the API defines none for progress), then ``image_edit.completed`` with
the PNG. A client that goes away (a closed stream, or a closed connection while it
waits for the JSON answer) closes the upstream connections, which cancels the edits on
the instances.

Masks: the API's convention (a mask with alpha: fully transparent = edit; without a
mask, the image's own transparency) and InstGenIE's (a mask without alpha: white =
edit) are both accepted; the instance always receives the latter. Errors are the API's
``{"error": {"message", "type", "param", "code"}}``: 4xx for the client's mistakes,
429 when the router or an instance is full, 503 when no instance can serve.
"""

from __future__ import annotations

import base64
import contextlib
import email.parser
import email.policy
import io
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any

from PIL import Image

from instgenie_protocol import EDIT_MODEL, ServerError, check_template_id, decode_blob, http_status, json_error_text, sse_data, sse_event

from .grpc_proxy import NoInstance, Overloaded
from .http_proxy import open_routed
from .requests import input_values, inspect_json

if TYPE_CHECKING:
    import http.client

    from .service import Router

__all__ = ["OpenAIError", "OpenEdits", "EditForm", "parse_edit_form", "handle_edit", "handle_models", "handle_templates"]

log = logging.getLogger("instgenie.router")

_GENERATE_STREAM = f"/v2/models/{EDIT_MODEL}/generate_stream"
_FIELDS = {"image", "image[]", "mask", "prompt", "n", "size", "response_format", "user", "stream", "model", "seed",
           "steps", "guidance", "template_id", "output_format", "quality", "background", "partial_images"}  # fmt: skip
# Accepted and ignored: what the API lets a client ask for that has only one answer here.
_ONE_ANSWER = {"output_format": "png", "quality": "auto", "background": "opaque"}
_POLL_S = 0.25  # how often a waiting handler checks that its client is still there
# Instance error reason -> (HTTP status, the request field it is about)
_REASONS: dict[str, tuple[int, str | None]] = {
    "invalid_image": (400, "image"),
    "image_too_large": (400, "image"),
    "invalid_mask": (400, "mask"),
    "unknown_template": (404, "template_id"),
    "template_mismatch": (400, "template_id"),
    "queue_full": (429, None),
    "overloaded": (429, None),
}


@dataclass
class OpenAIError(Exception):
    """An error answered in the API's shape."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @property
    def type(self) -> str:
        if self.status == 429:
            return "rate_limit_error"
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_instance(cls, text: str) -> "OpenAIError":
        """An instance's error text (``[request <id>] <reason>: <what>``) in the API's shape."""
        error = ServerError.parse(text)
        status, param = _REASONS.get(error.reason, (http_status(error.reason), None))
        return cls(status, f"{error.message} (request {error.request_id})" if error.request_id else error.message,
                   param, error.reason)  # fmt: skip


@dataclass(frozen=True)
class EditForm:
    """A checked ``/v1/images/edits`` request; ``mask`` is a PNG in InstGenIE's convention."""

    prompt: str
    mask: bytes
    image: bytes | None  # None: an edit of ``template_id``
    template_id: str | None
    n: int
    stream: bool
    seed: int | None
    steps: int | None
    guidance: float | None
    user: str | None
    size: str  # "WxH" of the image, or "auto" (a template edit)

    def kserve_body(self, index: int, request_id: str) -> dict[str, Any]:
        """The ``generate_stream`` body of image ``index`` (seeds ``seed + index``)."""
        body: dict[str, Any] = {"id": request_id, "ACTION": "edit", "PROMPT": self.prompt, "PROGRESS": True,
                                "OUTPUT_ENCODING": "base64", "MASK": base64.b64encode(self.mask).decode()}  # fmt: skip
        if self.template_id is not None:
            body["TEMPLATE_ID"] = self.template_id
        else:
            assert self.image is not None
            body["IMAGE"] = base64.b64encode(self.image).decode()
        if self.seed is not None:
            body["SEED"] = self.seed + index
        elif index:  # the first image keeps the instance's default seed (the template's), the others differ
            body["SEED"] = index
        if self.steps is not None:
            body["STEPS"] = self.steps
        if self.guidance is not None:
            body["GUIDANCE"] = self.guidance
        return body


# -- reading the form -----------------------------------------------------------------------
def parse_edit_form(content_type: str, body: bytes, *, max_images: int, max_pixels: int) -> EditForm:
    """Check a multipart ``/v1/images/edits`` body.

    Raises:
        OpenAIError: what is wrong, with the field it is about.
    """
    if not content_type.lower().startswith("multipart/form-data"):
        raise OpenAIError(400, f"expected a multipart/form-data body, got {content_type or 'none'!r}")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise OpenAIError(400, "the multipart body could not be read (boundary missing or wrong)")
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        if name not in _FIELDS:
            raise OpenAIError(400, f"unknown field {name!r}", name, "unknown_parameter")
        fields["image" if name == "image[]" else name] = part.get_payload(decode=True) or b""
    text = {name: value.decode("utf-8", "replace").strip() for name, value in fields.items() if name not in ("image", "mask")}
    for name, only in _ONE_ANSWER.items():
        if name in text and text[name] not in (only, "auto"):
            raise OpenAIError(400, f"{name} {text[name]!r} is not supported; InstGenIE answers {only}", name, "unsupported_value")
    if text.get("model") not in (None, "", EDIT_MODEL):
        raise OpenAIError(404, f"model {text['model']!r} does not exist; this router serves {EDIT_MODEL!r}", "model", "model_not_found")
    if text.get("response_format") not in (None, "", "b64_json"):
        raise OpenAIError(400, "only response_format=b64_json is supported (no image URLs are hosted)", "response_format", "unsupported_value")
    prompt = text.get("prompt", "")
    if not prompt:
        raise OpenAIError(400, "prompt is required", "prompt", "missing_required_parameter")
    n = _integer(text, "n", 1, max_images) or 1
    template_id = text.get("template_id") or None
    if template_id is not None:
        try:
            check_template_id(template_id)
        except LookupError as exc:
            raise OpenAIError(400, str(exc).strip("'\""), "template_id", "invalid_template_id") from None
    image = None if template_id is not None else fields.get("image")
    if template_id is None and not image:
        raise OpenAIError(400, "image is required (or the extension field template_id)", "image", "missing_required_parameter")
    mask, image, size = _masks(image, fields.get("mask"), max_pixels)
    if text.get("size") not in (None, "", "auto", size):
        raise OpenAIError(400, f"size {text['size']!r}: InstGenIE edits at the image's own size ({size})", "size", "unsupported_value")
    guidance = None
    if text.get("guidance"):
        try:
            guidance = float(text["guidance"])
        except ValueError:
            raise OpenAIError(400, f"guidance must be a number, got {text['guidance']!r}", "guidance", "invalid_value") from None
    stream = text.get("stream", "false").lower()
    if stream not in ("true", "false", "1", "0"):
        raise OpenAIError(400, f"stream must be true or false, got {stream!r}", "stream", "invalid_value")
    return EditForm(
        prompt=prompt, mask=mask, image=image, template_id=template_id, n=n, stream=stream in ("true", "1"),
        seed=_integer(text, "seed", 0, 2**63 - 1), steps=_integer(text, "steps", 1, 10_000), guidance=guidance,
        user=text.get("user") or None, size=size,
    )  # fmt: skip


def _integer(text: dict[str, str], name: str, low: int, high: int) -> int | None:
    if not text.get(name):
        return None
    try:
        value = int(text[name])
    except ValueError:
        raise OpenAIError(400, f"{name} must be an integer, got {text[name]!r}", name, "invalid_value") from None
    if not low <= value <= high:
        raise OpenAIError(400, f"{name} must be in [{low}, {high}], got {value}", name, "invalid_value")
    return value


def _open_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open without decoding the pixels; their count is checked first (a decompression bomb never decodes)."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise OpenAIError(400, f"{name} is not an image PIL can read: {exc}", name, f"invalid_{name}") from None
    if image.width * image.height > max_pixels:
        raise OpenAIError(400, f"{name} is {image.width}x{image.height} = {image.width * image.height} pixels; "
                          f"the limit is {max_pixels}", name, "image_too_large")  # fmt: skip
    try:
        image.load()
    except Exception as exc:
        raise OpenAIError(400, f"{name} could not be decoded: {exc}", name, f"invalid_{name}") from None
    return image


def _has_alpha(image: Image.Image) -> bool:
    """Whether some pixel is not opaque: a browser canvas writes RGBA even when all are, and
    such a mask means what its colours say (white = edit), not what its alpha does."""
    if image.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in image.info:
        return False
    return image.convert("RGBA").getchannel("A").getextrema()[0] < 255


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _transparent(image: Image.Image) -> bytes:
    """The API's mask convention in ours: fully transparent pixels are the ones to edit."""
    alpha = image.convert("RGBA").getchannel("A")
    return _png(alpha.point(lambda a: 255 if a == 0 else 0))


def _masks(image_data: bytes | None, mask_data: bytes | None, max_pixels: int) -> tuple[bytes, bytes | None, str]:
    """(mask in our convention, the image to send, the image's size or "auto")."""
    image = None if image_data is None else _open_image(image_data, "image", max_pixels)
    size = "auto" if image is None else f"{image.width}x{image.height}"
    if mask_data:
        mask = _open_image(mask_data, "mask", max_pixels)
        converted = _transparent(mask) if _has_alpha(mask) else mask_data
    elif image is not None and _has_alpha(image):  # the API: no mask, the image's transparency is it
        converted = _transparent(image)
    else:
        raise OpenAIError(400, "mask is required (white = edit, or transparent = edit), unless the image has "
                          "transparency", "mask", "missing_required_parameter")  # fmt: skip
    if image is not None and _has_alpha(image):
        image_data = _png(image.convert("RGB"))  # the models read RGB; the alpha was the mask
    return converted, image_data, size


# -- one image of an edit, upstream -------------------------------------------------------------
class _Upstream(threading.Thread):
    """One ``generate_stream`` call: routed, read, its events put on the edit's queue."""

    def __init__(self, router: "Router", form: EditForm, index: int, events: queue.Queue) -> None:
        super().__init__(name=f"instgenie-openai-{index}", daemon=True)
        self.router, self.form, self.index, self.events = router, form, index, events
        self.request_id = f"oai-{uuid.uuid4().hex[:16]}"
        self._connection: http.client.HTTPConnection | None = None
        self._closed = threading.Event()

    def run(self) -> None:
        try:
            self._call()
        except OpenAIError as error:
            self.events.put(("error", self.index, error))
        except Exception as exc:  # never leave the handler waiting for an event that cannot come
            if self._closed.is_set():
                return
            log.warning("OpenAI edit %s: %s", self.request_id, exc)
            self.events.put(("error", self.index, OpenAIError(502, f"the instance stopped answering: {exc}", code="unavailable")))

    def _call(self) -> None:
        router = self.router
        body = self.form.kserve_body(self.index, self.request_id)
        cost = inspect_json(body, pixels_per_token=router.pool.pixels_per_token(), cost=router.pool.step_cost()).cost
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        try:
            instance, key, connection = open_routed(router, "POST", _GENERATE_STREAM, json.dumps(body).encode(), headers, cost)
        except NoInstance as exc:
            raise OpenAIError(503, f"no instance can serve the edit: {exc}", code="no_instance") from None
        self._connection = connection
        router.metrics.count("instgenie_router_routed_total", instance.name)
        deadline = time.monotonic() + router.config.request_timeout_s
        try:
            if self._closed.is_set():
                return
            response = connection.getresponse()
            if "text/event-stream" not in (response.getheader("Content-Type") or ""):
                raise OpenAIError.from_instance(json_error_text(response.read()))

            def readline() -> bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OpenAIError(504, f"no answer within the router's request timeout "
                                      f"({router.config.request_timeout_s:g} s)", code="timeout")  # fmt: skip
                assert connection.sock is not None
                connection.sock.settimeout(left)
                return response.readline()

            for event in sse_data(readline):
                if "error" in event:
                    raise OpenAIError.from_instance(str(event["error"]))
                if "EDITED_IMAGE" in event:
                    self.events.put(("completed", self.index, event))
                    return
                if "STEP" in event:
                    self.events.put(("progress", self.index, event))
            if not self._closed.is_set():
                raise OpenAIError(502, f"instance {instance.name} ended the stream before the edit finished", code="unavailable")
        finally:
            connection.close()
            router.pool.finish(instance, key)

    def close(self, reason: str | None = None) -> None:
        """Cancel: closing the connection makes Triton cancel the request on the instance.
        ``reason``: tell the client why (the router is stopping), as a 503."""
        if reason is not None and not self._closed.is_set():
            self.events.put(("error", self.index, OpenAIError(503, reason, code="shutting_down")))
        self._closed.set()
        connection = self._connection
        if connection is not None and connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)


class OpenEdits:
    """The OpenAI edits a router is running, so that stopping it cancels them."""

    def __init__(self) -> None:
        self._calls: set[_Upstream] = set()
        self._lock = threading.Lock()

    def add(self, calls: list[_Upstream]) -> None:
        with self._lock:
            self._calls.update(calls)

    def remove(self, calls: list[_Upstream]) -> None:
        with self._lock:
            self._calls.difference_update(calls)

    def close_all(self, reason: str) -> None:
        """Cancel every running edit upstream; its client hears ``reason`` (503)."""
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            call.close(reason)


# -- the handlers --------------------------------------------------------------------------------
def handle_edit(handler: BaseHTTPRequestHandler, router: "Router") -> None:
    """``POST /v1/images/edits``."""
    try:
        length = int(handler.headers.get("Content-Length") or -1)
        limit = router.config.max_upload_bytes
        if length < 0:
            raise OpenAIError(411, "a Content-Length is required", code="length_required")
        if length > limit:
            _discard(handler, length, limit)
            raise OpenAIError(413, f"the request is {length} bytes; the limit is {limit}", "image", "request_too_large")
        form = parse_edit_form(handler.headers.get("Content-Type", ""), handler.rfile.read(length),
                               max_images=router.config.max_images_per_request,
                               max_pixels=router.config.max_image_pixels)  # fmt: skip
    except OpenAIError as error:
        reply_error(handler, error)
        return
    admitted = 0
    try:
        for _ in range(form.n):
            router.grpc.admit()
            admitted += 1
    except Overloaded as exc:
        for _ in range(admitted):
            router.grpc.leave()
        reply_error(handler, OpenAIError(429, str(exc), code="router_full"))
        return
    try:
        _serve_edit(handler, router, form)
    finally:
        for _ in range(admitted):
            router.grpc.leave()


def _discard(handler: BaseHTTPRequestHandler, length: int, limit: int) -> None:
    """Read and drop a refused body, so that the client, still sending, reads the answer
    instead of a reset connection; a body past a few times the limit is not waited for."""
    if length > 4 * limit:
        handler.close_connection = True
        return
    with contextlib.suppress(OSError):
        while length > 0:
            chunk = handler.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)
    handler.close_connection = True


def _serve_edit(handler: BaseHTTPRequestHandler, router: "Router", form: EditForm) -> None:
    events: queue.Queue = queue.Queue()
    calls = [_Upstream(router, form, index, events) for index in range(form.n)]
    log.info("OpenAI edit of %s, n=%d, stream=%s, user=%s: %s", form.template_id or f"an image ({form.size})", form.n,
             form.stream, form.user, [c.request_id for c in calls])  # fmt: skip
    router.openai_edits.add(calls)
    for call in calls:
        call.start()
    created = int(time.time())
    results: dict[int, dict[str, Any]] = {}
    try:
        if form.stream:
            _start_stream(handler)
        checked = time.monotonic()
        while len(results) < form.n:
            try:
                kind, index, payload = events.get(timeout=_POLL_S)
            except queue.Empty:
                kind = "none"
            if time.monotonic() - checked >= _POLL_S:  # a plain answer writes nothing that would tell
                checked = time.monotonic()
                if _client_gone(handler):
                    log.info("OpenAI edit: the client went away; cancelling %s", [c.request_id for c in calls])
                    return
            if kind == "none":
                continue
            if kind == "error":
                if form.stream:
                    handler.wfile.write(sse_event(payload.body(), "error"))
                    handler.wfile.flush()
                else:
                    reply_error(handler, payload)
                return
            if kind == "progress":
                if form.stream:
                    handler.wfile.write(sse_event({"type": "image_edit.progress", "index": index, "step": int(payload["STEP"]),
                                                   "total_steps": int(payload["TOTAL_STEPS"]),
                                                   "request_id": calls[index].request_id}, "image_edit.progress"))  # fmt: skip
                    handler.wfile.flush()
                continue
            results[index] = _completed(payload, index, calls[index].request_id, form, created)
            if form.stream:
                handler.wfile.write(sse_event(results[index], "image_edit.completed"))
                handler.wfile.flush()
        if not form.stream:
            _reply_json(handler, 200, _images_response([results[i] for i in range(form.n)], form, created))
    except OSError as exc:  # the client went away mid-stream
        log.info("OpenAI edit: writing to the client failed (%s); cancelling", exc)
    finally:
        for call in calls:
            call.close()
        router.openai_edits.remove(calls)
        handler.close_connection = True


def _completed(outputs: dict[str, Any], index: int, request_id: str, form: EditForm, created: int) -> dict[str, Any]:
    png = decode_blob(str(outputs["EDITED_IMAGE"]).encode())
    with Image.open(io.BytesIO(png)) as image:
        size = f"{image.width}x{image.height}"
    computed, total = int(outputs.get("COMPUTED_TOKENS", 0)), int(outputs.get("NUM_TOKENS", 0))
    return {
        "type": "image_edit.completed", "index": index, "b64_json": base64.b64encode(png).decode(),
        "created_at": created, "size": size, "output_format": "png", "quality": "auto", "background": "opaque",
        # Latent tokens, not text tokens: the image's, and those this edit computed.
        "usage": {"input_tokens": total, "input_tokens_details": {"image_tokens": total, "text_tokens": 0},
                  "output_tokens": computed, "total_tokens": total + computed},
        "request_id": request_id, "template_id": outputs.get("TEMPLATE") or form.template_id,
        "computed_tokens": computed, "num_tokens": total,
        "timeline": json.loads(outputs["TIMELINE"]) if outputs.get("TIMELINE") else None,
    }  # fmt: skip


def _images_response(results: list[dict[str, Any]], form: EditForm, created: int) -> dict[str, Any]:
    usage = {key: sum(r["usage"][key] for r in results) for key in ("input_tokens", "output_tokens", "total_tokens")}
    usage["input_tokens_details"] = {"image_tokens": usage["input_tokens"], "text_tokens": 0}
    return {
        "created": created, "background": "opaque", "output_format": "png", "quality": "auto", "size": results[0]["size"],
        "data": [{"b64_json": r["b64_json"], "revised_prompt": None, "request_id": r["request_id"],
                  "template_id": r["template_id"], "computed_tokens": r["computed_tokens"],
                  "num_tokens": r["num_tokens"], "timeline": r["timeline"]} for r in results],
        "usage": usage,
    }  # fmt: skip


def _start_stream(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Connection", "close")  # the stream ends when the connection does
    handler.end_headers()
    handler.wfile.flush()


def _client_gone(handler: BaseHTTPRequestHandler) -> bool:
    """Whether the client closed its connection (it sends nothing more once its request is sent)."""
    sock = handler.connection
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def handle_models(handler: BaseHTTPRequestHandler, router: "Router") -> None:
    """``GET /v1/models``: the edit model, as the API lists models."""
    model = {"id": EDIT_MODEL, "object": "model", "created": 0, "owned_by": "instgenie"}
    _reply_json(handler, 200, {"object": "list", "data": [model]})


def handle_templates(handler: BaseHTTPRequestHandler, router: "Router", path: str) -> None:
    """``GET /v1/templates`` (the templates registered through this router, with their
    sizes) and ``GET /v1/templates/<id>/image`` (a template's picture, PNG)."""
    registrations = router.grpc.registrations
    if path == "/v1/templates":
        listed = []
        for template_id in registrations.template_ids():
            image = _template_image(registrations.request(template_id))
            if image is not None:
                listed.append({"id": template_id, "object": "template", "width": image.width, "height": image.height})
        _reply_json(handler, 200, {"object": "list", "data": listed})
        return
    template_id = path.removeprefix("/v1/templates/").removesuffix("/image")
    image = _template_image(registrations.request(template_id)) if path.endswith("/image") else None
    if image is None:
        reply_error(handler, OpenAIError(404, f"no template {template_id!r} was registered through this router",
                                         "template_id", "template_not_found"))  # fmt: skip
        return
    body = _png(image)
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _template_image(request: Any) -> Image.Image | None:
    data = None if request is None else input_values(request).get("IMAGE")
    if not data:
        return None
    try:
        image = Image.open(io.BytesIO(decode_blob(data)))
        image.load()
        return image
    except Exception:
        return None


def reply_error(handler: BaseHTTPRequestHandler, error: OpenAIError) -> None:
    _reply_json(handler, error.status, error.body())


def _reply_json(handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
