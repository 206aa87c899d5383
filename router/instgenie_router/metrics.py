"""The router's own Prometheus metrics, in the text exposition format.

A few counters, gauges and one histogram need no client library: this module keeps
them under a lock and renders them for ``GET /metrics`` on the router's metrics port.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

__all__ = ["RouterMetrics"]

_DECISION_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
#: Counters published from the start (at 0, without an instance label), so a dashboard
#: or alert over them finds the series before the first event.
COUNTERS = (
    "instgenie_router_routed_total",
    "instgenie_router_failed_total",
    "instgenie_router_retried_total",
    "instgenie_router_ejections_total",
    "instgenie_router_rejoins_total",
    "instgenie_router_departures_total",
    "instgenie_router_replayed_registrations_total",
)
GAUGES = ("instgenie_router_in_flight_requests",)


class RouterMetrics:
    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, str], float] = defaultdict(float)  # (name, instance)
        self._gauges: dict[str, float] = defaultdict(float)
        self._buckets = [0] * (len(_DECISION_BUCKETS) + 1)
        self._decision_sum = 0.0
        self._decision_count = 0
        for name in COUNTERS:
            self._counters[(name, "")] = 0.0
        for name in GAUGES:
            self._gauges[name] = 0.0

    def count(self, name: str, instance: str = "", by: float = 1.0) -> None:
        with self._lock:
            self._counters[(name, instance)] += by

    def gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def decision(self, seconds: float) -> None:
        with self._lock:
            self._buckets[bisect.bisect_left(_DECISION_BUCKETS, seconds)] += 1
            self._decision_sum += seconds
            self._decision_count += 1

    def counter_value(self, name: str, instance: str = "") -> float:
        with self._lock:
            return self._counters.get((name, instance), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            names = sorted({name for name, _ in self._counters})
            for name in names:
                lines.append(f"# TYPE {name} counter")
                for (counter, instance), value in sorted(self._counters.items()):
                    if counter == name:
                        labels = f'{{instance="{instance}",policy="{self.policy}"}}' if instance else f'{{policy="{self.policy}"}}'
                        lines.append(f"{name}{labels} {value:g}")
            for name, value in sorted(self._gauges.items()):
                lines += [f"# TYPE {name} gauge", f'{name}{{policy="{self.policy}"}} {value:g}']
            name = "instgenie_router_decision_seconds"
            lines.append(f"# TYPE {name} histogram")
            cumulative = 0
            for bound, count in zip(_DECISION_BUCKETS + (float("inf"),), self._buckets):
                cumulative += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f'{name}_bucket{{le="{le}",policy="{self.policy}"}} {cumulative}')
            lines.append(f'{name}_sum{{policy="{self.policy}"}} {self._decision_sum:g}')
            lines.append(f'{name}_count{{policy="{self.policy}"}} {self._decision_count}')
        return "\n".join(lines) + "\n"
