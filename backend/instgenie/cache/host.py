"""The host-memory tier: step entries under a byte budget, least recently used first out.

Entries of *expendable* templates (auto-registered ones, :mod:`instgenie.auto_register`)
go before any other's. Entries an admitted request holds (pinned) are never evicted: a request pins the
steps it has fetched and unpins each once computed. When everything left is pinned
the tier runs over budget rather than fail a running request; the overshoot is
bounded by the admitted requests' fetch windows.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from .entry import StepKV

__all__ = ["HostTier", "StepKey"]

StepKey = tuple[str, int]  # (template id, step)


class HostTier:
    """``whole_templates``: evict all of a template at once (no disk tier to reload a step from)."""

    def __init__(
        self,
        budget_bytes: int | None,
        on_evict: Callable[[StepKey, int], None] | None = None,
        whole_templates: bool = False,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.whole_templates = whole_templates
        self._entries: OrderedDict[StepKey, StepKV] = OrderedDict()
        self._sizes: dict[StepKey, int] = {}
        self._pins: dict[StepKey, int] = {}
        self._expendable: set[str] = set()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._on_evict = on_evict

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def get(self, key: StepKey, pin: bool = False) -> StepKV | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                if pin:
                    self._pins[key] = self._pins.get(key, 0) + 1
            return entry

    def put(self, key: StepKey, entry: StepKV, pin: bool = False) -> None:
        with self._lock:
            if key in self._entries:
                self._nbytes -= self._sizes[key]
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._sizes[key] = entry.nbytes
            self._nbytes += entry.nbytes
            if pin:
                self._pins[key] = self._pins.get(key, 0) + 1
            self._evict_locked()

    def pin_or_put(self, key: StepKey, entry: StepKV) -> StepKV:
        """Pin ``key``'s entry, putting ``entry`` back first if it was evicted meanwhile."""
        with self._lock:
            current = self._entries.get(key)
            if current is not None:
                self._pins[key] = self._pins.get(key, 0) + 1
                self._entries.move_to_end(key)
                return current
        self.put(key, entry, pin=True)
        return entry

    def touch_template(self, template_id: str, steps: int) -> None:
        """Mark the entries of ``template_id``'s ``steps`` steps most recently used."""
        with self._lock:
            for step in range(steps):
                if (template_id, step) in self._entries:
                    self._entries.move_to_end((template_id, step))

    def mark_expendable(self, template_id: str, expendable: bool = True) -> None:
        """Evict ``template_id``'s entries before any other template's (or no longer)."""
        with self._lock:
            if expendable:
                self._expendable.add(template_id)
            else:
                self._expendable.discard(template_id)

    def unpin(self, key: StepKey) -> None:
        with self._lock:
            left = self._pins.get(key, 0) - 1
            if left > 0:
                self._pins[key] = left
            else:
                self._pins.pop(key, None)
            self._evict_locked()

    def contains(self, key: StepKey) -> bool:
        with self._lock:
            return key in self._entries

    def template_bytes(self, template_id: str) -> int:
        with self._lock:
            return sum(size for (tid, _), size in self._sizes.items() if tid == template_id)

    def drop_template(self, template_id: str) -> None:
        """Forget every unpinned entry of ``template_id`` (its cache was found corrupt)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == template_id and k not in self._pins]:
                self._remove_locked(key)
            self._expendable.discard(template_id)

    def _remove_locked(self, key: StepKey) -> int:
        del self._entries[key]
        size = self._sizes.pop(key)
        self._nbytes -= size
        return size

    def _evict_locked(self) -> None:
        if self.budget_bytes is None:
            return
        entries = list(self._entries)  # least recently used first; expendable templates' before all
        for key in [k for k in entries if k[0] in self._expendable] + [k for k in entries if k[0] not in self._expendable]:
            if self._nbytes <= self.budget_bytes:
                break
            if key in self._pins or key not in self._entries:
                continue
            victims = [key]
            if self.whole_templates:
                victims = [k for k in self._entries if k[0] == key[0]]
                if any(k in self._pins for k in victims):
                    continue
            for victim in victims:
                size = self._remove_locked(victim)
                if self._on_evict is not None:
                    self._on_evict(victim, size)
