"""Which waiting requests join the running batch at the next step.

The scheduler decides *which* states step together, and in which transformer calls;
the engine runs exactly those calls. It sees only what a state costs (rows, computed
tokens), which grid it is on and which leading blocks it recomputes, so it is tested
without a model.
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

    @property
    def full_blocks(self) -> int: ...  # planned leading blocks computing every token: one per call


class Scheduler(Protocol):
    """What the step loop asks of a scheduler (:class:`FcfsScheduler` is the one we ship)."""

    def admit(self, running: Sequence[Schedulable], waiting: Sequence[Schedulable]) -> list[int]: ...

    def calls(self, running: Sequence[Schedulable]) -> list[list[int]]: ...


@dataclass(frozen=True)
class SchedulerConfig:
    """Bounds on one batched step.

    ``max_active``: requests stepping together. ``max_batch_tokens``: bound on
    ``rows x longest row`` (rows are padded to the longest, so that is what a step
    computes); ``None`` = no bound. A lone request is always admitted.
    """

    max_active: int = 8
    max_batch_tokens: int | None = None
    # Split a step into transformer calls of similar token counts so that padding to the
    # longest row wastes at most this fraction; None = one call per step. Batching gains
    # nothing on CPU (keep it small there); on a GPU bigger calls are worth some padding.
    max_padding_waste: float | None = None

    def __post_init__(self) -> None:
        if self.max_active < 1:
            raise ValueError("max_active must be >= 1")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1 or None")
        if self.max_padding_waste is not None and self.max_padding_waste < 0:
            raise ValueError("max_padding_waste must be >= 0 or None")


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

    def calls(self, running: Sequence[Schedulable]) -> list[list[int]]:
        """Indices into ``running`` grouped into the transformer calls of one step.

        A call takes one grid (admission keeps the batch on one) and one planned prefix
        of recomputed blocks. Rows of a call are padded to its longest row; grouping
        similar token counts (ascending) bounds that waste by ``max_padding_waste``.
        """
        by_prefix: dict[int, list[int]] = {}
        for index, state in enumerate(running):
            by_prefix.setdefault(state.full_blocks, []).append(index)
        return [
            [members[i] for i in call]
            for members in by_prefix.values()
            for call in self._padding_calls([running[i] for i in members])
        ]

    def _padding_calls(self, running: Sequence[Schedulable]) -> list[list[int]]:
        waste = self.config.max_padding_waste
        if waste is None or len(running) < 2:
            return [list(range(len(running)))] if running else []
        groups: list[list[int]] = []
        rows = useful = 0
        for index in sorted(range(len(running)), key=lambda i: running[i].computed_tokens):
            item = running[index]
            padded = (rows + item.rows) * item.computed_tokens  # ascending: it is the longest
            if groups and padded > (1 + waste) * (useful + item.rows * item.computed_tokens):
                groups.append([])
                rows = useful = 0
            if not groups:
                groups.append([])
            groups[-1].append(index)
            rows += item.rows
            useful += item.rows * item.computed_tokens
        return groups
