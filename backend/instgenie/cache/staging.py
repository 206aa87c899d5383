"""Host->device copies of a step's cache, one attention site ahead of the compute.

This is the GPU half of the loading pipeline (the disk->host half is the store's
prefetch). Within one transformer call the sites run in order; when site *s* asks
for its cached tensors, the copies of site *s + 1* are issued on a separate copy
stream, so they overlap site *s*'s compute. At most two sites are in flight: the
double buffer of the design. Ordering is by CUDA events: the compute stream waits
for a site's copy event before reading it, and each copied tensor is marked as used
by the compute stream (``record_stream``), so the caching allocator reuses its
memory only after that compute finished.

On a CPU host memory is the compute's memory: the copy is the tensor itself and
there are no streams, but the same bookkeeping runs (which site is issued when),
so the path is exercised by the CPU tests.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..attention import KVSource

__all__ = ["CopyStage", "StagedSource"]


class CopyStage:
    """The copies of one transformer call's cached rows, issued a site ahead.

    Args:
        sources: one cached row source per batch row (``None`` for rows without a cache).
        num_sites: attention sites of the transformer.
        first_site: the first site that reads the cache (earlier ones recompute).
        device: where the compute runs.
    """

    def __init__(
        self, sources: Sequence[KVSource | None], num_sites: int, first_site: int, device: torch.device
    ) -> None:
        self._sources = list(sources)
        self._num_sites = num_sites
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staged: dict[int, tuple[list[tuple[torch.Tensor, ...] | None], torch.cuda.Event | None]] = {}
        self.issued: list[int] = []  # sites in the order their copies were issued
        self._issue(first_site)  # before the call's first blocks run: the first copy overlaps them

    @property
    def in_flight(self) -> int:
        """Sites staged and not yet released: the double buffer's occupancy."""
        return len(self._staged)

    def tensors(self, row: int, site: int) -> tuple[torch.Tensor, ...]:
        """Row ``row``'s cached tensors of ``site`` on the device, safe to read on the current stream."""
        if site not in self._staged:
            self._issue(site)
        self._issue(site + 1)
        staged, ready = self._staged[site]
        if ready is not None:
            torch.cuda.current_stream(self._device).wait_event(ready)
        # Two sites in flight at most: the one computing and the one copying.
        for old in [s for s in self._staged if s < site]:
            del self._staged[old]
        tensors = staged[row]
        if tensors is None:
            raise KeyError(f"row {row} has no cache")
        return tensors

    def _issue(self, site: int) -> None:
        if site >= self._num_sites or site in self._staged:
            return
        self.issued.append(site)
        if self._stream is None:
            self._staged[site] = ([None if s is None else s.stored(site) for s in self._sources], None)
            return
        compute = torch.cuda.current_stream(self._device)
        # No wait on the compute stream: the copy only allocates (on its own stream) and
        # reads host tensors the request pins; ``record_stream`` keeps the allocator from
        # reusing a copy's memory before the compute stream is done with it.
        with torch.cuda.stream(self._stream):
            staged = []
            for source in self._sources:
                if source is None:
                    staged.append(None)
                    continue
                copied = tuple(t.to(self._device, non_blocking=True) for t in source.stored(site))
                for tensor in copied:
                    tensor.record_stream(compute)
                staged.append(copied)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        self._staged[site] = (staged, ready)


class StagedSource:
    """A :class:`~instgenie.attention.KVSource` that reads one row through a :class:`CopyStage`."""

    def __init__(self, stage: CopyStage, row: int, source: KVSource) -> None:
        self._stage, self._row, self._source = stage, row, source
        self.stores_inputs = source.stores_inputs

    def stored_tokens(self, site: int) -> torch.Tensor | None:
        return self._source.stored_tokens(site)

    def kv(self, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = self._stage.tensors(self._row, site)
        return key, value

    def attention_input(self, site: int) -> torch.Tensor:
        (hidden,) = self._stage.tensors(self._row, site)
        return hidden

    def output(self, site: int) -> torch.Tensor:
        (hidden,) = self._stage.tensors(self._row, site)
        return hidden

    def stored(self, site: int) -> tuple[torch.Tensor, ...]:
        return self._stage.tensors(self._row, site)
