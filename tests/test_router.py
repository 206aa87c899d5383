"""The router in front of three real tritonserver instances (CPU, tiny flux-fill)."""

from __future__ import annotations

import io
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from conftest import TEXT_LEN, png, rect_mask, template_image
from instgenie.masking import token_indices
from instgenie.settings import EngineLimits
from instgenie.token_grid import StepCost, token_mask
from instgenie_protocol import PIXELS_PER_TOKEN_METRIC, parse_samples
from instgenie_client import InstGenIEClient
from instgenie_client.http_client import SseInstGenIEClient
from instgenie_cli import build_parser
from instgenie_router.discovery import Discovery, DnsTarget, resolve_addresses
from instgenie_router.instances import Instance, InstancePool, RequestCost
from instgenie_router.policies import SPEED_SPREAD, LeastRequests, MaskAware, RoundRobin
from instgenie_router.requests import inspect
from instgenie_router.service import Router, RouterConfig
from instgenie_router.signals import parse_metrics
from serving_calls import metric, metrics, perf_analyzer_inputs, run_perf_analyzer

STEPS = 3
INSTANCES = 3


# -- policies and signals, without servers -------------------------------------------------
def _pool(*outstanding: float) -> InstancePool:
    instances = [Instance("h", 9001 + 10 * i, 9000 + 10 * i, 9002 + 10 * i) for i in range(len(outstanding))]
    now = time.monotonic()
    for instance, work in zip(instances, outstanding):
        instance.scraped_token_steps, instance.scraped_at = work, now
    return InstancePool(instances)


def test_mask_aware_counts_the_text_tokens_every_request_computes() -> None:
    pool = _pool(0.0, 0.0)
    few_large, many_small = pool.instances
    for instance in pool.instances:  # 128 text tokens per request and step; 1 ms per token-step
        instance.scraped.update(instgenie_text_tokens=128.0, instgenie_step_duration_seconds_sum=1.0,
                                instgenie_computed_row_tokens_total=1000.0)  # fmt: skip
    pool.start(few_large, "a", RequestCost(400.0 * 10, steps=10))  # one edit of 400 masked tokens
    for key in "bcde":  # four edits of 40 masked tokens: less mask, more text
        pool.start(many_small, key, RequestCost(40.0 * 10, steps=10))
    assert few_large.outstanding_text_steps() == 128 * 10
    # Masked tokens alone say 4000 vs 1600 token-steps; with the text, 5280 vs 6720.
    assert MaskAware().choose(pool.instances, RequestCost(400.0, steps=10), 5.0) is few_large


def test_mask_aware_chooses_as_the_plain_makespan_definition_does() -> None:
    """The policy computes each makespan from the two largest finish times (linear in the
    fleet); the definition, the largest finish over all instances after the assignment,
    picks the same instance."""
    rng = np.random.default_rng(0)
    policy = MaskAware()
    for trial in range(50):
        pool = _pool(*rng.uniform(0, 5000, size=int(rng.integers(1, 9))))
        for instance in pool.instances:
            instance.scraped = {"instgenie_step_duration_seconds_sum": float(rng.uniform(1, 20)),
                                "instgenie_computed_row_tokens_total": 1e5, "instgenie_text_tokens": 64.0}  # fmt: skip
            if rng.random() < 0.3:
                instance.remember("tpl-00000000000000000001")
        cost = RequestCost(float(rng.uniform(100, 4000)), "tpl-00000000000000000001", 8)
        speed = {i.name: policy.speed(i, pool.instances) for i in pool.instances}
        finish = {i.name: (i.outstanding(time.monotonic(), 3.0) + i.outstanding_text_steps()) * speed[i.name] for i in pool.instances}

        def definition(instance: Instance) -> tuple[float, float, bool, str]:
            own = finish[instance.name] + (cost.token_steps + instance.text_tokens * cost.steps) * speed[instance.name]
            own += 0.0 if instance.holds(cost.template_id) else policy.cold_template_s
            others = [f for name, f in finish.items() if name != instance.name]
            return max([own, *others]), own, not instance.holds(cost.template_id), instance.name

        assert policy.choose(pool.instances, cost, 3.0) is min(pool.instances, key=definition), trial


def test_instance_spec_defaults_to_tritons_port_layout() -> None:
    instance = Instance.parse("node-1:8001")
    assert (instance.grpc_port, instance.http_port, instance.metrics_port) == (8001, 8000, 8002)
    assert Instance.parse("h:9001:9100:9200").metrics_url == "http://h:9200/metrics"
    for bad in ("h", "h:x", ":8001", "h:1:2:3:4"):
        with pytest.raises(ValueError):
            Instance.parse(bad)


def test_mask_aware_weighs_work_not_request_counts() -> None:
    pool = _pool(0.0, 0.0)
    busy, idle = pool.instances
    # One huge edit on ``busy``; three tiny ones on ``idle``.
    pool.start(busy, "a", RequestCost(10_000.0))
    for key in "bcd":
        pool.start(idle, key, RequestCost(100.0))
    new = RequestCost(500.0)
    assert LeastRequests().choose(pool.instances, new, 5.0) is busy
    assert MaskAware().choose(pool.instances, new, 5.0) is idle


def test_mask_aware_prefers_the_instance_holding_the_template_when_costs_tie() -> None:
    pool = _pool(0.0, 0.0, 0.0)
    pool.instances[2].remember("tpl-x")
    assert MaskAware().choose(pool.instances, RequestCost(100.0, "tpl-x"), 5.0) is pool.instances[2]


def test_a_fresh_scrape_stands_for_the_requests_it_already_shows() -> None:
    pool = _pool(0.0)
    (instance,) = pool.instances
    pool.start(instance, "old", RequestCost(10_000.0))
    instance.sent_at["old"] -= 5.0  # sent well before the scrape below
    instance.scraped_token_steps, instance.scraped_at = 1_000.0, time.monotonic()  # it has run most of it
    assert instance.outstanding(time.monotonic(), 3.0) == 1_000.0
    pool.start(instance, "new", RequestCost(500.0))  # sent after the scrape: not in the gauge yet
    assert instance.outstanding(time.monotonic(), 3.0) == 1_500.0
    instance.scraped_at -= 60  # stale: the router's own count alone
    assert instance.outstanding(time.monotonic(), 3.0) == 10_500.0


def test_a_past_of_large_batches_does_not_make_an_instance_attract_every_request() -> None:
    pool = _pool(0.0, 0.0)
    batched, fresh = pool.instances
    batched.scraped.update(instgenie_step_duration_seconds_sum=10.0, instgenie_computed_row_tokens_total=1e6)  # 10 us
    fresh.scraped.update(instgenie_step_duration_seconds_sum=1.0, instgenie_computed_row_tokens_total=1e4)  # 100 us
    policy = MaskAware()
    assert policy.speed(fresh, pool.instances) / policy.speed(batched, pool.instances) <= SPEED_SPREAD**2
    picks = []
    for key in range(6):
        chosen = policy.choose(pool.instances, RequestCost(1000.0), 5.0)
        pool.start(chosen, str(key), RequestCost(1000.0))
        picks.append(chosen.name)
    assert picks.count(fresh.name) >= 2, picks  # unclamped, all six would go to ``batched``


def test_stale_or_zero_counters_do_not_attract_every_request() -> None:
    pool = _pool(0.0, 0.0)
    first, second = pool.instances
    first.scraped_at = second.scraped_at = time.monotonic() - 60  # old scrapes: ignored
    policy = MaskAware()
    picks = []
    for key in range(6):  # the router's own bookkeeping spreads them while counters say 0
        chosen = policy.choose(pool.instances, RequestCost(100.0), stale_after_s=3.0)
        pool.start(chosen, str(key), RequestCost(100.0))
        picks.append(chosen.name)
    assert picks.count(first.name) == picks.count(second.name) == 3


def test_mask_aware_weighs_recording_a_template_an_instance_lacks() -> None:
    pool = _pool(0.0, 0.0)
    holder, lacking = pool.instances
    pool.registered(holder, {"tpl"})
    pool.start(holder, "a", RequestCost(2_000.0))  # busy, but with less work than a recording
    cost = RequestCost(100.0, "tpl", record_token_steps=50_000.0)
    assert lacking.lacks(cost) and not holder.lacks(cost)
    assert MaskAware().choose(pool.instances, cost, 5.0) is holder
    pool.start(holder, "b", RequestCost(100_000.0))  # now its queue outweighs recording elsewhere
    assert MaskAware().choose(pool.instances, cost, 5.0) is lacking
    # Without a registration to replay there is no recording to weigh: a disk load at most.
    assert not lacking.lacks(RequestCost(100.0, "tpl"))


def test_instance_specs_accept_ipv6_literals() -> None:
    instance = Instance.parse("[fd00::7]:8001")
    assert instance.host == "fd00::7" and instance.name == "[fd00::7]:8001"
    assert instance.metrics_url == "http://[fd00::7]:8002/metrics"


def test_the_router_listens_on_the_loopback_unless_told_otherwise() -> None:
    # As `instgenie serve`: compose and Kubernetes pass --host 0.0.0.0 themselves.
    assert RouterConfig(["127.0.0.1:8001"]).host == "127.0.0.1"


def test_router_config_file_with_command_line_overrides(tmp_path: Path) -> None:
    file = tmp_path / "router.toml"
    file.write_text('instances = ["a:8001", "dns:fleet.svc:8001"]\npolicy = "least_requests"\ngrpc_port = 9101\nscrape_interval_s = 1.5\n')
    config = RouterConfig.build(file, {"policy": "round_robin", "http_port": None})
    assert config.instances == ["a:8001", "dns:fleet.svc:8001"] and config.policy == "round_robin"
    assert (config.grpc_port, config.http_port, config.scrape_interval_s) == (9101, RouterConfig().http_port, 1.5)
    assert RouterConfig.build(overrides={"instances": "a:1, b:2"}).instances == ["a:1", "b:2"]
    bad = {
        'instances = ["a:1"]\nprot = 1\n': "unknown router setting",
        'instances = ["a:1"]\ngrpc_port = "x"\n': "grpc_port",
        'policy = "round_robin"\n': "needs instances",
        "instances = [\n": "router config",
    }
    for text, message in bad.items():
        file.write_text(text)
        with pytest.raises(ValueError, match=message):
            RouterConfig.build(file)
    # The command line says so and exits 2, starting nothing.
    file.write_text('instances = ["a:1"]\nmax_in_flight = 1.5\n')
    args = build_parser().parse_args(["router", "--config", str(file), "--grpc-port", "0"])
    assert args.run(args) == 2


def test_dns_discovery_follows_the_addresses_of_a_name() -> None:
    answers: dict[str, object] = {"fleet.svc": ["10.0.0.1", "10.0.0.2"]}

    def resolver(name: str) -> list[str]:
        answer = answers[name]
        if isinstance(answer, OSError):
            raise answer
        return list(answer)  # type: ignore[call-overload]

    fixed = Instance.parse("static:9001")
    pool = InstancePool([fixed], allow_empty=True)
    joined: list[str] = []
    left: list[str] = []
    discovery = Discovery(pool, [DnsTarget.parse("dns:fleet.svc:8001")], resolver,
                          on_join=lambda i: joined.append(i.name), on_leave=lambda i: left.append(i.name))  # fmt: skip
    discovery.refresh()
    assert [i.name for i in pool.snapshot()] == ["static:9001", "10.0.0.1:8001", "10.0.0.2:8001"]
    assert pool.by_name("10.0.0.1:8001").metrics_url == "http://10.0.0.1:8002/metrics"
    assert not any(i.healthy for i in pool.snapshot() if i.source)  # until a health check lets them in
    answers["fleet.svc"] = OSError("DNS timeout")  # a failed lookup changes nothing
    discovery.refresh()
    assert len(pool.snapshot()) == 3
    answers["fleet.svc"] = ["10.0.0.2", "fd00::3"]  # one pod gone, one new (IPv6)
    discovery.refresh()
    assert [i.name for i in pool.snapshot()] == ["static:9001", "10.0.0.2:8001", "[fd00::3]:8001"]
    assert left == ["10.0.0.1:8001"] and joined == ["10.0.0.1:8001", "10.0.0.2:8001", "[fd00::3]:8001"]
    answers["fleet.svc"] = []  # the name has no ready pods: only the fixed instance stays
    discovery.refresh()
    assert [i.name for i in pool.snapshot()] == ["static:9001"]
    assert "127.0.0.1" in resolve_addresses("localhost") or "::1" in resolve_addresses("localhost")


def test_round_robin_cycles() -> None:
    pool = _pool(0.0, 0.0, 0.0)
    policy = RoundRobin()
    assert [policy.choose(pool.instances, RequestCost(1.0), 5.0).name for _ in range(6)] == [
        i.name for i in pool.instances
    ] * 2


def test_prometheus_text_is_summed_per_series() -> None:
    text = '# HELP x\ninstgenie_active_requests{instance="a"} 2\ninstgenie_active_requests{instance="b"} 3\nother 1\n'
    assert parse_metrics(text) == {"instgenie_active_requests": 5.0}


def test_request_inspection_counts_mask_tokens_and_steps() -> None:
    inputs = [
        grpcclient.InferInput("TEMPLATE_ID", [1], "BYTES"),
        grpcclient.InferInput("MASK", [1], "BYTES"),
        grpcclient.InferInput("STEPS", [1], "INT32"),
    ]
    inputs[0].set_data_from_numpy(np.array([b"tpl-1"], dtype=np.object_))
    mask = rect_mask(0.25, size=128, seed=1)
    inputs[1].set_data_from_numpy(np.array([png(mask)], dtype=np.object_))
    inputs[2].set_data_from_numpy(np.array([5], dtype=np.int32))
    request = grpcclient._utils._get_inference_request(  # what tritonclient puts on the wire
        model_name="instgenie_edit", inputs=inputs, model_version="", request_id="r", outputs=None,
        sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None, parameters=None,
    )  # fmt: skip
    info = inspect(request)
    assert info.action == "edit" and info.template_id == "tpl-1"
    assert info.cost.token_steps == token_indices(np.asarray(mask) > 127, 16).numel() * 5  # the engine's count x steps
    assert info.cost.steps == 5
    # A UNet instance's published step cost: its dense layers plus the mask pooled per level.
    pool = _pool(0.0)
    unet_cost = StepCost(dense=0.25, levels=((1, 1.5), (2, 3.0)))
    pool.update_scrape(pool.instances[0], 0.0, {PIXELS_PER_TOKEN_METRIC: 8.0}, unet_cost)
    info = inspect(request, pixels_per_token=pool.pixels_per_token(), cost=pool.step_cost())
    assert pool.step_cost() == unet_cost
    assert info.cost.token_steps == pytest.approx(unet_cost.work(token_mask(np.asarray(mask) > 127, 8)) * 5)


# -- three real instances behind the router ------------------------------------------------
def _instance_server(model_dirs: dict[str, Path], root: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    """A tritonserver with the tiny flux-fill model and its own disk tier under ``root``."""
    from instgenie_server.launcher import TritonServer, default_model_repository, models_with_parameter, render_repository

    source = default_model_repository()
    parameters = {
        "model_dir": str(model_dirs["flux-fill"]), "max_sequence_length": str(TEXT_LEN), "max_active": "4",
        "max_waiting": "32", "codec_nice": "0", "cache_dir": str(root / "cache"), "drain_timeout_s": "10",
    }  # fmt: skip
    repository = render_repository(source, root / "models", {n: parameters for n in models_with_parameter(source, "model_dir")})
    return TritonServer(repository, log_file=root / "server.log", **kwargs)


@pytest.fixture(scope="module")
def instances(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    servers = [_instance_server(model_dirs, tmp_path_factory.mktemp(f"instance{i}")) for i in range(INSTANCES)]
    for server in servers:
        server.start()
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop(drain_timeout_s=0)


def _specs(servers) -> list[str]:  # type: ignore[no-untyped-def]
    return [f"127.0.0.1:{s.grpc_port}:{s.http_port}:{s.metrics_port}" for s in servers]


@pytest.fixture
def router(instances):  # type: ignore[no-untyped-def]
    config = RouterConfig(_specs(instances), host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0, scrape_interval_s=0.2)
    with Router(config) as running:
        yield running


def _pixels(png_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB")).astype(int)


def _routed(router: Router) -> dict[str, float]:
    return {i.name: router.metrics.counter_value("instgenie_router_routed_total", i.name) for i in router.pool.instances}


def test_registration_reaches_every_instance_and_edits_match_a_direct_call(router: Router, instances) -> None:  # type: ignore[no-untyped-def]
    client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=120)
    template_id = client.register_template(png(template_image(31)), "a shelf", seed=3, steps=STEPS)
    deadline = time.monotonic() + 60
    direct = [InstGenIEClient(server.grpc_url, timeout_s=60) for server in instances]
    while not all(template_id in c.list_templates() for c in direct):  # the broadcast copies finish in the background
        assert time.monotonic() < deadline, "the registration did not reach every instance"
        time.sleep(0.5)
    mask = png(rect_mask(0.2, seed=31))
    through_router = client.edit(mask, "a vase", template_id=template_id)
    alone = direct[0].edit(mask, "a vase", template_id=template_id).image
    # Routed to either instance, which may batch it with background work (registration
    # copies, replays): batched-kernel rounding, at most one grey level.
    assert np.abs(_pixels(through_router.image) - _pixels(alone)).max() <= 1


def test_client_errors_come_back_through_the_router(router: Router) -> None:
    client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=60)
    with pytest.raises(Exception, match="unknown_template"):
        client.edit(png(rect_mask(0.2)), "x", template_id="tpl-does-not-exist")


def test_round_robin_spreads_edits_evenly(instances) -> None:  # type: ignore[no-untyped-def]
    config = RouterConfig(_specs(instances), policy="round_robin", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0)
    with Router(config) as router:
        client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=120)
        template_id = client.register_template(png(template_image(32)), "a desk", seed=3, steps=STEPS)
        before = _routed(router)
        for i in range(6):
            client.edit(png(rect_mask(0.1, seed=i)), "a lamp", template_id=template_id)
        after = _routed(router)
        assert sorted(after[n] - before[n] for n in after) == [2, 2, 2]


def test_a_killed_instance_loses_no_edit_and_rejoins_after_restart(model_dirs, instances, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from instgenie_server.launcher import TritonServer

    config = RouterConfig(_specs(instances), host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0, scrape_interval_s=0.2)
    with Router(config) as router:
        client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=180)
        template_id = client.register_template(png(template_image(33)), "a room", seed=3, steps=STEPS)
        masks = [png(rect_mask(0.1 + 0.02 * (i % 10), seed=i % 10)) for i in range(50)]
        victim = instances[1]
        victim_name = f"127.0.0.1:{victim.grpc_port}"
        done = []
        lock = threading.Lock()

        def edit(i: int) -> bytes:
            result = client.edit(masks[i], "a chair", template_id=template_id)
            with lock:
                done.append(i)
            return result.image

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(edit, i) for i in range(50)]
            while len(done) < 8:
                time.sleep(0.05)
            victim_repository, victim_log = victim.model_repository, victim.log_file
            ports = (victim.http_port, victim.grpc_port, victim.metrics_port)
            victim.kill()
            results = [f.result(timeout=300) for f in futures]
        assert len(results) == 50  # 0 lost
        survivor = InstGenIEClient(instances[0].grpc_url, timeout_s=60)
        for i in range(10):
            expected = _pixels(survivor.edit(masks[i], "a chair", template_id=template_id).image)
            # Batched CPU kernels round ~1e-6 differently from solo ones: at most one grey level.
            assert all(np.abs(_pixels(results[j]) - expected).max() <= 1 for j in range(i, 50, 10)), f"mask {i}"
        instance = router.pool.by_name(victim_name)
        assert not instance.healthy and instance.ejections >= 1
        routed_after_ejection = router.metrics.counter_value("instgenie_router_routed_total", victim_name)
        client.edit(masks[0], "a chair", template_id=template_id)
        assert router.metrics.counter_value("instgenie_router_routed_total", victim_name) == routed_after_ejection

        restarted = TritonServer(victim_repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], log_file=victim_log)
        instances[1] = restarted
        restarted.start()
        restarted.wait_ready()
        deadline = time.monotonic() + 30
        while not instance.healthy:
            assert time.monotonic() < deadline, "the restarted instance did not rejoin"
            time.sleep(0.2)
        # It serves again: its disk tier still holds the template.
        for i in range(6):
            client.edit(masks[i], "a chair", template_id=template_id)
        assert router.metrics.counter_value("instgenie_router_routed_total", victim_name) > routed_after_ejection
        assert router.metrics.counter_value("instgenie_router_ejections_total", victim_name) >= 1


def test_cancelling_through_the_router_frees_the_slot_on_the_instance(router: Router, instances) -> None:  # type: ignore[no-untyped-def]
    client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=120)
    # the most steps a request may ask, so that a fast CPU cannot finish before the cancel lands
    template_id = client.register_template(png(template_image(34)), "a wall", seed=3, steps=EngineLimits.max_steps)
    before = sum(metric(metrics(s.metrics_url), "instgenie_cancellations_total") for s in instances)
    job = client.submit(png(rect_mask(0.5, seed=34)), "a door", template_id=template_id)
    assert next(iter(job.progress)).step >= 1  # it is stepping on an instance
    assert job.cancel()
    deadline = time.monotonic() + 30
    while True:
        values = [metrics(s.metrics_url) for s in instances]
        cancelled = sum(metric(v, "instgenie_cancellations_total") for v in values) - before
        active = sum(metric(v, "instgenie_active_requests") for v in values)
        if cancelled >= 1 and active == 0:
            break
        assert time.monotonic() < deadline, f"cancellation did not reach the instance ({cancelled=}, {active=})"
        time.sleep(0.2)


def test_plain_tritonclient_sees_the_router_as_a_triton_server(router: Router) -> None:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{router.grpc_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("instgenie_edit")
        metadata = client.get_model_metadata("instgenie_edit")
        assert {tensor.name for tensor in metadata.inputs} >= {"MASK", "PROMPT", "TEMPLATE_ID"}
        assert client.get_model_config("instgenie_edit").config.model_transaction_policy.decoupled
        # Statistics are the fleet's: each instance's, summed (counters never go back
        # when a later read is answered by another instance, as perf_analyzer needs).
        fleet = client.get_inference_statistics("instgenie_edit").model_stats[0]
        parts = []
        for instance in router.pool.instances:
            direct = grpcclient.InferenceServerClient(instance.grpc_address)
            parts.append(direct.get_inference_statistics("instgenie_edit").model_stats[0])
            direct.close()
        assert fleet.inference_stats.success.count == sum(p.inference_stats.success.count for p in parts)
        assert fleet.last_inference == max(p.last_inference for p in parts)
    finally:
        client.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{router.http_port}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    text = urllib.request.urlopen(f"http://127.0.0.1:{router.metrics_port}/metrics", timeout=5).read().decode()
    assert "instgenie_router_decision_seconds_count" in text


def test_perf_analyzer_measures_the_fleet_through_the_router(router: Router, tmp_path: Path) -> None:
    """Triton's own load generator, unchanged, against the router (decoupled model: gRPC streaming)."""
    url = f"127.0.0.1:{router.grpc_port}"
    binary = perf_analyzer_inputs(url, tmp_path, steps=STEPS, entries=6)  # registers its templates through the router
    before = _routed(router)
    run_perf_analyzer(binary, url, tmp_path, entries=6, concurrency=3)
    spread = {name: count - before[name] for name, count in _routed(router).items()}
    assert sum(spread.values()) >= 6 and sum(1 for count in spread.values() if count > 0) >= 2, spread


def test_http_clients_work_through_the_router(router: Router, instances) -> None:  # type: ignore[no-untyped-def]
    sse = SseInstGenIEClient(f"127.0.0.1:{router.http_port}", timeout_s=120)
    template_id = sse.register_template(png(template_image(35)), "a bench", seed=3, steps=STEPS)
    assert all(template_id in InstGenIEClient(s.grpc_url, timeout_s=60).list_templates() for s in instances)
    steps: list[int] = []
    mask = png(rect_mask(0.2, seed=35))
    result = sse.edit(mask, "a bag", template_id=template_id, on_progress=lambda p: steps.append(p.step))
    assert steps == list(range(1, STEPS + 1))  # server-sent events arrive through the router
    direct = InstGenIEClient(instances[0].grpc_url, timeout_s=60).edit(mask, "a bag", template_id=template_id)
    # Either instance, perhaps batched with background work: batched-kernel rounding.
    assert np.abs(_pixels(result.image) - _pixels(direct.image)).max() <= 1
    plain = httpclient.InferenceServerClient(f"127.0.0.1:{router.http_port}")
    try:
        assert plain.is_server_ready() and plain.is_model_ready("instgenie_edit")
        assert plain.get_model_metadata("instgenie_edit")["name"] == "instgenie_edit"
    finally:
        plain.close()


def test_edits_of_one_raw_image_follow_its_hash_to_the_instance_that_records_it(router: Router, instances) -> None:  # type: ignore[no-untyped-def]
    _wait_idle_and_healthy(router)
    client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=120)
    image, mask = png(template_image(36)), png(rect_mask(0.25, seed=36))
    before = _routed(router)
    names = ("instgenie_raw_image_lookups_total", "instgenie_auto_registrations_total")
    counted = {s.grpc_port: {n: metric(metrics(s.metrics_url), n) for n in names} for s in instances}
    results = []
    for attempt in range(4):
        results.append(client.edit(mask, "a rug", image=image, seed=2, steps=STEPS))
        if attempt == 1:  # the second sight: the instance records the image in the background
            deadline = time.monotonic() + 60
            while not any(metric(metrics(s.metrics_url), "instgenie_auto_registrations_total") for s in instances):
                assert time.monotonic() < deadline, "no instance recorded the raw image"
                time.sleep(0.1)
    grew = [name for name, count in _routed(router).items() if count > before[name]]
    assert len(grew) == 1  # every edit of the picture went to one instance
    assert results[0].template_id is None and results[0].computed_tokens == results[0].num_tokens
    assert all(r.template_id is not None and r.computed_tokens < r.num_tokens for r in results[2:])
    server = next(s for s in instances if f"127.0.0.1:{s.grpc_port}" == grew[0])
    text = metrics(server.metrics_url)
    lookups = metric(text, names[0]) - counted[server.grpc_port][names[0]]
    assert (lookups, metric(text, names[1]) - counted[server.grpc_port][names[1]]) == (4, 1)
    assert metric(text, names[0], result="hit") >= 2
    # Registering the picture by hand with the triggering edit's prompt names the same template: one cache.
    assert client.register_template(image, "a rug", seed=2, steps=STEPS) == results[2].template_id
    by_id = client.edit(mask, "a rug", template_id=results[2].template_id)
    # Any instance, perhaps batched with background work: batched-kernel rounding.
    assert np.abs(_pixels(by_id.image) - _pixels(results[3].image)).max() <= 1


def _wait_routed(router: Router, total: float, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(_routed(router).values()) < total:
        assert time.monotonic() < deadline, "the router did not route the request"
        time.sleep(0.02)


def _wait_idle_and_healthy(router: Router, timeout_s: float = 60.0) -> None:
    """Until every instance is healthy, freshly scraped with nothing active or waiting, and has no booking."""
    deadline = time.monotonic() + timeout_s
    while True:
        router.scraper.refresh()
        instances = router.pool.snapshot()
        if all(
            i.healthy
            and not i.in_flight
            and i.scraped.get("instgenie_active_requests", 1.0) + i.scraped.get("instgenie_waiting_requests", 1.0) == 0
            for i in instances
        ):
            return
        assert time.monotonic() < deadline, [(i.name, i.healthy, len(i.in_flight), i.scraped.get("instgenie_active_requests")) for i in instances]
        time.sleep(0.1)


@pytest.mark.parametrize("policy", ["least_requests", "mask_aware"])
def test_policies_spread_a_large_edit_and_small_ones_their_own_way(instances, policy: str) -> None:  # type: ignore[no-untyped-def]
    """One large edit, then two small ones, all running at once on two instances.

    ``least_requests`` balances counts, so the second small edit joins the large one
    (a 1-1 tie, broken by name); ``mask_aware`` balances work, so both small edits
    share the instance without the large one.
    """
    first, second = sorted(instances[:2], key=lambda s: f"127.0.0.1:{s.grpc_port}")
    config = RouterConfig(_specs([first, second]), policy=policy, host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0)
    with Router(config) as router:
        client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=120)
        template_id = client.register_template(png(template_image(36)), "a hall", seed=3, steps=100)
        _wait_idle_and_healthy(router)  # earlier tests' work on these instances must not tip the choice
        start = _routed(router)
        large = client.submit(png(rect_mask(0.9, seed=36)), "a crowd", template_id=template_id)
        assert next(iter(large.progress)).step >= 1
        before = _routed(router)
        total = sum(before.values())
        small = []
        for seed in (37, 38):
            small.append(client.submit(png(rect_mask(0.05, seed=seed)), "a cup", template_id=template_id))
            total += 1
            _wait_routed(router, total)  # each is placed before the next one arrives
        placed = {name: count - before[name] for name, count in _routed(router).items()}
        for job in [large, *small]:
            job.cancel()
    first_name, second_name = (f"127.0.0.1:{s.grpc_port}" for s in (first, second))
    (large_on,) = [name for name in before if before[name] - start[name] == 1]
    if policy == "least_requests":
        # Both idle: the large edit goes first by name; then counts 1-0, then a 1-1 tie (by name).
        assert large_on == first_name and placed == {first_name: 1, second_name: 1}, placed
    else:
        other = second_name if large_on == first_name else first_name
        assert placed == {large_on: 0, other: 2}, placed


def test_dns_discovered_instances_join_with_their_templates_and_leave(model_dirs, instances, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A headless-Service-like name: one address, then a second (a new pod on another
    address, same ports) that joins without a router restart, gets the templates
    registered before it existed and serves edits; then the first address leaves."""
    base = instances[0]
    addresses = ["127.0.0.1"]
    spec = f"dns:fleet.test:{base.grpc_port}:{base.http_port}:{base.metrics_port}"
    config = RouterConfig([spec], policy="round_robin", host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0,
                          scrape_interval_s=0.2, discovery_interval_s=0.2)  # fmt: skip
    new_pod = _instance_server(model_dirs, tmp_path, host="127.0.0.2", http_port=base.http_port, grpc_port=base.grpc_port,
                               metrics_port=base.metrics_port)  # fmt: skip
    with Router(config, resolver=lambda name: list(addresses) if name == "fleet.test" else []) as router:
        old_name, new_name = (f"{host}:{base.grpc_port}" for host in ("127.0.0.1", "127.0.0.2"))
        assert [i.name for i in router.pool.healthy()] == [old_name]
        client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=120)
        template_id = client.register_template(png(template_image(39)), "a porch", seed=3, steps=STEPS)
        new_pod.start()
        try:
            new_pod.wait_ready()
            addresses.append("127.0.0.2")
            direct = InstGenIEClient(f"127.0.0.2:{base.grpc_port}", timeout_s=60)
            deadline = time.monotonic() + 90
            while template_id not in direct.list_templates():  # replayed on it once it was healthy
                assert time.monotonic() < deadline, "the template was not registered on the new instance"
                time.sleep(0.3)
            assert router.metrics.counter_value("instgenie_router_replayed_registrations_total", new_name) == 1
            before = _routed(router)
            mask = png(rect_mask(0.2, seed=39))
            images = {client.edit(mask, "a cat", template_id=template_id).image for _ in range(4)}
            after = _routed(router)
            assert (after[old_name] - before[old_name], after[new_name] - before[new_name]) == (2, 2)
            assert len(images) == 1  # both instances give the same edit
            addresses.remove("127.0.0.1")  # the first pod goes away
            deadline = time.monotonic() + 10
            while old_name in [i.name for i in router.pool.snapshot()]:
                assert time.monotonic() < deadline, "the vanished address stayed in the pool"
                time.sleep(0.1)
            before = router.metrics.counter_value("instgenie_router_routed_total", new_name)
            client.edit(mask, "a cat", template_id=template_id)
            assert router.metrics.counter_value("instgenie_router_routed_total", new_name) == before + 1
        finally:
            new_pod.stop(drain_timeout_s=0)


def test_every_metric_the_grafana_dashboard_queries_exists_on_an_instance_or_the_router(router: Router, instances) -> None:  # type: ignore[no-untyped-def]
    import json
    import re

    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "deploy" / "grafana" / "instgenie.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(?:instgenie|nv)_[a-z_]+", target["expr"])
    }
    # An error through the router, so the per-reason error series exists (a hostile id).
    client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=60)
    with pytest.raises(Exception, match="unknown_template"):
        client.edit(png(rect_mask(0.2)), "x", template_id="tpl-00000000000000000000")
    published = set()
    for url in [f"http://127.0.0.1:{router.metrics_port}/metrics", *(server.metrics_url for server in instances)]:
        published |= {sample.name for sample in parse_samples(urllib.request.urlopen(url, timeout=10).read().decode())}
    # GPU series come only from instances on a CUDA device (these run on CPU).
    gpu_only = {"instgenie_gpu_utilization_ratio", "instgenie_gpu_memory_used_bytes"}
    missing = sorted(name for name in queried - gpu_only if name not in published)
    assert len(queried) >= 25 and not missing, missing
    prometheus = (root / "deploy" / "prometheus" / "prometheus.yml").read_text()
    compose = (root / "docker" / "compose.yaml").read_text()
    assert "router:8102" in prometheus and "triton-0:8002" in prometheus
    assert "deploy/grafana/instgenie.json" in compose and "deploy/prometheus/prometheus.yml" in compose
