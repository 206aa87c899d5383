"""Family adapters: one per supported diffusers pipeline class."""

from .base import Family, GenerationSettings, LatentInputs, ModelInputs, TextEmbeddings
from .flux import FluxFillFamily, FluxInpaintFamily
from .sd3 import SD3InpaintFamily
from .unet import SDInpaintFamily, SDXLInpaintFamily, UNetInpaintFamily

FAMILIES: tuple[type[Family], ...] = (
    FluxFillFamily,
    FluxInpaintFamily,
    SD3InpaintFamily,
    SDXLInpaintFamily,
    SDInpaintFamily,
)

__all__ = [
    "FAMILIES",
    "Family",
    "FluxFillFamily",
    "FluxInpaintFamily",
    "GenerationSettings",
    "LatentInputs",
    "ModelInputs",
    "SD3InpaintFamily",
    "SDInpaintFamily",
    "SDXLInpaintFamily",
    "TextEmbeddings",
    "UNetInpaintFamily",
]
