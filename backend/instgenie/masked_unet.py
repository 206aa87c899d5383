"""Mask-aware UNet attention levels: idea 1 for the UNet families (SDXL, SD 1.5 / 2).

A UNet interleaves ResNets (convolutions and GroupNorm, which mix neighbouring
tokens) with attention levels (``Transformer2DModel``: GroupNorm, ``proj_in``,
transformer blocks, ``proj_out``). In this design the ResNets run densely over the
full latent grid, whose unmasked tokens carry the template's latents at this step;
inside every attention level only the level's *computed tokens* run through the
transformer blocks: the latent-level computed tokens max-pooled to the level's
grid. Self-attention reads the template's K/V (or attention inputs) of the other
tokens (:meth:`TokenBatch.image_kv <instgenie.attention.TokenBatch.image_kv>`), and
the level's output for the tokens it does not compute is the template's.

Everything goes through diffusers' own extension points: attention processors, and
named hooks (``diffusers.hooks``) that gather the computed tokens where the level
enters its token-wise part and scatter them back over the template's output where it
leaves it. With a linear ``proj_in``/``proj_out`` (SD 2, SDXL) that part is
``proj_in`` .. ``proj_out``; with SD 1.5's 1x1 convolutions, which the level calls on
the spatial map, it is the first block's input .. the last block's output.

Cache sites per level, in call order: one per transformer block (its
self-attention's K/V or input), then one *output site* (the level's output at the
scatter point); with sparse convolutions (design (c), :mod:`instgenie.sparse_convs`)
each convolution's output is a site too, numbered in call order among them. A call
that recomputes its first ``full_blocks`` levels runs them (and the convolutions
before them) densely and reads nothing there (the loading planner's prefix, counted
in levels).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.models.attention_processor import AttnProcessor2_0

from .attention import (
    HOOK_PREFIX,
    STOCK_PROCESSORS_HOOK,
    MaskedProcessor,
    StockProcessors,
    TokenBatch,
    TokenRow,
    image_attention_inputs,
    install_hook,
)
from .masking import pool_token_index
from .sparse_convs import SPARSE_CONV_HOOK, CallSlot, SparseConv, check_sparse_conv

__all__ = ["UNetCall", "install_unet_levels", "unet_levels", "unet_units", "unit_convolutions"]

LEVEL_HOOK = HOOK_PREFIX + "unet_level"
GATHER_HOOK = HOOK_PREFIX + "unet_level_gather"
SCATTER_HOOK = HOOK_PREFIX + "unet_level_scatter"


class UNetCall:
    """One masked UNet call: the latent-level token batch and, per attention level, its own.

    Travels to the levels and processors as ``cross_attention_kwargs["token_batch"]``.
    """

    def __init__(self, batch: TokenBatch, grid: tuple[int, int]) -> None:
        self.batch = batch
        self.grid = grid
        self.current: TokenBatch | None = None  # the level now running
        self._levels: dict[tuple[int, int, bool], TokenBatch] = {}
        self._row_tokens: dict[tuple[int, int], list[torch.Tensor]] = {}

    def enter_level(self, index: int, grid: tuple[int, int]) -> TokenBatch:
        """The token batch of attention level ``index`` (call order) over a ``grid`` of tokens."""
        batch = self.batch
        dense = batch.all_dense or index < batch.full_blocks
        key = (*grid, dense)
        if key not in self._levels:
            rows = [
                TokenRow(token_index=tokens, cached=row.cached, recorder=row.recorder)
                for row, tokens in zip(batch.rows, self.row_tokens(grid))
            ]
            # A dense level of a cached call is a one-block "prefix": every token, no cache read.
            self._levels[key] = TokenBatch(rows, num_tokens=grid[0] * grid[1], text_len=0, full_blocks=int(dense))
        self.current = self._levels[key]
        return self.current

    def row_tokens(self, grid: tuple[int, int]) -> list[torch.Tensor]:
        """Each row's computed tokens on a ``grid`` of the UNet (the latent ones max-pooled)."""
        if grid not in self._row_tokens:
            self._row_tokens[grid] = [pool_token_index(row.token_index, self.grid, grid) for row in self.batch.rows]
        return self._row_tokens[grid]


class _Level(ModelHook):
    """On a ``Transformer2DModel``: finds the call's batch of this level for the hooks and
    processors inside it; calls without a :class:`UNetCall` pass through."""

    def __init__(self, index: int, output_site: int) -> None:
        super().__init__()
        self.index = index
        self.output_site = output_site
        self.active: UNetCall | None = None

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        call = (kwargs.get("cross_attention_kwargs") or {}).get("token_batch")
        if isinstance(call, UNetCall):
            hidden = args[0] if args else kwargs["hidden_states"]
            call.enter_level(self.index, (int(hidden.shape[-2]), int(hidden.shape[-1])))
            self.active = call
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.active is not None:
            self.active.current = None
            self.active = None
        return output

    @property
    def batch(self) -> TokenBatch | None:
        return None if self.active is None else self.active.current


class _Gather(ModelHook):
    """Where a level enters its token-wise part: ``[B, N, C]`` -> each row's computed tokens."""

    def __init__(self, level: _Level) -> None:
        super().__init__()
        self.level = level

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        batch = self.level.batch
        if batch is None or batch.is_dense:
            return args, kwargs
        return (batch.gather(args[0]), *args[1:]), kwargs


class _Scatter(ModelHook):
    """Where a level leaves its token-wise part: computed tokens written over the
    template's output of the level, ``[B, L, C]`` -> ``[B, N, C]``; recorded for templates."""

    def __init__(self, level: _Level) -> None:
        super().__init__()
        self.level = level

    def post_forward(self, module: torch.nn.Module, output: torch.Tensor) -> torch.Tensor:
        batch = self.level.batch
        if batch is None:
            return output
        site = self.level.output_site
        full = output
        if not batch.is_dense:
            full = output.new_empty(output.shape[0], batch.num_tokens, output.shape[-1])
            for b, row in enumerate(batch.rows):
                computed = output[b, : batch.lengths[b]]
                if row.cached is None:
                    full[b].copy_(computed)
                    continue
                cached = row.cached.output(site).to(output.device, output.dtype)
                stored = row.cached.stored_tokens(site)
                if stored is None:
                    full[b].copy_(cached)
                else:
                    full[b].index_copy_(0, stored.to(output.device), cached)
                full[b].index_copy_(0, row.token_index, computed)
        if batch.records:
            for b, row in enumerate(batch.rows):
                if row.recorder is not None:
                    row.recorder.record_output(site, full[b])
        return full


class MaskedUNetAttnProcessor(MaskedProcessor):
    """``AttnProcessor2_0`` for a UNet transformer block. Self-attention (``attn1``): the
    level's computed queries attend over the template's K/V with their own written in.
    Cross-attention (``attn2``) is token-wise over the computed tokens: stock."""

    def __init__(self, site: int) -> None:
        super().__init__(site)
        self._stock = AttnProcessor2_0()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        token_batch: UNetCall | None = None,
    ) -> torch.Tensor:
        batch = None if token_batch is None else token_batch.current
        if batch is None or encoder_hidden_states is not None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if attention_mask is not None or hidden_states.ndim != 3 or attn.residual_connection:
            raise TypeError("a masked UNet self-attention takes [B, L, C] tokens, no mask, no residual")
        query, key, value = image_attention_inputs(attn, hidden_states, batch, self.site)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).flatten(2).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states / attn.rescale_output_factor


def unet_levels(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's attention levels (``Transformer2DModel``) in call order: down, mid, up."""
    return [module for module, kind, _ in unet_units(unet) if kind == "level"]


def unet_units(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, str, int]]:
    """``(module, kind, depth)`` of the UNet's ResNets, attention levels and samplers in
    call order (kind ``resnet``, ``level`` or ``sampler``); ``depth``: 2x downsamplings
    before the module's output grid."""
    units: list[tuple[torch.nn.Module, str, int]] = []
    depth = 0

    def block_units(block: torch.nn.Module) -> None:
        attentions = getattr(block, "attentions", None) or []
        for i, resnet in enumerate(block.resnets):
            units.append((resnet, "resnet", depth))
            if i < len(attentions):
                units.append((attentions[i], "level", depth))

    for block in unet.down_blocks:
        block_units(block)
        for sampler in getattr(block, "downsamplers", None) or []:
            depth += 1
            units.append((sampler, "sampler", depth))
    mid = unet.mid_block
    if mid is not None:  # resnet, then (attention, resnet) pairs
        units.append((mid.resnets[0], "resnet", depth))
        for attention, resnet in zip(getattr(mid, "attentions", None) or [], mid.resnets[1:]):
            units += [(attention, "level", depth), (resnet, "resnet", depth)]
    for block in unet.up_blocks:
        block_units(block)
        for sampler in getattr(block, "upsamplers", None) or []:
            depth -= 1
            units.append((sampler, "sampler", depth))
    return units


def unit_convolutions(module: torch.nn.Module, kind: str) -> list[torch.nn.Module]:
    """A ResNet's or sampler's convolutions in call order."""
    if kind == "resnet":
        if module.upsample is not None or module.downsample is not None:
            raise TypeError("sparse convolutions do not take ResNets that resample")
        return [conv for conv in (module.conv1, module.conv2, module.conv_shortcut) if conv is not None]
    conv = getattr(module, "conv", None)
    if conv is None or getattr(module, "norm", None) is not None:
        raise TypeError(f"sparse convolutions need a plain convolutional sampler, got {type(module).__name__}")
    return [conv]


def install_unet_levels(unet: torch.nn.Module, sparse_convs: bool = False) -> tuple[list[int], list[int], CallSlot]:
    """Make every attention level of ``unet`` mask-aware, and with ``sparse_convs`` every
    convolution of its ResNets and samplers (:mod:`instgenie.sparse_convs`).

    Cache sites are numbered in call order. Returns ``(offsets, depths, slot)``:
    ``offsets[i]`` sites come before what level ``i``'s recomputed prefix leaves
    cached (the last entry is the number of sites), ``depths[site]`` the 2x
    downsamplings before each site's grid (:func:`level_grid`), and the slot a call
    must be put in while it runs (for the convolutions, which receive no call
    arguments). Installed once: a second call finds the hooks in place.
    """
    processors = unet.attn_processors
    if not any(isinstance(p, MaskedProcessor) for p in processors.values()):
        install_hook(unet, STOCK_PROCESSORS_HOOK, StockProcessors(processors))
    holder = install_hook(unet, CALL_SLOT_HOOK, _SlotHolder(sparse_convs))
    if holder.sparse_convs != sparse_convs:
        raise ValueError(
            f"this UNet is already mask-aware with sparse_convs={holder.sparse_convs}; "
            "adapters sharing a pipeline must use one design"
        )
    slot = holder.slot
    assigned: dict[str, Any] = {}
    names = {module: name for name, module in unet.named_modules()}
    offsets: list[int] = []
    depths: list[int] = []
    level = 0
    for module, kind, depth in unet_units(unet):
        if kind != "level":
            if sparse_convs:
                for conv in unit_convolutions(module, kind):
                    check_sparse_conv(conv)
                    if len(offsets) == level:  # the first site a prefix of `level` levels leaves cached
                        offsets.append(len(depths))
                    install_hook(conv, SPARSE_CONV_HOOK, SparseConv(len(depths), level, slot))
                    depths.append(depth)
            continue
        if getattr(module, "is_input_continuous", True) is not True:
            raise TypeError("only continuous-input attention levels (UNet Transformer2DModel) can be masked")
        if len(offsets) == level:
            offsets.append(len(depths))
        for block in module.transformer_blocks:
            if block.only_cross_attention or getattr(block, "pos_embed", None) is not None:
                raise TypeError("masked UNet levels need self-attention blocks without positional embeddings")
            processor = MaskedUNetAttnProcessor(len(depths))
            assigned[names[block.attn1] + ".processor"] = processor
            if block.attn2 is not None:
                assigned[names[block.attn2] + ".processor"] = processor
            depths.append(depth)
        hook = install_hook(module, LEVEL_HOOK, _Level(level, len(depths)))
        depths.append(depth)  # the level's output site
        if module.use_linear_projection:
            enter, leave = module.proj_in, module.proj_out
        else:
            enter, leave = module.transformer_blocks[0], module.transformer_blocks[-1]
        install_hook(enter, GATHER_HOOK, _Gather(hook))
        install_hook(leave, SCATTER_HOOK, _Scatter(hook))
        level += 1
    offsets.append(len(depths))
    unknown = sorted(set(processors) - set(assigned))
    if unknown:
        raise TypeError(f"attention outside the UNet's attention levels cannot be masked: {unknown[:3]}")
    unet.set_attn_processor(assigned)
    return offsets, depths, slot


CALL_SLOT_HOOK = HOOK_PREFIX + "unet_call_slot"


class _SlotHolder(ModelHook):
    """Keeps a UNet's :class:`CallSlot` where a second install finds it."""

    def __init__(self, sparse_convs: bool) -> None:
        super().__init__()
        self.slot = CallSlot()
        self.sparse_convs = sparse_convs
