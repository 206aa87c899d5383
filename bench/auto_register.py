"""Which prompt should the recording of an auto-registered raw image use?

A raw image edited again becomes a template (``instgenie.auto_register``). Its
recording can use the empty prompt or the prompt of the edit that triggered it. For
each family this records both templates of one image, then runs the *later* edits of
that image (new prompts, several masks) on the masked path against each template and
in full (the raw image's own full computation, what the edit gave before the image was
registered), and reports the masked-region deviation of each from the full
computation, as ``bench/quality.py`` defines it (mean |masked - full| of the latents
at the computed tokens, over the new prompt's own effect there), and PSNR of the
decoded images against the full computation's. Edits that repeat the triggering prompt
are reported apart (not zero even for that prompt's recording: the recording ran
without the edit's mask, which the inpainting models take as an input).

Random-weight models: compare the two columns, not the absolute values. Writes JSON
and ``docs/benchmarks/auto_register.md``.

    python bench/auto_register.py --json out/auto_register.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from statistics import mean

import torch

from engine import mask, template
from instgenie import Engine
from instgenie.tiny import FAMILIES, make_model
from quality import similarity, write_page

ROOT = Path(__file__).resolve().parents[1]
TRIGGER = "a red hat"
LATER = ("a green bicycle", "a wooden chair", "a blue vase")
RECORDINGS = {"empty": "", "edit": TRIGGER}


def measure(engine: Engine, resolution: int, ratios: list[float], steps: int) -> dict:
    image = template(resolution)
    token = engine.family.pixels_per_token
    templates = {name: engine.register_template(image, prompt, seed=3, steps=steps).template_id for name, prompt in RECORDINGS.items()}
    rows: dict[str, dict[str, list[float]]] = {name: {"deviation": [], "psnr": [], "repeat": []} for name in RECORDINGS}
    for index, ratio in enumerate(ratios):
        mask_png = mask(resolution, ratio, token, offset=index + 1)
        before = engine.edit(mask_png, TRIGGER, image=image, seed=3, steps=steps)  # the triggering edit, in full
        for prompt in (*LATER, TRIGGER):
            full = engine.edit(mask_png, prompt, image=image, seed=3, steps=steps)
            for name, template_id in templates.items():
                masked = engine.edit(mask_png, prompt, template_id=template_id)
                state = engine.prepare_edit(mask_png, prompt, template_id=template_id)
                tokens = state.token_index
                engine.release(state)
                deviation = (masked.latents - full.latents)[:, tokens].abs().mean().item()
                if prompt == TRIGGER:
                    rows[name]["repeat"].append(deviation)
                    continue
                effect = (full.latents - before.latents)[:, tokens].abs().mean().item()
                rows[name]["deviation"].append(deviation / effect)
                rows[name]["psnr"].append(similarity(masked.image, full.image)[0])
    return {name: {key: mean(values) for key, values in row.items()} for name, row in rows.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--mask-ratios", default="0.1,0.2,0.35")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--json", required=True)
    parser.add_argument("--markdown", default=str(ROOT / "docs/benchmarks/auto_register.md"))
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.mask_ratios.split(",")]

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            make_model(family, Path(tmp) / family, size=args.size)
            engine = Engine.from_pretrained(str(Path(tmp) / family), max_sequence_length=args.text_len)
            results[family] = measure(engine, args.resolution, ratios, args.steps)
            print(family, json.dumps(results[family]))
    meta = {"size": args.size, "resolution": args.resolution, "steps": args.steps, "mask_ratios": args.mask_ratios,
            "torch": torch.__version__, "machine": platform.machine()}  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    wins = sum(r["edit"]["deviation"] < r["empty"]["deviation"] for r in results.values())
    table = [
        "| family | deviation / prompt effect: empty prompt | triggering prompt | PSNR vs full: empty | triggering "
        "| deviation when the triggering prompt repeats: empty | triggering |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    table += [
        f"| {family} | {r['empty']['deviation']:.3f} | {r['edit']['deviation']:.3f} | {r['empty']['psnr']:.1f} dB "
        f"| {r['edit']['psnr']:.1f} dB | {r['empty']['repeat']:.4f} | {r['edit']['repeat']:.4f} |"
        for family, r in results.items()
    ]
    notes = [
        f"The triggering prompt's recording deviates less on new prompts in {wins} of {len(results)} families; "
        "`instgenie.auto_register` records with it (`recording_prompt=\"edit\"`)."
    ]
    write_page(
        Path(args.markdown),
        "Auto-registration: which prompt the recording uses",
        (
            "Written by `bench/auto_register.py`. One image per family is recorded twice, under the empty prompt and "
            f"under the prompt of the edit that triggered the recording ({TRIGGER!r}); later edits with new prompts "
            f"({', '.join(repr(p) for p in LATER)}) at mask ratios {args.mask_ratios} run on the masked path against each "
            "recording and in full. *Deviation / prompt effect*: the masked-region mean |masked - full| of the latents "
            "over the change the new prompt makes there (as in `quality.md`); lower is better. The last two columns: "
            "the absolute deviation of a later edit that repeats the triggering prompt (not 0 even under its own "
            "recording: the recording ran without the edit's mask, an input of the inpainting models). "
            "Random-weight models: compare the columns, not the values."
        ),
        meta,
        table,
        notes,
        "bench/auto_register.py",
        sys.argv[1:] if argv is None else argv,
    )
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
