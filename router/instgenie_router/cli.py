"""``instgenie router``: start the router in the foreground until SIGINT/SIGTERM.

    instgenie router --instances HOST:GRPC_PORT[,...] [--policy mask_aware]
                     [--grpc-port 8101 --http-port 8100 --metrics-port 8102]

Kept free of gRPC imports so ``instgenie --help`` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import threading

from .policies import POLICIES

__all__ = ["add_router_command"]


def _run(args: argparse.Namespace) -> int:
    from .service import Router, RouterConfig

    config = RouterConfig(
        instances=[spec for spec in args.instances.split(",") if spec.strip()],
        policy=args.policy, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
        metrics_port=args.metrics_port, scrape_interval_s=args.scrape_interval,
        max_in_flight=args.max_in_flight, request_timeout_s=args.request_timeout,
    )  # fmt: skip
    router = Router(config)
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
    parser = commands.add_parser("router", help="route edits over several Triton instances (KServe v2 gRPC)")
    parser.add_argument("--instances", required=True, help="HOST:GRPC_PORT[:HTTP_PORT[:METRICS_PORT]],...")
    parser.add_argument("--policy", default="mask_aware", choices=sorted(POLICIES))
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--grpc-port", type=int, default=8101)
    parser.add_argument("--http-port", type=int, default=8100)
    parser.add_argument("--metrics-port", type=int, default=8102)
    parser.add_argument("--scrape-interval", type=float, default=0.5, help="seconds between metrics scrapes and health checks")
    parser.add_argument("--max-in-flight", type=int, default=256, help="requests held at once; beyond: overloaded")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per forwarded request")
    parser.set_defaults(run=_run)
    return parser
