"""The wire protocol of the ``instgenie_edit`` Triton model, shared by server and clients.

One request is one job. All tensors are one-element (``dims: [1]``, no batch
dimension); every input but the ones an action needs is optional.

Inputs
  ``ACTION``          BYTES  ``edit`` (default) | ``register`` | ``list``
  ``TEMPLATE_ID``     BYTES  a registered template (edit)
  ``IMAGE``           BYTES  PNG/JPEG bytes, or their base64 text: the template to
                             register, or a raw image to edit with the full computation
  ``MASK``            BYTES  PNG mask, white = edit (required for edit; optional
                             template region for register); raw or base64
  ``PROMPT``          BYTES  UTF-8 text (required for edit and register)
  ``SEED``            INT64  noise seed (default: the template's, else 0)
  ``STEPS``           INT32  denoising steps (default: the template's, else the model's)
  ``GUIDANCE``        FP32   guidance scale (default: the template's, else the model's)
  ``FULL_COMPUTE``    BOOL   compute every token (no cache use); for comparisons
  ``PROGRESS``        BOOL   stream one response per denoising step
  ``OUTPUT_ENCODING`` BYTES  ``binary`` (default) | ``base64``: how ``EDITED_IMAGE`` is
                             encoded (base64 for SSE/JSON clients)

Outputs
  progress responses: ``STEP``, ``TOTAL_STEPS``, ``REQUEST_ID``
  final response:     ``EDITED_IMAGE`` (PNG; absent for register/list), ``TEMPLATE``
                      (template id edited or registered), ``TEMPLATES`` (list, ``[-1]``),
                      ``STEP``/``TOTAL_STEPS``, ``COMPUTED_TOKENS``, ``NUM_TOKENS``,
                      ``REQUEST_ID``
  errors:             a Triton error response whose message reads
                      ``[request <id>] <reason>: <what to change>``
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The template-id form is the engine's (one definition); that module imports no torch.
from instgenie.template_ids import check_template_id, is_template_id

__all__ = [
    "ACTIONS",
    "BASELINE_MODEL",
    "EDIT_MODEL",
    "ERROR_CODES",
    "INPUTS",
    "OUTPUTS",
    "SYNC_MODEL",
    "ServerError",
    "check_template_id",
    "error_code",
    "error_message",
    "is_template_id",
]

EDIT_MODEL = "instgenie_edit"
SYNC_MODEL = "instgenie_edit_sync"
BASELINE_MODEL = "diffusers_baseline"

ACTIONS = ("edit", "register", "list")

# name -> Triton datatype
INPUTS: dict[str, str] = {
    "ACTION": "BYTES",
    "TEMPLATE_ID": "BYTES",
    "IMAGE": "BYTES",
    "MASK": "BYTES",
    "PROMPT": "BYTES",
    "SEED": "INT64",
    "STEPS": "INT32",
    "GUIDANCE": "FP32",
    "FULL_COMPUTE": "BOOL",
    "PROGRESS": "BOOL",
    "OUTPUT_ENCODING": "BYTES",
}

OUTPUTS: dict[str, str] = {
    "EDITED_IMAGE": "BYTES",
    "TEMPLATE": "BYTES",
    "TEMPLATES": "BYTES",
    "STEP": "INT32",
    "TOTAL_STEPS": "INT32",
    "COMPUTED_TOKENS": "INT32",
    "NUM_TOKENS": "INT32",
    "REQUEST_ID": "BYTES",
}

#: Error reason -> the Triton status it is answered with (``pb_utils.TritonError`` code
#: name; Triton's HTTP front answers INVALID_ARG 400, UNAVAILABLE 503, INTERNAL 500).
#: Reasons not listed are the client's mistakes: INVALID_ARG.
ERROR_CODES: dict[str, str] = {
    "queue_full": "UNAVAILABLE",
    "shutting_down": "UNAVAILABLE",
    "unavailable": "UNAVAILABLE",
    "cache_corrupt": "UNAVAILABLE",  # being recorded again: retry shortly
    "cache_write_failed": "INTERNAL",
    "cancelled": "CANCELLED",
    "internal": "INTERNAL",
    "server_error": "INTERNAL",  # an error text not in our format
}


def error_code(reason: str) -> str:
    """The Triton status code name of an error ``reason`` (see :data:`ERROR_CODES`)."""
    return ERROR_CODES.get(reason, "INVALID_ARG")


_ERROR = re.compile(r"\[request (?P<request_id>[^\]]*)\] (?P<reason>[a-z_]+): (?P<message>.*)", re.S)


def error_message(request_id: str, reason: str, message: str) -> str:
    """The text of an error response: tritonclient keeps only the message, so it carries the id."""
    return f"[request {request_id}] {reason}: {message}"


@dataclass(frozen=True)
class ServerError:
    """An error response as a client sees it."""

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
