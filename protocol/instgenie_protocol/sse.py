"""Server-sent events, as Triton's ``generate_stream`` and the router's OpenAI endpoint write them.

One reader for every process that consumes a stream (the HTTP client, the router), and
the text of the JSON error Triton answers with before a stream starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["json_error_text", "sse_data", "sse_event"]


def sse_data(readline: Callable[[], bytes]) -> Iterator[Any]:
    """The JSON payloads of the ``data:`` events read line by line until ``readline``
    returns ``b""`` (the stream ended); a payload split over several ``data:`` lines is joined."""
    data: list[str] = []
    while True:
        line = readline()
        if not line:
            break
        text = line.decode("utf-8").rstrip("\r\n")
        if text.startswith("data:"):
            data.append(text[5:].lstrip(" "))
        elif not text and data:  # a blank line ends an event
            yield json.loads("\n".join(data))
            data = []
    if data:
        yield json.loads("\n".join(data))


def sse_event(payload: Any, event: str | None = None) -> bytes:
    """One event: an optional ``event:`` name line, the payload as one ``data:`` line, a blank line."""
    name = f"event: {event}\n" if event else ""
    return f"{name}data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def json_error_text(body: bytes) -> str:
    """The text of a JSON error answer (``{"error": "..."}``, Triton's before a stream
    starts), or the body itself when it is not one."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")
