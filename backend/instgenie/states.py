"""A request between prepare and finish (:class:`RequestState`), and an edit's result."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .activations import TemplateActivations
from .cache import TemplateCache
from .families import GenerationSettings, LatentInputs, TextEmbeddings
from .templates import TemplateRecord

__all__ = ["EditResult", "RequestKind", "RequestState"]


class RequestKind(enum.Enum):
    EDIT = "edit"
    RECORD = "record"


@dataclass
class RequestState:
    """One request between ``prepare`` and ``finish``; advanced in place by ``step``."""

    request_id: str
    kind: RequestKind
    settings: GenerationSettings
    prompt: str
    image: Image.Image
    pixel_mask: np.ndarray
    num_tokens: int  # N, image tokens of the full grid
    token_index: torch.Tensor  # int64 [M]: the tokens this request computes
    inputs: LatentInputs  # restricted to token_index
    text: TextEmbeddings
    scheduler: Any
    timesteps: torch.Tensor
    template: TemplateRecord | None = None  # read K/V of uncomputed tokens from its cache
    kv: TemplateCache | None = None  # this request's handle on that cache (fetches ahead)
    template_id: str | None = None  # the template the request edits, cached or not
    recording: TemplateActivations | None = None  # record K/V here (RECORD requests)
    full_inputs: LatentInputs | None = None  # full-grid inputs (RECORD requests, template edits)
    full_blocks: int = 0  # leading blocks that compute every token instead of loading (planned)
    step_index: int = 0
    row_work: float = 0.0  # token-equivalents of one row-step (the family's StepCost of its tokens)

    @property
    def total_steps(self) -> int:
        return int(len(self.timesteps))

    @property
    def done(self) -> bool:
        return self.step_index >= self.total_steps

    @property
    def computed_tokens(self) -> int:
        return int(self.token_index.numel())

    @property
    def rows(self) -> int:
        return self.text.rows

    @property
    def grid_key(self) -> tuple[int, int]:
        """(width, height): states of one resolution can share a transformer call."""
        return self.settings.width, self.settings.height

    @property
    def step_work(self) -> float:
        """Token-equivalents one step of this request computes (all its rows)."""
        return self.rows * self.row_work

    @property
    def remaining_token_steps(self) -> float:
        """Token-equivalents still to compute: the request's share of the remaining work."""
        return self.step_work * (self.total_steps - self.step_index)


@dataclass
class EditResult:
    image: Image.Image
    png: bytes  # ``image`` as PNG, encoded where the codec decoded it
    latents: torch.Tensor | None  # [1, N, C] final latents of the full grid; None if nothing was denoised
    request_id: str
    computed_tokens: int
    num_tokens: int
    template_id: str | None
