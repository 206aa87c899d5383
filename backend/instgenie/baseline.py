"""The diffusers baseline: what users run today, and what our benchmarks compare against.

:class:`BaselinePipeline` serves edits with the STOCK diffusers inpainting pipeline
(no InstGenIE attention processors, no template cache, every token computed at every
step) and request-level (static) batching: it takes the list of requests Triton's
dynamic batcher hands a model instance, runs each group of requests that share
resolution, steps and guidance as ONE pipeline call, and answers when all are done.

Requests are validated exactly like the engine's (the same helpers, the same typed
errors), and a single request's PNG is byte-identical to the engine's full
computation of it: same CPU-seeded noise, same decode, same paste of the original
pixels outside the mask. So a benchmark measures the serving strategy, not a
different output.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import attention
from .settings import EngineLimits, request_settings
from .errors import InstGenIEError, InternalError, InvalidInput
from .families import Family, GenerationSettings, UNetInpaintFamily
from .families.base import vae_input
from .imaging import decode_image, decode_mask, encode_png
from .loading import load_pipeline
from .step_loop import EditRequest, JobOutcome

log = logging.getLogger(__name__)

# A group of requests the pipeline can take in one call: (width, height, steps, guidance).
GroupKey = tuple[int, int, int, float]


@dataclass
class _Valid:
    """A validated request, ready to join its group's pipeline call."""

    slot: int  # position in the caller's list
    request_id: str
    prompt: str
    image: Image.Image  # RGB
    pixel_mask: np.ndarray  # [H, W] bool, True = edit
    settings: GenerationSettings
    num_tokens: int

    @property
    def key(self) -> GroupKey:
        s = self.settings
        return s.width, s.height, s.steps, s.guidance


class BaselinePipeline:
    """The stock diffusers inpainting pipeline behind a list-of-requests interface."""

    def __init__(
        self,
        pipe: Any,
        family_cls: type[Family],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 512,
        limits: EngineLimits = EngineLimits(),
    ) -> None:
        transformer = getattr(pipe, "transformer", None)
        if transformer is not None and attention.is_installed(transformer):
            # An engine's pipeline: the masked processors fall back to stock attention,
            # but a benchmark baseline must not depend on that.
            raise ValueError(
                "pipe carries InstGenIE's masked attention processors or hooks; the baseline needs a stock "
                "pipeline (Family.uninstall hands one back)"
            )
        self.pipe = pipe
        self.family_cls = family_cls
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        self.limits = limits
        pipe.set_progress_bar_config(disable=True)
        self._takes_strength = "strength" in inspect.signature(pipe.__call__).parameters
        # The pipeline keeps its schedule on the shared ``pipe.scheduler``: one call at a time.
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_sequence_length: int = 512,
        limits: EngineLimits = EngineLimits(),
    ) -> "BaselinePipeline":
        """Load a fresh, stock pipeline (``load_pipeline`` installs no processors; a Family does)."""
        pipe, family_cls, _ = load_pipeline(model_dir, device, dtype)
        return cls(pipe, family_cls, device=device, dtype=dtype, max_sequence_length=max_sequence_length, limits=limits)

    # -- serving ---------------------------------------------------------------------
    def run(self, requests: Sequence[EditRequest]) -> list[JobOutcome | InstGenIEError]:
        """Serve a batch of edits; slot ``i`` of the answer is request ``i``'s outcome or error.

        Never raises: a bad request fails alone; a failing pipeline call fails its group.
        """
        results: list[JobOutcome | InstGenIEError | None] = [None] * len(requests)
        groups: dict[GroupKey, list[_Valid]] = {}
        for slot, request in enumerate(requests):
            try:
                valid = self._validate(slot, request)
                if not valid.pixel_mask.any():  # nothing to edit: the image itself, as the engine answers
                    results[slot] = self._outcome(valid, valid.image.copy(), computed_tokens=0, latents=None)
                    continue
            except InstGenIEError as error:
                results[slot] = error
                continue
            except Exception as error:  # a bug must fail its request, not the batch
                log.exception("baseline request %s failed validation", getattr(request, "request_id", slot))
                results[slot] = InternalError(f"{type(error).__name__}: {error}")
                continue
            groups.setdefault(valid.key, []).append(valid)

        with self._lock:
            for members in groups.values():
                try:
                    for valid, outcome in zip(members, self._run_group(members)):
                        results[valid.slot] = outcome
                except Exception as error:
                    log.exception("baseline pipeline call failed for %d request(s)", len(members))
                    for valid in members:
                        results[valid.slot] = InternalError(f"pipeline call failed: {type(error).__name__}: {error}")
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _validate(self, slot: int, request: EditRequest) -> _Valid:
        """The engine's checks, in the engine's order (image, numbers, mask, prompt)."""
        if request.action != "edit":
            raise InvalidInput(f"the diffusers baseline only serves action 'edit', got {request.action!r}")
        if request.template_id is not None:
            raise InvalidInput(
                "the diffusers baseline has no template cache: send IMAGE (the picture to edit), not TEMPLATE_ID"
            )
        if request.image is None:
            raise InvalidInput("the diffusers baseline needs IMAGE (the picture to edit)")
        if request.mask is None:
            raise InvalidInput("edit needs MASK (white = the region to edit)")
        image = decode_image(request.image, max_pixels=self.limits.max_pixels)
        settings = request_settings(
            self.family_cls, self.limits, self.max_sequence_length, image, request.seed, request.steps, request.guidance
        )
        pixel_mask = decode_mask(request.mask, image.size, max_pixels=self.limits.max_pixels)
        if not isinstance(request.prompt, str):
            raise InvalidInput(f"prompt must be a string, got {type(request.prompt).__name__}")
        grid = self.family_cls.pixels_per_token
        return _Valid(
            slot=slot,
            request_id=request.request_id,
            prompt=request.prompt,
            image=image,
            pixel_mask=pixel_mask,
            settings=settings,
            num_tokens=(image.width // grid) * (image.height // grid),
        )

    def _run_group(self, members: list[_Valid]) -> list[JobOutcome]:
        """One stock pipeline call for requests of one resolution, step count and guidance."""
        settings = members[0].settings
        kwargs: dict[str, Any] = {}
        if self._takes_strength:
            kwargs["strength"] = 1.0  # full inpainting from noise, as the engine's settings
        with torch.no_grad():
            latents = self.pipe(
                prompt=[m.prompt for m in members],
                image=[m.image for m in members],
                # The already-thresholded mask: 0/255 binarizes identically in the
                # pipeline's mask processor, whatever mode (16-bit, float) the client sent.
                mask_image=[Image.fromarray(m.pixel_mask.astype(np.uint8) * 255) for m in members],
                height=settings.height,
                width=settings.width,
                num_inference_steps=settings.steps,
                guidance_scale=settings.guidance,
                # CPU generators on any device: the engine draws its noise on CPU, and
                # diffusers moves CPU-drawn noise to the pipeline's device.
                generator=[torch.Generator("cpu").manual_seed(m.settings.seed) for m in members],
                max_sequence_length=self.max_sequence_length,
                output_type="latent",
                **kwargs,
            ).images
            decoded = self._decode(latents, settings)
        tokens = self._tokens(latents)
        outcomes = []
        for i, valid in enumerate(members):
            # The engine's paste: pixels outside the mask are the original's, byte for byte.
            edited = np.where(valid.pixel_mask[..., None], np.asarray(decoded[i]), np.asarray(valid.image))
            outcomes.append(
                self._outcome(
                    valid, Image.fromarray(edited), computed_tokens=valid.num_tokens, latents=tokens[i : i + 1].clone()
                )
            )
        return outcomes

    def _decode(self, latents: torch.Tensor, settings: GenerationSettings) -> list[Image.Image]:
        """The pipelines' own decode, in one VAE call for the group, with two deliberate differences.

        Like ``Family.decode``: SD3 adds the VAE ``shift_factor`` back (the stock SD3
        inpaint pipeline forgets to; diffusers issue #13611), and the decoded tensor is
        post-processed in float32 (the stock pipelines denormalize in the VAE dtype).
        For Flux in float32 this is exactly the stock decode.
        """
        pipe, vae = self.pipe, self.pipe.vae
        if latents.ndim == 3:  # Flux returns packed tokens [B, N, C]
            latents = pipe._unpack_latents(latents, settings.height, settings.width, pipe.vae_scale_factor)
        decoded = vae.decode(vae_input(vae, latents).to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(decoded.float(), output_type="pil")

    def _tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents in the engine's token layout ``[B, N, C]``."""
        if latents.ndim == 3:  # Flux: already packed tokens
            return latents
        if getattr(self.pipe, "unet", None) is not None:  # a UNet: one token per latent pixel
            return UNetInpaintFamily.to_tokens(latents)
        # SD3 spatial [B, C, H, W] -> [B, N, p*p*C], the (p, q, c) order of SD3InpaintFamily.to_tokens.
        b, c, h, w = latents.shape
        p = int(self.pipe.transformer.config.patch_size)
        x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    @staticmethod
    def _outcome(
        valid: _Valid, image: Image.Image, *, computed_tokens: int, latents: torch.Tensor | None
    ) -> JobOutcome:
        return JobOutcome(
            request_id=valid.request_id,
            template_id=None,
            png=encode_png(image),
            computed_tokens=computed_tokens,
            num_tokens=valid.num_tokens,
            total_steps=valid.settings.steps,
            latents=latents,
        )
