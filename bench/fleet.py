"""A discrete-event simulation of a fleet of InstGenIE instances behind the router.

Where the CPU cannot show what routing is worth (masked tokens are not most of a
request's cost on 2 cores), this simulates the fleet from measured and modelled
costs, with the router's own policy objects (``instgenie_router.policies``) making
every decision on the state they would see: the router's in-flight bookkeeping and
the instances' metrics as of the last scrape (every 0.5 s).

An instance is a step loop (continuous batching, FCFS admission up to
``max_active``): a step of the batch takes ``intercept + seconds per token-step x
(masked + text tokens of every active request)`` (the engine's linear cost model).
Each request is prepared (prompt and VAE encoding) before it joins and finished
(VAE decode, PNG) after it leaves, by the instance's codec. On a CPU instance pinned
to one core the codec's work takes the loop's core (run between steps); on a GPU
instance it runs on the host CPU beside the loop.

First the simulation reproduces the CPU routing benchmark (``bench/routing.py``) from
costs measured here on one core (``--calibrate``): the same workload, rate and
policies. Then it predicts the GPU regime (FLUX.1 at 1024x1024 on H100-class GPUs,
costs from the FLOP model in ``GPU_FLUX1``) over many seeds. Writes
``docs/benchmarks/fleet.md``.

    python bench/fleet.py --json out/fleet.json           # ~3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instgenie_router.instances import Instance, RequestCost
from instgenie_router.policies import POLICIES

sys.path.insert(0, str(Path(__file__).parent))
import workload as shared  # noqa: E402 - the serving benchmarks' workload
from routing import hot_templates  # noqa: E402 - the routing benchmark's template popularity

ROOT = Path(__file__).resolve().parents[1]
SCRAPE_INTERVAL_S = 0.5  # the router's default (RouterConfig.scrape_interval_s)
STALE_AFTER_S = 3.0  # the router's default (RouterConfig.stale_after_s)
log = logging.getLogger("bench.fleet")


@dataclass(frozen=True)
class InstanceModel:
    """What an instance's work costs, in seconds."""

    step_intercept_s: float  # per batched step, whatever its tokens
    token_step_s: float  # per computed token (masked image tokens + text tokens) per step
    text_tokens: int
    image_tokens: int
    prepare_s: float  # prompt + VAE encoding of one request
    finish_s: float  # VAE decode + paste + PNG of one request
    codec_shares_core: bool  # the codec's work runs on the loop's core (a CPU instance)
    max_active: int = 8
    source: str = ""

    def step_s(self, computed_tokens: list[int]) -> float:
        return self.step_intercept_s + self.token_step_s * sum(t + self.text_tokens for t in computed_tokens)


#: FLUX.1 (12B) at 1024x1024 (4096 image tokens), 512 text tokens, bf16 on an H100-class
#: GPU: 2 x 12e9 FLOPs per token through the linear layers plus attention over 4608 keys
#: (4 x 4608 x 3072 x 57 blocks) per token, at ~600 TFLOP/s sustained: ~45 us a
#: token-step, so a full step (4608 tokens) is ~0.21 s, as measured for FLUX.1-dev
#: (28 steps in ~6 s). Intercept: ~1,100 kernel launches a step at ~5 us. Codec on the
#: host beside the GPU: T5-XXL + CLIP + VAE encode ~0.06 s, VAE decode + PNG ~0.15 s.
GPU_FLUX1 = InstanceModel(
    step_intercept_s=0.006, token_step_s=45e-6, text_tokens=512, image_tokens=4096,
    prepare_s=0.06, finish_s=0.15, codec_shares_core=False, source="FLOP model (see GPU_FLUX1)",
)  # fmt: skip


# -- one instance ---------------------------------------------------------------------------------


@dataclass
class SimRequest:
    index: int
    key: str
    template_id: str
    tokens: int
    steps: int
    arrival: float
    instance: int = -1
    remaining: int = 0
    done_at: float | None = None


@dataclass
class SimInstance:
    """One step loop and its codec, with the counters its metrics endpoint would show."""

    model: InstanceModel
    preparing: deque = field(default_factory=deque)  # codec queue: ("prepare" | "finish", request)
    ready: deque = field(default_factory=deque)
    active: list = field(default_factory=list)
    busy_until: float = 0.0  # the loop (and, sharing the core, the codec)
    codec_busy_until: float = 0.0
    counters: dict = field(default_factory=lambda: dict.fromkeys(
        ("instgenie_computed_row_tokens_total", "instgenie_request_steps_total", "instgenie_step_duration_seconds_sum"), 0.0))  # fmt: skip

    def metrics(self) -> dict[str, float]:
        waiting = list(self.ready) + [r for kind, r in self.preparing if kind == "prepare"]
        return {
            **self.counters,
            "instgenie_active_requests": float(len(self.active)),
            "instgenie_waiting_requests": float(len(waiting)),
            "instgenie_text_tokens": float(self.model.text_tokens),
        }

    def outstanding_token_steps(self) -> float:
        return float(sum(r.tokens * r.remaining for r in [*self.ready, *self.active]))


class Fleet:
    """Instances, the router's view of them, and the event loop."""

    def __init__(self, models: list[InstanceModel], policy: str) -> None:
        self.instances = [SimInstance(m) for m in models]
        self.views = [Instance("10.0.0.1", 8001 + 3 * i, 8000 + 3 * i, 8002 + 3 * i) for i in range(len(models))]
        self.policy = POLICIES[policy]()
        self.now = 0.0
        self._events: list[tuple[float, int, str, Any]] = []
        self._order = itertools.count()
        self._scraped_at = [-1e9] * len(models)
        self._sent_at: dict[str, float] = {}

    def _at(self, when: float, kind: str, payload: Any) -> None:
        heapq.heappush(self._events, (when, next(self._order), kind, payload))

    def run(self, requests: list[SimRequest]) -> list[SimRequest]:
        for request in requests:
            self._at(request.arrival, "arrive", request)
        self._at(0.0, "scrape", None)
        pending = len(requests)
        while pending:
            self.now, _, kind, payload = heapq.heappop(self._events)
            if kind == "arrive":
                self._route(payload)
            elif kind == "scrape":
                self._scrape()
                self._at(self.now + SCRAPE_INTERVAL_S, "scrape", None)
            elif kind == "codec":
                index, request, what = payload
                self._codec_done(index, request, what)
                pending -= what == "finish"
            elif kind == "step":
                self._step_done(payload)
        return requests

    # -- the router ---------------------------------------------------------------------------
    def _scrape(self) -> None:
        for index, (instance, view) in enumerate(zip(self.instances, self.views)):
            view.scraped = instance.metrics()
            view.scraped_token_steps = instance.outstanding_token_steps()
            self._scraped_at[index] = self.now

    def _route(self, request: SimRequest) -> None:
        mono = time.monotonic()  # the policies read time.monotonic(): map simulated times onto it
        for index, view in enumerate(self.views):
            view.scraped_at = mono - (self.now - self._scraped_at[index])
            view.sent_at = {key: mono - (self.now - self._sent_at[key]) for key in view.in_flight}
        cost = RequestCost(float(max(request.tokens, 1) * request.steps), request.template_id, request.steps)
        chosen = self.policy.choose(self.views, cost, STALE_AFTER_S)
        index = self.views.index(chosen)
        chosen.in_flight[request.key] = cost
        chosen.remember(request.template_id)
        self._sent_at[request.key] = self.now
        request.instance = index
        self.instances[index].preparing.append(("prepare", request))
        self._kick(index)

    # -- an instance ---------------------------------------------------------------------------
    def _kick(self, index: int) -> None:
        """Start whatever the instance's idle servers can start now."""
        instance, model = self.instances[index], self.instances[index].model
        if model.codec_shares_core:
            if self.now < instance.busy_until:
                return
            if instance.preparing:  # the codec's work first, between steps
                what, request = instance.preparing.popleft()
                instance.busy_until = self.now + (model.prepare_s if what == "prepare" else model.finish_s)
                self._at(instance.busy_until, "codec", (index, request, what))
                return
        elif instance.preparing and self.now >= instance.codec_busy_until:
            what, request = instance.preparing.popleft()
            instance.codec_busy_until = self.now + (model.prepare_s if what == "prepare" else model.finish_s)
            self._at(instance.codec_busy_until, "codec", (index, request, what))
        if self.now >= instance.busy_until and (instance.active or instance.ready):
            while instance.ready and len(instance.active) < model.max_active:
                instance.active.append(instance.ready.popleft())
            duration = model.step_s([r.tokens for r in instance.active])
            instance.busy_until = self.now + duration
            counters = instance.counters
            counters["instgenie_computed_row_tokens_total"] += sum(r.tokens for r in instance.active)
            counters["instgenie_request_steps_total"] += len(instance.active)
            counters["instgenie_step_duration_seconds_sum"] += duration
            self._at(instance.busy_until, "step", index)

    def _codec_done(self, index: int, request: SimRequest, what: str) -> None:
        instance = self.instances[index]
        if what == "prepare":
            request.remaining = request.steps
            instance.ready.append(request)
        else:
            request.done_at = self.now
            self.views[index].in_flight.pop(request.key, None)
            self._sent_at.pop(request.key, None)
        self._kick(index)

    def _step_done(self, index: int) -> None:
        instance = self.instances[index]
        still = []
        for request in instance.active:
            request.remaining -= 1
            if request.remaining == 0:
                instance.preparing.append(("finish", request))
            else:
                still.append(request)
        instance.active = still
        self._kick(index)


# -- workloads and runs -----------------------------------------------------------------------------


def sim_requests(workload: list[shared.Request], templates: list[str], steps: int, image_tokens: int, rate: float) -> list[SimRequest]:
    return [
        SimRequest(r.index, f"r{r.index}", templates[r.template], max(1, round(r.mask_ratio * image_tokens)), steps, r.arrival / rate)
        for r in workload
    ]


def simulate(models: list[InstanceModel], policy: str, requests: list[SimRequest]) -> dict:
    done = Fleet(models, policy).run([dataclasses.replace(r) for r in requests])
    latencies = np.array([r.done_at - r.arrival for r in done])  # type: ignore[operator]
    span = max(r.done_at for r in done) - min(r.arrival for r in done)  # type: ignore[type-var]
    return {
        "policy": policy,
        "p50_s": float(np.percentile(latencies, 50)),
        "p95_s": float(np.percentile(latencies, 95)),
        "mean_s": float(latencies.mean()),
        "throughput": len(done) / span,
        "routed": [sum(r.instance == i for r in done) for i in range(len(models))],
        "token_steps": [sum(r.tokens * r.steps for r in done if r.instance == i) for i in range(len(models))],
    }


def capacity(models: list[InstanceModel], requests: list[SimRequest]) -> float:
    """Requests per second of a burst (all at once) through ``least_requests``, as the routing bench measures it."""
    burst = [dataclasses.replace(r, arrival=0.0) for r in requests]
    return simulate(models, "least_requests", burst)["throughput"]


def scenario(model: InstanceModel, instances: int, steps: int, requests: int, templates: int, zipf: float,
             load: float, seed: int, trace: np.ndarray, policies: list[str], rate: float | None = None) -> dict:  # fmt: skip
    """One workload (the routing bench's recipe at ``seed``) through every policy."""
    size = int(round((model.image_tokens) ** 0.5)) * shared.GRID
    names = [f"tpl-{i:020d}" for i in range(templates)]
    burst_work = hot_templates(shared.make_workload(24, size, trace, templates, seed + 1), templates, zipf, seed + 1)
    work = hot_templates(shared.make_workload(requests, size, trace, templates, seed), templates, zipf, seed)
    models = [model] * instances
    if rate is None:
        rate = load * capacity(models, sim_requests(burst_work, names, steps, model.image_tokens, 1.0))
    sims = sim_requests(work, names, steps, model.image_tokens, rate)
    return {"rate": rate, "seed": seed, "policies": {p: simulate(models, p, sims) for p in policies}}


# -- calibration on this machine ----------------------------------------------------------------


def calibrate(model_dir: Path, size: int, text_len: int, steps: int, repeats: int) -> InstanceModel:
    """One pinned CPU instance's costs, measured here with one intra-op thread: step time
    vs computed tokens (masked steps at several mask sizes and a full one, fitted), and
    the codec's prepare and finish of an edit."""
    import torch

    from instgenie import Engine
    from sample_inputs import sample_template

    torch.set_num_threads(1)
    engine = Engine.from_pretrained(str(model_dir), max_sequence_length=text_len)
    rng = np.random.default_rng(0)
    record = engine.register_template(shared.png(sample_template(size, seed=3000)), "a room", seed=1, steps=steps)
    tokens, seconds, prepare, finish = [], [], [], []
    for ratio in (0.05, 0.2, 0.4, 0.6, 1.0):
        mask, _ = shared.rect_mask(size, ratio, rng)
        for _ in range(repeats):
            started = time.perf_counter()
            state = engine.prepare_edit(mask, "a red hat", template_id=record.template_id, full_compute=ratio >= 1.0)
            prepare.append(time.perf_counter() - started)
            try:
                engine.step([state])  # warm-up step, not timed
                started = time.perf_counter()
                engine.run([state])
                seconds.append((time.perf_counter() - started) / max(1, state.total_steps - 1))
                tokens.append(state.computed_tokens)
                started = time.perf_counter()
                engine.finish_edit(state)
                finish.append(time.perf_counter() - started)
            finally:
                engine.release(state)
    slope, intercept = np.polyfit(np.array(tokens, float), np.array(seconds), 1)
    text_tokens = int(engine.family.text_tokens(text_len))
    # The fit is over image tokens; the text tokens' share is the same slope times their count.
    intercept -= slope * text_tokens
    return InstanceModel(
        step_intercept_s=float(max(intercept, 0.0)), token_step_s=float(slope), text_tokens=text_tokens,
        image_tokens=(size // shared.GRID) ** 2, prepare_s=float(np.median(prepare)), finish_s=float(np.median(finish)),
        codec_shares_core=True, source=f"measured here, one thread, {size} px, {text_len} text tokens",
    )  # fmt: skip


# -- report -------------------------------------------------------------------------------------


def ratio_stats(runs: list[dict]) -> dict:
    ratios = [r["policies"]["mask_aware"]["p95_s"] / r["policies"]["least_requests"]["p95_s"] for r in runs]
    return {"median": float(np.median(ratios)), "p25": float(np.percentile(ratios, 25)), "p75": float(np.percentile(ratios, 75)), "runs": len(ratios)}


def reproduce(measured_path: Path, args: argparse.Namespace, trace: np.ndarray) -> dict:
    """The measured routing run's setup through the simulation, with costs calibrated here."""
    measured = json.loads(measured_path.read_text())
    config = measured["config"]
    model_dir = shared.build_model(config["model_size"], config.get("model"))
    cpu = calibrate(model_dir, config["size"], config["text_len"], config["steps"], args.repeats)
    cpu = dataclasses.replace(cpu, max_active=config["max_active"])
    log.info("calibrated: %s", cpu)
    policies = [p for p in config["policies"] if p in POLICIES]
    run = scenario(cpu, config["instances"], config["steps"], config["requests"], config["templates"], config["zipf"],
                   config["load"], config["seed"], trace, policies, rate=measured["rate"])  # fmt: skip
    seeds = [scenario(cpu, config["instances"], config["steps"], config["requests"], config["templates"], config["zipf"],
                      config["load"], seed, trace, policies, rate=measured["rate"]) for seed in range(args.seeds)]  # fmt: skip
    return {
        "source": str(measured_path.relative_to(ROOT)) if measured_path.is_relative_to(ROOT) else str(measured_path), "config": {k: config[k] for k in ("instances", "size", "steps", "requests", "text_len", "load")},
        "rate": measured["rate"], "model": dataclasses.asdict(cpu),
        "measured": {s["policy"]: {k: s.get(k) for k in ("p50_s", "p95_s", "mean_s", "throughput")} for s in measured["summaries"]},
        "measured_ratio_by_round": measured.get("headline", {}).get("p95_ratio_by_round"),
        "simulated": run["policies"], "seeds": ratio_stats(seeds),
    }  # fmt: skip


def predict(args: argparse.Namespace, trace: np.ndarray) -> list[dict]:
    rows = []
    policies = ["least_requests", "mask_aware", "round_robin"]
    for instances in args.gpu_instances:
        for load in args.loads:
            runs = [scenario(GPU_FLUX1, instances, args.gpu_steps, args.requests, args.templates, args.zipf, load, seed, trace, policies)
                    for seed in range(args.seeds)]  # fmt: skip
            p95 = {p: float(np.median([r["policies"][p]["p95_s"] for r in runs])) for p in policies}
            rows.append({"instances": instances, "load": load, "rate": float(np.median([r["rate"] for r in runs])),
                         "p95_median_s": p95, "ratio": ratio_stats(runs)})  # fmt: skip
            log.info("GPU %d instances, load %.1f: mask_aware / least_requests P95 %.3f", instances, load, rows[-1]["ratio"]["median"])
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# Fleet simulation: routing where masks matter",
        "",
        f"`python bench/fleet.py {' '.join(report['argv'])}`, code {report['code']}, {report['finished_at']}. Generated by "
        "the script; do not edit by hand. A discrete-event simulation of instances (step loops with continuous "
        "batching, FCFS admission, a codec) behind the router's own policy objects, which see what the real router sees: "
        f"its in-flight bookkeeping and the instances' metrics as of the last scrape ({SCRAPE_INTERVAL_S} s). "
        "See the module doc of `bench/fleet.py` for the model.",
        "",
    ]
    for item in report["reproduced"]:
        cfg, model = item["config"], item["model"]
        lines += [
            f"## 1. Reproducing the measured CPU run ({cfg['size']}x{cfg['size']}, {cfg['instances']} instances)",
            "",
            f"Measured: `{item['source']}` (`bench/routing.py`, {cfg['requests']} requests at {item['rate']:.3f} req/s, "
            f"{cfg['steps']} steps). Costs calibrated here on one thread: step = {model['step_intercept_s'] * 1e3:.1f} ms + "
            f"{model['token_step_s'] * 1e6:.1f} us x computed tokens ({model['text_tokens']} text tokens each); prepare "
            f"{model['prepare_s']:.3f} s, finish {model['finish_s']:.3f} s on the loop's core.",
            "",
            "| policy | measured P50 (s) | simulated P50 (s) | measured P95 (s) | simulated P95 (s) | measured throughput | simulated |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for policy, sim in item["simulated"].items():
            real = item["measured"].get(policy, {})
            lines.append(
                f"| `{policy}` | {fmt(real.get('p50_s'))} | {fmt(sim['p50_s'])} | {fmt(real.get('p95_s'))} | {fmt(sim['p95_s'])} "
                f"| {fmt(real.get('throughput'), 3)} | {fmt(sim['throughput'], 3)} |"
            )
        real = item["measured"]
        measured_ratio = real["mask_aware"]["p95_s"] / real["least_requests"]["p95_s"] if "mask_aware" in real and "least_requests" in real else None
        sim_ratio = item["simulated"]["mask_aware"]["p95_s"] / item["simulated"]["least_requests"]["p95_s"]
        seeds = item["seeds"]
        lines += [
            "",
            f"`mask_aware` / `least_requests` P95: measured {fmt(measured_ratio, 3)}"
            + (f" (per round {', '.join(f'{r:.2f}' for r in item['measured_ratio_by_round'])})" if item.get("measured_ratio_by_round") else "")
            + f", simulated {sim_ratio:.3f} on the same workload; over {seeds['runs']} other workload seeds at the same "
            f"rate the simulated ratio's median is {seeds['median']:.3f} (interquartile {seeds['p25']:.3f}-{seeds['p75']:.3f}).",
            "",
        ]
    gpu = report["gpu_model"]
    lines += [
        "## 2. Predicting the GPU regime",
        "",
        f"FLUX.1 at 1024x1024 ({gpu['image_tokens']} image tokens, {gpu['text_tokens']} text tokens), "
        f"{report['config']['gpu_steps']} steps, instances modelled from the FLOP count ({gpu['source']}): step = "
        f"{gpu['step_intercept_s'] * 1e3:.0f} ms + {gpu['token_step_s'] * 1e6:.0f} us x computed tokens, codec beside the GPU "
        f"(prepare {gpu['prepare_s']:.2f} s, finish {gpu['finish_s']:.2f} s), caches resident or loaded without a "
        f"bubble. Workload: the routing bench's recipe ({report['config']['requests']} requests, trace mask ratios, "
        f"{report['config']['templates']} templates, Zipf({report['config']['zipf']})), Poisson arrivals at the given "
        f"fraction of the fleet's burst capacity; {report['config']['seeds']} workload seeds per row (medians).",
        "",
        "| instances | load | rate (req/s) | P95 `least_requests` (s) | P95 `mask_aware` (s) | P95 `round_robin` (s) | mask_aware / least_requests P95, median (IQR) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["gpu"]:
        p95, ratio = row["p95_median_s"], row["ratio"]
        lines.append(
            f"| {row['instances']} | {row['load']:.0%} | {row['rate']:.2f} | {p95['least_requests']:.2f} | {p95['mask_aware']:.2f} | "
            f"{p95['round_robin']:.2f} | **{ratio['median']:.3f}** ({ratio['p25']:.3f}-{ratio['p75']:.3f}) |"
        )
    lines += [
        "",
        "Goal (issue 15): `mask_aware` P95 at least 30% below `least_requests` (published: 26%). A ratio of 0.70 or less "
        "meets it.",
        "",
        "## Limits of the model",
        "",
        "- A step's time is linear in its computed tokens: no GPU batching gain below saturation (at 4,600+ tokens a "
        "FLUX.1 step is compute-bound), no padding between rows of one call.",
        "- Template caches are assumed in host memory and loaded without a bubble (the loading pipeline's goal); a cold "
        "template costs nothing extra here.",
        "- The CPU model runs the codec's work between steps on the loop's core; the real codec process runs at a lower "
        "priority beside the loop, so the order of work differs while the total does not.",
        "",
    ]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measured", nargs="*", default=["out/routing.json"], help="routing bench JSON files to reproduce")
    parser.add_argument("--repeats", type=int, default=2, help="calibration repeats per mask size")
    parser.add_argument("--seeds", type=int, default=20, help="workload seeds per simulated row")
    parser.add_argument("--gpu-instances", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8])
    parser.add_argument("--loads", type=lambda s: [float(x) for x in s.split(",")], default=[0.7, 0.8, 0.9])
    parser.add_argument("--gpu-steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--templates", type=int, default=6)
    parser.add_argument("--zipf", type=float, default=1.2)
    parser.add_argument("--json", help="write the report's data here")
    parser.add_argument("--out", default=str(ROOT / "docs/benchmarks/fleet.md"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    trace = shared.read_trace(shared.TRACE)
    report = {
        "argv": raw_argv, "code": shared.git_state(), "finished_at": "",
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "out")},
        "reproduced": [reproduce(ROOT / path, args, trace) for path in args.measured if (ROOT / path).is_file()],
        "gpu_model": dataclasses.asdict(GPU_FLUX1),
        "gpu": predict(args, trace),
    }  # fmt: skip
    report["finished_at"] = time.strftime("%Y-%m-%d %H:%M")
    text = markdown(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
