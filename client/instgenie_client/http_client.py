"""HTTP client of ``instgenie_edit`` over Triton's ``generate_stream`` (server-sent events), stdlib only.

``tritonclient.http`` cannot call a decoupled model, but Triton's generate extension
can: the request is one flat JSON object whose fields named like model inputs become
those inputs (images as base64 text, the server decodes it) and ``id`` the request id;
each response comes back as a ``data: {...}`` event, an error as
``data: {"error": "..."}``. The stream ends after the final response. Closing the
connection early makes Triton cancel the request.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

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
from instgenie_protocol import EDIT_MODEL, json_error_text, sse_data

ProgressCallback = Callable[[Progress], None]

_FINAL_OUTPUTS = ("COMPUTED_TOKENS", "TEMPLATES")  # in every final response, never in a progress one


class SseInstGenIEClient:
    """Blocking client over HTTP/SSE with the methods of :class:`~instgenie_client.InstGenIEClient` but ``submit``.

    Args:
        url: ``host:port`` (or ``http://host:port``) of Triton's HTTP endpoint.
        model: the decoupled edit model's name.
        timeout_s: seconds a request may take before it is cancelled (None: no limit).
        stall_timeout_s: seconds a request may go without any event before it is
            cancelled (None: no limit); edits and registrations stream their steps.
    """

    def __init__(
        self,
        url: str = "localhost:8000",
        *,
        model: str = EDIT_MODEL,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        stall_timeout_s: float | None = DEFAULT_STALL_TIMEOUT_S,
    ) -> None:
        parts = urlsplit(url if "//" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected host:port or http://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
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
        """Register a template; returns its id."""
        values = register_inputs(image, prompt, seed=seed, steps=steps, guidance=guidance, mask=mask)
        return str(self._call(values, request_id or new_request_id(), None)["TEMPLATE"])

    def list_templates(self) -> list[str]:
        """Ids of the templates the server holds."""
        templates = self._call(request_inputs(action="list"), new_request_id(), None).get("TEMPLATES", [])
        # Triton's JSON writes a one-element output as a plain value, not a list.
        return [templates] if isinstance(templates, str) else list(templates)

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
        """Edit and wait; ``on_progress`` runs in this thread after every step (raising from it cancels)."""
        request_id = request_id or new_request_id()
        values = request_inputs(
            template_id=template_id, image=image, mask=mask, prompt=prompt, seed=seed, steps=steps,
            guidance=guidance, full_compute=full_compute, progress=True,  # the stall clock hears every step
        )  # fmt: skip
        values["OUTPUT_ENCODING"] = "base64"  # JSON carries text only
        outputs = self._call(values, request_id, on_progress)
        return EditResult.from_outputs({**outputs, "EDITED_IMAGE": base64.b64decode(outputs["EDITED_IMAGE"])}, request_id)

    def _call(self, values: dict[str, Any], request_id: str, on_progress: ProgressCallback | None) -> dict[str, Any]:
        """POST one request, read its events; the final response's fields.

        The connection is closed on every way out: before the final response that is
        what cancels the request on the server (timeout, Ctrl-C, a raising callback).
        """
        body = {name: base64.b64encode(value).decode() if isinstance(value, bytes) else value for name, value in values.items()}
        body["id"] = request_id
        clock = ResponseClock(self.timeout_s, self.stall_timeout_s)
        connection = http.client.HTTPConnection(self.host, self.port, timeout=clock.left_s())
        try:
            connection.request(
                "POST",
                f"/v2/models/{self.model}/generate_stream",
                body=json.dumps(body),
                headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
            )
            sock = connection.sock  # kept: the response reads through it, we bound each read
            response = connection.getresponse()
            if "text/event-stream" not in (response.getheader("Content-Type") or ""):
                # Triton refused the request before the model saw it (bad JSON type, unknown model).
                raise _server_error(json_error_text(response.read()), request_id)
            final: dict[str, Any] | None = None
            for event in _events(response, sock, clock, request_id):
                if "error" in event:
                    raise _server_error(str(event["error"]), request_id)
                if any(name in event for name in _FINAL_OUTPUTS):
                    final = event
                elif "STEP" in event and on_progress is not None:
                    on_progress(Progress(int(event["STEP"]), int(event["TOTAL_STEPS"]), request_id))
            if final is None:
                raise InstGenIEConnectionError("the event stream ended before the request finished", request_id)
            return final
        except TimeoutError as exc:  # socket.timeout is TimeoutError since 3.10
            raise clock.expired(request_id) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise InstGenIEConnectionError(f"the HTTP request to {self.host}:{self.port} failed: {exc}", request_id) from exc
        finally:
            connection.close()


def _events(
    response: http.client.HTTPResponse, sock: socket.socket, clock: ResponseClock, request_id: str
) -> Iterator[dict[str, Any]]:
    """The JSON payloads of the ``data:`` events of an SSE body, until it ends or a limit of ``clock`` passes."""

    def readline() -> bytes:
        left = clock.left_s()
        if left is not None:
            if left <= 0:
                raise clock.expired(request_id)
            sock.settimeout(left)  # the next read waits at most until a limit passes
        line = response.readline()
        if line:
            clock.heard()
        return line

    return sse_data(readline)


def _server_error(text: str, request_id: str) -> Exception:
    """An error event as an exception; Triton's own errors have no request id: use ours."""
    error = InstGenIEServerError.parse(text)
    if not error.request_id:
        error = InstGenIEServerError(request_id, error.reason, error.message)
    return JobCancelled(request_id) if error.reason == "cancelled" else error
