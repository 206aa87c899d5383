"""Mask-aware attention: masked queries attend over cached K/V of unmasked tokens.

This is idea 1 of InstGenIE in one place. Every token-wise operator of a DiT block
(projections, norms, adaLN, MLP, gates) runs on whatever tokens it is given; only
attention mixes tokens. So an edit feeds the transformer just the masked image
tokens (plus the text tokens), and the processors below rebuild the full key/value
sequence of each row: the template's recorded K/V for every image token, with the
freshly computed K/V of the masked tokens written over their positions. Keys stay
in raster order, so when the edit equals the template the softmax sums exactly what
the full computation sums: the result is bit-identical on CPU fp32.

The processors extend unmodified diffusers models through their own extension
point (``set_attn_processor``); per-call information reaches them through
``joint_attention_kwargs={"token_batch": ...}``, which diffusers forwards to every
processor that declares the argument. Without a ``token_batch`` they behave exactly
like the stock processors.

A cache may instead hold each site's attention *input* (the block's normalised hidden
states) of the unmasked tokens, half the bytes of K+V; the processors then project
those tokens' K/V again (``to_k``/``to_v``, the q/k norm, RoPE at their positions)
through the :data:`Projector` they hand to :meth:`TokenBatch.image_kv`.

Shapes: ``B`` rows (a request contributes one row, two with classifier-free
guidance), ``N`` image tokens of the template grid, ``L`` padded computed tokens per
row, ``T`` text tokens, ``H`` heads, ``D`` head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
# diffusers has no public form of the Flux Q/K/V projection (fused or not); its own
# processor uses this one, so ours projects exactly as the stock one does.
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

# CPU GEMMs with few rows take small-matrix kernels whose rounding differs from the
# kernels the full computation runs (measured with torch 2.13: up to 10 rows for the
# tiny models' shapes), and so does a flash-attention query block of 1-3 rows; and a
# row count off a multiple of 8 rounds differently in the UNets' levels, whose queries
# are the image tokens alone (7 masks of 8 were off at an 8x8 level without it). Rows
# are padded past all three so an edit equal to its template stays bit-exact on CPU.
MIN_PADDED_TOKENS = 16
ROW_MULTIPLE = 8
_MAX_SMALL_QUERY_TAIL = 3


def _small_query_tail(queries: int) -> bool:
    """Whether CPU flash attention would leave a last query block of 1-3 rows."""
    block = 256 if queries >= 768 else 64 if queries >= 192 else 32
    return 0 < queries % block <= _MAX_SMALL_QUERY_TAIL


#: ``(hidden [n, C], raster positions [n]) -> (K, V)`` of those image tokens at one
#: site, in the site's per-row layout: what the site's processor computes from its input.
Projector = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class KVSource(Protocol):
    """Recorded image-token K/V (or attention inputs) of one row at its current step."""

    #: Whether the source holds attention inputs (``attention_input``) instead of K/V.
    stores_inputs: bool

    def stored_tokens(self, site: int) -> torch.Tensor | None:
        """Raster indices of the tokens stored at ``site``, or ``None`` for all in order.
        Tokens left out must be ones the row computes (a template's own edit region)."""
        ...

    def kv(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of attention site ``site`` in the site's layout (any float dtype)."""
        ...

    def attention_input(self, site: int) -> torch.Tensor:
        """The stored tokens' input ``[n, C]`` to attention site ``site`` (any float dtype)."""
        ...

    def output(self, site: int) -> torch.Tensor:
        """The stored tokens' output of output site ``site``, in the layout it was recorded
        in (a UNet attention level's ``[n, C]``, a convolution's ``[C, n]``)."""
        ...

    def stored(self, site: int) -> tuple[torch.Tensor, ...]:
        """Whatever site ``site`` stores (K and V, an input or an output): what a copy stage moves."""
        ...


class KVSink(Protocol):
    """Receives the K/V (and attention input) of every image token of one row (template recording)."""

    def record(self, site: int, key: torch.Tensor, value: torch.Tensor, token_dim: int) -> None:
        """Store copies: the tensors passed in are reused by the computation."""
        ...

    def record_input(self, site: int, hidden: torch.Tensor) -> None:
        """Store a copy of the image tokens' attention input ``[N, C]`` (if this sink keeps inputs)."""
        ...

    def record_output(self, site: int, hidden: torch.Tensor, token_dim: int = 0) -> None:
        """Store a copy of every image token's output at output site ``site``: ``[N, C]``,
        or ``[C, N]`` with ``token_dim`` 1 (a convolution's map, channels first)."""
        ...


@dataclass
class TokenRow:
    """One transformer batch row.

    Attributes:
        token_index: sorted raster indices ``int64 [M]`` of the image tokens this row
            computes. A row without ``cached`` K/V must compute all ``N`` tokens.
        cached: where the K/V of the tokens it does not compute come from.
        recorder: where to record this row's image-token K/V (template registration).
    """

    token_index: torch.Tensor
    cached: KVSource | None = None
    recorder: KVSink | None = None


class TokenBatch:
    """The varlen-shaped description of one masked transformer call.

    Rows compute different token sets; they are padded to a common length ``L`` by
    repeating each row's last token, so diffusers' batched modules run unchanged.
    Padded positions are never written back: outputs beyond a row's length are junk.

    A call may run its first ``full_blocks`` transformer blocks over every image
    token, reading no cache there (the loading planner's "recompute" choice), and
    switch to the computed tokens at block ``full_blocks`` (a pre-hook on that
    block, :func:`install_block_hooks`). Only a prefix can recompute: a block
    needs every token's input, which exists only while all blocks before it
    computed every token.
    """

    def __init__(self, rows: Sequence[TokenRow], num_tokens: int, text_len: int, full_blocks: int = 0) -> None:
        if not rows:
            raise ValueError("a token batch needs at least one row")
        self.rows = list(rows)
        self.num_tokens = num_tokens
        self.text_len = text_len
        self.lengths = [int(row.token_index.numel()) for row in self.rows]
        for row, length in zip(self.rows, self.lengths):
            if row.cached is None and length != num_tokens:
                raise ValueError("a row without cached K/V must compute every image token")
            if length == 0:
                raise ValueError("a row must compute at least one image token")
        padded_len = max(max(self.lengths), min(MIN_PADDED_TOKENS, num_tokens))
        padded_len = min(num_tokens, -(-padded_len // ROW_MULTIPLE) * ROW_MULTIPLE)
        while padded_len < num_tokens and _small_query_tail(text_len + padded_len):
            padded_len = min(num_tokens, padded_len + ROW_MULTIPLE)
        self.padded_len = padded_len
        index = torch.empty(len(self.rows), self.padded_len, dtype=torch.long, device=self.rows[0].token_index.device)
        for b, row in enumerate(self.rows):
            n = self.lengths[b]
            index[b, :n] = row.token_index
            index[b, n:] = row.token_index[-1]
        self.padded_index = index
        # Every row computes every token in raster order and nothing is cached:
        # this is the stock computation, which needs no gathering or K/V exchange.
        self.all_dense = all(row.cached is None for row in self.rows)
        if full_blocks < 0:
            raise ValueError("full_blocks must be >= 0")
        self.full_blocks = 0 if self.all_dense else full_blocks
        self._in_full_prefix = self.full_blocks > 0
        self.records = any(row.recorder is not None for row in self.rows)
        # RoPE tables set by families that use it: ``full_rotary`` ``(cos, sin)`` of
        # shape ``[T + N, D]`` covers every position (dense calls and the full-block
        # prefix, and K/V projected from cached inputs); ``row_rotary`` ``[B, T + L, D]``
        # each row's computed tokens.
        self.full_rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.row_rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        # Per row, which stored inputs to project (the ones the row does not compute):
        # the same at every site of this call, so found once.
        self._projected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def is_dense(self) -> bool:
        """Whether the blocks now running see every image token of every row, in order."""
        return self.all_dense or self._in_full_prefix

    @property
    def rotary(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.full_rotary if self.is_dense else self.row_rotary

    def enter_masked_blocks(self, hidden: torch.Tensor) -> torch.Tensor:
        """End of the full-block prefix: ``[B, N, C]`` image states -> each row's computed tokens."""
        assert self._in_full_prefix, "this call has no full-block prefix to leave"
        self._in_full_prefix = False
        return self.gather(hidden)

    def computed_outputs(self, output: torch.Tensor) -> torch.Tensor:
        """The transformer's image output as ``[B, L, C]`` computed tokens.

        Only a call whose full-block prefix covered every block still has all ``N``.
        """
        return self.enter_masked_blocks(output) if self._in_full_prefix else output

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, L, C]``: each row's computed tokens, padded."""
        if self.is_dense:
            return tokens
        index = self.padded_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        return torch.gather(tokens, 1, index)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Apply each row's rotary embedding to ``x`` of shape ``[B, T + L, H, D]``."""
        assert self.rotary is not None, "this family sets no rotary tables"
        cos, sin = self.rotary
        if cos.dim() == 2:
            return apply_rotary_emb(x, (cos, sin), sequence_dim=1)
        return torch.cat(
            [apply_rotary_emb(x[b : b + 1], (cos[b], sin[b]), sequence_dim=1) for b in range(x.shape[0])]
        )

    def rotate_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply the rotary embedding of image tokens ``positions`` to ``x`` ``[n, H, D]``."""
        assert self.full_rotary is not None, "this family sets no rotary tables"
        cos, sin = self.full_rotary
        index = positions.to(cos.device) + self.text_len
        return apply_rotary_emb(x.unsqueeze(0), (cos[index], sin[index]), sequence_dim=1).squeeze(0)

    def _projected_tokens(self, b: int, row: TokenRow, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(which stored entries, their raster positions)`` row ``b`` must project:
        the same at every site of a batch (its sites share one token grid)."""
        if b not in self._projected:
            assert row.cached is not None
            stored = row.cached.stored_tokens(site)
            device = row.token_index.device
            positions = torch.arange(self.num_tokens, device=device) if stored is None else stored.to(device)
            entries = (~torch.isin(positions, row.token_index)).nonzero().flatten()
            self._projected[b] = (entries, positions[entries])
        return self._projected[b]

    def _cached_kv(
        self, b: int, row: TokenRow, site: int, project: Projector | None, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Row ``b``'s cached K/V at ``site`` and their raster positions (``None``: all ``N``)."""
        assert row.cached is not None
        if not row.cached.stores_inputs:
            key, value = row.cached.kv(site)
            stored = row.cached.stored_tokens(site)
            return key.to(like.device, like.dtype), value.to(like.device, like.dtype), stored
        if project is None:
            raise TypeError("this attention site cannot project K/V from cached inputs")
        entries, positions = self._projected_tokens(b, row, site)
        hidden = row.cached.attention_input(site).to(like.device)
        hidden = hidden.index_select(0, entries.to(hidden.device)).to(like.dtype)
        count = hidden.shape[0]
        if 0 < count < MIN_PADDED_TOKENS:  # small GEMMs round differently (see above)
            pad = MIN_PADDED_TOKENS - count
            hidden = torch.cat([hidden, hidden[-1:].expand(pad, -1)])
            positions = torch.cat([positions, positions[-1:].expand(pad)])
        key, value = project(hidden, positions)
        return key, value, positions

    def image_kv(
        self,
        site: int,
        key: torch.Tensor,
        value: torch.Tensor,
        token_dim: int,
        inputs: torch.Tensor | None = None,
        project: Projector | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full image-token K/V for attention site ``site``.

        Args:
            key, value: computed image-token K/V, ``L`` tokens along ``token_dim``.
            inputs: the computed image tokens' attention input ``[B, L, C]``
                (recorded for templates whose cache stores inputs).
            project: how this site projects K/V from inputs (caches that store inputs).
        Returns:
            K/V with all ``N`` image tokens in raster order along ``token_dim``: the
            row's cache with its computed tokens written over their positions.
        """
        if self.is_dense:
            full_key, full_value = key, value
        else:
            shape = list(key.shape)
            shape[token_dim] = self.num_tokens
            full_key, full_value = key.new_empty(shape), value.new_empty(shape)
            row_dim = token_dim - 1
            for b, row in enumerate(self.rows):
                computed_key = key[b].narrow(row_dim, 0, self.lengths[b])
                computed_value = value[b].narrow(row_dim, 0, self.lengths[b])
                if row.cached is None:
                    full_key[b].copy_(computed_key)
                    full_value[b].copy_(computed_value)
                    continue
                cached_key, cached_value, stored = self._cached_kv(b, row, site, project, key)
                if stored is None:
                    full_key[b].copy_(cached_key)
                    full_value[b].copy_(cached_value)
                else:
                    stored = stored.to(key.device)
                    full_key[b].index_copy_(row_dim, stored, cached_key)
                    full_value[b].index_copy_(row_dim, stored, cached_value)
                full_key[b].index_copy_(row_dim, row.token_index, computed_key)
                full_value[b].index_copy_(row_dim, row.token_index, computed_value)
        if self.records:
            for b, row in enumerate(self.rows):
                if row.recorder is not None:
                    row.recorder.record(site, full_key[b], full_value[b], token_dim - 1)
                    if inputs is not None:
                        row.recorder.record_input(site, inputs[b])
        return full_key, full_value


class MaskedProcessor:
    """Marks InstGenIE's attention processors (:func:`is_installed`, :func:`uninstall`)."""

    _attention_backend = None  # what diffusers' ``set_attention_backend`` sets (dispatch_attention_fn)
    _parallel_config = None

    def __init__(self, site: int) -> None:
        self.site = site


def image_attention_inputs(
    attn: torch.nn.Module, hidden_states: torch.Tensor, batch: TokenBatch, site: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q of the computed image tokens and K/V of every image token, ``[B, H, S, D]``.

    For processors laid out like ``AttnProcessor2_0`` (SD3's joint attention, a UNet's
    self-attention): separate ``to_q``/``to_k``/``to_v``, optional q/k norms, no RoPE.
    K/V are recorded after the norms; a cache of inputs is projected the same way.
    """
    batch_size = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)

    def project(hidden: torch.Tensor, _positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached_key = attn.to_k(hidden).view(-1, attn.heads, head_dim).transpose(0, 1)
        cached_value = attn.to_v(hidden).view(-1, attn.heads, head_dim).transpose(0, 1)
        if attn.norm_k is not None:
            cached_key = attn.norm_k(cached_key)
        return cached_key, cached_value

    key, value = batch.image_kv(site, key, value, 2, hidden_states, project)
    return query, key, value


class MaskedFluxAttnProcessor(MaskedProcessor):
    """``FluxAttnProcessor`` that attends masked queries over cached image K/V.

    Serves both Flux block kinds: double blocks pass text and image separately and
    single blocks pass them concatenated; either way the sequence after the
    projections is ``[text, image]``, with post-norm, post-RoPE K/V recorded.
    """

    def __init__(self, site: int) -> None:
        super().__init__(site)
        self._stock = FluxAttnProcessor()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        token_batch: TokenBatch | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if token_batch is None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        query = token_batch.rotate(query)
        key = token_batch.rotate(key)
        if not token_batch.is_dense or token_batch.records:
            text_len = token_batch.text_len
            # Single blocks see ``[text, image]``; double blocks the image tokens alone.
            image_inputs = hidden_states if encoder_hidden_states is not None else hidden_states[:, text_len:]

            def project(hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                cached_key = attn.norm_k(attn.to_k(hidden).unflatten(-1, (-1, attn.head_dim)))
                cached_value = attn.to_v(hidden).unflatten(-1, (-1, attn.head_dim))
                return token_batch.rotate_positions(cached_key, positions), cached_value

            image_key, image_value = token_batch.image_kv(
                self.site, key[:, text_len:], value[:, text_len:], 1, image_inputs, project
            )
            if not token_batch.is_dense:
                key = torch.cat([key[:, :text_len], image_key], dim=1)
                value = torch.cat([value[:, :text_len], image_value], dim=1)

        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class MaskedJointAttnProcessor(MaskedProcessor):
    """``JointAttnProcessor2_0`` (SD3) that attends masked queries over cached image K/V.

    SD3 has no RoPE (positions are added at patch embedding) and orders the joint
    sequence ``[image, text]`` in ``[B, H, S, D]`` layout; K/V are recorded after the
    q/k norms.
    """

    def __init__(self, site: int) -> None:
        super().__init__(site)
        self._stock = JointAttnProcessor2_0()

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_batch: TokenBatch | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if token_batch is None:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch_size, image_len = hidden_states.shape[:2]
        query, key, value = image_attention_inputs(attn, hidden_states, token_batch, self.site)
        head_dim = key.shape[-1]

        if encoder_hidden_states is not None:
            context_query = attn.add_q_proj(encoder_hidden_states)
            context_key = attn.add_k_proj(encoder_hidden_states)
            context_value = attn.add_v_proj(encoder_hidden_states)
            context_query = context_query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_key = context_key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            context_value = context_value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)

        # The one attention path of every family (diffusers' dispatcher, [B, S, H, D]).
        hidden_states = dispatch_attention_fn(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )  # fmt: skip
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :image_len], hidden_states[:, image_len:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


# -- what the engine installs in a pipeline, and how it comes out again ----------------
#
# Hooks go through diffusers' own registry (``diffusers.hooks.HookRegistry``), named
# with HOOK_PREFIX, so :func:`uninstall` finds and removes every one of them.

HOOK_PREFIX = "instgenie."
BLOCK_HOOK = HOOK_PREFIX + "masked_block_entry"
STOCK_PROCESSORS_HOOK = HOOK_PREFIX + "stock_processors"


class StockProcessors(ModelHook):
    """Keeps a transformer's attention processors from before the engine's, for :func:`uninstall`."""

    def __init__(self, processors: dict[str, Any]) -> None:
        super().__init__()
        self.processors = processors


class MaskedBlockEntry(ModelHook):
    """On block ``index`` (in call order): a call whose full-block prefix ends here
    switches to its computed tokens. Calls without a token batch pass through."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        batch = (kwargs.get("joint_attention_kwargs") or {}).get("token_batch")
        if batch is None or not batch._in_full_prefix or batch.full_blocks != self.index:
            return args, kwargs
        if "hidden_states" not in kwargs:
            raise TypeError(f"{type(module).__name__} was called without hidden_states=...; cannot switch tokens")
        kwargs["hidden_states"] = batch.enter_masked_blocks(kwargs["hidden_states"])
        return args, kwargs


def install_hook(module: torch.nn.Module, name: str, hook: ModelHook) -> ModelHook:
    """Register ``hook`` on ``module`` under ``name`` unless one is there; return the installed one."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    installed = registry.get_hook(name)
    if installed is None:
        registry.register_hook(hook, name)
        installed = hook
    return installed


def install_block_hooks(blocks: Sequence[torch.nn.Module]) -> None:
    """Let a :class:`TokenBatch` with a full-block prefix switch to its computed tokens.

    Blocks receive the batch through ``joint_attention_kwargs``, as their attention
    processors do. Installed once per block.
    """
    for index, block in enumerate(blocks):
        install_hook(block, BLOCK_HOOK, MaskedBlockEntry(index))


def install_masked_processors(transformer: torch.nn.Module, processor_cls: type) -> int:
    """Give every attention module of ``transformer`` a masked processor.

    Attention sites are numbered in module order; the number is the cache key of the
    site's K/V. The stock processors are kept for :func:`uninstall`. Returns the
    number of sites.
    """
    processors = transformer.attn_processors
    if not _has_masked_processors(transformer):
        install_hook(transformer, STOCK_PROCESSORS_HOOK, StockProcessors(processors))
    names = list(processors.keys())
    transformer.set_attn_processor({name: processor_cls(site) for site, name in enumerate(names)})
    return len(names)


def uninstall(transformer: torch.nn.Module) -> None:
    """Hand the pipeline's transformer back as it was: every ``instgenie.*`` hook
    removed and the stock attention processors restored."""
    stock = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(STOCK_PROCESSORS_HOOK)
    if stock is not None:
        transformer.set_attn_processor(stock.processors)
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in [name for name in registry.hooks if name.startswith(HOOK_PREFIX)]:
            registry.remove_hook(name, recurse=False)


def is_installed(transformer: torch.nn.Module) -> bool:
    """Whether InstGenIE's processors or hooks are in ``transformer``."""
    return _has_masked_processors(transformer) or any(
        name.startswith(HOOK_PREFIX)
        for module in transformer.modules()
        for name in getattr(getattr(module, "_diffusers_hook", None), "hooks", {})
    )


def _has_masked_processors(transformer: torch.nn.Module) -> bool:
    return any(isinstance(p, MaskedProcessor) for p in transformer.attn_processors.values())
