"""Write perf_analyzer ``--input-data`` files for a running InstGenIE server.

Registers ``--templates`` templates on the server (through the client library; the
ids are stable hashes of model, settings, prompt and image, so re-running against a
fresh server with the same model re-creates the same ids), then writes:

- ``edit.json``: ``instgenie_edit`` requests (TEMPLATE_ID, MASK, PROMPT, SEED): one
  response per request, so perf_analyzer's latency is the end-to-end latency;
- ``edit_progress.json``: the same with ``PROGRESS`` (one response per denoising step):
  perf_analyzer 2.41 times a decoupled model's FIRST response, so its latency is then
  the time to the first step;
- ``full.json``: ``edit.json`` with ``FULL_COMPUTE`` (every token computed);
- ``baseline.json``: ``diffusers_baseline`` requests (IMAGE, MASK, PROMPT, SEED, STEPS).

Each file holds ``--entries`` requests (perf_analyzer cycles through them) with mask
ratios drawn from ``bench/data/mask_ratios.csv`` like ``bench/serving.py``. Images
and masks are sent as base64 text in ordinary string elements, which the server
decodes (see ``instgenie_protocol``): perf_analyzer's ``{"b64": ...}`` form is
the raw *serialized* tensor, which for BYTES would need a 4-byte length prefix per
element. All tensors are one element; the edit model has no batch dimension
(dims ``[1]``), the baseline gets its batch dimension from perf_analyzer (``-b 1``).

    python bench/perf_analyzer/prepare.py --url localhost:8001 --size 128 --steps 8
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sample_inputs import sample_template  # noqa: E402
from workload import PROMPTS, TEMPLATE_PROMPTS, TRACE, make_workload, png, read_trace  # noqa: E402


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint")
    parser.add_argument("--size", type=int, default=128, help="image side (a multiple of the family's token: 16, or 8 for UNets)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--templates", type=int, default=2)
    parser.add_argument("--entries", type=int, default=8, help="requests per file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(HERE))
    args = parser.parse_args(argv)

    from instgenie_client import InstGenIEClient

    client = InstGenIEClient(args.url, timeout_s=600)
    templates = []
    for i in range(args.templates):
        image = png(sample_template(args.size, seed=1000 + i))
        seed = 100 + i
        template_id = client.register_template(image, TEMPLATE_PROMPTS[i % len(TEMPLATE_PROMPTS)], seed=seed, steps=args.steps)
        templates.append((template_id, image, seed))
        print(f"registered {template_id}")

    workload = make_workload(args.entries, args.size, read_trace(TRACE), len(templates), args.seed)
    files: dict[str, list[dict]] = {"edit.json": [], "edit_progress.json": [], "full.json": [], "baseline.json": []}
    for request in workload:
        template_id, image, seed = templates[request.template]
        common = {"MASK": [b64(request.mask)], "PROMPT": [request.prompt], "SEED": [seed]}
        entry = {"TEMPLATE_ID": [template_id], **common}
        files["edit.json"].append(entry)
        files["edit_progress.json"].append({**entry, "PROGRESS": [True]})
        files["full.json"].append({**entry, "FULL_COMPUTE": [True]})
        files["baseline.json"].append({"IMAGE": [b64(image)], **common, "STEPS": [args.steps]})

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_text(json.dumps({"data": data}, indent=1) + "\n")
    ratios = [r.mask_ratio for r in workload]
    print(
        f"wrote {', '.join(files)} to {out}: {len(workload)} requests each, "
        f"mask ratios {np.mean(ratios):.3f} mean ({min(ratios):.3f}-{max(ratios):.3f}); prompts from {len(PROMPTS)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
