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

__all__ = ["KeptTokens", "RowKV", "StepKV", "kept_from_meta", "kept_to_meta"]

#: Per attention or output site, the sorted raster indices (over the site's own token
#: grid) a cache stores; sites not listed store every token.
KeptTokens = dict[int, torch.Tensor]

_KEPT = "cache.kept."  # meta names: one tensor per distinct index set ...
_KEPT_SITES = "cache.kept_sites"  # ... and, per site, which one (-1: every token)


def kept_to_meta(kept: KeptTokens) -> dict[str, torch.Tensor]:
    """``kept`` as meta tensors; sites sharing a grid share one stored index set."""
    distinct: list[torch.Tensor] = []
    sites = torch.full((max(kept) + 1,), -1, dtype=torch.long) if kept else torch.empty(0, dtype=torch.long)
    for site, index in sorted(kept.items()):
        for i, known in enumerate(distinct):
            if known is index or torch.equal(known, index):
                sites[site] = i
                break
        else:
            sites[site] = len(distinct)
            distinct.append(index)
    return {_KEPT_SITES: sites, **{f"{_KEPT}{i}": index for i, index in enumerate(distinct)}}


def kept_from_meta(meta: dict[str, torch.Tensor]) -> KeptTokens | None:
    """Inverse of :func:`kept_to_meta`; removes its entries from ``meta``. ``None`` if absent."""
    sites = meta.pop(_KEPT_SITES, None)
    distinct = {int(name[len(_KEPT) :]): meta.pop(name) for name in [n for n in meta if n.startswith(_KEPT)]}
    if sites is None:
        return None
    try:
        return {site: distinct[int(i)] for site, i in enumerate(sites.tolist()) if i >= 0}
    except KeyError as missing:
        raise ValueError(f"cache meta lacks kept token set {missing}") from None


@dataclass
class StepKV:
    """What one step stores per ``(row, site)``, in storage dtype and layout.

    ``kv`` maps to ``(K, V)``; a step of an input-storing cache maps to ``(input,)``.
    """

    kv: dict[tuple[int, int], tuple[torch.Tensor, ...]]
    kept: KeptTokens | None  # per site, the raster indices stored; ``None`` (or a site missing): all, in order
    stores_inputs: bool = False
    #: Sites that store an output (a UNet attention level's), whatever the content mode.
    output_sites: frozenset[int] = frozenset()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.kv.values() for t in tensors)

    def row(self, row: int) -> "RowKV":
        return RowKV(self, row)

    @classmethod
    def from_recording(
        cls, recording: TemplateActivations, step: int, mode: CacheMode, kept: KeptTokens | None
    ) -> "StepKV":
        """The step as ``mode`` stores it; ``kept`` keeps only those tokens of each site."""
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
            if kept and site in kept:
                tensors = tuple(t.index_select(dim, kept[site]) for t in tensors)
            kv[(row, site)] = tuple(t.to(mode.torch_dtype).contiguous() for t in tensors)
        outputs = set()
        for s, row, site in recording.output_keys():
            if s == step:
                output = recording.get_output(step, row, site)
                if kept and site in kept:
                    output = output.index_select(recording.token_dims.get(site, 0), kept[site])
                kv[(row, site)] = (output.to(mode.torch_dtype).contiguous(),)
                outputs.add(site)
        return cls(kv, kept, mode.stores_inputs, frozenset(outputs))

    # -- file form: flat name -> tensor ---------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        content = _INPUT_KINDS if self.stores_inputs else _KV_KINDS
        return {
            f"{kind}.{row}.{site}": tensor
            for (row, site), tensors in self.kv.items()
            for kind, tensor in zip(_OUTPUT_KINDS if site in self.output_sites else content, tensors)
        }

    @classmethod
    def from_tensors(cls, named: dict[str, torch.Tensor], kept: KeptTokens | None) -> "StepKV":
        grouped: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        for name, tensor in named.items():
            kind, row, site = name.split(".")
            grouped.setdefault((int(row), int(site)), {})[kind] = tensor
        stores_inputs = any(_INPUT_KINDS[0] in parts for parts in grouped.values())
        content = _INPUT_KINDS if stores_inputs else _KV_KINDS
        outputs = frozenset(site for (_, site), parts in grouped.items() if _OUTPUT_KINDS[0] in parts)
        try:
            kv = {
                (row, site): tuple(parts[kind] for kind in (_OUTPUT_KINDS if site in outputs else content))
                for (row, site), parts in grouped.items()
            }
        except KeyError as missing:
            raise ValueError(f"cache step lacks tensor kind {missing}") from None
        return cls(kv, kept, stores_inputs, outputs)

    def pinned(self) -> "StepKV":
        """A copy in page-locked host memory, from which host->device copies run asynchronously."""
        kv = {key: tuple(t.pin_memory() for t in tensors) for key, tensors in self.kv.items()}
        return StepKV(kv, self.kept, self.stores_inputs, self.output_sites)


_KV_KINDS = ("k", "v")
_INPUT_KINDS = ("x",)
_OUTPUT_KINDS = ("o",)


class RowKV:
    """A :class:`~instgenie.attention.KVSource`: one row of a :class:`StepKV`."""

    def __init__(self, step: StepKV, row: int) -> None:
        self._step, self._row = step, row
        self.stores_inputs = step.stores_inputs

    def stored_tokens(self, site: int) -> torch.Tensor | None:
        kept = self._step.kept
        return kept.get(site) if kept else None

    def stored(self, site: int) -> tuple[torch.Tensor, ...]:
        try:
            return self._step.kv[(self._row, site)]
        except KeyError:
            raise KeyError(f"no cached activations for row {self._row}, site {site}") from None

    def kv(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert not self.stores_inputs, "this cache stores attention inputs"
        key, value = self.stored(site)
        return key, value

    def attention_input(self, site: int) -> torch.Tensor:
        assert self.stores_inputs, "this cache stores K/V"
        (hidden,) = self.stored(site)
        return hidden

    def output(self, site: int) -> torch.Tensor:
        (hidden,) = self.stored(site)
        return hidden
