"""From a pixel mask to the set of latent tokens an edit must compute.

Which tokens a mask touches is :func:`~instgenie.token_grid.token_mask`. Token indices
are raster order over the token grid, the order diffusers packs latents in (Flux
``_pack_latents``, SD3 ``PatchEmbed``).
"""

from __future__ import annotations

import numpy as np
import torch

from .token_grid import level_grid, pool_tokens, token_mask


def token_indices(pixel_mask: np.ndarray, pixels_per_token: int) -> torch.Tensor:
    """Sorted raster indices (``int64 [M]``) of the masked tokens."""
    return torch.from_numpy(np.flatnonzero(token_mask(pixel_mask, pixels_per_token))).long()


def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted union of two index sets."""
    return torch.unique(torch.cat([a, b]), sorted=True)


def pool_token_index(index: torch.Tensor, grid: tuple[int, int], level: tuple[int, int]) -> torch.Tensor:
    """The tokens of a coarser ``level`` grid (``grid`` downsampled 2x some times) whose
    cell covers any of ``index`` on ``grid``: a UNet level's computed tokens
    (:func:`~instgenie.token_grid.pool_tokens`, which the router's costs use too)."""
    if level == grid:
        return index
    depth = 0
    while level_grid(grid, depth) != level:
        if level_grid(grid, depth) == (1, 1):
            raise ValueError(f"{level} is not a 2x downsampling of the token grid {grid}")
        depth += 1
    pooled = pool_tokens(token_grid(index, grid), depth)
    return torch.from_numpy(np.flatnonzero(pooled)).to(index.device)


def token_grid(index: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Raster indices on ``grid`` as a boolean ``[rows, cols]`` grid."""
    tokens = np.zeros(grid[0] * grid[1], dtype=bool)
    tokens[index.cpu().numpy()] = True
    return tokens.reshape(grid)
