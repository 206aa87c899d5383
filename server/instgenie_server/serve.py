"""``instgenie serve``: render the repository, start the server, supervise it, stop it cleanly."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from instgenie.auto_register import AUTO_REGISTER_POLICIES

from .repository import default_model_repository, models_with_parameter, render_repository
from .leftovers import REPOSITORY_PREFIX
from .server_process import ServerStartError, TritonServer
from .supervisor import HealthEndpoint, SupervisionConfig, Supervisor

__all__ = ["add_serve_command", "main", "serve_parameters"]

logger = logging.getLogger(__name__)

#: ``serve`` options forwarded as config parameters to every model that declares ``model_dir``.
_FORWARDED = ("model_dir", "device", "dtype", "max_active", "max_waiting", "max_sequence_length")
# Set only on the models that declare them (the edit model's activation cache).
_FORWARDED_WHERE_DECLARED = ("cache_dir", "cache_mode", "cache_budget_bytes", "cost_model", "sparse_convs", "auto_register")


def _default_model() -> Path:
    """The tiny Flux Fill model in ``./models/flux-fill-tiny``, built on first use."""
    target = Path("models") / "flux-fill-tiny"
    if (target / "model_index.json").is_file():
        return target
    from instgenie.tiny import make_model  # torch + diffusers: only when actually needed

    logger.info("building the tiny default model in %s", target)
    return make_model("flux-fill", target, size="tiny")


def _port_arg(port: int) -> int | None:
    return None if port == 0 else port


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived: unwind to a clean stop."""


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _ignore_stop_signals() -> None:
    # A second Ctrl-C must not interrupt the clean stop half way (that would orphan the
    # server, which lives in its own session); the drain timeout bounds the wait instead.
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _raise_stop(signum: int, _frame: object) -> None:
    _ignore_stop_signals()
    raise _StopRequested(signal.Signals(signum).name)


def serve_parameters(args: argparse.Namespace, repository: Path, model: Path) -> dict[str, dict[str, str]]:
    """The config parameters ``serve`` sets, per model of ``repository``, from its arguments."""
    values = {"model_dir": str(model.resolve())} | {
        key: str(getattr(args, key)) for key in _FORWARDED[1:] if getattr(args, key) is not None
    }
    parameters = {name: dict(values) for name in models_with_parameter(repository, "model_dir")}
    for key in _FORWARDED_WHERE_DECLARED:
        if getattr(args, key) is not None:
            for name in models_with_parameter(repository, key):
                parameters.setdefault(name, {})[key] = str(getattr(args, key))
    return parameters


def _serve(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM (exit 0 after a clean stop) or until it dies (exit 1)."""
    previous = {sig: signal.signal(sig, _raise_stop) for sig in _STOP_SIGNALS}
    try:
        return _run_server(args)
    except _StopRequested as exc:
        logger.info("%s received; server stopped", exc)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_server(args: argparse.Namespace) -> int:
    model = Path(args.model) if args.model else _default_model()
    if not model.is_dir():
        raise FileNotFoundError(f"model folder {model} does not exist")
    source = Path(args.model_repository) if args.model_repository else default_model_repository()
    with tempfile.TemporaryDirectory(prefix=f"{REPOSITORY_PREFIX}{os.getpid()}-") as rendered:
        repository = render_repository(source, Path(rendered) / "models", serve_parameters(args, source, model))
        server = TritonServer(
            repository,
            http_port=_port_arg(args.http_port),
            grpc_port=_port_arg(args.grpc_port),
            metrics_port=_port_arg(args.metrics_port),
            host=args.host,
            log_file=args.log_file,
        )

        supervisor = Supervisor(
            server,
            SupervisionConfig(
                stall_timeout_s=args.stall_timeout,
                max_restarts=args.max_restarts,
                restart_window_s=args.restart_window,
                ready_timeout_s=args.ready_timeout,
            ),
        )
        health = HealthEndpoint(lambda: supervisor.health, args.host, args.health_port) if args.health_port >= 0 else None
        drain_timeout = args.drain_timeout
        try:
            server.start()
            server.wait_ready(args.ready_timeout)
            supervisor.watch()  # /ready answers 200 from the moment "ready" is printed
            print(f"http: {server.http_url}\ngrpc: {server.grpc_url}\nmetrics: {server.metrics_url}", flush=True)
            if health is not None:
                print(f"health: http://{server.http_url.rsplit(':', 1)[0]}:{health.port}/ready", flush=True)
            print("ready", flush=True)
            supervisor.run()  # returns only when recovery failed; a stop signal raises
            logger.error("recovery failed; exiting so that the orchestrator restarts the instance\n%s", server.log_tail())
            drain_timeout = 0.0  # a broken server's gauges are stale: nothing to wait for
            return 1
        finally:
            _ignore_stop_signals()
            server.stop(drain_timeout_s=drain_timeout)
            if health is not None:
                health.close()


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` command to ``subparsers``; it sets ``run`` to a ``(args) -> exit code`` callable."""
    serve = subparsers.add_parser("serve", help="run Triton Inference Server with the InstGenIE models")
    serve.add_argument(
        "--model",
        default=os.environ.get("INSTGENIE_MODEL") or None,
        help="diffusers pipeline folder (default: $INSTGENIE_MODEL, else build/reuse ./models/flux-fill-tiny)",
    )
    serve.add_argument(
        "--model-repository",
        help="Triton model repository to serve (default: $INSTGENIE_MODEL_REPOSITORY or the source tree's model_repository/)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: all interfaces)")
    serve.add_argument("--http-port", type=int, default=8000, help="0 = any free port")
    serve.add_argument("--grpc-port", type=int, default=8001, help="0 = any free port")
    serve.add_argument("--metrics-port", type=int, default=8002, help="0 = any free port")
    serve.add_argument("--device", default="cpu", help="torch device of the models")
    serve.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    serve.add_argument("--max-active", type=int, help="requests in the step loop at once (default: model config)")
    serve.add_argument("--max-waiting", type=int, help="queued requests before refusing (default: model config)")
    serve.add_argument("--max-sequence-length", type=int, help="text tokens (default: model config)")
    serve.add_argument(
        "--cache-dir",
        default=os.environ.get("INSTGENIE_CACHE_DIR") or None,
        help="disk tier of the template caches, one per instance (default: $INSTGENIE_CACHE_DIR, else host memory only)",
    )
    serve.add_argument(
        "--cache-mode", help="cache storage mode, e.g. bfloat16,unmasked or float32,input (default: model config)"
    )
    serve.add_argument("--cache-budget-bytes", type=int, help="host-memory tier budget (default: model config)")
    serve.add_argument(
        "--cost-model",
        default=os.environ.get("INSTGENIE_COST_MODEL") or None,
        help="costs.json from `instgenie profile` (default: $INSTGENIE_COST_MODEL, else load every cached block)",
    )
    serve.add_argument(
        "--sparse-convs", choices=("on", "off"), help="UNet models: design (c) sparse convolutions or (b) (default: the family's, on)"
    )
    serve.add_argument(
        "--auto-register", choices=AUTO_REGISTER_POLICIES,
        help="record raw images edited again as templates: off, second_sight or always (default: model config, second_sight)",
    )  # fmt: skip
    serve.add_argument("--log-file", type=Path, help="server log (default: a temporary file)")
    serve.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for the models to load")
    serve.add_argument("--drain-timeout", type=float, default=60.0, help="seconds running requests get on shutdown")
    serve.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="seconds with requests active and no denoising step finished before the server counts as wedged and is restarted",
    )
    serve.add_argument(
        "--max-restarts", type=int, default=5, help="restarts allowed within --restart-window; one more exits 1 (give up)"
    )
    serve.add_argument("--restart-window", type=float, default=600.0, help="seconds over which restarts are counted")
    serve.add_argument(
        "--health-port",
        type=int,
        default=8003,
        help="the launcher's probes: /live (supervising) and /ready (server ready, no fault); 0 = any free port, -1 = off",
    )
    serve.set_defaults(run=_serve)
    return serve


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m instgenie_server.serve serve ...``."""
    parser = argparse.ArgumentParser(prog="instgenie-server", description=__doc__.split("\n", 1)[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    add_serve_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        return int(args.run(args))
    except (ServerStartError, FileNotFoundError, FileExistsError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
