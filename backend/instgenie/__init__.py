"""InstGenIE engine: mask-aware, step-level editing on diffusers pipelines.

No serving code lives here; the Triton model and the CLI are thin layers over
:class:`~instgenie.engine.Engine`.
"""

from typing import TYPE_CHECKING

from .errors import (
    ImageTooLarge,
    InstGenIEError,
    InvalidImage,
    InvalidInput,
    InvalidMask,
    TemplateMismatch,
    UnknownTemplate,
    UnsupportedModel,
)

if TYPE_CHECKING:
    from .engine import EditResult, Engine, EngineLimits, RequestKind, RequestState, TemplateRecord

_ENGINE_NAMES = ("EditResult", "Engine", "EngineLimits", "RequestKind", "RequestState", "TemplateRecord")


def __getattr__(name: str):
    # The engine pulls in torch and diffusers (seconds); client-only commands never need it.
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'instgenie' has no attribute {name!r}")


__all__ = [
    "EditResult",
    "Engine",
    "EngineLimits",
    "ImageTooLarge",
    "InstGenIEError",
    "InvalidImage",
    "InvalidInput",
    "InvalidMask",
    "RequestKind",
    "RequestState",
    "TemplateMismatch",
    "TemplateRecord",
    "UnknownTemplate",
    "UnsupportedModel",
]
