"""The latent-token grid over an image, in numpy only (the router counts tokens with it too).

A latent token covers a ``pixels_per_token`` square of pixels (VAE factor 8 times the
transformer patch 2 = 16 for Flux and SD3). A token is masked when any pixel of its
square is masked: max-pooling, so no edited pixel is ever served from the cache.
"""

from __future__ import annotations

import numpy as np


def token_mask(pixel_mask: np.ndarray, pixels_per_token: int) -> np.ndarray:
    """Boolean ``[rows, cols]`` grid: True where the token's pixel square touches the mask."""
    height, width = pixel_mask.shape
    rows, cols = height // pixels_per_token, width // pixels_per_token
    cells = pixel_mask[: rows * pixels_per_token, : cols * pixels_per_token]
    cells = cells.reshape(rows, pixels_per_token, cols, pixels_per_token)
    return cells.any(axis=(1, 3))
