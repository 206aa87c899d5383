"""What the engine needs from a pipeline family, and what is common to all of them.

A family adapter wraps one loaded diffusers pipeline. It prepares a request with the
pipeline's own helpers (prompt encoding, latents, mask latents, schedule), so the
engine's full computation is the stock pipeline's, step by step; it runs one masked
transformer call over a :class:`~instgenie.attention.TokenBatch`; and it decodes.

Every per-request tensor is kept in *token space* ``[rows, N, C]``: one vector per
latent token in raster order, the layout the transformer sees. Scheduler updates and
inpainting blends are elementwise, so they run on any subset of tokens unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from PIL import Image

from ..attention import TokenBatch, uninstall
from ..token_grid import StepCost


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides the prompt and the mask that decides a denoising run.

    An edit served from a template's cache must match the template in all of these
    except ``seed`` where the family allows it (see ``Family.seed_must_match``).
    """

    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    strength: float = 1.0
    max_sequence_length: int = 512
    negative_prompt: str = ""


@dataclass
class TextEmbeddings:
    """Encoded prompt, one row per transformer row of the request (2 with CFG: uncond, cond)."""

    prompt_embeds: torch.Tensor  # [R, T, C_text]
    pooled: torch.Tensor  # [R, P]

    @property
    def rows(self) -> int:
        return int(self.prompt_embeds.shape[0])


@dataclass
class LatentInputs:
    """Per-request tensors over the full token grid, ``[1, N, C]`` each.

    ``condition`` is concatenated to the latents on the channel axis at every step
    (FluxFill's masked-image and mask channels). ``image_latents``, ``noise`` and
    ``blend_mask`` drive the inpainting blend that writes the noised original back
    into the unmasked area after each step (FluxInpaint, SD3Inpaint).
    ``generator_state`` is the seed generator's state after the noise was drawn, so
    a later request with the same seed continues the stock random sequence.
    """

    latents: torch.Tensor
    condition: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    blend_mask: torch.Tensor | None = None
    generator_state: torch.Tensor | None = None

    def generator(self) -> torch.Generator:
        """The seed generator where these inputs left it (a reuse continues the stock sequence)."""
        assert self.generator_state is not None, "these inputs kept no generator state"
        generator = torch.Generator("cpu")
        generator.set_state(self.generator_state)
        return generator

    def select(self, token_index: torch.Tensor) -> "LatentInputs":
        """The same inputs restricted to the tokens ``token_index``."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(1, token_index)

        return LatentInputs(
            latents=pick(self.latents),  # type: ignore[arg-type]
            condition=pick(self.condition),
            image_latents=pick(self.image_latents),
            noise=pick(self.noise),
            blend_mask=pick(self.blend_mask),
            generator_state=self.generator_state,
        )


@dataclass
class ModelInputs:
    """One batched transformer call; rows padded to ``batch.padded_len`` tokens."""

    batch: TokenBatch
    tokens: torch.Tensor  # [B, L, C_in] latents (+ condition)
    prompt_embeds: torch.Tensor  # [B, T, C_text]
    pooled: torch.Tensor  # [B, P]
    timesteps: torch.Tensor  # [B], the scheduler's timesteps (0..1000)
    guidance: torch.Tensor  # [B], guidance scale of each row
    grid: tuple[int, int]  # token grid (rows, cols) shared by the batch


def vae_input(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Denoised spatial latents -> the VAE decoder's input, as each pipeline unscales them:
    scaling and shift (FLUX, SD3), per-channel mean and std (SDXL VAEs that declare them),
    or scaling alone (SD 1.5 / 2)."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)


class Family(ABC):
    """Adapter between the engine and one diffusers pipeline class."""

    pipeline_classes: ClassVar[tuple[str, ...]]
    #: Pixels along one side of a latent token: VAE factor times patch size.
    pixels_per_token: ClassVar[int] = 16
    #: Whether an edit must use its template's noise seed for the cache to be valid
    #: (pipelines that blend the noised original back in).
    seed_must_match: ClassVar[bool] = True
    #: Whether ``prepare_latents`` runs the VAE even when it reuses a template's inputs
    #: (FluxFill encodes each edit's masked image), so it belongs off the loop's process.
    encodes_on_reuse: ClassVar[bool] = False
    #: Whether the denoiser reads every latent token at every step (a UNet's
    #: convolutions do): a cached row then carries its template's latents at this step
    #: wherever it computes nothing, and only the denoiser's attention levels gather.
    reads_every_token: ClassVar[bool] = False
    default_steps: ClassVar[int] = 28
    default_guidance: ClassVar[float] = 3.5
    #: The pipeline component that denoises (``pipe.transformer``, ``pipe.unet``).
    denoiser_name: ClassVar[str] = "transformer"

    def __init__(self, pipe: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.pipe = pipe
        self.device = device
        self.dtype = dtype
        self.denoiser = getattr(pipe, self.denoiser_name)
        # Pipeline helpers read ``pipe.scheduler``; each request owns a scheduler copy
        # (diffusers schedulers keep one global step index), swapped in under a lock.
        self._pipeline_lock = threading.RLock()
        # The fast tokenizers keep their padding and truncation settings on one shared
        # object: the pipelines' encode_prompt sets padding="max_length", then
        # padding="longest" for a truncation check, so two threads interleaving gave a
        # prompt its neighbour's length ([1, 3, C] among [1, 32, C]) and failed a batch.
        self._text_lock = threading.Lock()
        self.num_sites = self.install_processors()

    # -- setup -------------------------------------------------------------
    @abstractmethod
    def install_processors(self) -> int:
        """Install masked attention processors (and hooks); return the number of sites."""

    @property
    def options(self) -> dict[str, Any]:
        """The keyword arguments this adapter was made with (another adapter over the
        same pipeline must take the same)."""
        return {}

    def uninstall(self) -> None:
        """Hand the pipeline back untouched: stock attention processors, no InstGenIE hooks
        (every adapter sharing the pipeline stops working)."""
        uninstall(self.denoiser)

    @property
    @abstractmethod
    def blocks(self) -> list[torch.nn.Module]:
        """The denoiser's blocks in call order: the planner's unit of load-or-recompute."""

    def sites_before(self, block: int) -> int:
        """Attention sites (numbered in call order) of the blocks before ``block``."""
        if not hasattr(self, "_site_offsets"):  # once: every step asks
            offsets = [0]
            for b in self.blocks:
                offsets.append(offsets[-1] + sum(1 for m in b.modules() if hasattr(m, "set_processor")))
            self._site_offsets = offsets
        return self._site_offsets[block]

    def text_tokens(self, max_sequence_length: int) -> int:
        """Text tokens each row carries through the denoiser (the DiTs pad to ``max_sequence_length``)."""
        return max_sequence_length

    @property
    def step_cost(self) -> StepCost:
        """What a row-step costs by its computed tokens (the router predicts with it too):
        a DiT block computes each masked token once."""
        return StepCost()

    def site_grids(self, grid: tuple[int, int]) -> list[tuple[int, int]]:
        """The token grid each cache site works on, for a request on ``grid``."""
        return [grid] * self.num_sites

    # -- geometry ----------------------------------------------------------
    def grid(self, settings: GenerationSettings) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` of a resolution."""
        return settings.height // self.pixels_per_token, settings.width // self.pixels_per_token

    def num_tokens(self, settings: GenerationSettings) -> int:
        rows, cols = self.grid(settings)
        return rows * cols

    # -- preparation (off the step loop) -------------------------------------
    @contextlib.contextmanager
    def using_scheduler(self, scheduler: Any) -> Iterator[None]:
        """Run pipeline helpers against ``scheduler`` instead of the shared one."""
        with self._pipeline_lock:
            shared = self.pipe.scheduler
            self.pipe.scheduler = scheduler
            try:
                yield
            finally:
                self.pipe.scheduler = shared

    def new_scheduler(self) -> Any:
        return copy.deepcopy(self.pipe.scheduler)

    @abstractmethod
    def schedule(self, scheduler: Any, settings: GenerationSettings) -> torch.Tensor:
        """Set ``scheduler`` up for ``settings`` as the pipeline does; return its timesteps."""

    def encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings:
        """Encode ``prompt`` (and the negative prompt under CFG); one caller at a time (see ``_text_lock``)."""
        with self._text_lock:
            return self._encode_prompt(prompt, settings)

    @abstractmethod
    def _encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings:
        """The pipeline's own prompt encoding; called under ``_text_lock``."""

    @abstractmethod
    def prepare_latents(
        self,
        image: torch.Tensor,
        pixel_mask: torch.Tensor,
        settings: GenerationSettings,
        scheduler: Any,
        timesteps: torch.Tensor,
        reuse: LatentInputs | None,
    ) -> LatentInputs:
        """Latents and conditioning of one request over the full token grid.

        Args:
            image: ``[1, 3, H, W]`` in [-1, 1] (the pipeline's image processor output).
            pixel_mask: ``[1, 1, H, W]`` binary float, 1 = edit.
            reuse: the template's inputs when the request shares its seed; whatever
                depends only on image and seed is taken from it instead of recomputed.
        """

    # -- the step (on the step loop) -----------------------------------------
    def model_tokens(
        self, scheduler: Any, timestep: torch.Tensor, latents: torch.Tensor, condition: torch.Tensor | None
    ) -> torch.Tensor:
        """One row's denoiser input ``[M, C_in]`` at ``timestep``: its latents, then its condition."""
        return latents if condition is None else torch.cat([latents, condition], dim=-1)

    @abstractmethod
    def predict(self, inputs: ModelInputs) -> torch.Tensor:
        """One masked transformer call: the model output ``[B, L, C]`` of each row's tokens."""

    # -- finishing (off the step loop) ---------------------------------------
    @abstractmethod
    def decode(self, latents: torch.Tensor, settings: GenerationSettings) -> Image.Image:
        """Decode full-grid latents ``[1, N, C]`` to an RGB image."""

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """``[1, 3, H, W]`` float32 in [-1, 1], as the pipeline's own preprocessing."""
        return self.pipe.image_processor.preprocess(image, height=image.height, width=image.width).to(torch.float32)

    def postprocess(self, decoded: torch.Tensor) -> Image.Image:
        return self.pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]

    @staticmethod
    def pixel_mask_tensor(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(mask.astype(np.float32))[None, None]
