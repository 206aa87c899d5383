"""One step of one template's cache: the unit that moves between disk and host memory.

A denoising step reads every row's K/V (or attention inputs) of every attention site
once, in site order, so a step is what the loading pipeline fetches ahead of the
compute (on a GPU the copy engine then moves it block by block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..activations import TemplateActivations
from .mode import CacheMode

__all__ = ["StepKV", "RowKV"]


@dataclass
class StepKV:
    """What one step stores per ``(row, site)``, in storage dtype and layout.

    ``kv`` maps to ``(K, V)``; a step of an input-storing cache maps to ``(input,)``.
    """

    kv: dict[tuple[int, int], tuple[torch.Tensor, ...]]
    token_index: torch.Tensor | None  # stored token indices; None = all tokens in order
    stores_inputs: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.kv.values() for t in tensors)

    def row(self, row: int) -> "RowKV":
        return RowKV(self, row)

    @classmethod
    def from_recording(
        cls, recording: TemplateActivations, step: int, mode: CacheMode, stored: torch.Tensor | None
    ) -> "StepKV":
        """The step as ``mode`` stores it; ``stored`` keeps only those tokens."""
        if mode.stores_inputs and not recording.records_inputs:
            raise ValueError(f"cache mode {mode.name} stores attention inputs; this recording holds only K/V")
        kv: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        for s, row, site in recording.keys():
            if s != step:
                continue
            if mode.stores_inputs:
                tensors: tuple[torch.Tensor, ...] = (recording.get_input(step, row, site),)
                dim = 0
            else:
                tensors, dim = recording.get(step, row, site), recording.token_dims[site]
            if stored is not None:
                tensors = tuple(t.index_select(dim, stored) for t in tensors)
            kv[(row, site)] = tuple(t.to(mode.torch_dtype).contiguous() for t in tensors)
        return cls(kv, stored, mode.stores_inputs)

    # -- file form: flat name -> tensor ---------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        kinds = _INPUT_KINDS if self.stores_inputs else _KV_KINDS
        return {
            f"{kind}.{row}.{site}": tensor
            for (row, site), tensors in self.kv.items()
            for kind, tensor in zip(kinds, tensors)
        }

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor], token_index: torch.Tensor | None) -> "StepKV":
        grouped: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for name, tensor in named.items():
            kind, row, site = name.split(".")
            grouped.setdefault((int(row), int(site)), {})[kind] = tensor
        stores_inputs = any(_INPUT_KINDS[0] in parts for parts in grouped.values())
        kinds = _INPUT_KINDS if stores_inputs else _KV_KINDS
        try:
            kv = {key: tuple(parts[kind] for kind in kinds) for key, parts in grouped.items()}
        except KeyError as missing:
            raise ValueError(f"cache step lacks tensor kind {missing}") from None
        return cls(kv, token_index, stores_inputs)

    def pinned(self) -> "StepKV":
        """A copy in page-locked host memory, from which host->device copies run asynchronously."""
        kv = {key: tuple(t.pin_memory() for t in tensors) for key, tensors in self.kv.items()}
        return StepKV(kv, self.token_index, self.stores_inputs)


_KV_KINDS = ("k", "v")
_INPUT_KINDS = ("x",)


class RowKV:
    """A :class:`~instgenie.attention.KVSource`: one row of a :class:`StepKV`."""

    def __init__(self, step: StepKV, row: int) -> None:
        self._step, self._row = step, row
        self.token_index = step.token_index
        self.stores_inputs = step.stores_inputs

    def _stored(self, site: int) -> tuple[torch.Tensor, ...]:
        try:
            return self._step.kv[(self._row, site)]
        except KeyError:
            raise KeyError(f"no cached activations for row {self._row}, site {site}") from None

    def kv(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert not self.stores_inputs, "this cache stores attention inputs"
        key, value = self._stored(site)
        return key, value

    def attention_input(self, site: int) -> torch.Tensor:
        assert self.stores_inputs, "this cache stores K/V"
        (hidden,) = self._stored(site)
        return hidden
