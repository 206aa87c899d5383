"""Where the work around the denoising steps runs: prompt encoding, VAE encode, VAE decode, PNG.

A serving loop must not be slowed by this work. Threads in the loop's process are not
enough: the text encoders and the VAE hold the GIL between their kernels, and the
step loop then waits for the GIL before each of its own. Lowering those threads'
priority makes it worse (a descheduled low-priority thread holding the GIL stalls the
loop: priority inversion). :class:`ProcessCodec` runs them in worker processes of
lower CPU priority instead; the loop's threads only wait on a pipe.

:class:`LocalCodec` runs them in the calling thread (tests, CLI, one-off edits).
Both produce identical results: each worker keeps the parent's intra-op thread count,
so the same kernels run.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from .compute_threads import use_intra_op_threads
from .families import Family, GenerationSettings, LatentInputs, TextEmbeddings
from .imaging import encode_png
from .lifetime import exit_with_parent

log = logging.getLogger(__name__)


class Codec(Protocol):
    #: Whether the text encoders and the VAE run in the calling thread (then that
    #: thread needs the step loop's intra-op thread count; see ``compute_threads``).
    runs_networks_here: bool

    def encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings: ...

    def prepare_latents(
        self,
        image: Image.Image,
        pixel_mask: np.ndarray,
        settings: GenerationSettings,
        scheduler: Any,
        timesteps: torch.Tensor,
        reuse: LatentInputs | None,
    ) -> LatentInputs:
        """The family's ``prepare_latents`` from the decoded image and ``[H, W]`` bool mask."""

    def render(
        self, latents: torch.Tensor, settings: GenerationSettings, original: Image.Image, pixel_mask: np.ndarray
    ) -> RenderedImage:
        """Decode full-grid latents, keep ``original``'s pixels outside the mask, encode PNG."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class RenderedImage:
    image: Image.Image
    png: bytes


class LocalCodec:
    """The family's own methods, in the calling thread."""

    runs_networks_here = True

    def __init__(self, family: Family) -> None:
        self.family = family

    def encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings:
        return self.family.encode_prompt(prompt, settings)

    def prepare_latents(self, image, pixel_mask, settings, scheduler, timesteps, reuse) -> LatentInputs:  # type: ignore[no-untyped-def]
        return _prepare(self.family, image, pixel_mask, settings, scheduler, timesteps, reuse)

    def render(self, latents, settings, original, pixel_mask) -> RenderedImage:  # type: ignore[no-untyped-def]
        return _render(self.family, latents, settings, original, pixel_mask)

    def close(self) -> None:
        pass


def _prepare(family: Family, image, pixel_mask, settings, scheduler, timesteps, reuse) -> LatentInputs:  # type: ignore[no-untyped-def]
    # Image preprocessing runs here too: a PIL image crosses a pipe at a quarter of
    # the bytes of its float tensor, and the tensor work leaves the loop's process.
    image_tensor = family.preprocess_image(image).to(family.device)
    return family.prepare_latents(
        image_tensor, family.pixel_mask_tensor(pixel_mask), settings, scheduler, timesteps, reuse
    )


def _render(family: Family, latents, settings, original, pixel_mask) -> RenderedImage:  # type: ignore[no-untyped-def]
    decoded = np.asarray(family.decode(latents, settings))
    image = Image.fromarray(np.where(pixel_mask[..., None], decoded, np.asarray(original)))
    return RenderedImage(image, encode_png(image))


# -- worker process side ----------------------------------------------------------------
_family: Family | None = None


def _load(model_dir: str, device: str, dtype: str, threads: int, nice: int) -> None:
    global _family
    from .loading import load_pipeline

    exit_with_parent()  # a SIGKILLed stub cannot shut its pool down
    use_intra_op_threads(threads)
    if nice and hasattr(os, "nice"):
        os.nice(nice)
    pipe, family_cls, _ = load_pipeline(model_dir, device, getattr(torch, dtype))
    _family = family_cls(pipe, torch.device(device), getattr(torch, dtype))


def _encode_prompt(prompt: str, settings: GenerationSettings) -> TextEmbeddings:
    assert _family is not None
    return _family.encode_prompt(prompt, settings)


def _prepare_latents(image, pixel_mask, settings, scheduler, timesteps, reuse) -> tuple[LatentInputs, Any]:  # type: ignore[no-untyped-def]
    assert _family is not None
    inputs = _prepare(_family, image, pixel_mask, settings, scheduler, timesteps, reuse)
    return inputs, scheduler  # the scheduler travels back in case the pipeline's helpers touched it


def _render_remote(latents, settings, original, pixel_mask) -> RenderedImage:  # type: ignore[no-untyped-def]
    assert _family is not None
    return _render(_family, latents, settings, original, pixel_mask)


class ProcessCodec:
    """The same work in ``workers`` processes at ``nice`` lower CPU priority.

    ``semaphore_prefix``: names the pool's semaphores in ``/dev/shm`` (default ``mp``).

    Each worker loads the pipeline folder once (text encoders, VAE; the transformer
    is loaded too and unused). Preparation that reuses a template's latents stays
    local unless the family still runs its VAE then (``Family.encodes_on_reuse``).
    """

    runs_networks_here = False

    def __init__(
        self,
        family: Family,
        model_dir: str,
        *,
        workers: int = 1,
        nice: int = 10,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        semaphore_prefix: str | None = None,
    ) -> None:
        self.local = LocalCodec(family)
        if semaphore_prefix:
            # The pool's queues are POSIX named semaphores (/dev/shm/sem.mp-*), which a
            # killed process leaves behind; a known prefix lets its launcher remove them.
            multiprocessing.current_process()._config["semprefix"] = "/" + semaphore_prefix  # type: ignore[attr-defined]
        context = multiprocessing.get_context("spawn")
        # Inside Triton's Python backend stub sys.executable is the stub, not Python.
        executable = sys.executable if os.path.basename(sys.executable).startswith("python") else _python()
        context.set_executable(executable)
        self._pool = ProcessPoolExecutor(
            workers,
            mp_context=context,
            initializer=_load,
            initargs=(str(model_dir), str(device), str(dtype).removeprefix("torch."), torch.get_num_threads(), nice),
        )
        # Load the workers now, not on the first request.
        self._pool.submit(_family_ready).result()

    def encode_prompt(self, prompt: str, settings: GenerationSettings) -> TextEmbeddings:
        return self._pool.submit(_encode_prompt, prompt, settings).result()

    def prepare_latents(self, image, pixel_mask, settings, scheduler, timesteps, reuse) -> LatentInputs:  # type: ignore[no-untyped-def]
        if reuse is not None and not self.local.family.encodes_on_reuse:
            return self.local.prepare_latents(image, pixel_mask, settings, scheduler, timesteps, reuse)
        inputs, used = self._pool.submit(
            _prepare_latents, image, pixel_mask, settings, scheduler, timesteps, reuse
        ).result()
        scheduler.__dict__.update(used.__dict__)
        return inputs

    def render(self, latents, settings, original, pixel_mask) -> RenderedImage:  # type: ignore[no-untyped-def]
        return self._pool.submit(_render_remote, latents, settings, original, pixel_mask).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _family_ready() -> bool:
    return _family is not None


def _python() -> str:
    candidate = os.path.join(sys.prefix, "bin", "python")
    return candidate if os.path.exists(candidate) else (shutil.which("python3") or "python3")
