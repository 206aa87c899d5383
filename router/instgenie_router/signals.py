"""The router's view of its instances, refreshed on an interval: metrics and health.

Every ``interval_s`` each instance's Prometheus endpoint is scraped (Triton's and
InstGenIE's series, NVML GPU series when the instance has a GPU) and its readiness
checked (``GET /v2/health/ready``). An instance that fails the check is ejected and
gets no requests until a check passes again; the forwarding path also ejects an
instance at once when it refuses a connection.
"""

from __future__ import annotations

import http.client
import logging
import threading
import urllib.error
import urllib.request
from typing import Callable, Iterable

from instgenie_protocol import PIXELS_PER_TOKEN_METRIC, parse_samples, step_cost_from_metrics

from .instances import Instance, InstancePool

__all__ = ["Scraper", "parse_metrics", "SCRAPED_SERIES"]

log = logging.getLogger("instgenie.router")

# Series the policies read, summed over their labels.
SCRAPED_SERIES = (
    "instgenie_outstanding_token_steps",
    "instgenie_active_requests",
    "instgenie_waiting_requests",
    "instgenie_masked_tokens",
    "instgenie_step_duration_seconds_sum",
    "instgenie_computed_row_tokens_total",
    "instgenie_text_tokens",
    PIXELS_PER_TOKEN_METRIC,
    "instgenie_request_steps_total",
    "instgenie_cache_host_bytes",
    "instgenie_gpu_utilization_ratio",
    "instgenie_gpu_memory_used_bytes",
)


def parse_metrics(text: str, names: Iterable[str] = SCRAPED_SERIES) -> dict[str, float]:
    """Sum of each series in Prometheus text format, over all its label sets."""
    wanted = set(names)
    values: dict[str, float] = {}
    for sample in parse_samples(text):
        if sample.name in wanted:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


#: Health checks in a row that time out before a busy instance counts as gone.
SLOW_CHECKS_TO_EJECT = 3


class Scraper:
    """A thread that scrapes and health-checks every instance of a pool.

    Args:
        on_change: called with ``(instance, healthy)`` when an instance is ejected or rejoins.
    """

    def __init__(
        self,
        pool: InstancePool,
        interval_s: float = 0.5,
        timeout_s: float = 1.0,
        on_change: Callable[[Instance, bool], None] | None = None,
    ) -> None:
        self.pool = pool
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.on_change = on_change
        self._slow: dict[str, int] = {}  # health checks in a row that timed out, per instance
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="instgenie-router-scraper", daemon=True)

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def refresh(self) -> None:
        """One round over every instance (also what the thread does each interval)."""
        for instance in self.pool.snapshot():
            self.check(instance)

    def check(self, instance: Instance) -> bool:
        answer = self._ready(instance)
        # A refusal or a 503 is an answer: eject at once. A check that timed out may be a
        # busy machine: only SLOW_CHECKS_TO_EJECT of them in a row eject.
        slow = self._slow[instance.name] = self._slow.get(instance.name, 0) + 1 if answer is None else 0
        ready = answer if answer is not None else (instance.healthy and slow < SLOW_CHECKS_TO_EJECT)
        if answer:
            try:
                with urllib.request.urlopen(instance.metrics_url, timeout=self.timeout_s) as response:
                    text = response.read().decode()
                values = parse_metrics(text)
                self.pool.update_scrape(
                    instance, values.get("instgenie_outstanding_token_steps", 0.0), values, step_cost_from_metrics(text)
                )
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                log.debug("metrics of %s unreadable: %s", instance.name, exc)  # stale values age out
        self.set_health(instance, ready)
        return ready

    def set_health(self, instance: Instance, healthy: bool) -> None:
        if self.pool.mark(instance, healthy):
            log.warning("instance %s %s", instance.name, "rejoined" if healthy else "ejected")
            if self.on_change is not None:
                self.on_change(instance, healthy)

    def _ready(self, instance: Instance) -> bool | None:
        """Whether the instance answers ready; ``None`` when the check timed out."""
        try:
            url = f"http://{instance.http_address}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                return response.status == 200
        except TimeoutError:
            return None
        except urllib.error.URLError as exc:
            return None if isinstance(exc.reason, TimeoutError) else False
        except (ConnectionError, OSError, http.client.HTTPException):
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()
