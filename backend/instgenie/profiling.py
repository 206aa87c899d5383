"""``instgenie profile``: fit this machine's cost models for the loading planner.

Two linear fits (see :class:`~instgenie.cache.planner.CostModel`):

- block compute time vs row-tokens: masked steps of a recorded template at several
  mask sizes (full computation included), step time divided by the transformer's
  attention blocks;
- load time vs bytes: cache steps of several sizes read back from the disk tier
  with the page cache dropped first (``posix_fadvise``), so the fit is the disk's.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .cache.disk import DiskTier, step_file
from .cache.planner import CostModel, LinearCost


def drop_page_cache(path: Path) -> None:
    """Evict ``path``'s pages so the next read comes from the device."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _picture(size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    pixels = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 127 + 128
    return Image.fromarray(pixels.astype(np.uint8))


def _mask(size: int, ratio: float) -> bytes:
    mask = np.zeros((size, size), np.uint8)
    side = max(16, int(round(size * ratio**0.5)) // 16 * 16)
    mask[:side, :side] = 255
    return _png(Image.fromarray(mask))


def profile_compute(engine, size: int, steps: int, ratios: Sequence[float], repeats: int) -> LinearCost:  # type: ignore[no-untyped-def]
    record = engine.register_template(_png(_picture(size)), "a photo", seed=0, steps=steps)
    blocks = len(engine.family.blocks)
    tokens, seconds = [], []
    for ratio in ratios:
        best = float("inf")
        for _ in range(repeats):
            state = engine.prepare_edit(_mask(size, ratio), "a photo", template_id=record.template_id, full_compute=ratio >= 1)
            engine.step([state])  # warm-up step, not timed
            started = time.perf_counter()
            engine.run([state])
            best = min(best, (time.perf_counter() - started) / max(1, state.total_steps - 1))
            engine.release(state)
        tokens.append(state.rows * (state.computed_tokens + state.text.prompt_embeds.shape[1]))
        seconds.append(best / blocks)
    return LinearCost.fit(tokens, seconds)


def profile_load(folder: Path, sizes_mib: Sequence[float], repeats: int) -> LinearCost:
    disk = DiskTier(folder, "profile", "profile")
    sizes, seconds = [], []
    for index, mib in enumerate(sizes_mib):
        count = int(mib * 2**20) // 4
        template_id = f"profile-{index}"
        disk.write(template_id, {}, {}, [(0, {"k.0.0": torch.randn(count // 2), "v.0.0": torch.randn(count // 2)})])
        path = disk.folder / template_id / step_file(0)
        best = float("inf")
        for _ in range(repeats):
            drop_page_cache(path)
            started = time.perf_counter()
            disk.read_step(template_id, 0)
            best = min(best, time.perf_counter() - started)
        sizes.append(path.stat().st_size)
        seconds.append(best)
    return LinearCost.fit(sizes, seconds)


def profile(
    model_dir: str,
    out: str,
    *,
    size: int = 512,
    steps: int = 4,
    max_sequence_length: int = 128,
    device: str = "cpu",
    cache_dir: str | None = None,
    ratios: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    load_sizes_mib: Sequence[float] = (4, 16, 64, 128),
    repeats: int = 2,
) -> CostModel:
    from .engine import Engine

    engine = Engine.from_pretrained(model_dir, device=device, max_sequence_length=max_sequence_length)
    compute = profile_compute(engine, size, steps, ratios, repeats)
    with tempfile.TemporaryDirectory(dir=cache_dir) as folder:
        load = profile_load(Path(folder), load_sizes_mib, repeats)
    model = CostModel(block_compute=compute, load=load, device=str(engine.device))
    model.save(out)
    return model
