"""``instgenie router``: start the router in the foreground until SIGINT/SIGTERM.

    instgenie router --instances HOST:GRPC_PORT[,...] [--policy mask_aware]
                     [--grpc-port 8101 --http-port 8100 --metrics-port 8102]
    instgenie router --instances dns:instgenie-triton.default.svc.cluster.local:8001
    instgenie router --config router.toml

Options default to :class:`~instgenie_router.config.RouterConfig`'s values, a
``--config`` file's values win over those, and options given here win over both.
Kept free of gRPC imports so ``instgenie --help`` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .config import RouterConfig
from .policies import POLICIES

__all__ = ["add_router_command"]

_DEFAULTS = RouterConfig()


def _run(args: argparse.Namespace) -> int:
    from .service import Router

    overrides = {name: getattr(args, name) for name in RouterConfig.__dataclass_fields__ if hasattr(args, name)}
    try:
        config = RouterConfig.build(args.config, overrides)
        router = Router(config)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with router:
        print(f"grpc: {config.host}:{router.grpc_port}", flush=True)
        print(f"http: http://{config.host}:{router.http_port}", flush=True)
        print(f"metrics: http://{config.host}:{router.metrics_port}/metrics", flush=True)
        print("ready", flush=True)
        stop.wait()
    return 0


def add_router_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = commands.add_parser("router", help="route edits over several Triton instances (KServe v2 gRPC and HTTP)")
    parser.add_argument("--config", help="TOML file whose keys are RouterConfig's fields (options here override it)")
    parser.add_argument(
        "--instances",
        help="HOST:GRPC_PORT[:HTTP_PORT[:METRICS_PORT]],... or dns:NAME:GRPC_PORT[...] (every address of NAME)",
    )
    parser.add_argument("--policy", choices=sorted(POLICIES), help=f"(default: {_DEFAULTS.policy})")
    parser.add_argument("--host", help=f"address to bind (default: {_DEFAULTS.host})")
    parser.add_argument("--grpc-port", type=int, help=f"(default: {_DEFAULTS.grpc_port}; 0: any free port)")
    parser.add_argument("--http-port", type=int, help=f"(default: {_DEFAULTS.http_port}; 0: any free port)")
    parser.add_argument("--metrics-port", type=int, help=f"(default: {_DEFAULTS.metrics_port}; 0: any free port)")
    parser.add_argument("--scrape-interval", type=float, dest="scrape_interval_s",
                        help=f"seconds between metrics scrapes and health checks (default: {_DEFAULTS.scrape_interval_s})")  # fmt: skip
    parser.add_argument("--discovery-interval", type=float, dest="discovery_interval_s",
                        help=f"seconds between resolutions of dns: instances (default: {_DEFAULTS.discovery_interval_s})")  # fmt: skip
    parser.add_argument("--max-in-flight", type=int,
                        help=f"requests held at once; beyond: overloaded (default: {_DEFAULTS.max_in_flight})")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, dest="request_timeout_s",
                        help=f"seconds per forwarded request (default: {_DEFAULTS.request_timeout_s})")  # fmt: skip
    parser.set_defaults(run=_run)
    return parser
