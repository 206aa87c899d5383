"""The router process: gRPC data plane, metrics, health, discovery (``instgenie router``).

Ports given as 0 are picked free. The HTTP port answers ``/v2/health/live`` and
``/v2/health/ready`` itself and forwards every other ``/v2`` request
(:mod:`~instgenie_router.http_proxy`); it also speaks the OpenAI Images API under
``/v1`` (:mod:`~instgenie_router.openai_api`) and serves the browser playground at
``/``. The metrics port serves the router's Prometheus metrics.
"""

from __future__ import annotations

import logging
import threading
from importlib import resources
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from tritonclient.grpc import service_pb2_grpc

from . import openai_api
from .config import RouterConfig
from .discovery import Discovery, Resolver, resolve_addresses, split_specs
from .grpc_proxy import _MESSAGE_BYTES, GrpcRouter
from .http_proxy import forward
from .instances import Instance, InstancePool
from .metrics import RouterMetrics
from .policies import POLICIES
from .registrations import Registrations
from .signals import Scraper

__all__ = ["Router", "RouterConfig"]

log = logging.getLogger("instgenie.router")

_PLAYGROUND = resources.files("instgenie_router") / "playground" / "index.html"


class Router:
    """The running router: start(), then stop(); a context manager.

    ``resolver``: how ``dns:`` instance names are resolved (tests inject their own).
    """

    def __init__(self, config: RouterConfig, resolver: Resolver = resolve_addresses) -> None:
        if config.policy not in POLICIES:
            raise ValueError(f"unknown policy {config.policy!r}; one of {sorted(POLICIES)}")
        self.config = config
        fixed, targets = split_specs(config.instances)
        self.pool = InstancePool(fixed, config.stale_after_s, allow_empty=bool(targets))
        self.metrics = RouterMetrics(config.policy)
        self.scraper = Scraper(self.pool, interval_s=config.scrape_interval_s, on_change=self._health_changed)
        self.policy = POLICIES[config.policy]()
        self.grpc = GrpcRouter(
            self.pool, self.policy, self.scraper, self.metrics,
            max_in_flight=config.max_in_flight, request_timeout_s=config.request_timeout_s,
            registrations=Registrations(config.remembered_registrations),
        )  # fmt: skip
        self.discovery = Discovery(
            self.pool, targets, resolver, config.discovery_interval_s, on_join=self.scraper.check, on_leave=self._left
        )
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_in_flight + 16, thread_name_prefix="instgenie-router-rpc"),
            options=[("grpc.max_send_message_length", _MESSAGE_BYTES), ("grpc.max_receive_message_length", _MESSAGE_BYTES)],
        )
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.grpc, self._server)
        self.grpc_port = self._server.add_insecure_port(f"{config.host}:{config.grpc_port}")
        if not self.grpc_port:
            raise OSError(f"cannot listen on {config.host}:{config.grpc_port}")
        self.openai_edits = openai_api.OpenEdits()
        self._http = ThreadingHTTPServer((config.host, config.http_port), _handler(self, metrics_only=False))
        self._metrics_http = ThreadingHTTPServer((config.host, config.metrics_port), _handler(self, metrics_only=True))
        self.http_port = self._http.server_address[1]
        self.metrics_port = self._metrics_http.server_address[1]
        self._threads: list[threading.Thread] = []

    def start(self) -> "Router":
        self.discovery.start()
        self.scraper.start()
        self._server.start()
        for server in (self._http, self._metrics_http):
            thread = threading.Thread(target=server.serve_forever, daemon=True, name="instgenie-router-http")
            thread.start()
            self._threads.append(thread)
        log.info("router (%s) on grpc %d, http %d, metrics %d over %s", self.config.policy, self.grpc_port,
                 self.http_port, self.metrics_port, [i.name for i in self.pool.snapshot()])  # fmt: skip
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        self._server.stop(grace_s).wait()
        # gRPC calls had grace_s to finish; OpenAI edits still running are cancelled
        # upstream and their clients told to send them again (a 503).
        self.openai_edits.close_all("the router is shutting down; send the edit again")
        for server in (self._http, self._metrics_http):
            server.shutdown()
            server.server_close()
        self.discovery.stop()
        self.scraper.stop()
        self.grpc.close()

    def __enter__(self) -> "Router":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _health_changed(self, instance: Instance, healthy: bool) -> None:
        self.metrics.count("instgenie_router_ejections_total" if not healthy else "instgenie_router_rejoins_total", instance.name)
        if healthy:  # it joined, or came back, perhaps without the templates registered meanwhile
            self.grpc.replay(instance)

    def _left(self, instance: Instance) -> None:
        self.metrics.count("instgenie_router_departures_total", instance.name)
        self.grpc.forget(instance)


def _handler(router: Router, metrics_only: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path = self.path.partition("?")[0]
            if self.path == "/metrics":
                self._reply(200, router.metrics.render().encode(), "text/plain; version=0.0.4")
            elif not metrics_only and self.path == "/v2/health/live":
                self._reply(200, b"")
            elif not metrics_only and self.path == "/v2/health/ready":
                self._reply(200 if router.pool.healthy() else 503, b"")
            elif not metrics_only and self.path.startswith("/v2/"):
                forward(self, router, "GET")
            elif not metrics_only and path in ("/", "/index.html"):
                self._reply(200, _PLAYGROUND.read_bytes(), "text/html; charset=utf-8")
            elif not metrics_only and path == "/v1/models":
                openai_api.handle_models(self, router)
            elif not metrics_only and path.startswith("/v1/templates"):
                openai_api.handle_templates(self, router, path)
            else:
                self._reply(404, b'{"error":"not found"}', "application/json")

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            if not metrics_only and self.path.startswith("/v2/"):
                forward(self, router, "POST")
            elif not metrics_only and self.path.partition("?")[0] == "/v1/images/edits":
                openai_api.handle_edit(self, router)
            else:
                self._reply(404, b'{"error":"not found"}', "application/json")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            log.debug("http: " + format, *args)

    return Handler
