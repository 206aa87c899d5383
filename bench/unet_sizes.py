"""Cache sizes and work fractions of the real UNet inpainting models, without their weights.

Builds the real SDXL, SD 1.5 and SD 2 inpainting UNets on the meta device (configs
of the published checkpoints), installs InstGenIE's masked levels on them and reports

* the cache of one UNet call and guidance row per storage mode (``kv`` / ``input``,
  float32 / bfloat16) for design (b) (attention levels) and (c) (plus every
  convolution's output), at the model's native resolution;
* the step cost of an edit relative to a full step per mask ratio and design: the
  :class:`~instgenie.token_grid.StepCost` the engine counts and the router predicts
  with (multiply-accumulates of convolutions and attention levels; norms and
  activations are left out).

Writes ``docs/benchmarks/unet-sizes.md``. Seconds on any machine.

    python bench/unet_sizes.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from instgenie.families.unet import _unet_step_cost
from instgenie.masked_unet import unet_units, unit_convolutions
from instgenie.token_grid import level_grid

ROOT = Path(__file__).resolve().parents[1]

# The unet/config.json of the published inpainting checkpoints (the fields that shape them).
CONFIGS = {
    "SDXL inpainting (1024 px)": dict(
        sample_size=128, in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    "SD 1.5 inpainting (512 px)": dict(
        sample_size=64, in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8, cross_attention_dim=768,
    ),
    "SD 2 inpainting (512 px)": dict(
        sample_size=64, in_channels=9, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
    ),
}  # fmt: skip

MODES = [("kv", 4), ("kv", 2), ("input", 4), ("input", 2)]  # (content, bytes per element)


def cache_elements(unet: torch.nn.Module) -> tuple[int, int, int]:
    """Per UNet call and row at native size: (K+V elements, attention-input elements,
    level-output + convolution-output elements of design (c) beyond (b))."""
    side = int(unet.config.sample_size)
    kv = inputs = outputs = conv_outputs = 0
    for module, kind, depth in unet_units(unet):
        rows, cols = level_grid((side, side), depth)
        tokens = rows * cols
        if kind == "level":
            width, blocks = module.inner_dim, len(module.transformer_blocks)
            kv += 2 * blocks * tokens * width
            inputs += blocks * tokens * width
            outputs += tokens * width  # the level's output site
        else:
            conv_outputs += sum(tokens * conv.out_channels for conv in unit_convolutions(module, kind))
    return kv + outputs, inputs + outputs, conv_outputs


def centred_mask(side: int, ratio: float) -> np.ndarray:
    mask = np.zeros((side, side), bool)
    edge = max(1, round(side * ratio**0.5))
    start = (side - edge) // 2
    mask[start : start + edge, start : start + edge] = True
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mask-ratios", default="0.1,0.2,0.35,0.5")
    parser.add_argument("--markdown", default=str(ROOT / "docs/benchmarks/unet-sizes.md"))
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.mask_ratios.split(",")]
    sizes = ["| model | design | " + " | ".join(f"{c} {'fp32' if b == 4 else 'bf16'}" for c, b in MODES) + " |",
             "|---|---|" + "---:|" * len(MODES)]  # fmt: skip
    work = ["| model | design | " + " | ".join(f"mask {r:.2f}" for r in ratios) + " |", "|---|---|" + "---:|" * len(ratios)]
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        kv, inputs, conv_outputs = cache_elements(unet)
        for design, extra in (("b", 0), ("c", conv_outputs)):
            cells = [f"{((kv if c == 'kv' else inputs) + extra) * b / 1e9:.2f} GB" for c, b in MODES]
            sizes.append(f"| {name} | {design} | " + " | ".join(cells) + " |")
            cost = _unet_step_cost(unet, sparse_convs=design == "c")
            side = int(unet.config.sample_size)
            full = cost.work(np.ones((side, side), bool))
            fractions = [cost.work(centred_mask(side, r)) / full for r in ratios]
            work.append(f"| {name} | {design} | " + " | ".join(f"{f:.2f}" for f in fractions) + " |")
    markdown = [
        "# UNet families: cache sizes and step cost of the real models",
        "",
        "Written by `bench/unet_sizes.py` from the published checkpoints' UNet configs, built on the meta "
        "device (no weights). Native resolution, one UNet call and one guidance row (classifier-free guidance "
        "doubles it; a PNDM schedule makes one call more than it has steps).",
        "",
        "## Cache per UNet call and guidance row",
        "",
        "Design (b) stores, per attention level, each transformer block's self-attention K and V (`kv`) or "
        "its input (`input`), and the level's output; (c) adds every convolution's output. `unmasked` "
        "storage drops a template's own edit region from these.",
        "",
        *sizes,
        "",
        "## Step cost of an edit relative to a full step",
        "",
        "The engine's step cost (multiply-accumulates of convolutions and attention levels) of a centred "
        "square mask; the router predicts with the same function.",
        "",
        *work,
        "",
        "Command: `python bench/unet_sizes.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "",
    ]
    Path(args.markdown).write_text("\n".join(markdown))
    print("\n".join(sizes + [""] + work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
