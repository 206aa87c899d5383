"""Stable Diffusion 3: StableDiffusion3InpaintPipeline.

SD3's transformer patchifies a spatial latent itself (``PatchEmbed``, which also
adds the positional embedding) and unpatchifies its output. Two forward hooks make
it token-sparse without forking it: after ``pos_embed`` they keep each row's
computed tokens, and around ``proj_out`` they capture the computed tokens' outputs
and hand the unpatchify a full-size tensor. Patch embedding is a stride-``p``
convolution, so a token depends on its own patch only and the full-size input can
carry zeros wherever a row computes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_inpaint import retrieve_timesteps
from PIL import Image

from ..attention import HOOK_PREFIX, MaskedJointAttnProcessor, TokenBatch, install_block_hooks, install_hook, install_masked_processors
from .base import Family, GenerationSettings, LatentInputs, ModelInputs, TextEmbeddings, vae_input


class SD3InpaintFamily(Family):
    pipeline_classes = ("StableDiffusion3InpaintPipeline",)
    default_steps = 28
    default_guidance = 7.0

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        self._active: TokenBatch | None = None
        self._captured: torch.Tensor | None = None
        super().__init__(pipe, device, dtype)
        self.patch = int(self.denoiser.config.patch_size)

    # -- hooks -------------------------------------------------------------
    def install_processors(self) -> int:
        # One pair of hooks per transformer, dispatching to the adapter that is predicting
        # (several adapters may share one pipeline; stock calls have none and pass through).
        self._keep = install_hook(self.denoiser.pos_embed, _KEEP_HOOK, _PredictingAdapterHook("_keep_computed_tokens"))
        self._capture = install_hook(self.denoiser.proj_out, _CAPTURE_HOOK, _PredictingAdapterHook("_capture_output"))
        install_block_hooks(self.blocks)
        return install_masked_processors(self.denoiser, MaskedJointAttnProcessor)

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return list(self.denoiser.transformer_blocks)

    def _keep_computed_tokens(self, output: torch.Tensor) -> torch.Tensor | None:
        if self._active is None:
            return None
        return self._active.gather(output)

    def _capture_output(self, output: torch.Tensor) -> torch.Tensor | None:
        batch = self._active
        if batch is None:
            return None
        self._captured = output
        if batch.is_dense:
            return None
        full = output.new_zeros(output.shape[0], batch.num_tokens, output.shape[-1])
        return full.scatter(1, batch.padded_index.unsqueeze(-1).expand(-1, -1, output.shape[-1]), output)

    # -- token space <-> spatial latents ------------------------------------
    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, p*p*C]`` in the (p, q, c) order of SD3's unpatchify."""
        b, c, h, w = latents.shape
        p = self.patch
        x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def to_spatial(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`to_tokens` for a token grid of ``(rows, cols)``."""
        p = self.patch
        h, w = grid
        b, _, d = tokens.shape
        c = d // (p * p)
        x = tokens.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h * p, w * p)

    # -- preparation -------------------------------------------------------
    def schedule(self, scheduler: Any, settings: GenerationSettings) -> torch.Tensor:
        with self.using_scheduler(scheduler):
            retrieve_timesteps(scheduler, settings.steps, self.device)
            timesteps, _ = self.pipe.get_timesteps(settings.steps, settings.strength, self.device)
        return timesteps

    def _encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings:
        cfg = settings.guidance > 1  # classifier-free guidance, as the pipeline decides it
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=settings.negative_prompt if cfg else None,
                do_classifier_free_guidance=cfg,
                device=self.device,
                max_sequence_length=settings.max_sequence_length,
            )
        if cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return TextEmbeddings(embeds.to(self.dtype), pooled.to(self.dtype))

    def prepare_latents(
        self,
        image: torch.Tensor,
        pixel_mask: torch.Tensor,
        settings: GenerationSettings,
        scheduler: Any,
        timesteps: torch.Tensor,
        reuse: LatentInputs | None,
    ) -> LatentInputs:
        if reuse is not None:
            latents, noise, image_latents = reuse.latents, reuse.noise, reuse.image_latents
        else:
            generator = torch.Generator("cpu").manual_seed(settings.seed)
            channels = int(self.pipe.vae.config.latent_channels)
            with self.using_scheduler(scheduler), torch.no_grad():
                latents, noise, image_latents = self.pipe.prepare_latents(
                    1,
                    channels,
                    settings.height,
                    settings.width,
                    self.dtype,
                    self.device,
                    generator,
                    None,
                    image=image,
                    timestep=timesteps[:1],
                    is_strength_max=settings.strength == 1.0,
                    return_noise=True,
                    return_image_latents=True,
                )
            latents, noise, image_latents = self.to_tokens(latents), self.to_tokens(noise), self.to_tokens(image_latents)
        factor = self.pipe.vae_scale_factor
        # What the pipeline's prepare_mask_latents does to the mask, without its
        # VAE encode of a masked image that a 16-channel transformer never reads.
        mask = torch.nn.functional.interpolate(
            pixel_mask, size=(settings.height // factor, settings.width // factor)
        ).to(device=self.device, dtype=self.dtype)
        channels = latents.shape[-1] // (self.patch * self.patch)
        mask = self.to_tokens(mask.expand(-1, channels, -1, -1))
        return LatentInputs(latents=latents, image_latents=image_latents, noise=noise, blend_mask=mask)

    # -- the step ------------------------------------------------------------
    def predict(self, inputs: ModelInputs) -> torch.Tensor:
        batch = inputs.batch
        tokens = inputs.tokens
        if not batch.is_dense:
            full = tokens.new_zeros(tokens.shape[0], batch.num_tokens, tokens.shape[-1])
            index = batch.padded_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = full.scatter(1, index, tokens)
        spatial = self.to_spatial(tokens, inputs.grid)
        self._active = batch
        self._keep.adapter = self._capture.adapter = self
        try:
            with torch.no_grad():
                self.denoiser(
                    hidden_states=spatial,
                    timestep=inputs.timesteps,
                    encoder_hidden_states=inputs.prompt_embeds,
                    pooled_projections=inputs.pooled,
                    joint_attention_kwargs={"token_batch": batch},
                    return_dict=False,
                )
            assert self._captured is not None
            return self._captured
        finally:
            self._keep.adapter = self._capture.adapter = None
            self._active = None
            self._captured = None

    def decode(self, latents: torch.Tensor, settings: GenerationSettings) -> Image.Image:
        vae = self.pipe.vae
        spatial = self.to_spatial(latents, self.grid(settings))
        spatial = vae_input(vae, spatial)
        with torch.no_grad():
            decoded = vae.decode(spatial.to(vae.dtype), return_dict=False)[0]
        return self.postprocess(decoded)


_KEEP_HOOK = HOOK_PREFIX + "sd3_keep_computed_tokens"
_CAPTURE_HOOK = HOOK_PREFIX + "sd3_capture_output"


class _PredictingAdapterHook(ModelHook):
    """Hands a module's output to the adapter that is predicting, by method name (the
    hook is shared by every adapter of one pipeline); ``None`` from it keeps the output."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self.adapter: SD3InpaintFamily | None = None

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            return output
        replaced = getattr(self.adapter, self.method)(output)
        return output if replaced is None else replaced
