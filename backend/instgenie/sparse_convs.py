"""Sparse convolutions for the UNet families: design (c), ResNets that compute only the mask.

In design (b) the attention levels compute the masked tokens only and every ResNet
runs densely. Here each convolution of the ResNets and of the down/upsamplers
computes only the output *tiles* that hold a computed token of its grid (the latent
mask max-pooled to it), each tile read from its input grown by the kernel's halo;
everywhere else its output is the template's, read from the cache. Everything
between the convolutions (GroupNorm, SiLU, the time embedding, the residual sum)
runs densely over those cached-plus-fresh maps, as the stock modules do: a GroupNorm
of cached statistics would round differently (5e-7 to 1e-6 off), so the invariant
stays exact only this way.

A hook replaces each convolution's forward (``diffusers.hooks``' ``new_forward``);
the ResNet and sampler modules themselves run unmodified. A convolution of a tile is
bitwise the dense one's output on the CPUs we know, but kernels are chosen per shape:
the first sparse call of each input shape checks it against the dense convolution on
CPU and, if any bit differs, that convolution stays dense for that shape (a logged
fallback), so an edit equal to its template is bit-exact on any CPU.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from .attention import HOOK_PREFIX, TokenBatch

if TYPE_CHECKING:
    from .masked_unet import UNetCall

__all__ = ["CallSlot", "SparseConv", "SPARSE_CONV_HOOK", "TILE"]

log = logging.getLogger(__name__)

SPARSE_CONV_HOOK = HOOK_PREFIX + "sparse_conv"
#: Output tile side: small enough to follow a mask's outline, large enough that a
#: tile's halo (1 pixel per side for 3x3) costs little.
TILE = 8


class CallSlot:
    """The UNet call now running, for hooks on modules that receive no call arguments."""

    def __init__(self) -> None:
        self.call: UNetCall | None = None


Tile = tuple[int, int, int, int]  # (row, col, rows, cols) on the output grid


class SparseConv(ModelHook):
    """On one ``Conv2d``: compute the tiles of computed tokens, the template's output elsewhere.

    Args:
        site: the cache site of this convolution's output.
        level: attention levels before it in call order (dense while the call's
            recomputed prefix covers it).
        slot: where the running call is found.
    """

    def __init__(self, site: int, level: int, slot: CallSlot) -> None:
        super().__init__()
        self.site, self.level, self.slot = site, level, slot
        self._exact: dict[tuple, bool] = {}  # input shape -> tiles bitwise equal to dense here

    def new_forward(self, conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        dense_forward = self.fn_ref.original_forward
        call = self.slot.call
        if call is None:
            return dense_forward(x)
        batch = call.batch
        if batch.all_dense or self.level < batch.full_blocks:
            return self._recorded(batch, dense_forward(x))
        grid = _output_grid(conv, x)
        tiles = [_tiles(call.row_tokens(grid)[b], grid) if row.cached is not None else _all_tiles(grid)
                 for b, row in enumerate(batch.rows)]  # fmt: skip
        shape_key = (tuple(x.shape), x.dtype, x.device.type)
        if x.device.type == "cpu" and shape_key not in self._exact:
            self._exact[shape_key] = self._tiles_match_dense(conv, x, tiles, dense_forward)
        if not self._exact.get(shape_key, True):
            return self._recorded(batch, dense_forward(x))
        computed = _convolve_tiles(conv, x, tiles)
        full = x.new_empty(x.shape[0], conv.out_channels, *grid)
        for b, row in enumerate(batch.rows):
            if row.cached is not None:
                full[b] = _cached_map(row.cached.output(self.site), row.cached.stored_tokens(self.site), grid, full)
            for (r, c, h, w), values in zip(tiles[b], computed[b]):
                full[b, :, r : r + h, c : c + w] = values
        return self._recorded(batch, full)

    def _recorded(self, batch: TokenBatch, output: torch.Tensor) -> torch.Tensor:
        if batch.records:
            for b, row in enumerate(batch.rows):
                if row.recorder is not None:
                    row.recorder.record_output(self.site, output[b].flatten(1).t())
        return output

    def _tiles_match_dense(self, conv: torch.nn.Conv2d, x: torch.Tensor, tiles: list[list[Tile]], dense_forward: Any) -> bool:
        dense = dense_forward(x)
        computed = _convolve_tiles(conv, x, tiles)
        exact = all(
            torch.equal(values, dense[b, :, r : r + h, c : c + w])
            for b in range(len(tiles))
            for (r, c, h, w), values in zip(tiles[b], computed[b])
        )
        if not exact:
            log.warning("tiled %s on %s is not bitwise the dense one on this CPU; it stays dense", conv, tuple(x.shape))
        return exact


def check_sparse_conv(conv: torch.nn.Module) -> None:
    """Raise ``TypeError`` for a convolution the tiles cannot reproduce."""
    if not isinstance(conv, torch.nn.Conv2d) or conv.padding_mode != "zeros" or conv.dilation != (1, 1):
        raise TypeError(f"sparse convolutions need a zero-padded, undilated Conv2d, got {conv}")
    if isinstance(conv.padding, str):
        raise TypeError(f"sparse convolutions need numeric padding, got {conv.padding!r}")


def _output_grid(conv: torch.nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return (x.shape[-2] + 2 * ph - kh) // sh + 1, (x.shape[-1] + 2 * pw - kw) // sw + 1


def _all_tiles(grid: tuple[int, int]) -> list[Tile]:
    rows, cols = grid
    return [(r, c, min(TILE, rows - r), min(TILE, cols - c)) for r in range(0, rows, TILE) for c in range(0, cols, TILE)]


def _tiles(tokens: torch.Tensor, grid: tuple[int, int]) -> list[Tile]:
    """The tiles holding any of ``tokens`` (raster indices on ``grid``), in raster order."""
    rows, cols = grid
    tile_cols = -(-cols // TILE)
    tile_index = (tokens // cols // TILE) * tile_cols + (tokens % cols) // TILE
    tiles = []
    for index in torch.unique(tile_index).tolist():
        r, c = (index // tile_cols) * TILE, (index % tile_cols) * TILE
        tiles.append((r, c, min(TILE, rows - r), min(TILE, cols - c)))
    return tiles


def _convolve_tiles(conv: torch.nn.Conv2d, x: torch.Tensor, tiles: list[list[Tile]]) -> list[list[torch.Tensor]]:
    """Each row's tiles of ``conv(x)``, computed from their input windows in one call per tile shape."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    by_shape: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
    for b, row_tiles in enumerate(tiles):
        for i, (r, c, h, w) in enumerate(row_tiles):
            window = padded[b, :, r * sh : (r + h - 1) * sh + kh, c * sw : (c + w - 1) * sw + kw]
            by_shape.setdefault((h, w), []).append((b, i, window))
    out: list[list[torch.Tensor]] = [[None] * len(row_tiles) for row_tiles in tiles]  # type: ignore[list-item]
    for entries in by_shape.values():
        windows = torch.stack([window for _, _, window in entries])
        values = F.conv2d(windows, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
        for (b, i, _), value in zip(entries, values):
            out[b][i] = value
    return out


def _cached_map(stored: torch.Tensor, kept: torch.Tensor | None, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """A cached output ``[n, C]`` (all tokens, or the ``kept`` ones) as a ``[C, rows, cols]`` map."""
    stored = stored.to(like.device, like.dtype)
    if kept is None:
        tokens = stored
    else:  # tokens not kept are in the template's own region, which every edit computes
        tokens = stored.new_zeros(grid[0] * grid[1], stored.shape[-1])
        tokens.index_copy_(0, kept.to(like.device), stored)
    return tokens.t().reshape(-1, *grid)
