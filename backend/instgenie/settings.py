"""What a request may ask for, and its settings with the family's defaults filled in.

Module-level functions, so that the diffusers baseline validates exactly like the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from .errors import InvalidInput, TemplateMismatch
from .families import Family, GenerationSettings
from .imaging import DEFAULT_MAX_PIXELS, check_grid

if TYPE_CHECKING:
    from .templates import TemplateRecord

__all__ = ["EngineLimits", "check_numbers", "request_settings", "template_settings"]


@dataclass(frozen=True)
class EngineLimits:
    """Bounds on what one request may ask for."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_steps: int = 100
    max_guidance: float = 100.0


def request_settings(
    family: Family | type[Family],
    limits: EngineLimits,
    max_sequence_length: int,
    image: Image.Image,
    seed: int | None,
    steps: int | None,
    guidance: float | None,
) -> GenerationSettings:
    """Validated settings of a request on ``image``, with the family's defaults filled in.

    Module-level so that the diffusers baseline validates exactly like the engine.
    """
    check_grid(image.width, image.height, family.pixels_per_token)
    steps = family.default_steps if steps is None else steps
    guidance = family.default_guidance if guidance is None else guidance
    seed = 0 if seed is None else seed
    check_numbers(limits, steps, guidance, seed)
    return GenerationSettings(
        width=image.width,
        height=image.height,
        steps=steps,
        guidance=float(guidance),
        seed=seed,
        max_sequence_length=max_sequence_length,
    )


def check_numbers(limits: EngineLimits, steps: int | None, guidance: float | None, seed: int | None) -> None:
    """Type and range checks of the numeric request fields that are given."""
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= limits.max_steps
    ):
        raise InvalidInput(f"steps must be an integer in [1, {limits.max_steps}], got {steps!r}")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
            raise InvalidInput(f"guidance must be a finite number, got {guidance!r}")
        if not 0 <= guidance <= limits.max_guidance:
            raise InvalidInput(f"guidance must be in [0, {limits.max_guidance}], got {guidance}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise InvalidInput(f"seed must be a non-negative 64-bit integer, got {seed!r}")


def template_settings(
    family: Family,
    limits: EngineLimits,
    max_sequence_length: int,
    model_fingerprint: str,
    record: TemplateRecord,
    seed: int | None,
    steps: int | None,
    guidance: float | None,
) -> GenerationSettings:
    """The settings of an edit of ``record``: the template's own, checked against what the
    edit asks for (steps, guidance and text length must match; the seed may differ
    unless the family blends the noised original back in)."""
    check_numbers(limits, steps, guidance, seed)
    settings = record.settings
    if record.model_fingerprint != model_fingerprint:
        raise TemplateMismatch(
            f"template {record.template_id} was recorded with model {record.model_fingerprint}, "
            f"this engine serves {model_fingerprint}; register it again"
        )
    if steps is not None and steps != settings.steps:
        raise TemplateMismatch(
            f"template {record.template_id} was recorded with {settings.steps} steps, the edit asks for {steps}"
        )
    if guidance is not None and float(guidance) != settings.guidance:
        raise TemplateMismatch(
            f"template {record.template_id} was recorded with guidance {settings.guidance}, "
            f"the edit asks for {guidance}"
        )
    if settings.max_sequence_length != max_sequence_length:
        raise TemplateMismatch(f"template {record.template_id} was recorded with another text length")
    if seed is not None and seed != settings.seed:
        if family.seed_must_match:
            raise TemplateMismatch(
                f"template {record.template_id} was recorded with seed {settings.seed}; this pipeline blends "
                f"the noised original back in, so edits must use the same seed (got {seed})"
            )
        return request_settings(family, limits, max_sequence_length, record.image, seed, settings.steps, settings.guidance)
    return settings
