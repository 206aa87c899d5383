"""Soak: two supervised instances behind the router at 80% of their capacity, for minutes.

What it runs, as deployed: two ``instgenie serve`` processes (each its launcher,
tritonserver, three Python stubs and a codec worker) with disk tiers, and an
``instgenie router`` process in front. The offered load is ``--load`` times the fleet's
capacity measured by a burst through the router, as an open-loop Poisson stream of a
mix: good edits of the registered templates, bad requests (an undecodable mask, a mask
of the wrong size, a malformed template id), edits cancelled after their first step,
and registrations (idempotent: the templates already held). Every request runs through
the router with the blocking gRPC client.

It reports errors by kind (an expected error is the one its bad request must get, a
cancellation is expected of a cancelled edit; anything else is unexpected), every
process's RSS and open file descriptors at the start of the measured window and at
its end, and the /dev/shm entries. Goals: no unexpected error, RSS growth under 5%,
no growth in descriptors or shared memory. Writes ``docs/benchmarks/soak.md``.

    python bench/soak.py --minutes 10 --json out/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from conftest import png, rect_mask, template_image  # noqa: E402 - the tests' image helpers

from instgenie_client import InstGenIEClient, InstGenIEServerError, JobCancelled  # noqa: E402

KINDS = {"edit": 0.7, "bad": 0.1, "cancel": 0.1, "register": 0.1}
GOAL_RSS_GROWTH = 0.05
CLI = [sys.executable, "-c", "import sys; from instgenie.cli import main; sys.exit(main())"]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready in {timeout_s} s")
        time.sleep(0.2)


# -- the processes and their footprint ---------------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def role(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(argv).decode(errors="replace")
    if "triton_python_backend_stub" in text:
        return "stub " + Path(argv[1].decode()).parent.parent.name
    for marker, name in (("resource_tracker", "resource tracker"), ("spawn_main", "codec worker"),
                         ("tritonserver", "tritonserver"), (" router", "router"), (" serve", "launcher")):  # fmt: skip
        if marker in text:
            return name
    return Path(argv[0].decode(errors="replace")).name


def footprint(groups: dict[str, int]) -> dict[str, dict]:
    """``{group/role: {pid, rss_bytes, fds}}`` for every process of each group (by its root pid)."""
    found: dict[str, dict] = {}
    for group, root in groups.items():
        for pid in descendants(root):
            try:
                rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))  # fmt: skip
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, StopIteration):
                continue
            name = f"{group}/{role(pid)}"
            while name in found:
                name += "'"
            found[name] = {"pid": pid, "rss_bytes": rss, "fds": fds}
    return found


def shm_entries() -> list[str]:
    return sorted(os.listdir("/dev/shm"))


# -- the workload ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    result: str  # ok | expected:<reason> | unexpected:<reason>
    latency_s: float
    detail: str = ""
    started_at: float = 0.0  # time.monotonic() at the request's start


class Workload:
    def __init__(self, url: str, templates: list[str], images: list[bytes], steps: int, seed: int) -> None:
        self.url = url
        self.templates = templates
        self.images = images
        self.steps = steps
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def draw(self) -> tuple[str, int]:
        with self.lock:
            kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
            return kind, self.rng.randrange(1 << 30)

    def run(self, kind: str, seed: int) -> Outcome:
        rng = np.random.default_rng(seed)
        client = InstGenIEClient(self.url, timeout_s=300)
        template = self.templates[seed % len(self.templates)]
        mask = png(rect_mask(float(rng.uniform(0.05, 0.5)), seed=seed))
        started = time.monotonic()
        try:
            if kind == "edit":
                client.edit(mask, "a lamp", template_id=template)
            elif kind == "register":
                client.register_template(self.images[seed % len(self.images)], "a room", seed=1, steps=self.steps)
            elif kind == "cancel":
                with client.submit(mask, "a lamp", template_id=template) as job:
                    next(iter(job.progress), None)
                    job.cancel()
                    try:
                        job.result()
                    except JobCancelled:
                        return Outcome(kind, "expected:cancelled", time.monotonic() - started)
                    return Outcome(kind, "ok", time.monotonic() - started, "finished before the cancel")
            else:
                bad = seed % 3
                expected = ["invalid_mask", "invalid_mask", "unknown_template"][bad]
                try:
                    if bad == 0:
                        client.edit(b"not a png", "x", template_id=template)
                    elif bad == 1:
                        client.edit(png(rect_mask(0.2, size=64)), "x", template_id=template)
                    else:
                        client.edit(mask, "x", template_id="../../etc/passwd")
                except InstGenIEServerError as error:
                    result = f"expected:{error.reason}" if error.reason == expected else f"unexpected:{error.reason}"
                    return Outcome(kind, result, time.monotonic() - started, str(error)[:200])
                return Outcome(kind, "unexpected:accepted", time.monotonic() - started)
            return Outcome(kind, "ok", time.monotonic() - started)
        except InstGenIEServerError as error:
            return Outcome(kind, f"unexpected:{error.reason}", time.monotonic() - started, str(error)[:200])
        except Exception as error:  # noqa: BLE001 - every failure is counted, none stops the soak
            reason = getattr(error, "reason", type(error).__name__)
            return Outcome(kind, f"unexpected:{reason}", time.monotonic() - started, str(error)[:200])


def open_loop(workload: Workload, rate: float, seconds: float, seed: int) -> list[Outcome]:
    """Poisson arrivals at ``rate`` per second for ``seconds``; waits for every request."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(kind: str, request_seed: int) -> None:
        started_at = time.monotonic()
        outcome = workload.run(kind, request_seed)
        outcome.started_at = started_at - start
        with lock:
            outcomes.append(outcome)

    with ThreadPoolExecutor(128) as pool:
        start = time.monotonic()
        next_at = start
        while True:
            next_at += rng.expovariate(rate)
            if next_at - start > seconds:
                break
            time.sleep(max(0.0, next_at - time.monotonic()))
            pool.submit(one, *workload.draw())
    return outcomes


# -- the run -----------------------------------------------------------------------------------------


def start_fleet(args: argparse.Namespace, workdir: Path, model: Path) -> tuple[list[subprocess.Popen], subprocess.Popen, str, list[dict]]:
    """Two instances, instance i pinned to core i (as ``bench/routing.py`` does): two torch
    thread pools on two shared cores spin against each other and run several times slower."""
    launchers, specs, instances = [], [], []
    cores = sorted(os.sched_getaffinity(0))
    for index in range(2):
        http, grpc, metrics, health = free_ports(4)
        folder = workdir / f"instance{index}"
        folder.mkdir()
        command = CLI + ["serve", "--model", str(model), "--max-sequence-length", str(args.text_len),
                         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                         "--health-port", str(health), "--cache-dir", str(folder / "cache"),
                         "--log-file", str(folder / "triton.log")]  # fmt: skip
        log = (folder / "serve.out").open("w")
        core = {cores[index % len(cores)]}
        launchers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          preexec_fn=lambda core=core: os.sched_setaffinity(0, core)))  # fmt: skip
        specs.append(f"127.0.0.1:{grpc}:{http}:{metrics}")
        instances.append({"health": health, "http": http})
    for instance in instances:
        wait_http(f"http://127.0.0.1:{instance['health']}/ready", 300)
    http, grpc, metrics = free_ports(3)
    router_log = (workdir / "router.out").open("w")
    router = subprocess.Popen(CLI + ["router", "--instances", ",".join(specs), "--host", "127.0.0.1", "--grpc-port",
                                     str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)],
                              stdout=router_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    wait_http(f"http://127.0.0.1:{http}/v2/health/ready", 60)
    return launchers, router, f"127.0.0.1:{grpc}", instances


def stop(process: subprocess.Popen, timeout_s: float = 90) -> int:
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def summarize(outcomes: list[Outcome]) -> dict:
    by_kind = Counter(o.kind for o in outcomes)
    results = Counter(f"{o.kind}: {o.result}" for o in outcomes)
    unexpected = [asdict(o) for o in outcomes if o.result.startswith("unexpected")]
    edits = sorted(o.latency_s for o in outcomes if o.kind == "edit" and o.result == "ok")
    return {
        "requests": len(outcomes),
        "by_kind": dict(by_kind),
        "results": dict(sorted(results.items())),
        "unexpected": unexpected,
        "edit_p50_s": float(np.percentile(edits, 50)) if edits else None,
        "edit_p95_s": float(np.percentile(edits, 95)) if edits else None,
    }


def write_markdown(report: dict, path: Path) -> None:
    s = report["summary"]
    start, end = report["footprint_start"], report["footprint_end"]
    lines = [
        "# Soak: two supervised instances behind the router",
        "",
        f"`python bench/soak.py --minutes {report['minutes']:g}` on {report['machine']} "
        f"({report['cores']} cores), {report['date']}, commit {report['commit']}.",
        "",
        f"Tiny flux-fill model, {report['size']}x{report['size']}, {report['steps']} steps, {report['text_len']} text tokens. "
        f"Fleet capacity by a burst of {report['burst']} edits through the router: {report['capacity_rps']:.2f} req/s; "
        f"offered {report['load']:.0%} of it: {report['rate_rps']:.2f} req/s, Poisson, mix "
        + ", ".join(f"{k} {v:.0%}" for k, v in KINDS.items())
        + f". Measured window: {report['minutes']:g} min after a {report['warmup_s']:g} s warm-up at the same load.",
        "",
        "## Outcomes",
        "",
        "| kind: result | count |",
        "|---|---:|",
        *[f"| {name} | {count} |" for name, count in s["results"].items()],
        "",
        f"Requests: {s['requests']}. Unexpected errors: **{len(s['unexpected'])}** (goal 0). "
        f"Good edits: P50 {s['edit_p50_s']:.2f} s, P95 {s['edit_p95_s']:.2f} s.",
        "",
    ]
    if s["unexpected"]:
        lines += ["Unexpected:", ""] + [f"- {u['kind']}: {u['result']} {u['detail']}" for u in s["unexpected"][:20]] + [""]
    lines += [
        "## Footprint (start of the measured window -> end)",
        "",
        "| process | RSS start (MiB) | RSS end (MiB) | growth | fds start | fds end |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    worst = 0.0
    for name in sorted(set(start) | set(end)):
        a, b = start.get(name), end.get(name)
        if a is None or b is None or a["pid"] != b["pid"]:
            lines.append(f"| {name} | {'-' if a is None else round(a['rss_bytes'] / 2**20, 1)} | "
                         f"{'-' if b is None else round(b['rss_bytes'] / 2**20, 1)} | (not the same process) | | |")  # fmt: skip
            continue
        growth = b["rss_bytes"] / a["rss_bytes"] - 1
        worst = max(worst, growth)
        lines.append(f"| {name} | {a['rss_bytes'] / 2**20:.1f} | {b['rss_bytes'] / 2**20:.1f} | {growth:+.1%} | {a['fds']} | {b['fds']} |")
    total_a = sum(p["rss_bytes"] for p in start.values())
    total_b = sum(p["rss_bytes"] for p in end.values())
    fds_a, fds_b = sum(p["fds"] for p in start.values()), sum(p["fds"] for p in end.values())
    lines += [
        "",
        f"All processes: RSS {total_a / 2**20:.0f} -> {total_b / 2**20:.0f} MiB ({total_b / total_a - 1:+.1%}; "
        f"largest single growth {worst:+.1%}; goal < {GOAL_RSS_GROWTH:.0%}); open descriptors {fds_a} -> {fds_b}; "
        f"/dev/shm entries {len(report['shm_start'])} -> {len(report['shm_end'])}.",
        "",
        f"After the fleet stopped: /dev/shm entries {len(report['shm_after_stop'])} "
        f"(before it started: {len(report['shm_before'])}); exit statuses {report['exit_codes']}.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds at load before the measured window")
    parser.add_argument("--load", type=float, default=0.8, help="fraction of the measured capacity offered")
    parser.add_argument("--burst", type=int, default=16, help="edits sent at once to measure capacity")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "soak.md")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from instgenie.tiny import make_model

    workdir = Path(tempfile.mkdtemp(prefix="instgenie-soak-"))
    model = make_model("flux-fill", workdir / "model", size="tiny")
    shm_before = shm_entries()
    launchers, router, url, _ = start_fleet(args, workdir, model)
    exit_codes: list[int] = []
    try:
        client = InstGenIEClient(url, timeout_s=300)
        images = [png(template_image(100 + i, size=args.size)) for i in range(4)]
        templates = [client.register_template(image, "a room", seed=1, steps=args.steps) for image in images]
        workload = Workload(url, templates, images, args.steps, args.seed)
        started = time.monotonic()
        with ThreadPoolExecutor(args.burst) as pool:
            burst = list(pool.map(lambda i: workload.run("edit", i), range(args.burst)))
        capacity = args.burst / (time.monotonic() - started)
        assert all(o.result == "ok" for o in burst), [o for o in burst if o.result != "ok"]
        rate = args.load * capacity
        print(f"capacity {capacity:.2f} req/s; offering {rate:.2f} req/s", flush=True)
        open_loop(workload, rate, args.warmup, args.seed + 1)
        groups = {f"instance{i}": p.pid for i, p in enumerate(launchers)} | {"router": router.pid}
        footprint_start, shm_start = footprint(groups), shm_entries()
        outcomes = open_loop(workload, rate, args.minutes * 60, args.seed + 2)
        footprint_end, shm_end = footprint(groups), shm_entries()
    finally:
        exit_codes = [stop(router)] + [stop(p) for p in launchers]
    report = {
        "minutes": args.minutes, "warmup_s": args.warmup, "load": args.load, "burst": args.burst,
        "steps": args.steps, "size": args.size, "text_len": args.text_len,
        "capacity_rps": capacity, "rate_rps": rate, "summary": summarize(outcomes),
        "outcomes": [asdict(o) for o in sorted(outcomes, key=lambda o: o.started_at)],
        "footprint_start": footprint_start, "footprint_end": footprint_end,
        "shm_before": shm_before, "shm_start": shm_start, "shm_end": shm_end, "shm_after_stop": shm_entries(),
        "exit_codes": exit_codes, "machine": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
    }  # fmt: skip
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None)  # fmt: skip
    report["machine"] = cpu or report["machine"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(report, args.out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
    print(args.out.read_text())
    return 0 if not report["summary"]["unexpected"] else 1


if __name__ == "__main__":
    sys.exit(main())
