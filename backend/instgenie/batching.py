"""Batch assembly: the inputs of one transformer call over several requests' states.

Each request contributes one row per guidance branch, carrying only the tokens it
computes (padded to the call's longest row) and a source of the K/V it does not
compute (its template's cache, staged a site ahead of the compute). States share a
call only if they share a grid and a planned prefix (the scheduler's calls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from .attention import TokenBatch, TokenRow
from .cache.staging import CopyStage, StagedSource
from .errors import InvalidInput
from .families import Family, ModelInputs

if TYPE_CHECKING:
    from .states import RequestState

__all__ = ["call_inputs"]


def call_inputs(family: Family, device: torch.device, active: Sequence[RequestState], full_blocks: int = 0) -> ModelInputs:
    """The batched transformer inputs of unfinished ``active`` states at their current steps.

    With ``full_blocks`` > 0 every row carries every token (for the full-block prefix).
    """
    grid = family.grid(active[0].settings)
    if any(family.grid(s.settings) != grid for s in active):
        raise InvalidInput("states of different resolutions cannot share a step")
    if (full_blocks or family.reads_every_token) and any(
        s.template is not None and s.template.step_latents is None for s in active
    ):
        raise ValueError("a template cached without step latents cannot feed every token; register it again")
    full_grid = bool(full_blocks) or family.reads_every_token
    rows: list[TokenRow] = []
    tokens: list[torch.Tensor] = []
    for state in active:
        timestep = state.timesteps[state.step_index]
        if full_grid and state.template is not None:
            latents, condition = _full_grid_inputs(state)
        else:
            latents, condition = state.inputs.latents[0], state.inputs.condition
            condition = None if condition is None else condition[0]
        row_tokens = family.model_tokens(state.scheduler, timestep, latents, condition)
        for row in range(state.rows):
            rows.append(
                TokenRow(
                    token_index=state.token_index,
                    cached=None if state.kv is None else state.kv.at(state.step_index, row),
                    recorder=None if state.recording is None else state.recording.at(state.step_index, row),
                )
            )
            tokens.append(row_tokens)
    if any(row.cached is not None for row in rows):
        # Host->device copies run a site ahead of the compute (a no-op copy on CPU).
        stage = CopyStage(
            [row.cached for row in rows], family.num_sites, family.sites_before(full_blocks), device
        )
        for b, row in enumerate(rows):
            if row.cached is not None:
                row.cached = StagedSource(stage, b, row.cached)
    text = torch.cat([s.text.prompt_embeds for s in active])
    batch = TokenBatch(rows, num_tokens=active[0].num_tokens, text_len=text.shape[1], full_blocks=full_blocks)
    return ModelInputs(
        batch=batch,
        tokens=_pad_rows(tokens, batch.num_tokens if batch.is_dense or full_grid else batch.padded_len),
        prompt_embeds=text,
        pooled=torch.cat([s.text.pooled for s in active]),
        timesteps=torch.stack([s.timesteps[s.step_index] for s in active for _ in range(s.rows)]),
        guidance=torch.tensor(
            [s.settings.guidance for s in active for _ in range(s.rows)], dtype=torch.float32, device=device
        ),
        grid=grid,
    )


def _full_grid_inputs(state: RequestState) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[N, C]`` latents and condition of every token of a cached state: the template's
    latents at this step where the state computes nothing (the tokens its cache stands for)."""
    assert state.template is not None and state.template.step_latents is not None and state.full_inputs is not None
    latents = state.template.step_latents[state.step_index].clone()
    latents[state.token_index] = state.inputs.latents[0]
    condition = state.full_inputs.condition
    return latents, None if condition is None else condition[0]


def _pad_rows(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    """Stack ``[M_b, C]`` rows into ``[B, length, C]``, padding with each row's last token."""
    return torch.stack([torch.cat([r, r[-1:].expand(length - r.shape[0], -1)]) if r.shape[0] < length else r for r in rows])
