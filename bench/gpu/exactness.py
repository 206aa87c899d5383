"""The exactness invariant per family on one device and dtype (part of ``bench/gpu/run.sh``).

For every family (and both UNet designs): register a template, then edit it with the
template's own request (same prompt, seed and steps) on the masked path and in full;
report the largest |masked - full| of the final latents, next to the latents' spread.
On CPU fp32 the two must be bitwise equal (this script fails otherwise); on a GPU,
kernels choose their algorithm by token count, so the masked path differs by rounding
and the table states by how much.

    python bench/gpu/exactness.py --device cuda --dtype bfloat16 --markdown out/exactness.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine import mask, template  # noqa: E402

from instgenie import Engine  # noqa: E402
from instgenie.tiny import FAMILIES, make_model  # noqa: E402

VARIANTS = (*FAMILIES, "sdxl-inpaint+b", "sd-inpaint+b")


def measure(engine: Engine, resolution: int, steps: int) -> dict:
    region = mask(resolution, 0.25, engine.family.pixels_per_token, offset=2)
    # The template carries the edit's region: the inpainting models take the mask as an input.
    record = engine.register_template(template(resolution), "a red hat", seed=7, steps=steps, mask=region)
    masked = engine.edit(region, "a red hat", template_id=record.template_id)
    full = engine.edit(region, "a red hat", template_id=record.template_id, full_compute=True)
    difference = (masked.latents.float() - full.latents.float()).abs().max().item()
    return {
        "computed_tokens": masked.computed_tokens,
        "num_tokens": masked.num_tokens,
        "max_abs_difference": difference,
        "latent_std": full.latents.float().std().item(),
        "bit_exact": bool(torch.equal(masked.latents, full.latents)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--markdown", required=True)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            family, _, design = variant.partition("+")
            folder = Path(tmp) / family
            if not folder.exists():
                make_model(family, folder)
            options = {"sparse_convs": design == "c"} if design else None
            engine = Engine.from_pretrained(str(folder), device=args.device, dtype=dtype, max_sequence_length=64,
                                            family_options=options)  # fmt: skip
            rows[variant] = measure(engine, args.resolution, args.steps)
            print(variant, rows[variant], flush=True)
    lines = [
        "| family | computed tokens | max abs difference masked vs full | latent std | bit-exact |",
        "|---|---:|---:|---:|---|",
    ]
    lines += [
        f"| {v} | {r['computed_tokens']}/{r['num_tokens']} | {r['max_abs_difference']:.3g} | {r['latent_std']:.3g} "
        f"| {'yes' if r['bit_exact'] else 'no'} |"
        for v, r in rows.items()
    ]
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.device == "cpu" and dtype == torch.float32:
        broken = [v for v, r in rows.items() if not r["bit_exact"]]
        if broken:
            print(f"the exactness invariant is broken on CPU fp32 for {broken}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
