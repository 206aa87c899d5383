"""Which waiting requests join the running batch at the next step.

The scheduler decides *which* states step together; the engine knows *how* to run
them. It sees only what a state costs (rows, computed tokens) and which grid it is
on, so it is tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


class Schedulable(Protocol):
    """What admission needs to know of a request (a :class:`~instgenie.RequestState` fits)."""

    @property
    def rows(self) -> int: ...  # transformer rows: 2 with classifier-free guidance

    @property
    def computed_tokens(self) -> int: ...

    @property
    def grid_key(self) -> tuple[int, int]: ...  # (width, height): one transformer call takes one grid


@dataclass(frozen=True)
class SchedulerConfig:
    """Bounds on one batched step.

    ``max_active``: requests stepping together. ``max_batch_tokens``: bound on
    ``rows x longest row`` (rows are padded to the longest, so that is what a step
    computes); ``None`` = no bound. A lone request is always admitted.
    """

    max_active: int = 8
    max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_active < 1:
            raise ValueError("max_active must be >= 1")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1 or None")


class FcfsScheduler:
    """First come, first served admission, one grid per batch, no starvation.

    A waiting request on another grid than the running batch stops admission
    behind it until the batch drains; otherwise a steady stream of same-grid
    arrivals could keep it waiting forever.
    """

    def __init__(self, config: SchedulerConfig = SchedulerConfig()) -> None:
        self.config = config

    def admit(self, running: Sequence[Schedulable], waiting: Sequence[Schedulable]) -> list[int]:
        """Indices into ``waiting`` (in order) that join ``running`` at the next step."""
        admitted: list[int] = []
        grid = running[0].grid_key if running else None
        rows = sum(r.rows for r in running)
        longest = max((r.computed_tokens for r in running), default=0)
        count = len(running)
        for index, candidate in enumerate(waiting):
            if count >= self.config.max_active:
                break
            if grid is not None and candidate.grid_key != grid:
                break
            new_rows = rows + candidate.rows
            new_longest = max(longest, candidate.computed_tokens)
            budget = self.config.max_batch_tokens
            if count and budget is not None and new_rows * new_longest > budget:
                break
            admitted.append(index)
            grid, rows, longest, count = candidate.grid_key, new_rows, new_longest, count + 1
        return admitted
