"""The ``instgenie`` command: every layer's subcommands under one name.

The top of the import graph: it gathers the engine's commands (``make-model``,
``edit-local``, ``profile``), the server's (``serve``), the client's (``edit``,
``register``, ``templates``) and the router's (``router``), and turns each layer's
errors into one message and exit status. Nothing imports it.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    # Each layer's module defers its heavy imports (torch, gRPC) to the command that runs.
    from instgenie.cli import add_engine_commands
    from instgenie_client.cli import add_client_commands
    from instgenie_router.cli import add_router_command
    from instgenie_server.launcher import add_serve_command

    parser = argparse.ArgumentParser(prog="instgenie", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    add_engine_commands(commands)
    add_serve_command(commands)
    add_client_commands(commands)
    add_router_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    from instgenie.errors import InstGenIEError
    from instgenie_client import InstGenIEServerError
    from instgenie_server.launcher import ServerStartError

    try:
        return int(args.run(args))
    except InstGenIEError as exc:
        print(f"error ({exc.reason}): {exc}", file=sys.stderr)
        return 2
    except InstGenIEServerError as exc:
        print(f"error ({exc.reason}): {exc.message} [request {exc.request_id}]", file=sys.stderr)
        return 2
    except (ConnectionError, TimeoutError) as exc:  # server unreachable, stream broken, too slow
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServerStartError as exc:
        print(f"error: the server did not start: {exc}", file=sys.stderr)
        return 2
