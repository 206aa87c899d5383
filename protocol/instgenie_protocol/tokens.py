"""What a request costs in latent tokens, the unit of the instances' load.

A latent token covers a square of ``pixels_per_token`` pixels, which depends on the
model family (VAE factor x transformer patch: 16 for Flux and SD3); each instance
publishes its own as the :data:`PIXELS_PER_TOKEN_METRIC` gauge. The grid arithmetic is
the engine's (:func:`instgenie.token_grid.token_mask`), so the router counts exactly
the tokens the instance will compute.
"""

from __future__ import annotations

import numpy as np

from instgenie.token_grid import token_mask

#: Until an instance has said otherwise: the DiT families' grid.
DEFAULT_PIXELS_PER_TOKEN = 16
PIXELS_PER_TOKEN_METRIC = "instgenie_pixels_per_token"


def mask_token_count(mask: np.ndarray, pixels_per_token: int = DEFAULT_PIXELS_PER_TOKEN) -> int:
    """Latent tokens a boolean ``[height, width]`` pixel mask touches."""
    return int(token_mask(mask, pixels_per_token).sum())


def image_token_count(width: int, height: int, pixels_per_token: int = DEFAULT_PIXELS_PER_TOKEN) -> int:
    """Latent tokens of a whole image."""
    return (width // pixels_per_token) * (height // pixels_per_token)
