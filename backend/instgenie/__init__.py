"""InstGenIE engine: mask-aware, step-level editing on diffusers pipelines.

No serving code lives here; the Triton model and the CLI are thin layers over
:class:`~instgenie.engine.Engine`.
"""

from .engine import EditResult, Engine, EngineLimits, RequestKind, RequestState, TemplateRecord
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
