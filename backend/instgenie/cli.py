"""The engine's ``instgenie`` subcommands: build offline models, edit in-process, profile.

The ``instgenie`` command itself (:mod:`instgenie_cli`) adds these next to the
server's, the client's and the router's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


def _make_model(args: argparse.Namespace) -> int:
    from .tiny import make_model

    path = make_model(args.family, args.out, size=args.size, seed=args.seed)
    print(path)
    return 0


def _edit_local(args: argparse.Namespace) -> int:
    import torch

    from .engine import Engine

    engine = Engine.from_pretrained(
        args.model, device=args.device, dtype=getattr(torch, args.dtype), max_sequence_length=args.max_sequence_length
    )
    template_bytes = Path(args.template).read_bytes()
    mask_bytes = Path(args.mask).read_bytes()
    if args.full:
        started = time.perf_counter()
        result = engine.edit(
            mask_bytes, args.prompt, image=template_bytes, seed=args.seed, steps=args.steps, guidance=args.guidance
        )
        edit_s = time.perf_counter() - started
    else:
        started = time.perf_counter()
        record = engine.register_template(
            template_bytes,
            args.template_prompt if args.template_prompt is not None else args.prompt,
            seed=args.seed,
            steps=args.steps,
            guidance=args.guidance,
        )
        register_s = time.perf_counter() - started
        print(f"template {record.template_id} registered in {register_s:.2f} s ({record.activations.nbytes / 2**20:.1f} MiB cache)")
        started = time.perf_counter()
        result = engine.edit(mask_bytes, args.prompt, template_id=record.template_id)
        edit_s = time.perf_counter() - started
    Path(args.out).write_bytes(result.png)
    print(f"edited {result.computed_tokens}/{result.num_tokens} tokens in {edit_s:.2f} s -> {args.out}")
    return 0

def _profile(args: argparse.Namespace) -> int:
    from .profiling import profile

    model = profile(
        args.model, args.out, size=args.size, steps=args.steps, max_sequence_length=args.max_sequence_length,
        device=args.device, cache_dir=args.cache_dir, repeats=args.repeats,
    )  # fmt: skip
    compute, load = model.block_compute, model.load
    print(f"block compute: {compute.intercept_s * 1e3:.3f} ms + {compute.slope_s * 1e6:.3f} us/row-token (R^2 {compute.r2:.3f})")
    print(f"cache load:    {load.intercept_s * 1e3:.3f} ms + {1 / max(load.slope_s, 1e-15) / 2**30:.2f} GiB/s (R^2 {load.r2:.3f})")
    print(f"-> {args.out}")
    return 0


def add_engine_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``make-model``, ``edit-local`` and ``profile`` to ``commands``."""
    make = commands.add_parser("make-model", help="write a random-weight diffusers pipeline folder (offline)")
    make.add_argument("--family", required=True, choices=("flux-fill", "flux-inpaint", "sd3-inpaint", "sdxl-inpaint", "sd-inpaint"))
    make.add_argument("--size", default="tiny", choices=("tiny", "small"))
    make.add_argument("--seed", type=int, default=0, help="weight seed")
    make.add_argument("--out", required=True, help="folder to write")
    make.set_defaults(run=_make_model)

    edit = commands.add_parser("edit-local", help="register a template and edit it, in this process")
    edit.add_argument("--model", required=True, help="diffusers pipeline folder")
    edit.add_argument("--template", required=True, help="template image (PNG/JPEG)")
    edit.add_argument("--mask", required=True, help="mask image, white = edit")
    edit.add_argument("--prompt", required=True)
    edit.add_argument("--template-prompt", help="prompt of the template run (default: --prompt)")
    edit.add_argument("--out", required=True, help="output PNG")
    edit.add_argument("--seed", type=int, default=0)
    edit.add_argument("--steps", type=int)
    edit.add_argument("--guidance", type=float)
    edit.add_argument("--max-sequence-length", type=int, default=512, help="text tokens (T5)")
    edit.add_argument("--device", default="cpu")
    edit.add_argument("--dtype", default="float32", choices=_DTYPES)
    edit.add_argument("--full", action="store_true", help="full computation, no template cache")
    edit.set_defaults(run=_edit_local)

    prof = commands.add_parser("profile", help="fit this machine's compute and cache-load costs (for the loading planner)")
    prof.add_argument("--model", required=True, help="diffusers pipeline folder")
    prof.add_argument("--out", default="costs.json", help="where to write the fitted cost model")
    prof.add_argument("--size", type=int, default=512, help="image side in pixels")
    prof.add_argument("--steps", type=int, default=4)
    prof.add_argument("--max-sequence-length", type=int, default=128)
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--cache-dir", help="folder on the disk the cache tier will use (default: the temp folder)")
    prof.add_argument("--repeats", type=int, default=2)
    prof.set_defaults(run=_profile)
