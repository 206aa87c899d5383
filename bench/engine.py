"""How much faster is a masked denoiser step than a full one, and a whole edit than the stock pipeline?

Measures, in one process with interleaved repeats, the denoiser time of one
denoising step on the masked path over the full path for several mask ratios, next
to the FLOP fraction counted by ``torch.utils.flop_counter`` on the same calls, and
one mixed batch of four masks against the four stepped alone. With
``--end-to-end RATIO`` it also times whole edits at that mask ratio (text encoding,
VAE, steps, decode, paste): the masked edit, the engine's full computation and the
stock diffusers pipeline call, interleaved. Writes JSON rows and a Markdown table
(``docs/benchmarks/engine.md``, or ``engine-<family>.md`` for the other families).

    python bench/engine.py --family flux-fill --size small --resolution 1024 \\
        --mask-ratios 0.1,0.25,0.5,1.0 --json out/engine.json
    python bench/engine.py --family sdxl-inpaint --size small --resolution 1024 \\
        --mask-ratios 0.1,0.2,0.35,0.5,1.0 --end-to-end 0.2 --json out/engine-sdxl.json

The rows' ``design`` says how the masked path computes: ``masked-attention`` (the DiT
families: every block runs on the masked tokens) or ``b`` (the UNets: masked
attention levels, dense ResNets).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from instgenie import Engine, RequestState
from instgenie.loading import family_class, pipeline_class_name
from instgenie.tiny import FAMILIES, make_model

ROOT = Path(__file__).resolve().parents[1]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def template(resolution: int) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:resolution, 0:resolution] / resolution
    channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y)) for _ in range(3)]
    return png(((np.stack(channels, -1) * 0.5 + 0.5) * 255).astype(np.uint8))


def mask(resolution: int, ratio: float, token: int, offset: int = 0) -> bytes:
    """A token-aligned rectangle covering ``ratio`` of the image's tokens."""
    cells = resolution // token
    area = max(1, round(ratio * cells * cells))
    width = min(cells, max(1, round(area**0.5)))
    height = min(cells, -(-area // width))
    pixels = np.zeros((resolution, resolution), np.uint8)
    top = (offset * 3) % (cells - height + 1)
    left = (offset * 5) % (cells - width + 1)
    pixels[top * token : (top + height) * token, left * token : (left + width) * token] = 255
    return png(pixels)


def timed(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Seconds ``fn`` takes; on a GPU by CUDA events around it (the kernels, not the launch)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


# Transformer dimensions to put in place of the generated model's (random weights):
# FLUX.1's (24 heads of 128, 19 double and 38 single blocks) and a miniature of the same
# shape that a CPU runs, so that the swap itself is exercised without a GPU.
TRANSFORMER_DIMS = {
    "flux1": dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128, axes_dims_rope=(16, 56, 56)),
    "flux1-mini": dict(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=128, axes_dims_rope=(16, 56, 56)),
}


def engine_with_transformer(model_dir: str, dims: str, device: str, dtype: torch.dtype, text_len: int) -> Engine:
    """An engine over ``model_dir`` whose Flux transformer is replaced by one of ``dims``.

    Built on the device, in fp32 then cast (random init, not seeded: timing only). The
    text encoders stay the generated ones: only the context embedder's input width differs
    from FLUX.1's (64 or 32 instead of 4096 and 768), a negligible part of a step.
    """
    from diffusers import FluxTransformer2DModel

    from instgenie.loading import load_pipeline

    pipe, family_cls, fingerprint = load_pipeline(model_dir, device, dtype)
    config = pipe.transformer.config
    with torch.device(device):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=config.in_channels, out_channels=config.out_channels,
            joint_attention_dim=config.joint_attention_dim, pooled_projection_dim=config.pooled_projection_dim,
            guidance_embeds=config.guidance_embeds, **TRANSFORMER_DIMS[dims],
        )  # fmt: skip
    pipe.register_modules(transformer=transformer.to(dtype).eval())
    return Engine(pipe, family_cls, f"{fingerprint}+{dims}", device=device, dtype=dtype, max_sequence_length=text_len)


def flops(engine: Engine, states: list[RequestState]) -> int:
    inputs = engine.model_inputs(states)
    with FlopCounterMode(display=False) as counter:
        engine.family.predict(inputs)
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="flux-fill", choices=FAMILIES)
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--model", help="an existing pipeline folder instead of a generated one")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--mask-ratios", default="0.1,0.25,0.5,1.0")
    parser.add_argument("--mixed-ratios", default="0.1,0.15,0.2,0.3", help="the mixed batch of four")
    parser.add_argument("--text-len", type=int, default=512, help="text tokens (FLUX.1 uses 512)")
    parser.add_argument("--steps", type=int, default=2, help="steps of the template recording")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--json", required=True, help="where to write the rows")
    parser.add_argument("--markdown", help="default: docs/benchmarks/engine.md (flux-fill) or engine-<family>.md")
    parser.add_argument("--end-to-end", type=float, help="also time whole edits at this mask ratio against the stock pipeline")
    parser.add_argument("--end-to-end-steps", type=int, default=8, help="denoising steps of those edits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--transformer-dims", choices=sorted(TRANSFORMER_DIMS),
                        help="flux families: replace the generated transformer by one of these dimensions")  # fmt: skip
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.mask_ratios.split(",")]
    mixed = [float(r) for r in args.mixed_ratios.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(args.model or make_model(args.family, Path(tmp) / "model", size=args.size))
        unet = family_class(pipeline_class_name(Path(model_dir))).reads_every_token
        # The UNets run both designs side by side, each over its own pipeline (hooks differ).
        designs = {"b": {"sparse_convs": False}, "c": {"sparse_convs": True}} if unet else {"masked-attention": {}}
        if args.transformer_dims:
            engines = {"masked-attention": engine_with_transformer(model_dir, args.transformer_dims, args.device, dtype, args.text_len)}
        else:
            engines = {
                design: Engine.from_pretrained(model_dir, device=args.device, dtype=dtype, max_sequence_length=args.text_len,
                                               family_options=options)  # fmt: skip
                for design, options in designs.items()
            }
        records = {
            design: engine.register_template(template(args.resolution), "a photo of a room", seed=0, steps=args.steps)
            for design, engine in engines.items()
        }
        primary = next(iter(engines))
        engine, record = engines[primary], records[primary]
        print(f"template recorded: {record.activations.nbytes / 2**20:.0f} MiB of cache for {args.steps} steps ({primary})")
        token = engine.family.pixels_per_token

        def edit(design: str, ratio: float, offset: int = 0, full: bool = False) -> RequestState:
            return engines[design].prepare_edit(
                mask(args.resolution, ratio, token, offset), "a red sofa", template_id=records[design].template_id,
                full_compute=full,
            )  # fmt: skip

        full_state = edit(primary, 1.0, full=True)
        masked_states = {(d, r): edit(d, r) for d in engines for r in ratios}
        mixed_states = [edit(primary, r, offset=i + 1) for i, r in enumerate(mixed)]
        calls: dict[str, tuple[str, list[RequestState]]] = {"full": (primary, [full_state]), "mixed": (primary, mixed_states)}
        calls.update({f"{d} masked {r}": (d, [s]) for (d, r), s in masked_states.items()})
        calls.update({f"alone {i}": (primary, [s]) for i, s in enumerate(mixed_states)})
        inputs = {name: (engines[d], engines[d].model_inputs(states)) for name, (d, states) in calls.items()}

        for owner, model_inputs in inputs.values():  # warm-up
            owner.family.predict(model_inputs)
        samples: dict[str, list[float]] = {name: [] for name in inputs}
        for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
            for name, (owner, model_inputs) in inputs.items():
                samples[name].append(timed(lambda owner=owner, model_inputs=model_inputs: owner.family.predict(model_inputs), device))
        median = {name: statistics.median(values) for name, values in samples.items()}
        full_flops = flops(engine, [full_state])
        rows = []
        for (design, r), state in masked_states.items():
            rows.append(
                {
                    "design": design,
                    "mask_ratio": r,
                    "token_ratio": state.computed_tokens / state.num_tokens,
                    "flop_fraction": flops(engines[design], [state]) / full_flops,
                    "time_ratio": median[f"{design} masked {r}"] / median["full"],
                }
            )
        end_to_end = None
        if args.end_to_end is not None:
            end_to_end = time_end_to_end(engines, args, token)

    alone_sum = sum(median[f"alone {i}"] for i in range(len(mixed)))
    mixed_row = {
        "design": primary,
        "mask_ratios": mixed,
        "batch_over_sum_alone": median["mixed"] / alone_sum,
        "batch_over_full": median["mixed"] / median["full"],
        "padded_tokens": int(inputs["mixed"][1].batch.padded_len),
        "computed_tokens": [s.computed_tokens for s in mixed_states],
    }
    meta = {
        "family": args.family,
        "size": args.size,
        "resolution": args.resolution,
        "text_len": args.text_len,
        "image_tokens": full_state.num_tokens,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "transformer_dims": args.transformer_dims or args.size,
    }
    report = {"meta": meta, "rows": rows, "mixed_batch": mixed_row, "end_to_end": end_to_end}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))

    table = [
        "| design | mask ratio | computed tokens | FLOP fraction | time ratio (masked / full) |",
        "|---|---:|---:|---:|---:|",
    ]
    table += [
        f"| {row['design']} | {row['mask_ratio']:.2f} | {row['token_ratio']:.3f} | {row['flop_fraction']:.3f} "
        f"| {row['time_ratio']:.3f} |"
        for row in rows
    ]
    end_to_end_lines = [] if end_to_end is None else end_to_end_table(end_to_end)
    mixed_line = (
        f"Mixed batch of four masks {mixed} (computed tokens {mixed_row['computed_tokens']}, padded to "
        f"{mixed_row['padded_tokens']} per row): one batched step takes {mixed_row['batch_over_sum_alone']:.3f}x "
        f"the sum of the four stepped alone ({mixed_row['batch_over_full']:.3f}x one full step)."
    )
    print("\n".join(table))
    print(mixed_line)
    print("\n".join(end_to_end_lines))
    markdown = [
        "# Engine: masked vs full denoiser step",
        "",
        "Written by `bench/engine.py`; ratios of medians measured side by side in one run "
        f"({args.repeats} interleaved repeats after a warm-up). Denoiser call of one denoising step only "
        "(text encoding and VAE are off the step loop). FLOP fractions are counted by "
        "`torch.utils.flop_counter` on the same calls (matmuls, convolutions, attention).",
        "",
        "Setup: " + ", ".join(f"{k}={v}" for k, v in meta.items()) + ".",
        "",
        *table,
        "",
        mixed_line,
        "",
        *end_to_end_lines,
        *(UNET_NOTE if unet else []),
        "Rows of one transformer call are padded to its longest row: diffusers' blocks take one "
        "`[B, L, C]` tensor with per-row adaLN modulation, so packing rows without padding would mean "
        "forking them. On a CPU batching saves no time per token, so a mixed batch costs its padded "
        "token count; a step loop should batch requests of similar token counts together.",
        "",
        "Command: `python bench/engine.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "",
    ]
    name = "engine.md" if args.family == "flux-fill" else f"engine-{args.family}.md"
    markdown_path = Path(args.markdown or ROOT / "docs/benchmarks" / name)
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text("\n".join(markdown))
    return 0


UNET_NOTE = [
    "Designs: (b) computes the masked tokens in the attention levels and runs ResNets densely; (c) also "
    "runs every convolution on the mask's tiles only. On a CPU attention costs more time per FLOP than "
    "convolutions, so (b)'s time ratios fall below its FLOP fractions and (c)'s FLOP savings, all in "
    "convolutions, buy less time than they count. The UNets' CLIP encoders take 77 text tokens whatever "
    "`text_len` says.",
    "",
]


def time_end_to_end(engines: dict[str, Engine], args: argparse.Namespace, token: int) -> dict:
    """Whole edits at one mask ratio, interleaved: masked (each design), the engine's full
    computation and the stock diffusers pipeline."""
    steps, ratio, resolution = args.end_to_end_steps, args.end_to_end, args.resolution
    image_png, mask_png = template(resolution), mask(resolution, ratio, token, offset=1)
    prompt = "a photo of a room"
    records = {d: e.register_template(image_png, prompt, seed=0, steps=steps) for d, e in engines.items()}
    primary = next(iter(engines))
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    mask_image = Image.open(io.BytesIO(mask_png))
    pipe = engines[primary].family.pipe
    stock_kwargs = {"max_sequence_length": args.text_len} if "max_sequence_length" in pipe.__call__.__code__.co_varnames else {}

    def stock() -> object:
        # strength 1.0: SDXL inpaint's default 0.9999 drops a step.
        return pipe(
            prompt=prompt, image=image, mask_image=mask_image, height=resolution, width=resolution,
            num_inference_steps=steps, guidance_scale=records[primary].settings.guidance, strength=1.0,
            generator=torch.Generator().manual_seed(0), **stock_kwargs,
        ).images[0]  # fmt: skip

    variants: dict[str, Callable[[], object]] = {
        f"masked {d}": (lambda e=e, r=records[d]: e.edit(mask_png, prompt, template_id=r.template_id))
        for d, e in engines.items()
    }
    variants["full"] = lambda: engines[primary].edit(mask_png, prompt, template_id=records[primary].template_id, full_compute=True)
    variants["stock"] = stock
    for fn in variants.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(max(1, args.repeats // 2)):
        for name, fn in variants.items():
            samples[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "mask_ratio": ratio,
        "steps": steps,
        "repeats": len(samples["stock"]),
        "stock_over_masked": {d: median["stock"] / median[f"masked {d}"] for d in engines},
        "full_over_masked": {d: median["full"] / median[f"masked {d}"] for d in engines},
        "full_over_stock": median["full"] / median["stock"],
    }


def end_to_end_table(result: dict) -> list[str]:
    designs = list(result["stock_over_masked"])
    return [
        f"Whole edits at mask ratio {result['mask_ratio']} ({result['steps']} steps, {result['repeats']} interleaved "
        "repeats after a warm-up; text encoding, VAE, steps, decode and paste included):",
        "",
        "| design | speed-up over the stock diffusers pipeline | over the engine's full computation |",
        "|---|---:|---:|",
        *[
            f"| {d} | {result['stock_over_masked'][d]:.2f}x | {result['full_over_masked'][d]:.2f}x |"
            for d in designs
        ],
        "",
        f"The engine's full computation takes {result['full_over_stock']:.3f}x the stock pipeline's time.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
