"""What the router knows of each Triton instance, and of the work it sent there.

Two sources of load, combined so neither alone misleads: the instance's own
``instgenie_outstanding_token_steps`` gauge (the *remaining* work of everything it
runs, scraped on an interval, so it lags and may be stale), and the router's
bookkeeping of the work it dispatched and has not seen finish (whole requests, so it
overstates requests near their end, and blind to other routers' traffic). The
estimate is the fresh scrape plus what the router sent since that scrape was taken
(requests the gauge cannot show yet); with a stale or missing scrape, the router's own
count alone. So an instance whose counters are old or zero is not mistaken for an idle
one while the router has work running there.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from instgenie_protocol import DEFAULT_PIXELS_PER_TOKEN, PIXELS_PER_TOKEN_METRIC, StepCost

__all__ = ["Instance", "InstancePool", "RequestCost"]

_AFFINITY_TEMPLATES = 64  # templates per instance assumed resident in its host memory
# A request sent this long before a scrape may still be in transit or being prepared
# (not in the instance's gauge yet): it is counted on top of that scrape.
SCRAPE_LAG_S = 0.25


@dataclass(frozen=True)
class RequestCost:
    """What routing needs to know of one request.

    ``token_steps``: masked tokens x steps x rows, in the unit of the instances'
    ``instgenie_outstanding_token_steps`` gauge.
    """

    token_steps: float
    template_id: str | None = None
    steps: int = 1  # denoising steps (each also computes the instance's text tokens)
    # Token-steps of recording the template, when the router holds its registration
    # (and so can replay it on an instance that lacks it).
    record_token_steps: float | None = None


@dataclass
class Instance:
    """One Triton instance: its endpoints and the router's view of it."""

    host: str
    grpc_port: int
    http_port: int
    metrics_port: int
    healthy: bool = True
    source: str | None = None  # the DNS name it was discovered under; None: given by hand
    ejections: int = 0
    # Scraped (signals.Scraper): the instance's own outstanding work, when it was read.
    scraped_token_steps: float = 0.0
    scraped_at: float = 0.0
    scraped: dict[str, float] = field(default_factory=dict)
    step_cost: StepCost | None = None  # the cost function it publishes (None: not scraped yet)
    # The router's own bookkeeping.
    in_flight: dict[str, RequestCost] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)  # monotonic time each in-flight request was booked
    templates: OrderedDict[str, None] = field(default_factory=OrderedDict)
    registered: set[str] = field(default_factory=set)  # templates it is known to hold (on disk or in memory)

    @property
    def name(self) -> str:
        return self.grpc_address

    @property
    def grpc_address(self) -> str:
        return _host_port(self.host, self.grpc_port)

    @property
    def http_address(self) -> str:
        return _host_port(self.host, self.http_port)

    @property
    def metrics_url(self) -> str:
        return f"http://{_host_port(self.host, self.metrics_port)}/metrics"

    @classmethod
    def parse(cls, spec: str) -> "Instance":
        """``HOST:GRPC_PORT[:HTTP_PORT[:METRICS_PORT]]``; HTTP and metrics default to Triton's
        layout around the gRPC port (8000/8001/8002: gRPC - 1 and gRPC + 1)."""
        spec = spec.strip()
        if spec.startswith("["):  # [IPv6]:PORT...
            host, _, rest = spec[1:].partition("]")
            ports = rest.split(":")[1:] if rest.startswith(":") else []
        else:
            host, *ports = spec.split(":")
        if not host or not 1 <= len(ports) <= 3 or not all(p.isdigit() for p in ports):
            raise ValueError(f"instance {spec!r}: expected HOST:GRPC_PORT[:HTTP_PORT[:METRICS_PORT]]")
        grpc_port = int(ports[0])
        http_port = int(ports[1]) if len(ports) > 1 else grpc_port - 1
        metrics_port = int(ports[2]) if len(ports) > 2 else grpc_port + 1
        return cls(host, grpc_port, http_port, metrics_port)

    # -- load ------------------------------------------------------------------------------
    def outstanding(self, now: float, stale_after_s: float) -> float:
        """Masked token-steps this instance still has to run (see the module doc)."""
        if now - self.scraped_at > stale_after_s:
            return sum(cost.token_steps for cost in self.in_flight.values())
        since = self.scraped_at - SCRAPE_LAG_S
        unseen = sum(cost.token_steps for key, cost in self.in_flight.items() if self.sent_at.get(key, now) >= since)
        return self.scraped_token_steps + unseen

    @property
    def text_tokens(self) -> float:
        """Text tokens each request computes per step here (the instance's scraped gauge; 0 unknown)."""
        return self.scraped.get("instgenie_text_tokens", 0.0)

    def outstanding_text_steps(self) -> float:
        """Text token-steps of the requests the router has running here (the gauge counts none)."""
        return self.text_tokens * sum(cost.steps for cost in self.in_flight.values())

    def holds(self, template_id: str | None) -> bool:
        """Whether the template was routed here recently (its cache likely in host memory)."""
        return template_id is not None and template_id in self.templates

    def lacks(self, cost: RequestCost) -> bool:
        """Whether the request's template is known to be absent here (it would be recorded first)."""
        return cost.record_token_steps is not None and cost.template_id not in self.registered

    def remember(self, template_id: str | None) -> None:
        if template_id is None:
            return
        self.templates[template_id] = None
        self.templates.move_to_end(template_id)
        while len(self.templates) > _AFFINITY_TEMPLATES:
            self.templates.popitem(last=False)


class InstancePool:
    """The instances and the router's bookkeeping, under one lock.

    ``allow_empty``: start with no instance (they are discovered later).
    """

    def __init__(self, instances: list[Instance], stale_after_s: float = 5.0, allow_empty: bool = False) -> None:
        if not instances and not allow_empty:
            raise ValueError("the router needs at least one instance")
        names = [i.name for i in instances]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate instances: {names}")
        self.instances = list(instances)
        self.stale_after_s = stale_after_s
        self.lock = threading.Lock()

    def snapshot(self) -> list[Instance]:
        with self.lock:
            return list(self.instances)

    def healthy(self, exclude: set[str] = frozenset()) -> list[Instance]:  # type: ignore[assignment]
        with self.lock:
            return [i for i in self.instances if i.healthy and i.name not in exclude]

    def pixels_per_token(self) -> int:
        """The instances' latent-token grid (their scraped gauge); the DiT grid before any scrape."""
        with self.lock:
            for instance in self.instances:
                value = instance.scraped.get(PIXELS_PER_TOKEN_METRIC)
                if value:
                    return int(value)
        return DEFAULT_PIXELS_PER_TOKEN

    def step_cost(self) -> StepCost:
        """What a row-step of the instances' model costs by its tokens (their published
        :class:`~instgenie.token_grid.StepCost`); a DiT's before any scrape."""
        with self.lock:
            for instance in self.instances:
                if instance.step_cost is not None:
                    return instance.step_cost
        return StepCost()

    def by_name(self, name: str) -> Instance:
        with self.lock:
            return next(i for i in self.instances if i.name == name)

    def add(self, instance: Instance) -> bool:
        """Add a discovered instance; False if one of that name is there already."""
        with self.lock:
            if any(i.name == instance.name for i in self.instances):
                return False
            self.instances.append(instance)
            return True

    def remove(self, instance: Instance) -> None:
        """Route nothing more to ``instance``; requests running there finish as they will."""
        with self.lock:
            self.instances = [i for i in self.instances if i is not instance]
            instance.healthy = False

    def start(self, instance: Instance, request_key: str, cost: RequestCost) -> None:
        with self.lock:
            self.start_unlocked(instance, request_key, cost)

    def start_unlocked(self, instance: Instance, request_key: str, cost: RequestCost) -> None:
        """:meth:`start` for a caller that holds ``lock`` (choosing and booking in one step,
        so concurrent choices see each other)."""
        instance.in_flight[request_key] = cost
        instance.sent_at[request_key] = time.monotonic()
        instance.remember(cost.template_id)

    def finish(self, instance: Instance, request_key: str) -> None:
        with self.lock:
            instance.in_flight.pop(request_key, None)
            instance.sent_at.pop(request_key, None)

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

    def registered(self, instance: Instance, template_ids: set[str], replace: bool = False) -> None:
        """Note templates ``instance`` holds; ``replace``: exactly those (it listed them)."""
        with self.lock:
            if replace:
                instance.registered = set(template_ids)
            else:
                instance.registered |= template_ids

    def update_scrape(
        self, instance: Instance, token_steps: float, values: dict[str, float], step_cost: StepCost | None = None
    ) -> None:
        with self.lock:
            instance.scraped_token_steps = token_steps
            instance.scraped = values
            if step_cost is not None:
                instance.step_cost = step_cost
            instance.scraped_at = time.monotonic()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 literals in brackets
