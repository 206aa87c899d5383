"""Instances found by DNS: every address a name resolves to is one instance.

For a Kubernetes headless Service (``clusterIP: None``) the name resolves to the
ready pods' addresses, so a pod that becomes ready joins the router and one that
goes away leaves it, without a router restart. The resolver is injectable (tests
pass their own); a resolution that fails transiently keeps the instances as they
were, while a name that resolves to nothing empties its set.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from .instances import Instance, InstancePool

__all__ = ["DnsTarget", "Discovery", "Resolver", "resolve_addresses", "split_specs"]

log = logging.getLogger("instgenie.router")

PREFIX = "dns:"

Resolver = Callable[[str], Sequence[str]]
"""Name -> its addresses now. Raises ``OSError`` when the answer is unknown (try again later)."""


def resolve_addresses(name: str) -> list[str]:
    """The system resolver's addresses for ``name`` (IPv4 and IPv6, sorted, deduplicated)."""
    try:
        answers = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []  # the name exists no more, or has no ready pods
        raise
    return sorted({str(answer[4][0]) for answer in answers})


@dataclass(frozen=True)
class DnsTarget:
    """``dns:NAME:GRPC_PORT[:HTTP_PORT[:METRICS_PORT]]``; ports as in :meth:`Instance.parse`."""

    name: str
    grpc_port: int
    http_port: int
    metrics_port: int

    @classmethod
    def parse(cls, spec: str) -> "DnsTarget":
        if not spec.startswith(PREFIX):
            raise ValueError(f"{spec!r} is not a dns: instance spec")
        template = Instance.parse(spec[len(PREFIX) :])
        return cls(template.host, template.grpc_port, template.http_port, template.metrics_port)

    def instance(self, address: str) -> Instance:
        return Instance(address, self.grpc_port, self.http_port, self.metrics_port, healthy=False, source=self.name)


def split_specs(specs: Sequence[str]) -> tuple[list[Instance], list[DnsTarget]]:
    """Fixed instances and DNS targets of ``--instances``."""
    fixed = [Instance.parse(spec) for spec in specs if not spec.startswith(PREFIX)]
    targets = [DnsTarget.parse(spec) for spec in specs if spec.startswith(PREFIX)]
    return fixed, targets


class Discovery:
    """A thread that re-resolves the DNS targets every ``interval_s`` and updates the pool.

    A discovered instance joins unhealthy; ``on_join`` (the router's health check)
    lets it in. ``on_leave`` is called for each instance that left.
    """

    def __init__(
        self,
        pool: InstancePool,
        targets: Sequence[DnsTarget],
        resolver: Resolver = resolve_addresses,
        interval_s: float = 5.0,
        on_join: Callable[[Instance], None] | None = None,
        on_leave: Callable[[Instance], None] | None = None,
    ) -> None:
        self.pool = pool
        self.targets = list(targets)
        self.resolver = resolver
        self.interval_s = interval_s
        self.on_join = on_join
        self.on_leave = on_leave
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="instgenie-router-discovery", daemon=True)

    def start(self) -> None:
        if self.targets:
            self.refresh()
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        for target in self.targets:
            try:
                addresses = self.resolver(target.name)
            except OSError as exc:
                log.warning("resolving %s failed (%s); keeping its %d instance(s)", target.name, exc,
                            sum(i.source == target.name for i in self.pool.snapshot()))  # fmt: skip
                continue
            wanted = {target.instance(address).name: target.instance(address) for address in addresses}
            current = {i.name: i for i in self.pool.snapshot() if i.source == target.name}
            for name in sorted(current.keys() - wanted.keys()):
                self.pool.remove(current[name])
                log.warning("instance %s left %s", name, target.name)
                if self.on_leave is not None:
                    self.on_leave(current[name])
            for name in sorted(wanted.keys() - current.keys()):
                if self.pool.add(wanted[name]):
                    log.info("instance %s found under %s", name, target.name)
                    if self.on_join is not None:
                        self.on_join(wanted[name])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - discovery must outlive one bad round
                log.exception("instance discovery failed")
