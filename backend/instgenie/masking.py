"""From a pixel mask to the set of latent tokens an edit must compute.

A latent token covers a ``pixels_per_token`` square of pixels (VAE factor 8 times the
transformer patch 2 = 16 for Flux and SD3). A token is masked when any pixel of its
square is masked: max-pooling, so no edited pixel is ever served from the cache.
Token indices are raster order over the token grid, the order diffusers packs
latents in (Flux ``_pack_latents``, SD3 ``PatchEmbed``).
"""

from __future__ import annotations

import numpy as np
import torch


def token_mask(pixel_mask: np.ndarray, pixels_per_token: int) -> np.ndarray:
    """Boolean ``[rows, cols]`` grid: True where the token's pixel square touches the mask."""
    height, width = pixel_mask.shape
    rows, cols = height // pixels_per_token, width // pixels_per_token
    cells = pixel_mask[: rows * pixels_per_token, : cols * pixels_per_token]
    cells = cells.reshape(rows, pixels_per_token, cols, pixels_per_token)
    return cells.any(axis=(1, 3))


def token_indices(pixel_mask: np.ndarray, pixels_per_token: int) -> torch.Tensor:
    """Sorted raster indices (``int64 [M]``) of the masked tokens."""
    return torch.from_numpy(np.flatnonzero(token_mask(pixel_mask, pixels_per_token))).long()


def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted union of two index sets."""
    return torch.unique(torch.cat([a, b]), sorted=True)
