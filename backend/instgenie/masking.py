"""From a pixel mask to the set of latent tokens an edit must compute.

Which tokens a mask touches is :func:`~instgenie.token_grid.token_mask`. Token indices
are raster order over the token grid, the order diffusers packs latents in (Flux
``_pack_latents``, SD3 ``PatchEmbed``).
"""

from __future__ import annotations

import numpy as np
import torch

from .token_grid import token_mask


def token_indices(pixel_mask: np.ndarray, pixels_per_token: int) -> torch.Tensor:
    """Sorted raster indices (``int64 [M]``) of the masked tokens."""
    return torch.from_numpy(np.flatnonzero(token_mask(pixel_mask, pixels_per_token))).long()


def union(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sorted union of two index sets."""
    return torch.unique(torch.cat([a, b]), sorted=True)


def pool_token_index(index: torch.Tensor, grid: tuple[int, int], level: tuple[int, int]) -> torch.Tensor:
    """The tokens of a coarser ``level`` grid whose cell covers any of ``index`` on ``grid``
    (max-pooling, as from pixels to tokens): a UNet attention level's computed tokens."""
    if level == grid:
        return index
    rows, cols = grid
    if index.numel() == rows * cols:
        return torch.arange(level[0] * level[1], device=index.device)
    mask = torch.zeros(rows * cols, device=index.device)
    mask[index] = 1.0
    pooled = torch.nn.functional.adaptive_max_pool2d(mask.view(1, 1, rows, cols), level)
    return pooled.flatten().nonzero().flatten()
