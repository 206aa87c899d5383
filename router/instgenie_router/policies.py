"""Which instance serves a request: ``round_robin``, ``least_requests``, ``mask_aware``.

``mask_aware`` (the default) predicts each instance's finish time: its outstanding
token-steps plus the new request's (masked tokens, and the text tokens every request
computes at each step, which make even a tiny mask cost something), at the
instance's measured seconds per token-step, plus the cost of bringing the request's template cache in: none when
the template was routed there recently and so sits in its host tier, a disk load
when it was not, and a recording (the registration's token-steps) when the
instance is known to lack it. It picks the instance that minimises the largest finish time over all
instances after the assignment, then the earliest finish of the chosen one, then
template affinity. A small mask on a busy instance can thus beat a large one on an
idle instance, which request counting cannot see.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Protocol, Sequence

from .instances import Instance, RequestCost

# An instance's measured speed is a lifetime average, which a past of large batches
# makes look faster per token than the next request will run; it may move that
# instance's estimate at most this factor off the fleet's average.
SPEED_SPREAD = 1.25

__all__ = ["POLICIES", "Policy", "RoundRobin", "LeastRequests", "MaskAware"]


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Instance], cost: RequestCost, stale_after_s: float) -> Instance:
        """One of ``candidates`` (healthy, non-empty) for a request of ``cost``."""
        ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def choose(self, candidates: Sequence[Instance], cost: RequestCost, stale_after_s: float) -> Instance:
        with self._lock:
            turn = next(self._counter)
        return sorted(candidates, key=lambda i: i.name)[turn % len(candidates)]


class LeastRequests:
    """Fewest requests in flight (the router's own count, or the instance's scraped one)."""

    name = "least_requests"

    def choose(self, candidates: Sequence[Instance], cost: RequestCost, stale_after_s: float) -> Instance:
        now = time.monotonic()

        def requests(instance: Instance) -> float:
            scraped = 0.0
            if now - instance.scraped_at <= stale_after_s:
                scraped = instance.scraped.get("instgenie_active_requests", 0.0) + instance.scraped.get(
                    "instgenie_waiting_requests", 0.0
                )
            return max(len(instance.in_flight), scraped)

        return min(candidates, key=lambda i: (requests(i), i.name))


class MaskAware:
    """Minimise the predicted makespan (see module doc).

    Args:
        seconds_per_token_step: the instances' speed when not measured yet.
        cold_template_s: the cost of a template whose cache is not in host memory.
    """

    name = "mask_aware"

    def __init__(self, seconds_per_token_step: float = 1e-4, cold_template_s: float = 0.3) -> None:
        self.seconds_per_token_step = seconds_per_token_step
        self.cold_template_s = cold_template_s

    def speed(self, instance: Instance, fleet: Sequence[Instance] = ()) -> float:
        """Seconds per token-step, from the instance's counters when it has run any (step
        time over the masked and text tokens its steps computed), kept within
        :data:`SPEED_SPREAD` of the ``fleet``'s."""
        return self._speed(instance, self._fleet_average(fleet))

    def _speed(self, instance: Instance, average: float | None) -> float:
        steps_s, tokens = self._work(instance)
        own = steps_s / tokens if tokens > 0 and steps_s > 0 else self.seconds_per_token_step
        if average is None:
            return own
        return min(max(own, average / SPEED_SPREAD), average * SPEED_SPREAD)

    def _fleet_average(self, fleet: Sequence[Instance]) -> float | None:
        totals = [self._work(i) for i in fleet]
        fleet_s, fleet_tokens = sum(t[0] for t in totals), sum(t[1] for t in totals)
        return fleet_s / fleet_tokens if fleet_s > 0 and fleet_tokens > 0 else None

    @staticmethod
    def _work(instance: Instance) -> tuple[float, float]:
        """(step seconds, token-steps) the instance has run."""
        tokens = instance.scraped.get("instgenie_computed_row_tokens_total", 0.0)
        tokens += instance.text_tokens * instance.scraped.get("instgenie_request_steps_total", 0.0)
        return instance.scraped.get("instgenie_step_duration_seconds_sum", 0.0), tokens

    def choose(self, candidates: Sequence[Instance], cost: RequestCost, stale_after_s: float) -> Instance:
        # Linear in the instances (docs/benchmarks/scaling.md): the fleet's average speed
        # once, and each candidate's makespan from the two largest finish times.
        now = time.monotonic()
        average = self._fleet_average(candidates)
        speed = {i.name: self._speed(i, average) for i in candidates}
        finish = {
            i.name: (i.outstanding(now, stale_after_s) + i.outstanding_text_steps()) * speed[i.name] for i in candidates
        }
        ranked = sorted(finish.items(), key=lambda item: item[1], reverse=True)[:2]

        def others_latest(name: str) -> float:
            """The largest finish time of the instances other than ``name``."""
            for other, value in ranked:
                if other != name:
                    return value
            return 0.0

        def after_assignment(instance: Instance) -> tuple[float, float, bool, str]:
            own = finish[instance.name] + (cost.token_steps + instance.text_tokens * cost.steps) * speed[instance.name]
            if instance.lacks(cost):
                own += (cost.record_token_steps or 0.0) * speed[instance.name]
            elif not instance.holds(cost.template_id):
                own += self.cold_template_s
            makespan = max(own, others_latest(instance.name))
            return makespan, own, not instance.holds(cost.template_id), instance.name

        return min(candidates, key=after_assignment)


POLICIES: dict[str, type] = {p.name: p for p in (RoundRobin, LeastRequests, MaskAware)}
