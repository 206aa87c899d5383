"""What the router knows of each Triton instance, and of the work it sent there.

Two sources of load, combined so neither alone misleads: the instance's own
``instgenie_outstanding_token_steps`` gauge (everything it is running, scraped on an
interval, so it lags and may be stale), and the router's bookkeeping of the work it
dispatched and has not seen finish (exact for its own traffic, blind to others').
The estimate is the larger of the two, with a stale scrape ignored: an instance whose
counters are old or zero is not mistaken for an idle one while the router itself has
work running there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

__all__ = ["Instance", "InstancePool", "RequestCost"]

_AFFINITY_TEMPLATES = 64  # templates per instance assumed resident in its host memory


@dataclass(frozen=True)
class RequestCost:
    """What routing needs to know of one request.

    ``token_steps``: masked tokens x steps x rows, in the unit of the instances'
    ``instgenie_outstanding_token_steps`` gauge.
    """

    token_steps: float
    template_id: str | None = None


@dataclass
class Instance:
    """One Triton instance: its endpoints and the router's view of it."""

    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    healthy: bool = True
    ejections: int = 0
    # Scraped (signals.Scraper): the instance's own outstanding work, when it was read.
    scraped_token_steps: float = 0.0
    scraped_at: float = 0.0
    scraped: dict[str, float] = field(default_factory=dict)
    # The router's own bookkeeping.
    in_flight: dict[str, RequestCost] = field(default_factory=dict)
    templates: OrderedDict[str, None] = field(default_factory=OrderedDict)

    @property
    def name(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @classmethod
    def parse(cls, spec: str) -> "Instance":
        """``HOST:GRPC_PORT[:HTTP_PORT[:METRICS_PORT]]``; HTTP and metrics default to Triton's
        layout around the gRPC port (8000/8001/8002: gRPC - 1 and gRPC + 1)."""
        host, *ports = spec.strip().split(":")
        if not host or not 1 <= len(ports) <= 3 or not all(p.isdigit() for p in ports):
            raise ValueError(f"instance {spec!r}: expected HOST:GRPC_PORT[:HTTP_PORT[:METRICS_PORT]]")
        grpc_port = int(ports[0])
        http_port = int(ports[1]) if len(ports) > 1 else grpc_port - 1
        metrics_port = int(ports[2]) if len(ports) > 2 else grpc_port + 1
        return cls(host, grpc_port, http_port, metrics_port)

    # -- load ------------------------------------------------------------------------------
    def outstanding(self, now: float, stale_after_s: float) -> float:
        """Token-steps this instance still has to run, by the better of the two sources."""
        own = sum(cost.token_steps for cost in self.in_flight.values())
        scraped = self.scraped_token_steps if now - self.scraped_at <= stale_after_s else 0.0
        return max(own, scraped)

    def holds(self, template_id: str | None) -> bool:
        """Whether the template was routed here recently (its cache likely in host memory)."""
        return template_id is not None and template_id in self.templates

    def remember(self, template_id: str | None) -> None:
        if template_id is None:
            return
        self.templates[template_id] = None
        self.templates.move_to_end(template_id)
        while len(self.templates) > _AFFINITY_TEMPLATES:
            self.templates.popitem(last=False)


class InstancePool:
    """The instances and the router's bookkeeping, under one lock."""

    def __init__(self, instances: list[Instance], stale_after_s: float = 5.0) -> None:
        if not instances:
            raise ValueError("the router needs at least one instance")
        names = [i.name for i in instances]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate instances: {names}")
        self.instances = instances
        self.stale_after_s = stale_after_s
        self.lock = threading.Lock()

    def healthy(self, exclude: set[str] = frozenset()) -> list[Instance]:  # type: ignore[assignment]
        with self.lock:
            return [i for i in self.instances if i.healthy and i.name not in exclude]

    def by_name(self, name: str) -> Instance:
        return next(i for i in self.instances if i.name == name)

    def start(self, instance: Instance, request_key: str, cost: RequestCost) -> None:
        with self.lock:
            instance.in_flight[request_key] = cost
            instance.remember(cost.template_id)

    def finish(self, instance: Instance, request_key: str) -> None:
        with self.lock:
            instance.in_flight.pop(request_key, None)

    def mark(self, instance: Instance, healthy: bool) -> bool:
        """Set an instance's health; returns whether it changed."""
        with self.lock:
            if instance.healthy == healthy:
                return False
            instance.healthy = healthy
            if not healthy:
                instance.ejections += 1
                instance.templates.clear()  # a restarted instance starts with a cold host tier
            return True

    def update_scrape(self, instance: Instance, token_steps: float, values: dict[str, float]) -> None:
        with self.lock:
            instance.scraped_token_steps = token_steps
            instance.scraped = values
            instance.scraped_at = time.monotonic()
