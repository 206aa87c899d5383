"""Which blocks load their cache and which recompute: the loading planner.

On a GPU a masked step runs block by block while the copy engine brings the next
blocks' K/V from host memory (double-buffered). When the mask is small the compute
is short and the step waits on the copies; recomputing a block with all tokens
costs more compute but needs no load, and buys the copy engine time for the blocks
after it. Per block, the recurrence of the design (section 2) chooses::

    use the cache for block i  iff  max(load_done + L_i, comp_done) + C_masked_i <= comp_done + C_full_i

:func:`plan_blocks` runs it, and also a small search over the Pareto frontier of
(compute done, copy done, buffer release) states, since the greedy rule is myopic:
with loads longer than a full block it alternates load/recompute and leaves the
compute waiting on every load (15% slower than the best plan on 12 equal blocks),
where recomputing two blocks per load hides them. It returns the fastest of greedy,
frontier, "load every block" and "recompute every block", so a plan is never slower
than either extreme. Costs come from :class:`CostModel`, linear fits written by
``instgenie profile``.

What the engine executes is :func:`plan_prefix`: recomputing a block needs every
token's input to it, and those exist only while every block before it computed
every token, so the recomputed blocks of a step are its first ``k``. The search
over ``k`` is exhaustive (one simulation per ``k``) and, like the above, never
slower than loading every block or recomputing every block (``k = 0``, ``k = n``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["BlockPlan", "CostModel", "LinearCost", "plan_blocks", "plan_prefix", "simulate"]


@dataclass(frozen=True)
class LinearCost:
    """``seconds = intercept_s + slope_s * x`` (x: tokens or bytes), fitted by least squares."""

    intercept_s: float
    slope_s: float
    r2: float = 1.0

    def __call__(self, x: float) -> float:
        return max(0.0, self.intercept_s + self.slope_s * x)

    @classmethod
    def fit(cls, xs: Sequence[float], seconds: Sequence[float]) -> "LinearCost":
        x, y = np.asarray(xs, dtype=float), np.asarray(seconds, dtype=float)
        if len(x) < 2 or np.ptp(x) == 0:
            raise ValueError("a linear fit needs at least two distinct x values")
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (intercept + slope * x)
        total = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float((residual**2).sum()) / total if total > 0 else 1.0
        return cls(float(intercept), float(slope), r2)


@dataclass(frozen=True)
class CostModel:
    """This machine's costs: one transformer block vs row-tokens, one cache load vs bytes."""

    block_compute: LinearCost
    load: LinearCost
    device: str = "cpu"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> "CostModel":
        raw = json.loads(Path(path).read_text())
        return cls(LinearCost(**raw["block_compute"]), LinearCost(**raw["load"]), raw.get("device", "cpu"))

    def _costs(self, blocks: int, all_tokens: int, masked_tokens: int, block_bytes: int) -> tuple[list[float], ...]:
        full = [self.block_compute(all_tokens)] * blocks
        masked = [self.block_compute(masked_tokens)] * blocks
        return full, masked, [self.load(block_bytes)] * blocks

    def plan(self, blocks: int, all_tokens: int, masked_tokens: int, block_bytes: int) -> "BlockPlan":
        """The unconstrained plan for ``blocks`` equal blocks of one masked step."""
        return plan_blocks(*self._costs(blocks, all_tokens, masked_tokens, block_bytes))

    def plan_prefix(self, blocks: int, all_tokens: int, masked_tokens: int, block_bytes: int) -> "BlockPlan":
        """The executable plan (recomputed blocks first) for ``blocks`` equal blocks."""
        return plan_prefix(*self._costs(blocks, all_tokens, masked_tokens, block_bytes))


@dataclass(frozen=True)
class BlockPlan:
    use_cache: tuple[bool, ...]  # per block: load + masked compute (True) or full compute (False)
    predicted_s: float  # the step's compute finish time under the plan
    all_load_s: float
    all_recompute_s: float

    @property
    def recomputed(self) -> int:
        return sum(not use for use in self.use_cache)


def simulate(
    use_cache: Sequence[bool],
    full_s: Sequence[float],
    masked_s: Sequence[float],
    load_s: Sequence[float],
    buffers: int = 2,
) -> float:
    """Finish time of a plan: one copy stream, one compute stream, ``buffers`` load slots.

    A load may start once the copy stream is free and a buffer is: the block that
    used that buffer ``buffers`` loads earlier has finished computing.
    """
    load_done = comp_done = 0.0
    consumers: list[float] = []  # compute finish times of blocks that loaded, in order
    for use, full, masked, load in zip(use_cache, full_s, masked_s, load_s):
        if use:
            buffer_free = consumers[-buffers] if len(consumers) >= buffers else 0.0
            load_done = max(load_done, buffer_free) + load
            comp_done = max(load_done, comp_done) + masked
            consumers.append(comp_done)
        else:
            comp_done += full
    return comp_done


def plan_blocks(
    full_s: Sequence[float], masked_s: Sequence[float], load_s: Sequence[float], buffers: int = 2
) -> BlockPlan:
    """Choose per block between loading its cache and recomputing it (see module doc)."""
    if not (len(full_s) == len(masked_s) == len(load_s)):
        raise ValueError("full_s, masked_s and load_s need one entry per block")
    load_done = comp_done = 0.0
    consumers: list[float] = []
    greedy: list[bool] = []
    for full, masked, load in zip(full_s, masked_s, load_s):
        buffer_free = consumers[-buffers] if len(consumers) >= buffers else 0.0
        loaded_at = max(load_done, buffer_free) + load
        use = max(loaded_at, comp_done) + masked <= comp_done + full
        greedy.append(use)
        if use:
            load_done = loaded_at
            comp_done = max(loaded_at, comp_done) + masked
            consumers.append(comp_done)
        else:
            comp_done += full
    blocks = len(full_s)
    candidates = {
        "greedy": tuple(greedy),
        "frontier": _frontier_plan(full_s, masked_s, load_s, buffers),
        "all_load": (True,) * blocks,
        "all_recompute": (False,) * blocks,
    }
    times = {name: simulate(plan, full_s, masked_s, load_s, buffers) for name, plan in candidates.items()}
    best = min(candidates, key=lambda name: (times[name], name != "greedy"))
    return BlockPlan(candidates[best], times[best], times["all_load"], times["all_recompute"])


def plan_prefix(
    full_s: Sequence[float], masked_s: Sequence[float], load_s: Sequence[float], buffers: int = 2
) -> BlockPlan:
    """The fastest plan that recomputes the first ``k`` blocks and loads the rest."""
    if not (len(full_s) == len(masked_s) == len(load_s)):
        raise ValueError("full_s, masked_s and load_s need one entry per block")
    blocks = len(full_s)
    times = [
        simulate((False,) * k + (True,) * (blocks - k), full_s, masked_s, load_s, buffers) for k in range(blocks + 1)
    ]
    best = min(range(blocks + 1), key=lambda k: (times[k], k))  # ties: load (fewer recomputed blocks)
    return BlockPlan((False,) * best + (True,) * (blocks - best), times[best], times[0], times[blocks])


def _frontier_plan(
    full_s: Sequence[float], masked_s: Sequence[float], load_s: Sequence[float], buffers: int, width: int = 64
) -> tuple[bool, ...]:
    """Best plan found by keeping, block after block, the non-dominated partial plans.

    A partial plan's future depends only on when compute and copy are done and when
    each buffer is released, so one that is no later in all of those is at least as good.
    """
    start: _State = (0.0, 0.0, (0.0,) * max(1, buffers), ())
    states = [start]
    for full, masked, load in zip(full_s, masked_s, load_s):
        grown: list[_State] = []
        for comp_done, load_done, releases, plan in states:
            grown.append((comp_done + full, load_done, releases, plan + (False,)))
            loaded_at = max(load_done, releases[0]) + load
            finish = max(loaded_at, comp_done) + masked
            grown.append((finish, loaded_at, releases[1:] + (finish,), plan + (True,)))
        grown.sort(key=lambda state: (state[0], state[1], state[2]))
        states = []
        for state in grown:
            if not any(_dominates(kept, state) for kept in states):
                states.append(state)
                if len(states) == width:
                    break
    return min(states, key=lambda state: state[0])[3]


_State = tuple[float, float, tuple[float, ...], tuple[bool, ...]]


def _dominates(a: _State, b: _State) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and all(x <= y for x, y in zip(a[2], b[2]))
