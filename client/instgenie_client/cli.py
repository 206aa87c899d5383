"""``instgenie templates ...`` and ``instgenie edit``: talk to a running server over gRPC.

Only argparse wiring at import time: the gRPC client loads when a command runs, so
``instgenie --help`` and the engine's commands do not pay for it. Server errors raise
:class:`~instgenie_client.InstGenIEServerError` and connection problems
:class:`~instgenie_client.InstGenIEConnectionError`; ``instgenie.cli.main`` turns them
into exit codes 2 and 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from . import DEFAULT_STALL_TIMEOUT_S, DEFAULT_TIMEOUT_S, Progress
from instgenie_protocol import check_template_id

DEFAULT_URL = "localhost:8001"
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class ProgressBar:
    """A one-line step bar redrawn in place with ``\\r`` on a terminal; silent on anything else
    (a log file or a pipe would collect every redraw)."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self._stream = stream
        self._width = width
        self._enabled = stream.isatty()
        self._drawn = False

    def update(self, progress: Progress) -> None:
        if not self._enabled:
            return
        filled = self._width * progress.step // max(progress.total_steps, 1)
        bar = "#" * filled + "." * (self._width - filled)
        self._stream.write(f"\r[{bar}] step {progress.step}/{progress.total_steps}")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        """End the bar's line, so later output starts on a fresh one."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"Triton gRPC endpoint host:port (default {DEFAULT_URL})")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help=f"seconds the request may take (default {DEFAULT_TIMEOUT_S:g})"
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=DEFAULT_STALL_TIMEOUT_S,
        help=f"seconds without any response before giving up (default {DEFAULT_STALL_TIMEOUT_S:g})",
    )


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .grpc_client import InstGenIEClient

    return InstGenIEClient(args.url, timeout_s=args.timeout, stall_timeout_s=args.stall_timeout)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, help="noise seed (default: the template's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the template's, else the model's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the template's, else the model's)")


def _register(args: argparse.Namespace) -> int:
    template_id = _client(args).register_template(
        args.image, args.prompt, seed=args.seed, steps=args.steps, guidance=args.guidance, mask=args.mask
    )
    print(template_id)
    return 0


def _list(args: argparse.Namespace) -> int:
    for template_id in _client(args).list_templates():
        print(template_id)
    return 0


def _edit(args: argparse.Namespace) -> int:
    from .grpc_client import EditJob

    if args.template_id is not None:
        check_template_id(args.template_id)  # a malformed id is refused here, not sent
    bar = ProgressBar(sys.stderr)
    job: EditJob | None = None
    try:
        job = _client(args).submit(
            args.mask,
            args.prompt,
            template_id=args.template_id,
            image=args.template,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
            full_compute=args.full_compute,
            on_progress=None if args.no_progress else bar.update,
        )
        result = job.result()
    except KeyboardInterrupt:
        if job is not None:
            job.cancel()  # the request stops on the server too, not only here
        bar.close()
        print("cancelled", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        bar.close()
    args.out.write_bytes(result.image)
    print(
        f"request {result.request_id}: computed {result.computed_tokens}/{result.num_tokens} tokens"
        f" in {result.total_steps} steps -> {args.out}"
    )
    return 0


def add_client_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``templates register|list`` and ``edit``; each sets ``run`` to an ``(args) -> exit code`` callable."""
    templates = subparsers.add_parser("templates", help="register or list templates on a running server")
    actions = templates.add_subparsers(dest="templates_command", required=True)

    register = actions.add_parser("register", help="run a template once on the server and print its id")
    _add_url(register)
    register.add_argument("--image", required=True, type=Path, help="template picture (PNG/JPEG)")
    register.add_argument("--prompt", default="", help="prompt of the template run")
    register.add_argument("--mask", type=Path, help="optional template region mask (white = editable)")
    _add_settings(register)
    register.set_defaults(run=_register)

    listing = actions.add_parser("list", help="print the server's template ids, one per line")
    _add_url(listing)
    listing.set_defaults(run=_list)

    edit = subparsers.add_parser("edit", help="edit a template on a running server and write the PNG")
    _add_url(edit)
    source = edit.add_mutually_exclusive_group(required=True)
    source.add_argument("--template-id", help="a registered template (cached: only the mask is computed)")
    source.add_argument("--template", type=Path, help="a raw picture (PNG/JPEG): full computation")
    edit.add_argument("--mask", required=True, type=Path, help="mask PNG, white = edit")
    edit.add_argument("--prompt", required=True)
    edit.add_argument("-o", "--out", type=Path, default=Path("edited.png"), help="output PNG (default edited.png)")
    _add_settings(edit)
    edit.add_argument("--full-compute", action="store_true", help="compute every token (no cache use); for comparisons")
    edit.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    edit.set_defaults(run=_edit)
