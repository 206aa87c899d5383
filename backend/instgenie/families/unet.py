"""UNet inpainting families: StableDiffusionXLInpaintPipeline and StableDiffusionInpaintPipeline.

The inpainting UNets read 9 channels per latent pixel: the latents, the mask and
the masked image's latents; they denoise every latent, so unmasked pixels are pasted
from the template afterwards as for the other families. A token is one latent pixel
(8x8 image pixels). The UNet's ResNets read every token, so each cached row carries
the template's latents at this step wherever it computes nothing
(``reads_every_token``); only the attention levels compute the masked tokens alone
(:mod:`instgenie.masked_unet`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import retrieve_timesteps
from PIL import Image

from ..errors import UnsupportedModel
from ..masked_unet import UNetCall, install_unet_levels, unet_levels, unet_units, unit_convolutions
from ..token_grid import StepCost, level_grid
from .base import Family, GenerationSettings, LatentInputs, ModelInputs, TextEmbeddings, vae_input

#: Latent, mask and masked-image channels of an inpainting UNet's input.
_INPAINT_CHANNELS = 9


class UNetInpaintFamily(Family):
    """What the SD 1.5 / 2 and SDXL inpainting pipelines share."""

    pixels_per_token = 8
    seed_must_match = False  # only the computed tokens start from the edit's noise
    encodes_on_reuse = True  # each edit's masked image is VAE-encoded
    reads_every_token = True
    denoiser_name = "unet"
    default_steps = 50
    default_guidance = 7.5

    #: Whether design (c) (sparse ResNets) is on when the model does not say: it measured
    #: faster than (b) at mask ratios 0.1-0.35 and end to end for both families
    #: (docs/benchmarks/engine-sdxl-inpaint.md, engine-sd-inpaint.md).
    default_sparse_convs: ClassVar[bool] = True

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype, sparse_convs: bool | None = None) -> None:
        """``sparse_convs``: design (c), convolutions that compute only the mask's tiles
        (:mod:`instgenie.sparse_convs`); ``None``: the family's default."""
        self.sparse_convs = self.default_sparse_convs if sparse_convs is None else bool(sparse_convs)
        channels = int(pipe.unet.config.in_channels)
        if channels != _INPAINT_CHANNELS:
            raise UnsupportedModel(
                f"{type(pipe).__name__} with a {channels}-channel UNet is not supported: "
                f"only inpainting UNets ({_INPAINT_CHANNELS} input channels) are"
            )
        if pipe.vae.dtype == torch.float32 and getattr(pipe.vae.config, "force_upcast", False):
            # Upcasting a float32 VAE is a no-op, but SDXL's encode casts it anyway at
            # every call, and diffusers logs a warning at each cast.
            pipe.vae.register_to_config(force_upcast=False)
        super().__init__(pipe, device, dtype)

    # -- setup -------------------------------------------------------------
    @property
    def options(self) -> dict[str, Any]:
        return {"sparse_convs": self.sparse_convs}

    def install_processors(self) -> int:
        self._site_offsets, self._site_depths, self._call_slot = install_unet_levels(self.denoiser, self.sparse_convs)
        return self._site_offsets[-1]

    def site_grids(self, grid: tuple[int, int]) -> list[tuple[int, int]]:
        return [level_grid(grid, depth) for depth in self._site_depths]

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """The attention levels: what the loading planner loads or recomputes."""
        return unet_levels(self.denoiser)

    def text_tokens(self, max_sequence_length: int) -> int:
        return int(self.pipe.tokenizer.model_max_length)  # CLIP pads to its own length

    @property
    def step_cost(self) -> StepCost:
        """Multiply-accumulates per token of each part, from the UNet's own widths, in
        units where a full-mask row-step costs the latent tokens of the model's native
        size (as a DiT step would). Design (b) runs ResNets and samplers densely; (c)
        counts them by the tokens they compute, as the attention levels."""
        if not hasattr(self, "_step_cost"):
            self._step_cost = _unet_step_cost(self.denoiser, self.sparse_convs)
        return self._step_cost

    def sites_before(self, block: int) -> int:
        return self._site_offsets[block]

    @property
    def latent_channels(self) -> int:
        return int(self.pipe.vae.config.latent_channels)

    # -- token space <-> spatial latents ------------------------------------
    @staticmethod
    def to_tokens(spatial: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, H*W, C]`` (raster order)."""
        return spatial.flatten(2).transpose(1, 2)

    @staticmethod
    def to_spatial(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``[B, H*W, C]`` -> ``[B, C, H, W]``, contiguous: the stock pipeline's memory
        format, so convolutions take the stock kernels (channels-last ones round differently)."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], *grid).contiguous()

    # -- preparation -------------------------------------------------------
    def schedule(self, scheduler: Any, settings: GenerationSettings) -> torch.Tensor:
        # Every UNet call is a step of ours: a PNDM scheduler's timesteps list the
        # extra call its first step makes, so caches are keyed by UNet call.
        with self.using_scheduler(scheduler):
            retrieve_timesteps(scheduler, settings.steps, self.device)
            timesteps, _ = self.pipe.get_timesteps(settings.steps, settings.strength, self.device)
        return timesteps

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
            generator = torch.Generator("cpu").manual_seed(settings.seed)
            with self.using_scheduler(scheduler), torch.no_grad():
                (latents, _noise) = self.pipe.prepare_latents(
                    1,
                    self.latent_channels,
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
                )
            latents = self.to_tokens(latents)
        generator_state = generator.get_state()
        masked_image = image * (pixel_mask < 0.5)
        with torch.no_grad():
            mask, masked_image_latents = self.pipe.prepare_mask_latents(
                pixel_mask.to(self.device, self.dtype),
                masked_image.to(self.device, self.dtype),
                1,
                settings.height,
                settings.width,
                self.dtype,
                self.device,
                generator,
                False,
            )
        condition = torch.cat([self.to_tokens(mask), self.to_tokens(masked_image_latents)], dim=-1)
        return LatentInputs(latents=latents, condition=condition, generator_state=generator_state)

    # -- the step ------------------------------------------------------------
    def model_tokens(
        self, scheduler: Any, timestep: torch.Tensor, latents: torch.Tensor, condition: torch.Tensor | None
    ) -> torch.Tensor:
        return super().model_tokens(scheduler, timestep, scheduler.scale_model_input(latents, timestep), condition)

    def added_conditions(self, inputs: ModelInputs) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` of a call (SDXL's pooled text and size ids)."""
        return None

    def predict(self, inputs: ModelInputs) -> torch.Tensor:
        batch = inputs.batch
        spatial = self.to_spatial(inputs.tokens, inputs.grid)
        call = UNetCall(batch, inputs.grid)
        # Several adapters may share one pipeline (each with its own hooks' settings);
        # only this one's convolutions read the call.
        self._call_slot.call = call if self.sparse_convs else None
        try:
            with torch.no_grad():
                output = self.denoiser(
                    spatial,
                    inputs.timesteps,
                    encoder_hidden_states=inputs.prompt_embeds,
                    added_cond_kwargs=self.added_conditions(inputs),
                    cross_attention_kwargs={"token_batch": call},
                    return_dict=False,
                )[0]
        finally:
            self._call_slot.call = None
        return batch.gather(self.to_tokens(output))

    # -- finishing -----------------------------------------------------------
    def decode(self, latents: torch.Tensor, settings: GenerationSettings) -> Image.Image:
        vae = self.pipe.vae
        spatial = self.to_spatial(latents, self.grid(settings))
        with torch.no_grad():
            decoded = vae.decode(vae_input(vae, spatial).to(vae.dtype), return_dict=False)[0]
        return self.postprocess(decoded)


class SDInpaintFamily(UNetInpaintFamily):
    """StableDiffusionInpaintPipeline: SD 1.5 (1x1-convolution ``proj_in``/``proj_out``)
    and SD 2 (linear) inpainting; one CLIP text encoder, no pooled text."""

    pipeline_classes = ("StableDiffusionInpaintPipeline",)

    def _encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings:
        cfg = settings.guidance > 1
        with torch.no_grad():
            embeds, negative = self.pipe.encode_prompt(
                prompt, self.device, 1, cfg, negative_prompt=settings.negative_prompt or None
            )
        if cfg:
            embeds = torch.cat([negative, embeds])
        return TextEmbeddings(embeds.to(self.dtype), embeds.new_zeros(embeds.shape[0], 0, dtype=self.dtype))


class SDXLInpaintFamily(UNetInpaintFamily):
    """StableDiffusionXLInpaintPipeline: two CLIP encoders, pooled text and size ids
    (``text_time`` additional embeddings)."""

    pipeline_classes = ("StableDiffusionXLInpaintPipeline",)

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype, sparse_convs: bool | None = None) -> None:
        super().__init__(pipe, device, dtype, sparse_convs)
        self._time_ids: dict[tuple[int, int], torch.Tensor] = {}

    def _encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings:
        cfg = settings.guidance > 1
        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                prompt=prompt,
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=cfg,
                negative_prompt=settings.negative_prompt or None,
            )
        if cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return TextEmbeddings(embeds.to(self.dtype), pooled.to(self.dtype))

    def _size_ids(self, grid: tuple[int, int]) -> torch.Tensor:
        """The pipeline's ``add_time_ids`` of an uncropped image of the grid's size ``[1, 6]``."""
        if grid not in self._time_ids:
            factor = self.pipe.vae_scale_factor
            size = (grid[0] * factor, grid[1] * factor)
            encoder = self.pipe.text_encoder_2
            projection = int(encoder.config.projection_dim) if encoder is not None else None
            ids, _negative = self.pipe._get_add_time_ids(
                size, (0, 0), size, 6.0, 2.5, size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=projection
            )
            self._time_ids[grid] = ids.to(self.device)
        return self._time_ids[grid]

    def added_conditions(self, inputs: ModelInputs) -> dict[str, torch.Tensor]:
        ids = self._size_ids(inputs.grid).expand(inputs.pooled.shape[0], -1)
        return {"text_embeds": inputs.pooled, "time_ids": ids}


def _unet_step_cost(unet: torch.nn.Module, sparse_convs: bool) -> StepCost:
    side = int(unet.config.sample_size)
    grid = (side, side)
    dense = 0.0  # MACs per latent token of the whole grid
    per_depth: dict[int, float] = {}  # MACs per computed token at each depth
    for module, kind, depth in unet_units(unet):
        rows, cols = level_grid(grid, depth)
        share = rows * cols / (side * side)
        if kind == "level":
            width, blocks = module.inner_dim, len(module.transformer_blocks)
            # proj_in/out; per block q, k, v, out, cross q, out, GEGLU (8C^2 + 4C^2); scores and values.
            macs = 2 * width**2 + blocks * (18 * width**2 + 2 * rows * cols * width)
            per_depth[depth] = per_depth.get(depth, 0.0) + macs
            continue
        macs = sum(
            conv.in_channels * conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
            for conv in unit_convolutions(module, kind)
        )
        if sparse_convs:
            per_depth[depth] = per_depth.get(depth, 0.0) + macs
        else:
            dense += macs * share
    full = dense + sum(macs * level_grid(grid, d)[0] * level_grid(grid, d)[1] / (side * side) for d, macs in per_depth.items())
    return StepCost(dense=dense / full, levels=tuple(sorted((d, macs / full) for d, macs in per_depth.items())))
