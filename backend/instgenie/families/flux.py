"""Flux.1 families: FluxFillPipeline and FluxInpaintPipeline.

Flux packs 2x2 latent patches into tokens before the transformer, so the engine can
hand the transformer exactly the computed tokens; the only per-row state the
transformer itself cannot take is the token positions (``img_ids`` is shared by the
batch), so each row's rotary table travels in the token batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

from ..attention import MaskedFluxAttnProcessor, TokenBatch, install_block_hooks, install_masked_processors
from .base import Family, GenerationSettings, LatentInputs, ModelInputs, TextEmbeddings, vae_input


class FluxFamily(Family):
    """What FluxFill and FluxInpaint share: text, schedule, transformer call, decode."""

    default_steps = 28

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(pipe, device, dtype)
        self._rotary_tables: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def install_processors(self) -> int:
        install_block_hooks(self.blocks)
        return install_masked_processors(self.denoiser, MaskedFluxAttnProcessor)

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return [*self.denoiser.transformer_blocks, *self.denoiser.single_transformer_blocks]

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    def schedule(self, scheduler: Any, settings: GenerationSettings) -> torch.Tensor:
        steps = settings.steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        image_seq_len = self.num_tokens(settings)
        config = scheduler.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        with self.using_scheduler(scheduler):
            retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
            timesteps, _ = self.pipe.get_timesteps(steps, settings.strength, self.device)
        return timesteps

    def _encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings:
        with torch.no_grad():
            prompt_embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=prompt, prompt_2=None, device=self.device, max_sequence_length=settings.max_sequence_length
            )
        return TextEmbeddings(prompt_embeds.to(self.dtype), pooled.to(self.dtype))

    def _rotary(self, text_len: int, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables ``[T + N, D]`` of the text tokens and every image token of a grid."""
        key = (text_len, *grid)
        if key not in self._rotary_tables:
            rows, cols = grid
            img_ids = self.pipe._prepare_latent_image_ids(1, rows, cols, self.device, self.dtype)
            txt_ids = torch.zeros(text_len, 3, device=self.device, dtype=self.dtype)
            with torch.no_grad():
                self._rotary_tables[key] = self.denoiser.pos_embed(torch.cat([txt_ids, img_ids]))
        return self._rotary_tables[key]

    def _set_rotary(self, batch: TokenBatch, grid: tuple[int, int]) -> None:
        cos, sin = self._rotary(batch.text_len, grid)
        batch.full_rotary = (cos, sin)
        if batch.all_dense:
            return
        text = torch.arange(batch.text_len, device=cos.device)
        index = torch.cat([text.expand(batch.batch_size, -1), batch.padded_index + batch.text_len], dim=1)
        batch.row_rotary = (cos[index], sin[index])

    def predict(self, inputs: ModelInputs) -> torch.Tensor:
        batch = inputs.batch
        text_len = inputs.prompt_embeds.shape[1]
        # Positions come per row from the token batch; the transformer's own shared
        # ``img_ids`` only needs the right length.
        img_ids = torch.zeros(inputs.tokens.shape[1], 3, device=self.device, dtype=self.dtype)
        txt_ids = torch.zeros(text_len, 3, device=self.device, dtype=self.dtype)
        guidance = inputs.guidance if self.denoiser.config.guidance_embeds else None
        self._set_rotary(batch, inputs.grid)
        with torch.no_grad():
            return self.denoiser(
                hidden_states=inputs.tokens,
                timestep=inputs.timesteps.to(inputs.tokens.dtype) / 1000,
                guidance=guidance,
                pooled_projections=inputs.pooled,
                encoder_hidden_states=inputs.prompt_embeds,
                txt_ids=txt_ids,
                img_ids=img_ids,
                joint_attention_kwargs={"token_batch": batch},
                return_dict=False,
            )[0]

    def _latent_hw(self, settings: GenerationSettings) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor
        return 2 * (settings.height // (factor * 2)), 2 * (settings.width // (factor * 2))

    def _noise_and_image_latents(
        self, image: torch.Tensor, settings: GenerationSettings, scheduler: Any, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Generator]:
        """The pipeline's ``prepare_latents``, returning the generator for what follows."""
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        with self.using_scheduler(scheduler), torch.no_grad():
            outputs = self.pipe.prepare_latents(
                image,
                timesteps[:1],
                1,
                self.latent_channels,
                settings.height,
                settings.width,
                self.dtype,
                self.device,
                generator,
            )
        if len(outputs) == 4:  # FluxInpaint: latents, noise, image_latents, ids
            return outputs[0], outputs[1], outputs[2], generator
        return outputs[0], None, None, generator

    def decode(self, latents: torch.Tensor, settings: GenerationSettings) -> Image.Image:
        vae = self.pipe.vae
        spatial = self.pipe._unpack_latents(latents, settings.height, settings.width, self.pipe.vae_scale_factor)
        spatial = vae_input(vae, spatial)
        with torch.no_grad():
            decoded = vae.decode(spatial.to(vae.dtype), return_dict=False)[0]
        return self.postprocess(decoded)


class FluxFillFamily(FluxFamily):
    """FluxFillPipeline: the mask and the masked image are extra input channels.

    The seed may differ from the template's: only the computed tokens start from the
    edit's noise, and nothing is blended back.
    """

    pipeline_classes = ("FluxFillPipeline",)
    seed_must_match = False
    encodes_on_reuse = True
    default_guidance = 30.0

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
            latents, generator = reuse.latents, reuse.generator()
        else:
            latents, _, _, generator = self._noise_and_image_latents(image, settings, scheduler, timesteps)
        generator_state = generator.get_state()
        masked_image = (image * (1 - pixel_mask)).to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            mask, masked_image_latents = self.pipe.prepare_mask_latents(
                pixel_mask.to(self.device, self.dtype),
                masked_image,
                1,
                self.latent_channels,
                1,
                settings.height,
                settings.width,
                self.dtype,
                self.device,
                generator,
            )
        condition = torch.cat((masked_image_latents, mask), dim=-1)
        return LatentInputs(latents=latents, condition=condition, generator_state=generator_state)


class FluxInpaintFamily(FluxFamily):
    """FluxInpaintPipeline: after every step the unmasked latents are reset to the
    noised original, so image latents and noise must be the template's."""

    pipeline_classes = ("FluxInpaintPipeline",)
    default_guidance = 3.5

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
            latents, noise, image_latents, _ = self._noise_and_image_latents(image, settings, scheduler, timesteps)
        height, width = self._latent_hw(settings)
        # The pipeline's prepare_mask_latents would also VAE-encode a masked image
        # that FluxInpaint never uses; only its mask packing matters here.
        mask = torch.nn.functional.interpolate(pixel_mask.to(self.device, self.dtype), size=(height, width))
        mask = self.pipe._pack_latents(mask.repeat(1, self.latent_channels, 1, 1), 1, self.latent_channels, height, width)
        return LatentInputs(latents=latents, image_latents=image_latents, noise=noise, blend_mask=mask)
