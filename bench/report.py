"""The serving benchmarks' report: figures, SLO rates, ratios, the plot and the
markdown page under ``docs/benchmarks/`` (shared by :mod:`serving` and :mod:`routing`).
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from workload import GRID  # noqa: E402

SYSTEMS = ("baseline", "full", "instgenie")
LABELS = {
    "baseline": "diffusers baseline (dynamic batching)",
    "full": "full computation + continuous batching",
    "instgenie": "InstGenIE (mask-aware + continuous batching)",
}
# Goals of the project (docs/shared design: up to 3x throughput, 14.7x lower mean latency published).
GOAL_THROUGHPUT = 2.5
GOAL_MEAN_LATENCY = 10.0
# Goals of the serving path (issue 15): it costs no more than the engine saves.
GOAL_SERVING_OVERHEAD = 1.05  # served unloaded latency over its in-process / baseline counterpart, at most
GOAL_CAPACITY_SHARE = 0.95  # served capacity ratio over the in-process speed-up, at least
GOAL_SERVING_THROUGHPUT = 2.0  # throughput at equal P95 (declared SLO) over the baseline's, at least
IN_PROCESS_LABELS = {
    "engine": "engine, masked edit (in process)",
    "engine_full": "engine, full computation (in process)",
    "stock": "stock diffusers pipeline (in process)",
}




def rate_at_slo(points: list[tuple[float, float, float]], slo: float) -> tuple[float | None, str]:
    """The throughput a system sustains with its P95 latency at ``slo``.

    ``points`` are (offered rate, achieved throughput, P95), one per measured rate. Walking
    up the offered rates, the first run over the SLO and the one before it bracket the
    answer: the achieved throughput is interpolated between them at the SLO (in log P95).
    Achieved, not offered: an overloaded finite run keeps a bounded P95 while completing
    far fewer requests than offered. Returns (throughput, qualifier): ``"="`` interpolated,
    ``">="`` never over the SLO (the highest run's throughput is a lower bound), ``"<"``
    over it already at the lowest rate.
    """
    points = sorted(points)
    if not points:
        return None, "?"
    if points[0][2] > slo:
        return points[0][1], "<"
    for (_, x0, p0), (_, x1, p1) in itertools.pairwise(points):
        if p1 > slo:
            fraction = (math.log(slo) - math.log(p0)) / (math.log(p1) - math.log(p0)) if p1 != p0 else 0.0
            return x0 + fraction * (x1 - x0), "="
    return points[-1][1], ">="


def ratio_text(numerator: tuple[float | None, str], denominator: tuple[float | None, str]) -> tuple[float | None, str]:
    """numerator / denominator with the direction the bounds allow ('' exact, '>=' lower bound, ...)."""
    (n, nq), (d, dq) = numerator, denominator
    if n is None or d is None or nq == "<" or dq == "<":
        return None, "n/a"
    value = n / d
    lower = nq == ">=" or dq == "<"
    upper = dq == ">="
    if lower and upper:
        return value, "?"
    return value, ">=" if lower else "<=" if upper else ""


# -- report -------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def bounded(value: float | None, qualifier: str, digits: int = 2, suffix: str = "") -> str:
    """A value with its bound qualifier ('>= 0.42', '< 0.24'); 'n/a' when undefined."""
    if value is None or qualifier in ("n/a", "?"):
        return "n/a"
    prefix = "" if qualifier in ("", "=") else qualifier + " "
    return f"{prefix}{value:.{digits}f}{suffix}"


def plot(summaries: list[dict], slos: list[tuple[float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = {"baseline": "tab:red", "full": "tab:orange", "instgenie": "tab:blue"}
    for system in SYSTEMS:
        rows = sorted((s for s in summaries if s["system"] == system and s.get("mean_s")), key=lambda s: s["rate"])
        if not rows:
            continue
        rates = [s["rate"] for s in rows]
        ax.plot(rates, [s["mean_s"] for s in rows], "o-", color=colours[system], label=f"{system}: mean")
        ax.plot(rates, [s["p95_s"] for s in rows], "s--", color=colours[system], alpha=0.7, label=f"{system}: P95")
    for factor, slo in slos:
        ax.axhline(slo, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"{factor:g}x unloaded baseline", (ax.get_xlim()[0], slo), fontsize=7, color="grey", va="bottom")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("latency (s)")
    ax.set_title("Latency vs offered rate (same Poisson workload for every system)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def headline(summaries: list[dict], unloaded: dict, slo_factors: list[float]) -> dict:
    """The derived ratios: throughput at equal P95 (per SLO) and mean latency at and above saturation."""
    # Runs that other engineers' jobs disturbed (and that no repeat could replace) are left out.
    by = {system: {s["rate"]: s for s in summaries if s["system"] == system and not s.get("disturbed")} for system in SYSTEMS}
    slos = []
    for factor in slo_factors:
        slo = factor * unloaded["baseline"]["mean_s"]
        at_slo = {}
        for system in SYSTEMS:
            # A run with errors counts as over any SLO.
            points = [
                (rate, s.get("throughput") or 0.0, s["p95_s"] if s.get("p95_s") and not s["errors"] else 1e12)
                for rate, s in by[system].items()
            ]
            at_slo[system] = rate_at_slo(points, slo)
        slos.append(
            {
                "factor": factor,
                "slo_s": slo,
                "rate_at_slo": at_slo,
                "throughput_instgenie": ratio_text(at_slo["instgenie"], at_slo["baseline"]),
                "throughput_full": ratio_text(at_slo["full"], at_slo["baseline"]),
            }
        )
    # Saturated: the baseline completes clearly fewer requests per second than arrive (its queue grows).
    saturated = sorted(rate for rate, s in by["baseline"].items() if (s.get("throughput") or 0.0) < 0.9 * rate)
    saturation = saturated[0] if saturated else max(by["baseline"], default=None)
    by_rate = []
    for rate in sorted(by["baseline"]):
        if rate < saturation:
            continue
        row: dict[str, Any] = {"rate": rate, "baseline_mean_s": by["baseline"][rate].get("mean_s")}
        for system in ("full", "instgenie"):
            mean = by[system].get(rate, {}).get("mean_s")
            row[f"{system}_mean_s"] = mean
            row[f"ratio_{system}"] = row["baseline_mean_s"] / mean if mean and row["baseline_mean_s"] else None
        by_rate.append(row)
    at_saturation = by_rate[0] if by_rate else {}
    return {
        "slos": slos,
        "saturation_rate": saturation,
        "baseline_saturated": bool(saturated),
        "baseline_max_throughput": max((s.get("throughput") or 0.0) for s in by["baseline"].values()),
        "max_throughput": {
            system: max((s.get("throughput") or 0.0 for s in by[system].values() if not s["errors"]), default=0.0)
            for system in SYSTEMS
        },
        "latency_by_rate": by_rate,
        "latency_instgenie": at_saturation.get("ratio_instgenie"),
        "latency_full": at_saturation.get("ratio_full"),
    }


def met(value: float | None, qualifier: str, goal: float) -> str:
    if value is None or qualifier in ("n/a", "?"):
        return "not measurable"
    if qualifier == "<=":
        return "no" if value < goal else "unknown (upper bound)"
    if qualifier == ">=":
        return "yes" if value >= goal else "unknown (lower bound)"
    return "yes" if value >= goal else "no"


def met_goal(value: float | None, qualifier: str, goal: tuple[str, float]) -> str:
    """``goal`` = ("<=", bound) or (">=", bound)."""
    direction, bound = goal
    if direction == ">=":
        return met(value, qualifier, bound)
    if value is None or qualifier in ("n/a", "?"):
        return "not measurable"
    return "yes" if value <= bound else "no"


def serving_path_goals(report: dict) -> list[tuple[tuple[str, float], float | None, str, str]]:
    """The serving path's goals: (goal, measured, qualifier, text) per row."""
    unloaded, head = report["unloaded"], report["headline"]
    primary = next(s for s in head["slos"] if s["factor"] == report["config"]["slo_factor"])
    mean = {system: u.get("mean_s") for system, u in unloaded.items()}

    def over(a: str, b: str) -> float | None:
        return mean[a] / mean[b] if mean.get(a) and mean.get(b) else None

    rows: list[tuple[tuple[str, float], float | None, str, str]] = [
        (("<=", GOAL_SERVING_OVERHEAD), over("full", "baseline"), "",
         f"unloaded latency: full / baseline <= {GOAL_SERVING_OVERHEAD:g}x"),
    ]  # fmt: skip
    if "engine" in mean:
        rows.append((("<=", GOAL_SERVING_OVERHEAD), over("instgenie", "engine"), "",
                     f"unloaded latency: instgenie / the in-process engine's edit <= {GOAL_SERVING_OVERHEAD:g}x"))  # fmt: skip
    in_process, peak = report.get("in_process"), head["max_throughput"]
    if in_process and peak.get("baseline"):
        share = peak["instgenie"] / peak["baseline"] / in_process["speedup"]
        rows.append(((">=", GOAL_CAPACITY_SHARE), share, "",
                     f"capacity: instgenie / baseline over the in-process speed-up ({in_process['speedup']:.2f}x at mask "
                     f"ratio {in_process['mask_ratio']:.3f}) >= {GOAL_CAPACITY_SHARE:g}"))  # fmt: skip
    value, qualifier = primary["throughput_instgenie"]
    rows.append(((">=", GOAL_SERVING_THROUGHPUT), value, qualifier,
                 f"throughput at equal P95 >= {GOAL_SERVING_THROUGHPUT:g}x the baseline (declared SLO; the serving path's goal)"))  # fmt: skip
    return rows


def serving_path_lines(report: dict) -> list[str]:
    """Where an unloaded request's time went: the step loop's phases and the rest, next to
    the same work in process."""
    unloaded = report["unloaded"]
    served = [s for s in ("full", "instgenie") if unloaded.get(s, {}).get("timeline_mean_s")]
    if not served:
        return []
    phases = list(unloaded[served[0]]["timeline_mean_s"])
    lines = [
        "",
        "Where an unloaded request's time went, from the `TIMELINE` the server returns (means, seconds): the step "
        "loop's phases (prepare = waiting for a helper, decoding, prompt and VAE encoding in the codec process; "
        "admission = waiting to join the batch; steps; finish = VAE decode, paste, PNG) and the rest of the serving "
        "path (gRPC, Triton, the stub, the client).",
        "",
        "| system | " + " | ".join(phases) + " | latency | in process | served / in process |",
        "|---|" + "---:|" * (len(phases) + 3),
    ]
    counterpart = {"full": "engine_full", "instgenie": "engine"}
    for system in served:
        u = unloaded[system]
        local = unloaded.get(counterpart[system], {}).get("mean_s")
        ratio = u["mean_s"] / local if local else None
        lines.append(
            f"| {system} | " + " | ".join(fmt(u["timeline_mean_s"].get(p), 3) for p in phases)
            + f" | {fmt(u['mean_s'], 3)} | {fmt(local, 3)} | {bounded(ratio, '', digits=3, suffix='x')} |"
        )
    if unloaded.get("stock", {}).get("mean_s") and unloaded.get("baseline", {}).get("mean_s"):
        lines += [
            "",
            f"The baseline model served takes {unloaded['baseline']['mean_s'] / unloaded['stock']['mean_s']:.3f}x the "
            "stock pipeline's call in process.",
        ]
    return lines


def write_markdown(report: dict, path: Path, png_path: Path) -> str:
    cfg, env, head = report["config"], report["environment"], report["headline"]
    unloaded = report["unloaded"]
    primary = next(s for s in head["slos"] if s["factor"] == cfg["slo_factor"])
    lines = [
        "# Serving: InstGenIE vs the diffusers baseline on Triton",
        "",
        f"Written by `bench/serving.py` ({'quick smoke run, not a result' if cfg['quick'] else 'default settings'}); "
        "raw per-request records in the `--json` file. All numbers come from one run on one server, systems measured "
        "back to back on the same workload"
        + (", except the runs marked re-measured (see below the results table)." if report.get("redos") else "."),
        "",
        "## Setup",
        "",
        f"- One `tritonserver` ({env['tritonserver']}) serving `diffusers_baseline`, `instgenie_edit` "
        f"(and `instgenie_edit_sync`) over the same model folder: flux-fill `{cfg['model_size']}` (random weights, real "
        f"architecture), {cfg['size']}x{cfg['size']} images ({(cfg['size'] // GRID) ** 2} image tokens), "
        f"`max_sequence_length={cfg['text_len']}`, {cfg['steps']} denoising steps, fp32 on CPU.",
        f"- Machine: {env['cpus']} CPU cores ({env['machine']}), torch {env['torch']}, Python {env['python']}; "
        f"load average before / after: {env['load_before']} / {env['load_after']}. The bench client runs on the same cores. "
        f"Code: {env.get('git', 'unknown')} ("
        + "".join(f"`{item}`, " for item in cfg.get("parameters", []))
        + "`instgenie_edit` config defaults otherwise, e.g. its codec process for prompt/VAE work).",
        f"- `instgenie_edit`: `max_active={cfg['max_active']}`, `max_waiting={cfg['max_waiting']}` (never full here). "
        "`diffusers_baseline`: Triton dynamic batcher, `max_batch_size` 8, one instance.",
        "- Systems: **baseline** = `diffusers_baseline` (template IMAGE + mask, the template's SEED and STEPS); "
        "**full** = `instgenie_edit` with `FULL_COMPUTE=True` (continuous batching, every token computed); "
        "**instgenie** = `instgenie_edit` with `TEMPLATE_ID` (continuous batching + mask-aware compute).",
        f"- Workload: {cfg['templates']} templates registered once ({cfg['steps']} steps each); per run "
        f"{cfg['requests']} requests with Poisson arrivals (seed {cfg['seed']}), each a random template, prompt and "
        f"mask. Mask ratios: stratified sample of `bench/data/mask_ratios.csv` (trace-like Beta(1.3, 5.5) clipped to "
        f"[0.02, 0.6], trace mean {report['workload']['trace_mean']:.3f}); this workload's mean "
        f"{report['workload']['mean_mask_ratio']:.3f} (min {report['workload']['min_mask_ratio']:.3f}, "
        f"max {report['workload']['max_mask_ratio']:.3f}); rectangles on the 16-px token grid at random positions. "
        "The identical request list and arrival pattern (scaled by 1/rate) is replayed for every system and rate.",
        "- Latency = client send to final response. Time to first step (TTFS) = send to the first progress response "
        "(`PROGRESS=True`); **the baseline streams no steps, so its time to first step is its completion time**. "
        "After last step = last progress response to final response (VAE decode, paste, PNG, send). "
        "Throughput = completed / (last completion - first send). Between runs the bench waits until "
        "`instgenie_active_requests` and `instgenie_waiting_requests` are 0.",
        "",
        "## Unloaded latency (sequential requests)",
        "",
        "| system | mean latency (s) | time to first step (s) | capacity estimate 1/latency (req/s) | other processes, worst request (cores) |",
        "|---|---:|---:|---:|---:|",
    ]
    for system in (*SYSTEMS, *[s for s in IN_PROCESS_LABELS if s in unloaded]):
        u = unloaded[system]
        ttfs = "-" if system in IN_PROCESS_LABELS else fmt(u.get("ttfs_mean_s"))
        lines.append(
            f"| {IN_PROCESS_LABELS.get(system, system)} | {fmt(u.get('mean_s'))} | {ttfs} | "
            f"{fmt(1 / u['mean_s'] if u.get('mean_s') else None, 3)} | {fmt(u.get('other_cores'))} |"
        )
    lines += serving_path_lines(report)
    lines += [
        "",
        f"Offered rates (req/s): {', '.join(f'{r:.3f}' for r in cfg['rates'])} ({cfg['rate_origin']}).",
        "",
        "## Results",
        "",
        "| system | offered (req/s) | achieved (req/s) | mean (s) | P50 (s) | P95 (s) | TTFS mean (s) | TTFS P95 (s) "
        "| after last step, mean (s) | errors | server: mean batch | server: mean step (s) | other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rate in cfg["rates"]:
        for system in SYSTEMS:
            s = next((x for x in report["summaries"] if x["system"] == system and x["rate"] == rate), None)
            if s is None:
                continue
            server = s.get("server", {})
            lines.append(
                f"| {system} | {rate:.3f} | {fmt(s.get('throughput'), 3)} | {fmt(s.get('mean_s'))} | {fmt(s.get('p50_s'))} | "
                f"{fmt(s.get('p95_s'))} | {fmt(s.get('ttfs_mean_s'))} | {fmt(s.get('ttfs_p95_s'))} | "
                f"{fmt(s.get('after_last_step_mean_s'))} | {s['errors']} | "
                f"{fmt(server.get('mean_batch'))} | {fmt(server.get('mean_step_s'), 3)} | {fmt(s.get('other_cores'))}"
                f"{' **disturbed, excluded**' if s.get('disturbed') else ''}{' (re-measured)' if s.get('redo') else ''} |"
            )
    lines += [
        "",
        "Server columns: for the baseline, requests per pipeline call of Triton's dynamic batcher "
        "(`nv_inference_count / nv_inference_exec_count`); for the edit model, requests per step-loop step and the mean "
        "duration of one batched step (`instgenie_step_duration_seconds`). Other processes: cores used on average "
        "during the run by processes other than this bench and its server (the machine is shared; read from `/proc`); "
        "anything well above 0 means the run was slowed by someone else's job. A run beside more than "
        f"{cfg['max_other_cores']:g} busy cores was repeated (at most {cfg['repeat_noisy']} time(s)); a run still "
        "disturbed after that is marked and left out of the headline ratios. "
        f"{len(report['discarded_runs'])} run(s) were replaced in this report (raw data under `discarded_runs` in the JSON).",
    ]
    for item in report.get("redos", []):
        lines.append("")
        lines.append(
            f"Re-measured on a fresh server with the same setup and workload (`--redo`, {item['at']}, code {item['git']}): "
            f"{', '.join(item['runs'])} ({item['runtime_s'] / 60:.1f} min); the runs they replace were disturbed by other "
            "jobs on the machine."
        )
    lines += [
        "",
        f"![latency vs offered rate]({png_path.name})",
        "",
        "## Headline ratios vs goals",
        "",
        "**Throughput at equal P95.** For a P95 latency SLO, each system's throughput is the achieved throughput "
        "at which its P95 reaches the SLO: walking up the offered rates, the first run over the SLO and the run "
        "before it are interpolated (log P95). Achieved rather than offered, because an overloaded finite run keeps a "
        "bounded P95 while completing far fewer requests than offered. `>=` marks a system still under the SLO at the "
        "highest rate (a lower bound), `<` one already over it at the lowest rate (then no ratio can be formed). The "
        f"declared SLO is {cfg['slo_factor']:g}x the baseline's unloaded mean latency; the other rows show how the "
        "ratio depends on that choice.",
        "",
        "| P95 SLO | baseline (req/s) | full (req/s) | instgenie (req/s) | instgenie / baseline | full / baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in head["slos"]:
        at = s["rate_at_slo"]
        label = f"{s['factor']:g}x = {s['slo_s']:.2f} s" + (" (declared)" if s is primary else "")
        lines.append(
            f"| {label} | {bounded(*at['baseline'], 3)} | {bounded(*at['full'], 3)} | {bounded(*at['instgenie'], 3)} | "
            f"{bounded(*s['throughput_instgenie'], suffix='x')} | {bounded(*s['throughput_full'], suffix='x')} |"
        )
    peak = head["max_throughput"]
    if peak.get("baseline"):
        lines += [
            "",
            f"Highest achieved throughput at any measured rate, whatever the latency (capacity): baseline "
            f"{peak['baseline']:.3f}, full {peak['full']:.3f}, instgenie {peak['instgenie']:.3f} req/s, i.e. instgenie / "
            f"baseline {peak['instgenie'] / peak['baseline']:.2f}x, full / baseline {peak['full'] / peak['baseline']:.2f}x.",
        ]
    lines += [
        "",
        "**Mean latency at and above the baseline's saturation.** The baseline saturates at the lowest offered rate "
        "where it completes fewer than 90% of the offered requests per second (its queue grows for the whole run; "
        f"its highest achieved throughput was {head['baseline_max_throughput']:.3f} req/s). Overloaded latencies "
        f"grow with the run's length ({cfg['requests']} requests here).",
        "",
        "| offered (req/s) | baseline mean (s) | full mean (s) | instgenie mean (s) | baseline / instgenie | baseline / full |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in head["latency_by_rate"]:
        lines.append(
            f"| {row['rate']:.3f}{' (saturation)' if row['rate'] == head['saturation_rate'] else ''} | "
            f"{fmt(row['baseline_mean_s'])} | {fmt(row['full_mean_s'])} | {fmt(row['instgenie_mean_s'])} | "
            f"{bounded(row['ratio_instgenie'], '', suffix='x')} | {bounded(row['ratio_full'], '', suffix='x')} |"
        )
    value, qualifier = primary["throughput_instgenie"]
    lines += [
        "",
        "| goal | measured | met |",
        "|---|---:|---|",
        f"| throughput at equal P95 >= {GOAL_THROUGHPUT:g}x the baseline (declared SLO, {primary['factor']:g}x) | "
        f"{bounded(value, qualifier, suffix='x')} | {met(value, qualifier, GOAL_THROUGHPUT)} |",
    ]
    for s in head["slos"]:
        if s is primary:
            continue
        value, qualifier = s["throughput_instgenie"]
        lines.append(
            f"| the same at a {s['factor']:g}x SLO | {bounded(value, qualifier, suffix='x')} | "
            f"{met(value, qualifier, GOAL_THROUGHPUT)} |"
        )
    for goal, value, qualifier, goal_text in serving_path_goals(report):
        lines.append(f"| {goal_text} | {bounded(value, qualifier, digits=3, suffix='x')} | {met_goal(value, qualifier, goal)} |")
    latency = head["latency_instgenie"]
    lines.append(
        f"| mean latency at the baseline's saturation rate ({fmt(head['saturation_rate'], 3)} req/s) >= "
        f"{GOAL_MEAN_LATENCY:g}x lower | {bounded(latency, '', suffix='x')} | {met(latency, '', GOAL_MEAN_LATENCY)} |"
    )
    if not head["baseline_saturated"]:
        lines.append("")
        lines.append("The baseline never saturated at the measured rates: the mean-latency ratio is not at saturation.")
    lines += [
        "",
        "## Notes and CPU caveats",
        "",
        *[f"- {note}" for note in report["notes"]],
        "",
        "## Reproduce",
        "",
        "```bash",
        f"python bench/serving.py {' '.join(cfg['argv'])}".rstrip(),
        "python bench/serving.py --report-from out/serving.json   # rebuild this page and the plot from the raw records",
        "python bench/serving.py --json out/serving.json --redo baseline@0.209   # re-measure a disturbed run, merge it in",
        "python bench/serving.py --write-trace   # regenerates bench/data/mask_ratios.csv (same seed, same file)",
        "```",
        "",
        f"Runtime of this run: {report['runtime_s'] / 60:.1f} min on this machine.",
        "",
    ]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def finish_report(report: dict, out: Path, json_path: str | None) -> str:
    """Derive the headline ratios, write the plot, the Markdown page and (optionally) the JSON."""
    cfg = report["config"]
    for summary in report["summaries"]:  # reports written before the flag existed
        summary.setdefault("disturbed", (summary.get("other_cores") or 0.0) > cfg["max_other_cores"])
    factors = sorted(set(cfg["slo_factors"]) | {cfg["slo_factor"]})
    report["headline"] = headline(report["summaries"], report["unloaded"], factors)
    png_path = out.with_name(out.stem + "_latency.png")
    plot(report["summaries"], [(s["factor"], s["slo_s"]) for s in report["headline"]["slos"]], png_path)
    text = write_markdown(report, out, png_path)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))
    return text


def notes_for(report: dict) -> list[str]:
    """Caveats for the page; the last ones are read off this run's numbers."""
    cfg, summaries = report["config"], report["summaries"]
    size, text_len, image_tokens = cfg["size"], cfg["text_len"], (cfg["size"] // GRID) ** 2
    notes = [
        f"CPU only, {report['environment']['cpus']} cores shared by the server's model processes (and the edit "
        "model's codec process), their threads and this client. Text encoding, VAE encode/decode and PNG work take "
        "cores from the step loop; on a GPU they would run on the CPU beside it.",
        "On a CPU, batching does not make a token cheaper (no idle parallel units to fill), so continuous batching "
        "gains latency (no waiting for a whole static batch, short requests leave early) but hardly raises capacity; "
        "the capacity gain comes from computing fewer tokens. On a GPU, batching itself adds throughput to all "
        "three systems.",
        "Rows of one transformer call are padded to the call's longest masked row (diffusers blocks take one "
        "`[B, L, C]` tensor); how much of that a batched step pays depends on the edit model's `max_padding_waste` "
        "(a step split into calls of similar token counts) in the code measured. The FCFS scheduler admits "
        "requests regardless of their token counts (`max_batch_tokens=0`).",
        f"At {size}x{size} with {text_len} text tokens the text tokens are always recomputed, so a 0.19 mask computes "
        f"~{(0.19 * image_tokens + text_len) / (image_tokens + text_len):.2f} of the tokens (and attention still reads "
        "every key): the compute floor is higher than at 1024x1024.",
        f"Random-weight {cfg['model_size']} model (the small transformer has ~9M parameters), so fixed per-request "
        f"costs (text encoders, VAE, PNG, gRPC) weigh more than with real Flux weights; {cfg['steps']} steps instead "
        "of Flux's 28-50 keep the runtime down and also make fixed costs weigh more.",
        f"Open loop with a finite run of {cfg['requests']} requests: above a system's capacity the queue grows for "
        "the whole run, so overloaded latencies (and the mean-latency ratio) depend on the run length; "
        f"P95 of {cfg['requests']} samples is roughly the second-slowest request, and one Poisson burst moves it.",
        "Time to first step of the baseline is its completion time (it streams no progress).",
    ]
    inst = sorted((s for s in summaries if s["system"] == "instgenie" and s.get("after_last_step_mean_s")), key=lambda s: s["rate"])
    unloaded = report["unloaded"].get("instgenie", {})
    if inst:
        low, high = inst[0], inst[-1]
        notes.append(
            f"Work after the last denoising step (VAE decode, paste, PNG, response) took {low['after_last_step_mean_s']:.2f} s "
            f"on average for instgenie at {low['rate']:.3f} req/s and {high['after_last_step_mean_s']:.2f} s at "
            f"{high['rate']:.3f} req/s; its time to first step went from {fmt(unloaded.get('ttfs_mean_s'))} s unloaded to "
            f"{fmt(high.get('ttfs_mean_s'))} s (mean) / {fmt(high.get('ttfs_p95_s'))} s (P95). That work shares the "
            "two cores with the step loop: the codec process runs at a lower priority (`codec_nice`"
            + (f" {cfg['codec_nice']}" if cfg.get("codec_nice") is not None else ", 10 by default")
            + "), and after each step the loop waits for one pending prepare/finish job (`yield_to_helpers_s`, at most "
            "1 s on a CPU), so the two take turns instead of the codec waiting for the loop to go idle."
        )
    return notes
