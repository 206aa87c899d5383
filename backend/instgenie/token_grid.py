"""The latent-token grid over an image, in numpy only (the router counts tokens with it too).

A latent token covers a ``pixels_per_token`` square of pixels (VAE factor 8 times the
transformer patch 2 = 16 for Flux and SD3). A token is masked when any pixel of its
square is masked: max-pooling, so no edited pixel is ever served from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def token_mask(pixel_mask: np.ndarray, pixels_per_token: int) -> np.ndarray:
    """Boolean ``[rows, cols]`` grid: True where the token's pixel square touches the mask."""
    height, width = pixel_mask.shape
    rows, cols = height // pixels_per_token, width // pixels_per_token
    cells = pixel_mask[: rows * pixels_per_token, : cols * pixels_per_token]
    cells = cells.reshape(rows, pixels_per_token, cols, pixels_per_token)
    return cells.any(axis=(1, 3))


def level_grid(grid: tuple[int, int], depth: int) -> tuple[int, int]:
    """The token grid after ``depth`` 2x downsamplings (a UNet's stride-2, padding-1
    convolutions: odd sides round up)."""
    rows, cols = grid
    for _ in range(depth):
        rows, cols = (rows + 1) // 2, (cols + 1) // 2
    return rows, cols


def pool_tokens(tokens: np.ndarray, depth: int) -> np.ndarray:
    """A boolean token grid max-pooled 2x ``depth`` times (odd sides round up): the
    tokens a UNet computes at that depth."""
    for _ in range(depth):
        rows, cols = tokens.shape
        padded = np.zeros((rows + rows % 2, cols + cols % 2), dtype=bool)
        padded[:rows, :cols] = tokens
        tokens = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).any(axis=(1, 3))
    return tokens


@dataclass(frozen=True)
class StepCost:
    """What one denoising step of one request row costs, in token-equivalents.

    One cost function for the instance that counts its work and the router that
    predicts it. ``dense``: per token of the whole grid, computed whatever the mask (a
    UNet's dense ResNets); ``levels``: ``(depth, weight)`` per computed token of the
    token mask pooled to each depth (:func:`pool_tokens`). The DiT families compute
    each masked token once: no dense part, weight 1 at depth 0. Text tokens are
    counted apart (a constant per row-step that an instance publishes).
    """

    dense: float = 0.0
    levels: tuple[tuple[int, float], ...] = ((0, 1.0),)

    def work(self, tokens: np.ndarray) -> float:
        """Token-equivalents of one row-step computing the boolean token grid ``tokens``."""
        return self.dense * tokens.size + sum(weight * int(pool_tokens(tokens, depth).sum()) for depth, weight in self.levels)
