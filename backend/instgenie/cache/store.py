"""The activation cache store: host-memory tier over a disk tier, with prefetch.

Idea 2 of InstGenIE (bubble-free loading) starts here. A template's K/V are written
once to disk (every recorded template stays there) and kept in host memory under a
byte budget. A request opens a :class:`TemplateCache` when it is queued: that
starts fetching its first steps from disk before it is admitted, and every step it
computes fetches a later one (``lookahead``), so reading step *s+1* overlaps
computing step *s*. Without a disk tier the host tier is the only copy: a template
is then evicted whole, and one larger than the budget is refused.

Thread-safe: the step loop, request workers and the prefetch threads share it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..activations import TemplateActivations
from ..compute_threads import single_threaded_helper
from ..errors import CacheBudgetExceeded, CacheCorrupt, UnknownTemplate
from .disk import DiskTier
from .entry import KeptTokens, RowKV, StepKV, kept_from_meta, kept_to_meta
from .host import HostTier, StepKey
from .mode import CacheMode

log = logging.getLogger(__name__)

__all__ = ["ActivationStore", "CacheStats", "TemplateCache"]

_STEPS = "cache.steps"


@dataclass
class CacheStats:
    """Counters since the store was created (a snapshot; see :meth:`ActivationStore.stats`)."""

    host_hits: int = 0  # steps a request found in host memory
    disk_loads: int = 0  # steps read from disk
    disk_bytes: int = 0
    disk_seconds: float = 0.0
    stalls: int = 0  # steps whose compute waited for a load
    stall_seconds: float = 0.0
    prefetched: int = 0  # steps loaded ahead of their use
    prefetch_lead_seconds: float = 0.0  # summed time between a prefetch finishing and its use
    evictions: int = 0
    evicted_bytes: int = 0
    corrupt: int = 0
    writes: int = 0
    written_bytes: int = 0
    host_bytes: int = 0  # gauge

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class ActivationStore:
    def __init__(
        self,
        model_fingerprint: str,
        *,
        mode: CacheMode = CacheMode(),
        host_budget_bytes: int | None = None,
        disk_dir: str | Path | None = None,
        prefetch_workers: int = 2,
        lookahead: int = 2,
        device: str | torch.device = "cpu",
    ) -> None:
        self.mode = mode
        self.lookahead = max(0, lookahead)  # 0: no prefetch, each step loads when needed (naive)
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"  # page-locked host memory for async H2D copies
        self.disk = None if disk_dir is None else DiskTier(disk_dir, mode.name, model_fingerprint)
        self.host = HostTier(host_budget_bytes, on_evict=self._evicted, whole_templates=self.disk is None)
        self._lock = threading.Lock()
        self._stats = CacheStats()
        self._templates: dict[str, tuple[int, KeptTokens | None]] = {}  # id -> (steps, tokens kept per site)
        self._loading: dict[StepKey, Future[StepKV]] = {}
        # Loading is reading and copying: single-threaded, so the step loop's OpenMP
        # team stays the process's only one (see ``compute_threads``).
        self._pool = ThreadPoolExecutor(
            prefetch_workers, thread_name_prefix="instgenie-prefetch", initializer=single_threaded_helper
        )

    # -- templates -----------------------------------------------------------------
    def put(
        self,
        template_id: str,
        recording: TemplateActivations,
        meta: dict[str, torch.Tensor],
        info: dict[str, str],
        unmasked: KeptTokens | None = None,
    ) -> int:
        """Store a recording (disk first, then host memory); return its stored bytes.

        ``unmasked``: per site, the tokens outside the template's own edit region; with
        ``tokens="unmasked"`` only those are stored (every edit recomputes the others).
        """
        steps = recording.steps
        kept = unmasked if self.mode.tokens == "unmasked" and unmasked else None
        entries = [StepKV.from_recording(recording, step, self.mode, kept) for step in range(steps)]
        total = sum(entry.nbytes for entry in entries)
        budget = self.host.budget_bytes
        if self.disk is None and budget is not None and total > budget:
            raise CacheBudgetExceeded(
                f"template {template_id} records {total} bytes of K/V; the host cache budget is {budget} bytes "
                "and there is no disk tier to stream it from (set a cache folder)"
            )
        if self.disk is not None:
            meta = dict(meta)
            if kept is not None:
                meta.update(kept_to_meta(kept))
            info = {**info, _STEPS: str(steps)}
            written = self.disk.write(template_id, meta, info, ((s, e.tensors()) for s, e in enumerate(entries)))
            with self._lock:
                self._stats.writes += 1
                self._stats.written_bytes += written
        with self._lock:
            self._templates[template_id] = (steps, kept)
        for step, entry in enumerate(entries):
            self.host.put((template_id, step), entry.pinned() if self._pin else entry)
        return total

    def has(self, template_id: str) -> bool:
        if self.disk is not None:
            return self.disk.has(template_id)
        return self.host.contains((template_id, 0))  # host only: evicted whole or not at all

    def template_ids(self) -> list[str]:
        if self.disk is not None:
            return self.disk.template_ids()
        with self._lock:
            known = list(self._templates)
        return sorted(t for t in known if self.host.contains((t, 0)))

    def meta(self, template_id: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The ``meta``/``info`` a template was put with, from disk (e.g. after a restart)."""
        if self.disk is None or not self.disk.has(template_id):
            raise UnknownTemplate(f"unknown template {template_id!r}; register it (again) first")
        try:
            meta, info = self.disk.read_meta(template_id)
        except CacheCorrupt:
            self._count(corrupt=1)
            self.discard(template_id)
            raise
        try:
            kept = kept_from_meta(meta)
        except ValueError as error:
            self._count(corrupt=1)
            self.discard(template_id)
            raise CacheCorrupt(f"template {template_id}: {error}") from None
        steps = int(info.pop(_STEPS, "0"))
        with self._lock:
            self._templates[template_id] = (steps, kept)
        return meta, info

    def discard(self, template_id: str) -> None:
        """Forget a template everywhere (its cache is corrupt, or it is deregistered)."""
        with self._lock:
            self._templates.pop(template_id, None)
        self.host.drop_template(template_id)
        if self.disk is not None:
            self.disk.delete(template_id)

    def touch(self, template_id: str) -> None:
        """A request is about to use the template: keep it in host memory longest."""
        with self._lock:
            steps = self._templates.get(template_id, (0, None))[0]
        self.host.touch_template(template_id, steps)

    def nbytes(self, template_id: str) -> int:
        if self.disk is not None and self.disk.has(template_id):
            return self.disk.nbytes(template_id)
        return self.host.template_bytes(template_id)

    def open(self, template_id: str) -> "TemplateCache":
        """A request's handle on ``template_id``'s cache; starts prefetching its first steps."""
        with self._lock:
            known = self._templates.get(template_id)
        if known is None:
            self.meta(template_id)  # raises UnknownTemplate / CacheCorrupt
            with self._lock:
                known = self._templates[template_id]
        steps, _kept = known
        return TemplateCache(self, template_id, steps)

    # -- loading -------------------------------------------------------------------
    def _fetch(self, key: StepKey) -> Future[StepKV]:
        """The step's entry, from host memory at once or from disk on a prefetch thread."""
        entry = self.host.get(key)
        if entry is not None:
            with self._lock:
                self._stats.host_hits += 1
            done: Future[StepKV] = Future()
            done.set_result(entry)
            return done
        with self._lock:
            pending = self._loading.get(key)
            if pending is None:
                pending = self._pool.submit(self._load, key)
                self._loading[key] = pending
            return pending

    def _load(self, key: StepKey) -> StepKV:
        template_id, step = key
        try:
            if self.disk is None:
                raise UnknownTemplate(f"template {template_id} was evicted from the host cache; register it again")
            with self._lock:
                kept = self._templates.get(template_id, (0, None))[1]
            started = time.perf_counter()
            try:
                entry = StepKV.from_tensors(self.disk.read_step(template_id, step), kept)
            except CacheCorrupt:
                with self._lock:
                    first = template_id in self._templates  # not yet discarded by another load
                    self._stats.corrupt += first
                if first:
                    log.error("cache of template %s is corrupt (step %d); discarding it", template_id, step)
                    self.discard(template_id)
                raise
            if self._pin:
                entry = entry.pinned()
            with self._lock:
                self._stats.disk_loads += 1
                self._stats.disk_bytes += entry.nbytes
                self._stats.disk_seconds += time.perf_counter() - started
            self.host.put(key, entry)
            return entry
        finally:
            with self._lock:
                self._loading.pop(key, None)

    def _evicted(self, key: StepKey, size: int) -> None:
        # Called under the host tier's lock: only counters here.
        self._stats.evictions += 1
        self._stats.evicted_bytes += size

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)

    def stats(self) -> CacheStats:
        with self._lock:
            snapshot = CacheStats(**self._stats.as_dict())
        snapshot.host_bytes = self.host.nbytes
        return snapshot

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class TemplateCache:
    """One request's view of a template's cache: fetches ahead, pins what it holds.

    The request's steps read :meth:`at`; after computing a step the request calls
    :meth:`advance`, which unpins it and fetches ``lookahead`` steps further.
    :meth:`release` when the request leaves (finished, failed or cancelled).
    """

    def __init__(self, store: ActivationStore, template_id: str, steps: int) -> None:
        self.store, self.template_id, self.steps = store, template_id, steps
        self._lock = threading.RLock()  # a fetch already done runs its callback at once
        self._pending: dict[int, Future[StepKV]] = {}
        self._held: dict[int, StepKV] = {}  # pinned entries
        self._ready_at: dict[int, float] = {}
        self._released = False
        whole = store.disk is None  # the only copy: hold all of it while the request runs
        for step in range(steps if whole else min(steps, store.lookahead)):
            self._start(step)

    def _start(self, step: int) -> None:
        if step >= self.steps or step in self._pending or step in self._held:
            return
        future = self.store._fetch((self.template_id, step))
        self._pending[step] = future
        future.add_done_callback(lambda f, s=step: self._landed(s, f))

    def _landed(self, step: int, future: Future[StepKV]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        with self._lock:
            if self._released or step in self._held:
                return
            self._held[step] = self.store.host.pin_or_put((self.template_id, step), future.result())
            self._ready_at[step] = time.perf_counter()

    def at(self, step: int, row: int) -> RowKV:
        """Row ``row`` of step ``step``; waits for (or starts) its load if needed."""
        return self.wait(step).row(row)

    def wait(self, step: int) -> StepKV:
        """Step ``step``'s entry, held until :meth:`advance` past it; raises the load's error."""
        with self._lock:
            entry = self._held.get(step)
            if entry is None and step not in self._pending:
                self._start(step)
            future = self._pending.get(step)
        if entry is None:
            assert future is not None
            started = time.perf_counter()
            if not future.done():
                entry = future.result()
                self.store._count(stalls=1, stall_seconds=time.perf_counter() - started)
            else:
                entry = future.result()  # raises the load's error (corrupt, evicted)
            self._landed(step, future)
        else:
            ready = self._ready_at.pop(step, None)
            if ready is not None and self.store.disk is not None:
                self.store._count(prefetched=1, prefetch_lead_seconds=time.perf_counter() - ready)
        return entry

    def advance(self, step_done: int) -> None:
        """``step_done`` is computed: unpin it and fetch ahead."""
        if self.store.disk is None:
            return  # the whole template stays pinned until release
        with self._lock:
            self._pending.pop(step_done, None)
            self._ready_at.pop(step_done, None)
            if self._held.pop(step_done, None) is not None:
                self.store.host.unpin((self.template_id, step_done))
            for step in range(step_done + 1, min(self.steps, step_done + 1 + self.store.lookahead)):
                self._start(step)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
            held, self._held = self._held, {}
            self._pending.clear()
        for step in held:
            self.store.host.unpin((self.template_id, step))
