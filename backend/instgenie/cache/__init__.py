"""Template activation caches: storage modes, host and disk tiers, prefetch, load planning."""

from .entry import RowKV, StepKV
from .mode import CacheMode
from .store import ActivationStore, CacheStats, TemplateCache

__all__ = ["ActivationStore", "CacheMode", "CacheStats", "RowKV", "StepKV", "TemplateCache"]
