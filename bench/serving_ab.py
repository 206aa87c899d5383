"""A/B of edit-model parameters on the serving path: two servers, the same requests, interleaved.

A change to the serving path moves unloaded latency by a few percent, while this
machine's speed drifts by as much between minutes (and between one process and the
next). So each request goes to both servers back to back, in alternating order, and
the answer is the median of the per-request ratios B/A, not a ratio of two runs.

    python bench/serving_ab.py --b metrics_flush_s=0 --b cancel_poll_s=0 --requests 12
    python bench/serving_ab.py --b max_padding_waste=0 --systems instgenie --out out/ab.md

Both servers serve the serving bench's model and templates (``bench/serving.py``'s
defaults: flux-fill small, 512x512, 16 steps); A takes the config defaults plus ``--a``.
Writes a Markdown table (default ``docs/benchmarks/serving-ab.md``).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import serving  # noqa: E402 - the serving bench's server stack
from workload import ROOT, TRACE, Record, git_state, make_workload, read_trace  # noqa: E402

log = logging.getLogger("bench.serving_ab")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", action="append", default=[], metavar="KEY=VALUE", help="a parameter of server A (repeatable)")
    parser.add_argument("--b", action="append", default=[], metavar="KEY=VALUE", help="a parameter of server B (repeatable)")
    parser.add_argument("--systems", default="full,instgenie", help="comma-separated: baseline, full, instgenie")
    parser.add_argument("--requests", type=int, default=12, help="measured requests per system and server")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks/serving-ab.md"))
    args = parser.parse_args(argv)
    args.systems = args.systems.split(",")
    unknown = set(args.systems) - set(serving.SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {serving.SYSTEMS}")
    serving.parse_parameters(args.a + args.b)  # KEY=VALUE or a clear error now, not after a server start
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started, code = time.monotonic(), git_state()
    stacks: dict[str, serving.Stack] = {}
    latencies: dict[tuple[str, str], list[float]] = {(name, s): [] for name in "AB" for s in args.systems}
    try:
        for name, parameters in (("A", args.a), ("B", args.b)):
            stacks[name] = serving.Stack(serving.parse_args([f"--parameter={p}" for p in parameters]))
        workload = make_workload(args.warmup + args.requests, 512, read_trace(TRACE), len(stacks["A"].templates), args.seed)
        for index, request in enumerate(workload):
            for system in args.systems:
                for name in "AB" if index % 2 else "BA":  # neither server always goes first
                    record = Record(system, 0.0, index, request.template, request.mask_ratio, scheduled_s=0.0)
                    stacks[name].caller(system, request, record)
                    if record.error is not None:
                        raise RuntimeError(f"{system} on server {name} failed: {record.error}")
                    if index >= args.warmup:
                        latencies[(name, system)].append(record.done_s - record.sent_s)
                    stacks[name].server.drain(60)
    finally:
        for stack in stacks.values():
            stack.close()

    rows = []
    for system in args.systems:
        a, b = latencies[("A", system)], latencies[("B", system)]
        ratios = sorted(y / x for x, y in zip(a, b))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append(
            f"| {system} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | {statistics.median(ratios):.3f} "
            f"| {quartiles[0]:.3f} - {quartiles[2]:.3f} | {sum(r < 1 for r in ratios)} of {len(ratios)} |"
        )
    page = "\n".join([
        "# Serving-path A/B: two servers, the same requests, interleaved",
        "",
        f"Written by `bench/serving_ab.py` ({' '.join(sys.argv[1:]) or 'defaults'}); code {code}; "
        f"{time.monotonic() - started:.0f} s. Each request went to both servers back to back, in alternating order "
        f"({args.warmup} warm-up requests left out); latency is client send to final response, unloaded.",
        "",
        f"- A: config defaults{' + ' + ', '.join(args.a) if args.a else ''}",
        f"- B: config defaults{' + ' + ', '.join(args.b) if args.b else ''}",
        "",
        "| system | A median (s) | B median (s) | median of B/A per request | B/A quartiles | requests B was faster |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(page)
    print(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
