"""How close is a masked edit to the full computation of the same edit, per family?

For each family: register a template under one prompt, edit it under a new prompt
at one mask ratio on the masked path and in full, and report

* the masked-region deviation of the masked edit's latents from the full
  computation's, against the new prompt's own effect there (the full computation
  under the new prompt against the one under the template's prompt): how much of
  what the prompt changes the cache approximation gets wrong;
* PSNR and SSIM (torchmetrics, no downloaded weights) of the whole decoded image
  against the full computation's, next to the same for the template's-prompt image
  (what a cache that ignored the prompt would give).

Random-weight models make the absolute numbers meaningless for image quality; the
comparison between rows is the point. Writes JSON and ``docs/benchmarks/quality.md``.

    python bench/quality.py --size tiny --resolution 256 --json out/quality.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from engine import mask, template
from instgenie import Engine
from instgenie.tiny import FAMILIES, make_model

ROOT = Path(__file__).resolve().parents[1]


def image_tensor(image: object) -> torch.Tensor:
    """A PIL image as ``[1, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def similarity(a: object, b: object) -> tuple[float, float]:
    """(PSNR dB, SSIM) of image ``a`` against reference ``b``."""
    x, y = image_tensor(a), image_tensor(b)
    return (
        float(peak_signal_noise_ratio(x, y, data_range=1.0)),
        float(structural_similarity_index_measure(x, y, data_range=1.0)),
    )


def measure(engine: Engine, resolution: int, ratio: float, steps: int) -> dict:
    token = engine.family.pixels_per_token
    mask_png = mask(resolution, ratio, token, offset=2)
    record = engine.register_template(template(resolution), "a red hat", seed=3, steps=steps)
    masked = engine.edit(mask_png, "a green bicycle", template_id=record.template_id)
    full = engine.edit(mask_png, "a green bicycle", template_id=record.template_id, full_compute=True)
    old_prompt = engine.edit(mask_png, "a red hat", template_id=record.template_id, full_compute=True)
    state = engine.prepare_edit(mask_png, "x", template_id=record.template_id)
    tokens = state.token_index
    engine.release(state)
    deviation = (masked.latents - full.latents)[:, tokens].abs().mean().item()
    effect = (full.latents - old_prompt.latents)[:, tokens].abs().mean().item()
    psnr, ssim = similarity(masked.image, full.image)
    old_psnr, old_ssim = similarity(old_prompt.image, full.image)
    return {
        "mask_ratio": ratio,
        "computed_tokens": masked.computed_tokens,
        "num_tokens": masked.num_tokens,
        "deviation": deviation,
        "prompt_effect": effect,
        "deviation_over_effect": deviation / effect,
        "psnr_db": psnr,
        "ssim": ssim,
        "template_prompt_psnr_db": old_psnr,
        "template_prompt_ssim": old_ssim,
    }


def write_page(
    path: Path, title: str, intro: str, meta: dict, table: list[str], notes: list[str], script: str, argv: list[str]
) -> None:
    """A benchmark's markdown page: title, what it measures, setup, the table, notes, the command."""
    lines = [f"# {title}", "", intro, "", "Setup: " + ", ".join(f"{k}={v}" for k, v in meta.items()) + ".", "", *table, ""]
    lines += [*notes, ""] if notes else []
    lines += [f"Command: `python {script} " + " ".join(argv) + "`", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--families", default=",".join([*FAMILIES, "sdxl-inpaint+b", "sd-inpaint+b"]),
        help='"+b" / "+c": a UNet with sparse_convs off / on (default: the family\'s own design)',
    )
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--mask-ratio", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", default=str(ROOT / "docs/benchmarks/quality.md"))
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            name, _, design = family.partition("+")
            folder = Path(tmp) / name
            if not folder.exists():
                make_model(name, folder, size=args.size)
            options = {"sparse_convs": design == "c"} if design else None
            engine = Engine.from_pretrained(str(folder), max_sequence_length=args.text_len, family_options=options)
            row = {"family": family, **measure(engine, args.resolution, args.mask_ratio, args.steps)}
            print(json.dumps(row))
            rows.append(row)
    meta = {
        "size": args.size,
        "resolution": args.resolution,
        "steps": args.steps,
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    table = [
        "| family | computed tokens | deviation / prompt effect | PSNR masked vs full | SSIM | PSNR template prompt vs full | SSIM |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    table += [
        f"| {r['family']} | {r['computed_tokens']}/{r['num_tokens']} | {r['deviation_over_effect']:.3f} "
        f"| {r['psnr_db']:.1f} dB | {r['ssim']:.3f} | {r['template_prompt_psnr_db']:.1f} dB | {r['template_prompt_ssim']:.3f} |"
        for r in rows
    ]
    write_page(
        Path(args.markdown),
        "Quality: masked edits against the full computation",
        (
            "Written by `bench/quality.py`. A template recorded under one prompt is edited under a new one at "
            f"mask ratio {args.mask_ratio}. *Deviation / prompt effect*: the masked-region mean |masked - full| of "
            "the latents over the mean change the new prompt makes there (full computation under the new prompt "
            "against the template's prompt). PSNR/SSIM (torchmetrics) compare whole decoded images with the full "
            "computation's; the last two columns do the same for the image under the template's prompt, i.e. a "
            "cache that ignored the new prompt. Random-weight models: compare rows, not absolute values."
        ),
        meta,
        table,
        [],
        "bench/quality.py",
        sys.argv[1:] if argv is None else argv,
    )
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
