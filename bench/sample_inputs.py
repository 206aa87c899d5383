"""Sample inputs: smooth random pictures and rectangle masks; writes template.png / mask.png."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def sample_template(size: int = 128, seed: int = 0) -> Image.Image:
    """A smooth picture (sines of random frequency and phase), so the VAE sees structure."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.uniform())) for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8))


def write_samples(folder: Path, size: int = 128) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sample_template(size).save(folder / "template.png")
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : 3 * size // 4] = 255
    Image.fromarray(mask).save(folder / "mask.png")


if __name__ == "__main__":
    write_samples(Path(sys.argv[1] if len(sys.argv) > 1 else "out"))
