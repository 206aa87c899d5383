"""What a request costs in latent tokens, the unit of the instances' load.

A latent token covers a square of ``pixels_per_token`` pixels, which depends on the
model family (VAE factor x transformer patch: 16 for Flux and SD3, 8 for the UNets);
each instance publishes its own as the :data:`PIXELS_PER_TOKEN_METRIC` gauge. What a
step of those tokens costs is the family's :class:`~instgenie.token_grid.StepCost`
(the UNets pool the mask to each attention level and run some layers densely), which
instances publish as :data:`STEP_COST_DENSE_METRIC` and per-depth
:data:`STEP_COST_WEIGHT_METRIC` gauges. The grid arithmetic and the cost function are
the engine's, so the router counts exactly the work the instance will count.
"""

from __future__ import annotations

import numpy as np

from instgenie.token_grid import StepCost, token_mask

from .prometheus import parse_samples

__all__ = [
    "DEFAULT_PIXELS_PER_TOKEN",
    "PIXELS_PER_TOKEN_METRIC",
    "STEP_COST_DENSE_METRIC",
    "STEP_COST_WEIGHT_METRIC",
    "StepCost",
    "image_token_count",
    "image_work",
    "mask_token_count",
    "mask_work",
    "step_cost_from_metrics",
    "token_mask",
]

#: Until an instance has said otherwise: the DiT families' grid.
DEFAULT_PIXELS_PER_TOKEN = 16
PIXELS_PER_TOKEN_METRIC = "instgenie_pixels_per_token"
STEP_COST_DENSE_METRIC = "instgenie_step_cost_dense"
STEP_COST_WEIGHT_METRIC = "instgenie_step_cost_weight"  # labelled depth="<2x downsamplings>"


def mask_token_count(mask: np.ndarray, pixels_per_token: int = DEFAULT_PIXELS_PER_TOKEN) -> int:
    """Latent tokens a boolean ``[height, width]`` pixel mask touches."""
    return int(token_mask(mask, pixels_per_token).sum())


def image_token_count(width: int, height: int, pixels_per_token: int = DEFAULT_PIXELS_PER_TOKEN) -> int:
    """Latent tokens of a whole image."""
    return (width // pixels_per_token) * (height // pixels_per_token)


def mask_work(mask: np.ndarray, pixels_per_token: int = DEFAULT_PIXELS_PER_TOKEN, cost: StepCost = StepCost()) -> float:
    """Token-equivalents of one row-step computing what a boolean pixel mask touches."""
    return cost.work(token_mask(mask, pixels_per_token))


def image_work(width: int, height: int, pixels_per_token: int = DEFAULT_PIXELS_PER_TOKEN, cost: StepCost = StepCost()) -> float:
    """Token-equivalents of one row-step computing a whole image."""
    return cost.work(np.ones((height // pixels_per_token, width // pixels_per_token), dtype=bool))


def step_cost_from_metrics(text: str) -> StepCost | None:
    """The :class:`StepCost` an instance publishes in its Prometheus text (``None``: none)."""
    dense = None
    levels: dict[int, float] = {}
    for sample in parse_samples(text):
        if sample.name == STEP_COST_DENSE_METRIC:
            dense = sample.value
        elif sample.name == STEP_COST_WEIGHT_METRIC and sample.labels.get("depth", "").isdigit():
            levels[int(sample.labels["depth"])] = sample.value
    if dense is None or not levels:
        return None
    return StepCost(dense=dense, levels=tuple(sorted(levels.items())))
