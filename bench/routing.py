"""Routing benchmark: one skewed workload through the router with each policy, in one run.

Several real ``tritonserver`` instances (each pinned to its own core on a CPU
machine, so they do not fight over one thread pool) serve the small flux-fill model;
an ``instgenie router`` process sits in front of them, started afresh for each
policy. Every policy gets the same open-loop Poisson workload (seeded: same arrivals,
masks, templates, prompts): mask ratios from the trace-like distribution of
``bench/data/mask_ratios.csv`` (wide spread, so requests differ a lot in cost) and a
few hot templates (Zipf popularity). The offered rate is ``--load`` times the fleet's
measured capacity (a burst through the router, all requests at once). Policies run
in rotated order over ``--rounds`` rounds, and each policy's latencies are pooled
over its rounds, so slow drift of the machine hits every policy alike.

Reported per policy: P50/P95/mean latency, throughput, how the work (computed
row-tokens, from the instances' metrics) split across instances, and the P95 ratio
of ``mask_aware`` against ``least_requests`` (the goal: at least 30% lower).
Writes ``docs/benchmarks/routing.md`` and, with ``--json``, every record.

    python bench/routing.py --json out/routing.json            # ~20 min on 2 CPU cores
    python bench/routing.py --quick --json out/routing-quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from instgenie_protocol import parse_samples, sample_sum

sys.path.insert(0, str(Path(__file__).parent))
import report as pages  # noqa: E402 - the serving benchmarks' report helpers
import workload as shared  # noqa: E402 - the serving benchmarks' workload, caller and statistics
from sample_inputs import sample_template  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("least_requests", "mask_aware", "round_robin")
GOAL_P95_REDUCTION = 0.30  # mask_aware vs least_requests (published: 26%)
log = logging.getLogger("bench.routing")


# -- the fleet ----------------------------------------------------------------------------------


def start_instances(args: argparse.Namespace, model: Path, workdir: Path) -> list[Any]:
    """``args.instances`` tritonservers, instance i pinned to core i (mod the cores this process may use)."""
    from instgenie_server.launcher import TritonServer, default_model_repository, models_with_parameter, render_repository

    source = default_model_repository()
    cores = sorted(os.sched_getaffinity(0))
    own = set(cores)
    servers = []
    try:
        for index in range(args.instances):
            parameters = {
                "model_dir": str(model.resolve()), "max_sequence_length": str(args.text_len),
                "max_active": str(args.max_active), "max_waiting": str(args.max_waiting),
            }  # fmt: skip
            repository = render_repository(
                source, workdir / f"instance{index}" / "models", {n: parameters for n in models_with_parameter(source, "model_dir")}
            )
            server = TritonServer(repository, log_file=workdir / f"instance{index}.log")
            if args.pin:
                os.sched_setaffinity(0, {cores[index % len(cores)]})  # inherited by the server and its stubs
            try:
                server.start()
            finally:
                os.sched_setaffinity(0, own)
            servers.append(server)
        for server in servers:
            server.wait_ready(300)
    except BaseException:
        for server in servers:
            server.stop(drain_timeout_s=0)
        raise
    return servers


class RouterProcess:
    """``instgenie router`` as its own process (as deployed), on free ports."""

    def __init__(self, policy: str, specs: list[str], log_path: Path) -> None:
        command = [str(Path(sys.executable).parent / "instgenie"), "router", "--instances", ",".join(specs),
                   "--policy", policy, "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0"]  # fmt: skip
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True)
        lines: dict[str, str] = {}
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip() == "ready":
                break
            key, _, value = line.strip().partition(": ")
            lines[key] = value
        else:
            raise RuntimeError(f"the router exited before it was ready; see {log_path}")
        self.grpc_url = lines["grpc"]
        self.metrics_url = lines["metrics"]
        self.pgid = self.process.pid

    def routed(self) -> dict[str, float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        return {
            sample.labels["instance"]: sample.value
            for sample in parse_samples(text)
            if sample.name == "instgenie_router_routed_total" and "instance" in sample.labels
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


# -- workload -----------------------------------------------------------------------------------


def hot_templates(requests: list[shared.Request], templates: int, zipf: float, seed: int) -> list[shared.Request]:
    """Re-draw each request's template with Zipf popularity (template k has weight 1/(k+1)^zipf)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, templates + 1) ** zipf
    picks = rng.choice(templates, size=len(requests), p=weights / weights.sum())
    return [dataclasses.replace(r, template=int(t)) for r, t in zip(requests, picks)]


def work_by_instance(servers: list[Any]) -> dict[str, float]:
    """Row-tokens each instance has computed so far (its ``instgenie_computed_row_tokens_total``)."""
    return {
        f"127.0.0.1:{s.grpc_port}": sample_sum(shared.read_metrics(s.metrics_url), "instgenie_computed_row_tokens_total")
        for s in servers
    }


def measure(args: argparse.Namespace, policy: str, servers: list[Any], templates: list[shared.Template],
            rate: float, workload: list[shared.Request], workdir: Path) -> tuple[list[shared.Record], dict]:  # fmt: skip
    """One open-loop run of ``workload`` through a fresh router with ``policy``."""
    specs = [f"127.0.0.1:{s.grpc_port}:{s.http_port}:{s.metrics_port}" for s in servers]
    for server in servers:
        shared.wait_idle(server)
    exclude = {os.getpgrp(), *(s.pid for s in servers)}
    shared.wait_quiet(exclude, args.quiet_wait)
    router = RouterProcess(policy, specs, workdir / f"router-{policy}.log")
    try:
        exclude.add(router.pgid)
        time.sleep(1.0)  # a scrape round, so the router starts with the instances' counters
        work_before = work_by_instance(servers)
        other = shared.OtherLoad(exclude)
        caller = shared.Caller(router.grpc_url, templates, args.request_timeout)
        records = shared.run_open_loop(caller, policy, rate, workload)
        other_cores = other.cores()
        for server in servers:
            shared.wait_idle(server)
        work = {name: count - work_before[name] for name, count in work_by_instance(servers).items()}
        routed = router.routed()
    finally:
        router.stop()
    total = sum(work.values()) or 1.0
    run = {
        "policy": policy, "rate": rate, **shared.summarize(records), "other_cores": other_cores,
        "routed": routed, "work_share": {name: value / total for name, value in work.items()},
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    log.info("%-14s %d/%d ok, p50 %s s, p95 %s s, throughput %s/s, busiest instance %.0f%% of the work, other load %.2f cores",
             policy, run["completed"], run["requests"], pages.fmt(run.get("p50_s")), pages.fmt(run.get("p95_s")),
             pages.fmt(run.get("throughput"), 3), 100 * max(run["work_share"].values()), other_cores)  # fmt: skip
    return records, run


# -- report -------------------------------------------------------------------------------------


def pooled(policy: str, records: list[shared.Record], runs: list[dict]) -> dict:
    mine = [r for r in runs if r["policy"] == policy]
    summary = shared.summarize([r for r in records if r.system == policy])
    summary["policy"] = policy
    summary["throughput"] = float(np.mean([r["throughput"] for r in mine if r.get("throughput")]))
    summary["busiest_share"] = float(np.mean([max(r["work_share"].values()) for r in mine]))
    summary["other_cores"] = float(max(r["other_cores"] for r in mine))
    return summary


def markdown(report: dict) -> str:
    config, summaries = report["config"], {s["policy"]: s for s in report["summaries"]}
    lines = [
        "# Routing benchmark",
        "",
        f"`python bench/routing.py {' '.join(report['argv'])}` on {report['machine']}, code {report['code']}, "
        f"{report['finished_at']}. Generated by the script; do not edit by hand.",
        "",
        f"{config['instances']} tritonserver instances ({'each pinned to its own core' if config['pin'] else 'unpinned'}, "
        f"{config['model_size']} flux-fill, {config['size']}x{config['size']} px, {config['steps']} steps, "
        f"max_active {config['max_active']}) behind one `instgenie router` process per policy. Workload: "
        f"{config['requests']} requests per run, Poisson arrivals at {report['rate']:.3f} req/s = {config['load']:.0%} of the "
        f"fleet's measured capacity ({report['capacity']:.3f} req/s, a burst of {config['capacity_requests']} requests through "
        f"`least_requests`); mask ratios from `bench/data/mask_ratios.csv` (mean {report['mask_ratio_mean']:.3f}, "
        f"P95 {report['mask_ratio_p95']:.3f}); {config['templates']} templates with Zipf({config['zipf']}) popularity. "
        f"Each policy ran {config['rounds']} times in rotated order; latencies are pooled over its runs.",
        "",
        "| policy | completed | P50 (s) | P95 (s) | mean (s) | throughput (req/s) | busiest instance's work share | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for policy in config["policies"]:
        s = summaries[policy]
        lines.append(
            f"| `{policy}` | {s['completed']}/{s['requests']} | {pages.fmt(s.get('p50_s'))} | {pages.fmt(s.get('p95_s'))} | "
            f"{pages.fmt(s.get('mean_s'))} | {pages.fmt(s.get('throughput'), 3)} | {s['busiest_share']:.0%} | {s['other_cores']:.2f} |"
        )
    lines += ["", "## Ratios", ""]
    head = report.get("headline", {})
    if head:
        lines += [
            f"- `mask_aware` P95 / `least_requests` P95: **{head['p95_ratio']:.3f}** "
            f"({head['p95_reduction']:+.1%} reduction; goal at least {GOAL_P95_REDUCTION:.0%}, published 26%): "
            f"{'met' if head['p95_reduction'] >= GOAL_P95_REDUCTION else 'not met'}.",
            f"- `mask_aware` P50 / `least_requests` P50: {head['p50_ratio']:.3f}; mean: {head['mean_ratio']:.3f}; "
            f"throughput: {head['throughput_ratio']:.3f}.",
            f"- Paired by round (the two policies' runs of one round are minutes apart, so machine drift cancels): "
            f"P95 ratio per round {', '.join(f'{r:.2f}' for r in head['p95_ratio_by_round'])}; "
            f"median {head['p95_ratio_median']:.3f}.",
        ]
    lines += ["", "## Runs", "", "| round | policy | P50 (s) | P95 (s) | throughput | routed per instance | work share per instance | other load |",
              "|---:|---|---:|---:|---:|---|---|---:|"]  # fmt: skip
    for run in report["runs"]:
        routed = ", ".join(f"{int(v)}" for _, v in sorted(run["routed"].items()))
        shares = ", ".join(f"{v:.0%}" for _, v in sorted(run["work_share"].items()))
        lines.append(f"| {run['round']} | `{run['policy']}` | {pages.fmt(run.get('p50_s'))} | {pages.fmt(run.get('p95_s'))} | "
                     f"{pages.fmt(run.get('throughput'), 3)} | {routed} | {shares} | {run['other_cores']:.2f} |")  # fmt: skip
    lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def notes(report: dict) -> list[str]:
    config = report["config"]
    found = [
        "Latency is from the request's send to its final response through the router; every request was an edit of a "
        "registered template (the registration broadcast put each template on every instance first).",
        "`least_requests` balances request counts, `mask_aware` the predicted work (masked tokens x steps, at each instance's "
        "measured seconds per token-step), `round_robin` neither. The work share column is the busier instance's share "
        "of the row-tokens the instances computed in the run (50% = perfectly even).",
        "Absolute seconds are of this shared 2-core CPU machine and mean nothing elsewhere; compare policies within the run.",
    ]
    if config["pin"] and config["instances"] > (os.cpu_count() or 1):
        found.append(f"There are more instances than cores ({os.cpu_count()}): pinned instances share cores.")
    busy = [r for r in report["runs"] if r["other_cores"] > 0.5]
    if busy:
        found.append(f"{len(busy)} run(s) ran beside other processes using more than 0.5 cores (see the runs table).")
    return found


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write every record and summary here")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 128 px, few requests")
    parser.add_argument("--out", help="markdown report (default docs/benchmarks/routing.md; --quick: out/routing-quick.md)")
    parser.add_argument("--model", help="an existing flux-fill pipeline folder (default: build/reuse models/flux-fill-<size>)")
    parser.add_argument("--model-size", choices=("tiny", "small"))
    parser.add_argument("--size", type=int, help="image side in pixels (default 512; --quick 128)")
    parser.add_argument("--text-len", type=int, help="max_sequence_length (default 128; --quick 32)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 8; --quick 4)")
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="pin instance i to core i")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--templates", type=int, default=6)
    parser.add_argument("--zipf", type=float, default=1.2, help="template popularity exponent")
    parser.add_argument("--requests", type=int, help="requests per run (default 48; --quick 8)")
    parser.add_argument("--rounds", type=int, help="runs per policy, in rotated order (default 2; --quick 1)")
    parser.add_argument("--load", type=float, default=0.8, help="offered rate as a fraction of the measured capacity")
    parser.add_argument("--rate", type=float, help="offered rate in req/s (default: --load x the measured capacity)")
    parser.add_argument("--capacity-requests", type=int, help="burst size of the capacity measurement (default 24; --quick 6)")
    parser.add_argument("--max-active", type=int, default=8)
    parser.add_argument("--max-waiting", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="before each run, wait up to this long for a quiet machine")
    parser.add_argument("--request-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    defaults = dict(model_size=("tiny", "small"), size=(128, 512), text_len=(32, 128), steps=(4, 8), requests=(8, 48),
                    rounds=(1, 2), capacity_requests=(6, 24))  # fmt: skip
    for name, (quick_value, value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else value)
    if args.out is None:
        args.out = str(ROOT / ("out/routing-quick.md" if args.quick else "docs/benchmarks/routing.md"))
    args.policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.pin:
        os.environ["OMP_NUM_THREADS"] = "1"  # one core per instance: one torch thread
    from instgenie_client import InstGenIEClient

    code = shared.git_state()
    model = shared.build_model(args.model_size, args.model)
    trace = shared.read_trace(shared.TRACE)
    workdir = Path(tempfile.mkdtemp(prefix="instgenie-routing-"))
    servers = start_instances(args, model, workdir)
    try:
        specs = [f"127.0.0.1:{s.grpc_port}:{s.http_port}:{s.metrics_port}" for s in servers]
        setup = RouterProcess("round_robin", specs, workdir / "router-setup.log")
        try:
            client = InstGenIEClient(setup.grpc_url, timeout_s=args.request_timeout)
            templates = []
            for i in range(args.templates):  # broadcast: every instance holds every template
                image = shared.png(sample_template(args.size, seed=2000 + i))
                prompt, seed = shared.TEMPLATE_PROMPTS[i % len(shared.TEMPLATE_PROMPTS)], 200 + i
                template_id = client.register_template(image, prompt, seed=seed, steps=args.steps)
                templates.append(shared.Template(i, template_id, image, prompt, seed, args.steps))
            log.info("registered %d templates on %d instances", len(templates), len(servers))
            warm = hot_templates(shared.make_workload(2 * len(servers), args.size, trace, args.templates, args.seed + 7),
                                 args.templates, args.zipf, args.seed + 7)  # fmt: skip
            shared.run_open_loop(shared.Caller(setup.grpc_url, templates, args.request_timeout), "warmup", 1e6, warm)
        finally:
            setup.stop()

        burst = hot_templates(shared.make_workload(args.capacity_requests, args.size, trace, args.templates, args.seed + 1),
                              args.templates, args.zipf, args.seed + 1)  # fmt: skip
        if args.rate:
            rate, capacity = args.rate, args.rate / args.load
        else:
            _, capacity_run = measure(args, "least_requests", servers, templates, 1e6, burst, workdir)
            capacity = capacity_run["throughput"]
            rate = args.load * capacity
        log.info("capacity %.3f req/s; offered %.3f req/s", capacity, rate)

        workload = hot_templates(shared.make_workload(args.requests, args.size, trace, args.templates, args.seed),
                                 args.templates, args.zipf, args.seed)  # fmt: skip
        records: list[shared.Record] = []
        runs: list[dict] = []
        for round_index in range(args.rounds):
            shift = round_index % len(args.policies)
            for policy in args.policies[shift:] + args.policies[:shift]:
                run_records, run = measure(args, policy, servers, templates, rate, workload, workdir)
                run["round"] = round_index + 1
                records += run_records
                runs.append(run)
    finally:
        for server in servers:
            server.stop(drain_timeout_s=10)

    summaries = [pooled(policy, records, runs) for policy in args.policies]
    by_policy = {s["policy"]: s for s in summaries}
    report: dict[str, Any] = {
        "argv": raw_argv, "code": code, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "finished_at": time.strftime("%Y-%m-%d %H:%M"),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
        "capacity": capacity, "rate": rate,
        "mask_ratio_mean": float(np.mean([r.mask_ratio for r in workload])),
        "mask_ratio_p95": float(np.percentile([r.mask_ratio for r in workload], 95)),
        "summaries": summaries, "runs": runs,
    }  # fmt: skip
    if "mask_aware" in by_policy and "least_requests" in by_policy:
        aware, counting = by_policy["mask_aware"], by_policy["least_requests"]
        report["headline"] = {
            "p95_ratio": aware["p95_s"] / counting["p95_s"],
            "p95_reduction": 1 - aware["p95_s"] / counting["p95_s"],
            "p50_ratio": aware["p50_s"] / counting["p50_s"],
            "mean_ratio": aware["mean_s"] / counting["mean_s"],
            "throughput_ratio": aware["throughput"] / counting["throughput"],
        }
        by_round = [
            next(r["p95_s"] for r in runs if r["round"] == k and r["policy"] == "mask_aware")
            / next(r["p95_s"] for r in runs if r["round"] == k and r["policy"] == "least_requests")
            for k in range(1, args.rounds + 1)
        ]
        report["headline"].update(p95_ratio_by_round=by_round, p95_ratio_median=float(np.median(by_round)))
    report["notes"] = notes(report)
    if args.json:  # the measurements first: nothing after them may lose a run of minutes
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**report, "records": [dataclasses.asdict(r) for r in records]}, indent=1))
    text = markdown(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
