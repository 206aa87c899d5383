"""Sparse convolutions for the UNet families: design (c), ResNets that compute only the mask.

In design (b) the attention levels compute the masked tokens only and every ResNet
runs densely. Here each convolution of the ResNets and of the down/upsamplers
computes only the output *windows* that hold the computed tokens of its grid (the
latent mask max-pooled to it: tiles, merged into their bounding box or into one band
per row of tiles), each read from its input grown by the kernel's halo; everywhere
else its output is the template's, read from the cache. Everything between the
convolutions (GroupNorm, SiLU, the time embedding, the residual sum) runs densely
over those cached-plus-fresh maps, as the stock modules do: a GroupNorm of cached
statistics would round differently (5e-7 to 1e-6 off), so the invariant stays exact
only this way.

A hook replaces each convolution's forward (``diffusers.hooks``' ``new_forward``);
the ResNet and sampler modules themselves run unmodified. CPU convolution kernels
are chosen per shape, batch size included: a dense convolution of two rows rounds
differently from one of each. So a window is convolved together with the other rows'
windows at its position (a request's two guidance rows: the batch of the dense
convolution that recorded its template), and on CPU the first call of each input
shape and window set is checked against the dense convolution; where a bit differs,
the windows are cut from a dense convolution instead (a logged fallback). An edit
equal to its template is then bit-exact on any CPU.
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

__all__ = ["CallSlot", "SparseConv", "SPARSE_CONV_HOOK", "tile_side"]

log = logging.getLogger(__name__)

SPARSE_CONV_HOOK = HOOK_PREFIX + "sparse_conv"
#: Output tiles per grid side, and the bounds of a tile's side: small enough to
#: follow a mask's outline on the coarse grids, where most convolution FLOPs are, large
#: enough that per-window overheads (the halo read, one window copy) stay small.
TILES_PER_SIDE = 8
MIN_TILE, MAX_TILE = 4, 8
#: The touched tiles' bounding box is computed instead of bands when it holds at most
#: this many times their count (one big convolution beats several smaller ones).
BOX_SLACK = 1.5


def tile_side(grid: tuple[int, int]) -> int:
    """The output tile side on a grid."""
    return max(MIN_TILE, min(MAX_TILE, min(grid) // TILES_PER_SIDE))


class CallSlot:
    """The UNet call now running, for hooks on modules that receive no call arguments."""

    def __init__(self) -> None:
        self.call: UNetCall | None = None


Window = tuple[int, int, int, int]  # (row, col, rows, cols) of output on the output grid


class SparseConv(ModelHook):
    """On one ``Conv2d``: compute the windows of computed tokens, the template's output elsewhere.

    Args:
        site: the cache site of this convolution's output.
        level: attention levels before it in call order (dense while the call's
            recomputed prefix covers it).
        slot: where the running call is found.
    """

    def __init__(self, site: int, level: int, slot: CallSlot) -> None:
        super().__init__()
        self.site, self.level, self.slot = site, level, slot
        # (input shape, dtype, window convolutions) -> whether they are bitwise the dense output here
        self._exact: dict[tuple, bool] = {}

    def new_forward(self, conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        dense_forward = self.fn_ref.original_forward
        call = self.slot.call
        if call is None:
            return dense_forward(x)
        batch = call.batch
        if batch.all_dense or self.level < batch.full_blocks:
            return self._recorded(batch, dense_forward(x))
        grid = _output_grid(conv, x)
        windows = [_windows(call.row_tokens(grid)[b], grid) if row.cached is not None else [(0, 0, *grid)]
                   for b, row in enumerate(batch.rows)]  # fmt: skip
        if x.device.type == "cpu" and not self._windows_exact(conv, x, windows, dense_forward):
            # The same windows, cut from the dense output: what a call computes must not
            # depend on which windows its batch mates brought.
            dense = dense_forward(x)
            computed = [[dense[b, :, r : r + h, c : c + w] for (r, c, h, w) in row] for b, row in enumerate(windows)]
        else:
            computed = _convolve_windows(conv, x, windows)
        full = x.new_empty(x.shape[0], conv.out_channels, *grid)
        for b, row in enumerate(batch.rows):
            if row.cached is not None:
                full[b] = _cached_map(row.cached.output(self.site), row.cached.stored_tokens(self.site), grid, full)
            for (r, c, h, w), values in zip(windows[b], computed[b]):
                full[b, :, r : r + h, c : c + w] = values
        return self._recorded(batch, full)

    def _recorded(self, batch: TokenBatch, output: torch.Tensor) -> torch.Tensor:
        if batch.records:
            for b, row in enumerate(batch.rows):
                if row.recorder is not None:
                    row.recorder.record_output(self.site, output[b].flatten(1), token_dim=1)
        return output

    def _windows_exact(self, conv: torch.nn.Conv2d, x: torch.Tensor, windows: list[list[Window]], dense_forward: Any) -> bool:
        """Whether this call's windows reproduce the dense convolution of its rows bit for bit.

        Kernels are chosen per shape, batch size included (a dense convolution of two rows
        rounds differently from one of each), so the check is made once per input shape
        and set of window convolutions (:func:`_window_groups`), against the dense
        convolution of the same rows.
        """
        key = (tuple(x.shape), x.dtype, tuple(sorted(_window_groups(windows))))
        if key not in self._exact:
            dense = dense_forward(x)
            computed = _convolve_windows(conv, x, windows)
            exact = all(
                torch.equal(value, dense[b, :, r : r + h, c : c + w])
                for b, row in enumerate(windows)
                for (r, c, h, w), value in zip(row, computed[b])
            )
            self._exact[key] = exact
            if not exact:
                log.warning("%s on windows %s of %s is not bitwise the dense one here; it stays dense", conv, key[2], key[0])
        return self._exact[key]


def check_sparse_conv(conv: torch.nn.Module) -> None:
    """Raise ``TypeError`` for a convolution the windows cannot reproduce."""
    if not isinstance(conv, torch.nn.Conv2d) or conv.padding_mode != "zeros" or conv.dilation != (1, 1):
        raise TypeError(f"sparse convolutions need a zero-padded, undilated Conv2d, got {conv}")
    if isinstance(conv.padding, str):
        raise TypeError(f"sparse convolutions need numeric padding, got {conv.padding!r}")


def _output_grid(conv: torch.nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return (x.shape[-2] + 2 * ph - kh) // sh + 1, (x.shape[-1] + 2 * pw - kw) // sw + 1


def _windows(tokens: torch.Tensor, grid: tuple[int, int]) -> list[Window]:
    """Output windows covering ``tokens`` (raster indices on ``grid``), snapped to tiles:
    the bounding box of the tiles they touch when it is hardly larger, else one band per
    row of tiles, from its first touched tile to its last (few windows, few shapes: one
    convolution each)."""
    rows, cols = grid
    side = tile_side(grid)
    tile_cols = -(-cols // side)
    touched = torch.unique((tokens // cols // side) * tile_cols + (tokens % cols) // side).tolist()
    bands: dict[int, tuple[int, int]] = {}
    for tile in touched:
        row, col = divmod(tile, tile_cols)
        first, last = bands.get(row, (col, col))
        bands[row] = (min(first, col), max(last, col))
    top, bottom = min(bands), max(bands) + 1
    left, right = min(f for f, _ in bands.values()), max(last for _, last in bands.values()) + 1
    if (bottom - top) * (right - left) <= BOX_SLACK * len(touched):
        bands = {top: (left, right - 1)}
        height = bottom - top
    else:
        height = 1
    windows = []
    for row, (first, last) in sorted(bands.items()):
        r, c = row * side, first * side
        windows.append((r, c, min((row + height) * side, rows) - r, min((last + 1) * side, cols) - c))
    return windows


def _window_groups(windows: list[list[Window]]) -> dict[tuple[int, int, int], list[int]]:
    """The convolution calls of a call's windows: ``(i, rows, cols) -> batch rows``.

    A row's ``i``-th window joins the other rows' ``i``-th windows of its shape, so a
    request alone (its guidance rows computing the same windows) convolves with the
    batch size of the dense convolution that recorded its template.
    """
    groups: dict[tuple[int, int, int], list[int]] = {}
    for b, row in enumerate(windows):
        for i, (_, _, h, w) in enumerate(row):
            groups.setdefault((i, h, w), []).append(b)
    return groups


def _convolve_windows(conv: torch.nn.Conv2d, x: torch.Tensor, windows: list[list[Window]]) -> list[list[torch.Tensor]]:
    """Each row's windows of ``conv(x)``, computed from their inputs grown by the halo."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    out: list[list[torch.Tensor]] = [[None] * len(row) for row in windows]  # type: ignore[list-item]
    for (i, _, _), rows in _window_groups(windows).items():
        inputs = []
        for b in rows:
            r, c, h, w = windows[b][i]
            inputs.append(padded[b, :, r * sh : (r + h - 1) * sh + kh, c * sw : (c + w - 1) * sw + kw])
        values = F.conv2d(torch.stack(inputs), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
        for b, value in zip(rows, values):
            out[b][i] = value
    return out


def _cached_map(stored: torch.Tensor, kept: torch.Tensor | None, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """A cached output ``[C, n]`` (all tokens, or the ``kept`` ones) as a ``[C, rows, cols]`` map."""
    stored = stored.to(like.device, like.dtype)
    if kept is not None:  # tokens not kept are in the template's own region, which every edit computes
        tokens = stored.new_zeros(stored.shape[0], grid[0] * grid[1])
        stored = tokens.index_copy_(1, kept.to(like.device), stored)
    return stored.view(-1, *grid)
