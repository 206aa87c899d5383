"""Error reasons, the status each is answered with, and the wording of an error.

An error's text reads ``[request <id>] <reason>: <what to change>``: tritonclient keeps
only the message of a Triton error, so the text carries the request id, and the reason
is the machine-readable part (:class:`ServerError` reads it back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Error reason -> the Triton status it is answered with (``pb_utils.TritonError`` code
#: name). Reasons not listed are the client's mistakes: INVALID_ARG.
ERROR_CODES: dict[str, str] = {
    "queue_full": "UNAVAILABLE",
    "shutting_down": "UNAVAILABLE",
    "unavailable": "UNAVAILABLE",
    "overloaded": "UNAVAILABLE",  # the router's admission limit
    "cache_corrupt": "UNAVAILABLE",  # being recorded again: retry shortly
    "timeout": "DEADLINE_EXCEEDED",
    "cache_write_failed": "INTERNAL",
    "cancelled": "CANCELLED",
    "internal": "INTERNAL",
    "router_error": "INTERNAL",
    "server_error": "INTERNAL",  # an error text not in our format
}

#: Triton status -> the HTTP status Triton's HTTP front (and the router's) answers with.
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARG": 400,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def error_code(reason: str) -> str:
    """The Triton status code name of an error ``reason`` (see :data:`ERROR_CODES`)."""
    return ERROR_CODES.get(reason, "INVALID_ARG")


def http_status(reason: str) -> int:
    """The HTTP status of an error ``reason``."""
    return HTTP_STATUS.get(error_code(reason), 500)


_ERROR = re.compile(r"\[request (?P<request_id>[^\]]*)\] (?P<reason>[a-z_]+): (?P<message>.*)", re.S)


def error_message(request_id: str, reason: str, message: str) -> str:
    """The text of an error response."""
    return f"[request {request_id}] {reason}: {message}"


@dataclass(frozen=True)
class ServerError:
    """An error response as a client (or the router) sees it."""

    request_id: str
    reason: str
    message: str

    @classmethod
    def parse(cls, text: str) -> "ServerError":
        match = _ERROR.search(text)
        if match is None:
            return cls(request_id="", reason="server_error", message=text)
        return cls(**match.groupdict())

    def __str__(self) -> str:
        return error_message(self.request_id, self.reason, self.message)
