"""Typed errors of the engine.

Every error a request can cause derives from :class:`InstGenIEError` and carries a
stable ``reason`` string: the serving layer maps it to an error response and a
metrics label without parsing messages. Messages say what to change in the request.
"""

from __future__ import annotations


class InstGenIEError(Exception):
    """Base class: a request could not be served as asked."""

    reason = "internal"


class InvalidInput(InstGenIEError, ValueError):
    """A request field is malformed or out of range."""

    reason = "invalid_input"


class InvalidImage(InvalidInput):
    """The image bytes cannot be decoded, or its size does not fit the model."""

    reason = "invalid_image"


class ImageTooLarge(InvalidImage):
    """The image has more pixels than the configured limit (image bombs included)."""

    reason = "image_too_large"


class InvalidMask(InvalidInput):
    """The mask cannot be decoded or does not match the image."""

    reason = "invalid_mask"


class UnknownTemplate(InstGenIEError, KeyError):
    """No template with this id is registered."""

    reason = "unknown_template"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TemplateMismatch(InstGenIEError):
    """The edit asks for settings its template's cache was not recorded with."""

    reason = "template_mismatch"


class UnsupportedModel(InstGenIEError):
    """The model folder holds a pipeline class no family adapter supports."""

    reason = "unsupported_model"


class QueueFull(InstGenIEError):
    """The waiting queue is at its bound; retry later or elsewhere (nothing was dropped)."""

    reason = "queue_full"


class ShuttingDown(InstGenIEError):
    """The server is draining and accepts no new work."""

    reason = "shutting_down"


class Cancelled(InstGenIEError):
    """The client cancelled the request; it left the batch and freed its slot."""

    reason = "cancelled"


class InternalError(InstGenIEError):
    """A bug or resource failure on the server, not the request's fault."""

    reason = "internal"


class CacheBudgetExceeded(InstGenIEError):
    """One template's recorded activations do not fit the cache budget."""

    reason = "cache_budget_exceeded"


class CacheCorrupt(InstGenIEError):
    """A template's cache on disk is missing, truncated or fails its checksum.

    It is never used: the files are removed and the template is recorded again.
    """

    reason = "cache_corrupt"


class CacheWriteFailed(InstGenIEError):
    """A template's cache could not be written (disk full, unwritable cache folder)."""

    reason = "cache_write_failed"
