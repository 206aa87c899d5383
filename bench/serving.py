"""End-to-end serving benchmark on a real Triton server: InstGenIE vs the diffusers baseline.

One ``tritonserver`` serves the three systems side by side, over the same model folder:

- ``baseline``: ``diffusers_baseline``, the stock diffusers pipeline behind Triton's
  dynamic batcher (request-level batching, up to 8 per pipeline call); it gets the
  template IMAGE, the mask, and the template's SEED / STEPS.
- ``full``: ``instgenie_edit`` with ``FULL_COMPUTE=True``: step-level continuous
  batching, every token computed (the serving strategy without the mask-aware compute).
- ``instgenie``: ``instgenie_edit`` with ``TEMPLATE_ID``: continuous batching and
  mask-aware compute over the template's cached K/V.

Every system gets the same open-loop Poisson workload (seeded: same arrivals, masks,
templates, prompts and seeds) at several request rates. Mask ratios are drawn from
a trace-like distribution shipped as ``bench/data/mask_ratios.csv`` (regenerate it
with ``--write-trace``). Rates are set from the measured single-request (unloaded)
latencies: fractions and multiples of the baseline's capacity plus rates near
InstGenIE's; ``--rates`` overrides. Writes ``docs/benchmarks/serving.md``, a latency
plot and, with ``--json``, every per-request record.

    python bench/serving.py --json out/serving.json      # default: ~25 min on 2 CPU cores
    python bench/serving.py --quick --json out/serving-quick.json   # smoke test, < 2 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np


sys.path.insert(0, str(Path(__file__).parent))
from report import (  # noqa: E402 - the report writer
    SYSTEMS,
    finish_report,
    fmt,
    notes_for,
)
from sample_inputs import sample_template  # noqa: E402
from workload import (  # noqa: E402 - trace, workload, caller, statistics
    Caller,
    GRID,
    InProcess,
    OtherLoad,
    PROMPTS,
    ROOT,
    Record,
    Request,
    TEMPLATE_PROMPTS,
    TRACE,
    Template,
    build_model,
    git_state,
    make_workload,
    metric_snapshot,
    png,
    read_trace,
    rect_mask,
    run_open_loop,
    run_sequential,
    server_stats,
    summarize,
    wait_idle,
    wait_quiet,
    write_trace,
)

log = logging.getLogger("bench.serving")



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write every per-request record and the summaries here")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 128 px, few requests, 2 rates")
    parser.add_argument("--write-trace", action="store_true", help=f"(re)generate {TRACE.relative_to(ROOT)} and exit")
    parser.add_argument("--model", help="an existing flux-fill pipeline folder (default: build/reuse models/flux-fill-<size>)")
    parser.add_argument("--model-size", choices=("tiny", "small"), help="default small (--quick: tiny)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 512; --quick: 128)")
    parser.add_argument("--text-len", type=int, help="max_sequence_length (default 128 = 1/8 of 512x512's 1024 image tokens; --quick 32)")
    parser.add_argument("--steps", type=int, help="denoising steps of every template (default 16; --quick: 4)")
    parser.add_argument("--templates", type=int, default=4)
    parser.add_argument("--requests", type=int, help="requests per (system, rate) run (default 32; --quick: 6)")
    parser.add_argument("--rates", help="comma-separated offered rates in req/s (default: from the unloaded latencies)")
    parser.add_argument(
        "--baseline-factors", default=None, help="rates as multiples of the baseline's capacity (default 0.5,0.9,1.5; --quick 0.5)"
    )
    parser.add_argument(
        "--instgenie-factors", default=None, help="rates as multiples of InstGenIE's capacity (default 1.0,1.3; --quick 1.0)"
    )
    parser.add_argument("--warmup", type=int, help="unloaded warm-up requests per system (default 2; --quick 1)")
    parser.add_argument("--unloaded", type=int, help="measured unloaded requests per system (default 8; --quick 2)")
    parser.add_argument("--slo-factor", type=float, default=3.0, help="declared P95 SLO = this x the baseline's unloaded mean latency")
    parser.add_argument("--slo-factors", default="3,5,10", help="more SLO factors to report the throughput ratio at")
    parser.add_argument("--report-from", help="rebuild the Markdown page and plot from this --json file (no server)")
    parser.add_argument(
        "--redo", help="re-measure runs of the --json report on a fresh server, e.g. baseline@0.209,full@0.377 (disturbed runs)"
    )
    parser.add_argument("--max-active", type=int, default=8)
    parser.add_argument("--codec-nice", type=int, help="the edit model's codec_nice (default: its config's)")
    parser.add_argument(
        "--parameter", action="append", default=[], metavar="KEY=VALUE",
        help="another config.pbtxt parameter of the served models (repeatable), e.g. outbox=on",
    )  # fmt: skip
    parser.add_argument("--max-waiting", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-other-cores", type=float, default=0.5, help="a run beside busier other processes is repeated")
    parser.add_argument("--repeat-noisy", type=int, default=1, help="how many times such a run is repeated at most")
    parser.add_argument(
        "--quiet-wait", type=float,
        help="before each run, wait up to this many seconds until other processes use < 0.3 cores (default 30; --quick 5)",
    )  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--out", help="markdown report (default docs/benchmarks/serving.md; --quick: out/serving-quick.md)")
    parser.add_argument("--server-log", help="keep the tritonserver log here")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(
        model_size=("tiny", "small"), size=(128, 512), text_len=(32, 128), steps=(4, 16), requests=(6, 32),
        baseline_factors=("0.5", "0.5,0.9,1.5"), instgenie_factors=("1.0", "1.0,1.3"), warmup=(1, 2), unloaded=(2, 8), quiet_wait=(5.0, 30.0),
    )  # fmt: skip
    for name, (quick_value, value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else value)
    args.out_given = args.out is not None
    if args.out is None:
        args.out = str(ROOT / ("out/serving-quick.md" if quick else "docs/benchmarks/serving.md"))
    if args.size % GRID:
        parser.error(f"--size must be a multiple of {GRID}")
    return args


def parse_parameters(items: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (``--parameter``) as model parameters."""
    parameters = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--parameter {item!r}: expected KEY=VALUE")
        parameters[key] = value
    return parameters


class Stack:
    """One tritonserver with the three systems, the templates registered, and a :class:`Caller`."""

    def __init__(self, args: argparse.Namespace) -> None:
        from instgenie_client import InstGenIEClient
        from instgenie_server.launcher import (
            TritonServer,
            default_model_repository,
            models_with_parameter,
            render_repository,
        )

        self.args = args
        self.model = build_model(args.model_size, args.model)
        source = default_model_repository()
        parameters = {
            "model_dir": str(self.model.resolve()),
            "max_sequence_length": str(args.text_len),
            "max_active": str(args.max_active),
            "max_waiting": str(args.max_waiting),
        }
        if args.codec_nice is not None:
            parameters["codec_nice"] = str(args.codec_nice)
        parameters.update(parse_parameters(args.parameter))
        self.workdir = tempfile.TemporaryDirectory(prefix="instgenie-bench-")
        repository = render_repository(
            source, Path(self.workdir.name) / "models", {name: parameters for name in models_with_parameter(source, "model_dir")}
        )
        self.server = TritonServer(repository, log_file=Path(args.server_log) if args.server_log else None)
        try:
            self.server.start()
            self.server.wait_ready(300)
            log.info("server ready (grpc %s)", self.server.grpc_url)
            client = InstGenIEClient(self.server.grpc_url, timeout_s=args.request_timeout)
            self.templates = []
            for i in range(args.templates):
                image = png(sample_template(args.size, seed=1000 + i))
                prompt, seed = TEMPLATE_PROMPTS[i % len(TEMPLATE_PROMPTS)], 100 + i
                template_id = client.register_template(image, prompt, seed=seed, steps=args.steps)
                self.templates.append(Template(i, template_id, image, prompt, seed, args.steps))
            log.info("registered %d templates", len(self.templates))
        except BaseException:
            self.close()
            raise
        self.caller = Caller(self.server.grpc_url, self.templates, args.request_timeout)
        self.exclude = {os.getpgrp(), self.server.pid}  # processes that are ours, for OtherLoad

    def measure(self, system: str, rate: float, workload: list[Request]) -> tuple[list[Record], dict, list[dict]]:
        """One open-loop run; repeated (``--repeat-noisy``) while other processes loaded the machine.

        Returns the kept run's records and summary, and the summaries of the runs it replaced.
        """
        args, server, discarded = self.args, self.server, []
        for attempt in range(args.repeat_noisy + 1):
            wait_idle(server)
            wait_quiet(self.exclude, args.quiet_wait)
            before = metric_snapshot(server.metrics_url)
            other = OtherLoad(self.exclude)
            run = run_open_loop(self.caller, system, rate, workload)
            other_cores = other.cores()
            wait_idle(server)
            after = metric_snapshot(server.metrics_url)
            summary = {"system": system, "rate": rate, **summarize(run), "other_cores": other_cores}
            summary["disturbed"] = other_cores > args.max_other_cores
            summary["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            summary["server"] = server_stats(system, before, after, summary["completed"], args.steps)
            if not summary["disturbed"] or attempt == args.repeat_noisy:
                break
            log.warning("%s at %.3f req/s ran beside %.2f busy cores of other processes; repeating the run", system, rate, other_cores)
            discarded.append(summary)
        log.info(
            "%-9s rate %.3f: %d/%d ok, throughput %s, mean %s s, p95 %s s%s",
            system, rate, summary["completed"], summary["requests"], fmt(summary.get("throughput"), 3),
            fmt(summary.get("mean_s")), fmt(summary.get("p95_s")), " (disturbed)" if summary["disturbed"] else "",
        )  # fmt: skip
        return run, summary, discarded

    def close(self) -> None:
        code = self.server.stop(drain_timeout_s=60)
        log.info("server stopped (status %s)", code)
        self.workdir.cleanup()


def measure_unloaded(stack: Stack, local: InProcess, trace: np.ndarray) -> tuple[dict[str, dict], list[Record]]:
    """Sequential requests (a separate draw of the same trace) to every served system and
    the same edits in this process, interleaved request by request: the machine's speed
    drifts over minutes, and the serving path's cost is a ratio of neighbours."""
    args = stack.args
    callers = {**{system: stack.caller for system in SYSTEMS}, **{system: local for system in InProcess.SYSTEMS}}
    probe = make_workload(args.warmup + args.unloaded, args.size, trace, len(stack.templates), args.seed + 1)
    for system, call in callers.items():
        run_sequential(call, system, probe[: args.warmup])
    measured: dict[str, list[Record]] = {system: [] for system in callers}
    worst = dict.fromkeys(callers, 0.0)
    for request in probe[args.warmup :]:
        for system, call in callers.items():
            records, cores = run_sequential(call, system, [request], quiet=(stack.exclude, args.quiet_wait))
            measured[system] += records
            worst[system] = max(worst[system], cores)
        wait_idle(stack.server)
    unloaded = {}
    for system, records in measured.items():
        unloaded[system] = {**summarize(records), "other_cores": worst[system]}
        unloaded[system].pop("throughput", None)
        log.info("unloaded %s: %.2f s", system, unloaded[system].get("mean_s", float("nan")))
    return unloaded, [record for records in measured.values() for record in records]


def speedup_at_mean_mask(stack: Stack, local: InProcess, ratio: float) -> dict:
    """The in-process speed-up of a masked edit over the stock pipeline at the workload's
    mean mask ratio: what the served capacity ratio is held against."""
    args = stack.args
    rng = np.random.default_rng(args.seed + 2)
    seconds: dict[str, list[float]] = {system: [] for system in ("engine", "stock")}
    for index in range(args.unloaded):
        mask, exact = rect_mask(args.size, ratio, rng)
        request = Request(index, index % len(stack.templates), mask, exact, PROMPTS[index % len(PROMPTS)], 0.0)
        for system in seconds:
            record = Record(system, 0.0, index, request.template, exact, scheduled_s=0.0)
            local(system, request, record)
            if not record.ok:
                raise RuntimeError(f"in-process {system} failed: {record.error}")
            seconds[system].append(record.latency)
    engine, stock = float(np.mean(seconds["engine"])), float(np.mean(seconds["stock"]))
    log.info("in process at mask ratio %.3f: engine %.2f s, stock %.2f s (%.2fx)", ratio, engine, stock, stock / engine)
    return {"mask_ratio": ratio, "engine_s": seconds["engine"], "stock_s": seconds["stock"], "speedup": stock / engine}


def redo(args: argparse.Namespace, raw_argv: list[str]) -> int:
    """Re-measure some (system, rate) runs of a saved report on a fresh server and merge them in.

    For runs that other engineers' jobs disturbed: the setup (model, size, steps,
    templates, workload, seed) comes from the report, so the request list and arrival
    pattern are the same; the replaced summaries move to ``discarded_runs``.
    """
    path = Path(args.json)
    report = json.loads(path.read_text())
    cfg = report["config"]
    for key in ("model_size", "size", "text_len", "steps", "templates", "requests", "max_active", "max_waiting", "seed"):
        setattr(args, key, cfg[key])
    args.codec_nice = cfg.get("codec_nice")
    args.parameter = cfg.get("parameters", [])
    wanted = []
    for item in args.redo.split(","):
        system, _, rate = item.partition("@")
        match = [s for s in report["summaries"] if s["system"] == system and abs(s["rate"] - float(rate)) < 1e-6]
        if system not in SYSTEMS or not match:
            raise SystemExit(f"--redo {item}: no such run in {path}")
        wanted.append((system, match[0]["rate"]))
    started = time.monotonic()
    code_state = git_state()
    trace = read_trace(TRACE)
    stack = Stack(args)
    try:
        workload = make_workload(args.requests, args.size, trace, len(stack.templates), args.seed)
        probe = make_workload(args.warmup + args.unloaded, args.size, trace, len(stack.templates), args.seed + 1)
        for system in sorted({system for system, _ in wanted}):
            run_sequential(stack.caller, system, probe[: args.warmup])  # warm-up, as in the full run
        for system, rate in wanted:
            run, summary, discarded = stack.measure(system, rate, workload)
            old = next(s for s in report["summaries"] if s["system"] == system and s["rate"] == rate)
            report["discarded_runs"] += [{**old, "replaced_by_redo": True}, *discarded]
            report["summaries"][report["summaries"].index(old)] = {**summary, "redo": True}
            report["records"] = [r for r in report["records"] if not (r["system"] == system and r["rate"] == rate)]
            report["records"] += [asdict(r) for r in run]
    finally:
        stack.close()
    report.setdefault("redos", []).append(
        {"runs": [f"{s}@{r}" for s, r in wanted], "at": time.strftime("%Y-%m-%d %H:%M:%S"), "git": code_state,
         "argv": raw_argv, "runtime_s": time.monotonic() - started}
    )  # fmt: skip
    report["notes"] = notes_for(report)
    out = Path(args.out) if args.out_given else ROOT / ("out/serving-quick.md" if cfg["quick"] else "docs/benchmarks/serving.md")
    print(finish_report(report, out, str(path)))
    return 0


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.write_trace:
        ratios = write_trace(TRACE)
        print(f"wrote {len(ratios)} ratios to {TRACE} (mean {ratios.mean():.3f}, min {ratios.min()}, max {ratios.max()})")
        return 0
    if args.report_from:
        report = json.loads(Path(args.report_from).read_text())
        report["config"]["slo_factor"] = args.slo_factor
        report["config"]["slo_factors"] = [float(f) for f in args.slo_factors.split(",")]
        report.setdefault("discarded_runs", [])
        report["notes"] = notes_for(report)
        out = Path(args.out) if args.out_given else ROOT / ("out/serving-quick.md" if report["config"]["quick"] else "docs/benchmarks/serving.md")
        print(finish_report(report, out, args.report_from if args.json is None else args.json))
        return 0
    if args.redo:
        if not args.json:
            raise SystemExit("--redo needs --json: the report to re-measure runs of")
        return redo(args, raw_argv)

    import torch

    started = time.monotonic()
    load_before = os.getloadavg()
    code_state = git_state()  # the code the server runs (colleagues may commit while the bench runs)
    trace = read_trace(TRACE)
    records: list[Record] = []
    summaries: list[dict] = []
    discarded: list[dict] = []  # summaries of runs repeated because other jobs loaded the machine
    stack = Stack(args)
    try:
        workload = make_workload(args.requests, args.size, trace, len(stack.templates), args.seed)
        local = InProcess(stack.model, args.text_len, stack.templates)
        unloaded, unloaded_records = measure_unloaded(stack, local, trace)
        records += unloaded_records
        in_process = speedup_at_mean_mask(stack, local, float(np.mean([r.mask_ratio for r in workload])))
        del local  # its memory and threads, before the loaded runs
        for system in SYSTEMS:
            if not unloaded[system].get("mean_s"):
                raise RuntimeError(f"{system} failed every unloaded request: {unloaded[system]['error_messages']}")

        if args.rates:
            rates = sorted(float(r) for r in args.rates.split(","))
            origin = "given with --rates"
        else:
            base_capacity = 1 / unloaded["baseline"]["mean_s"]
            inst_capacity = 1 / unloaded["instgenie"]["mean_s"]
            rates = sorted(
                {round(f * base_capacity, 3) for f in map(float, args.baseline_factors.split(","))}
                | {round(f * inst_capacity, 3) for f in map(float, args.instgenie_factors.split(","))}
            )
            origin = (
                f"{args.baseline_factors} x the baseline's unloaded capacity {base_capacity:.3f} req/s and "
                f"{args.instgenie_factors} x InstGenIE's {inst_capacity:.3f} req/s"
            )
        log.info("rates: %s", rates)

        for rate in rates:
            for system in SYSTEMS:
                run, summary, repeated = stack.measure(system, rate, workload)
                records += run
                summaries.append(summary)
                discarded += repeated
    finally:
        stack.close()

    load_after = os.getloadavg()
    report = {
        "config": {
            "quick": args.quick, "model": str(stack.model), "model_size": args.model_size, "size": args.size,
            "text_len": args.text_len, "steps": args.steps, "templates": args.templates, "requests": args.requests,
            "rates": rates, "rate_origin": origin, "slo_factor": args.slo_factor, "max_active": args.max_active,
            "slo_factors": [float(f) for f in args.slo_factors.split(",")],
            "max_waiting": args.max_waiting, "seed": args.seed, "argv": raw_argv, "codec_nice": args.codec_nice,
            "parameters": args.parameter,
            "max_other_cores": args.max_other_cores, "repeat_noisy": args.repeat_noisy,
        },
        "environment": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "tritonserver": "2.51.0 from nvidia-pytriton",
            "git": code_state,
            "load_before": ", ".join(f"{x:.2f}" for x in load_before),
            "load_after": ", ".join(f"{x:.2f}" for x in load_after),
        },
        "workload": {
            "trace_mean": float(trace.mean()),
            "mean_mask_ratio": float(np.mean([r.mask_ratio for r in workload])),
            "min_mask_ratio": float(min(r.mask_ratio for r in workload)),
            "max_mask_ratio": float(max(r.mask_ratio for r in workload)),
            "requests": [
                {"index": r.index, "template": r.template, "mask_ratio": r.mask_ratio, "prompt": r.prompt, "arrival": r.arrival}
                for r in workload
            ],
        },
        "unloaded": unloaded,
        "in_process": in_process,
        "summaries": summaries,
        "discarded_runs": discarded,
        "runtime_s": time.monotonic() - started,
        "records": [asdict(r) for r in records],
    }
    report["notes"] = notes_for(report)
    print(finish_report(report, Path(args.out), args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
