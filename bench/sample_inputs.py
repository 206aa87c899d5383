"""Write a sample template (template.png) and mask (mask.png) into a folder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def write_samples(folder: Path, size: int = 128) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    picture = np.stack([np.sin(3 * x + 1), np.cos(2 * y), np.sin(2 * (x + y))], -1) * 0.5 + 0.5
    Image.fromarray((picture * 255).astype(np.uint8)).save(folder / "template.png")
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : size // 2, size // 4 : 3 * size // 4] = 255
    Image.fromarray(mask).save(folder / "mask.png")


if __name__ == "__main__":
    write_samples(Path(sys.argv[1] if len(sys.argv) > 1 else "out"))
