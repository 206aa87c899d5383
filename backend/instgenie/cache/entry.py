"""One step of one template's cache: the unit that moves between disk and host memory.

A denoising step reads every row's K/V of every attention site once, in site order,
so a step is what the loading pipeline fetches ahead of the compute (on a GPU the
copy engine then moves it block by block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..activations import TemplateActivations
from .mode import CacheMode

__all__ = ["StepKV", "RowKV"]


@dataclass
class StepKV:
    """K/V of every ``(row, site)`` of one step, in storage dtype and layout."""

    kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
    token_index: torch.Tensor | None  # stored token indices; None = all tokens in order

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv.values())

    def row(self, row: int) -> "RowKV":
        return RowKV(self, row)

    @classmethod
    def from_recording(
        cls, recording: TemplateActivations, step: int, mode: CacheMode, stored: torch.Tensor | None
    ) -> "StepKV":
        """The step's K/V as ``mode`` stores it; ``stored`` keeps only those tokens."""
        kv = {}
        for s, row, site in recording.keys():
            if s != step:
                continue
            key, value = recording.get(step, row, site)
            if stored is not None:
                dim = recording.token_dims[site]
                key, value = key.index_select(dim, stored), value.index_select(dim, stored)
            kv[(row, site)] = (key.to(mode.torch_dtype).contiguous(), value.to(mode.torch_dtype).contiguous())
        return cls(kv, stored)

    # -- file form: flat name -> tensor ---------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        named = {}
        for (row, site), (key, value) in self.kv.items():
            named[f"k.{row}.{site}"], named[f"v.{row}.{site}"] = key, value
        return named

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor], token_index: torch.Tensor | None) -> "StepKV":
        kv: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for name, tensor in named.items():
            kind, row, site = name.split(".")
            if kind != "k":
                continue
            kv[(int(row), int(site))] = (tensor, named[f"v.{row}.{site}"])
        return cls(kv, token_index)

    def pinned(self) -> "StepKV":
        """A copy in page-locked host memory, from which host->device copies run asynchronously."""
        return StepKV({key: (k.pin_memory(), v.pin_memory()) for key, (k, v) in self.kv.items()}, self.token_index)


class RowKV:
    """A :class:`~instgenie.attention.KVSource`: one row of a :class:`StepKV`."""

    def __init__(self, step: StepKV, row: int) -> None:
        self._step, self._row = step, row
        self.token_index = step.token_index

    def kv(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._step.kv[(self._row, site)]
        except KeyError:
            raise KeyError(f"no cached K/V for row {self._row}, site {site}") from None
