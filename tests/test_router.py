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
from instgenie_client import InstGenIEClient
from instgenie_client.http_client import SseInstGenIEClient
from instgenie_router.instances import Instance, InstancePool, RequestCost
from instgenie_router.policies import LeastRequests, MaskAware, RoundRobin
from instgenie_router.requests import inspect
from instgenie_router.service import Router, RouterConfig
from instgenie_router.signals import parse_metrics
from serving_calls import metric, metrics

STEPS = 3
INSTANCES = 3


# -- policies and signals, without servers -------------------------------------------------
def _pool(*outstanding: float) -> InstancePool:
    instances = [Instance("h", 9001 + 10 * i, 9000 + 10 * i, 9002 + 10 * i) for i in range(len(outstanding))]
    now = time.monotonic()
    for instance, work in zip(instances, outstanding):
        instance.scraped_token_steps, instance.scraped_at = work, now
    return InstancePool(instances)


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


# -- three real instances behind the router ------------------------------------------------
@pytest.fixture(scope="module")
def instances(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    from instgenie_server.launcher import TritonServer, default_model_repository, models_with_parameter, render_repository

    source = default_model_repository()
    servers = []
    for index in range(INSTANCES):
        root = tmp_path_factory.mktemp(f"instance{index}")
        parameters = {
            "model_dir": str(model_dirs["flux-fill"]), "max_sequence_length": str(TEXT_LEN), "max_active": "4",
            "max_waiting": "32", "codec_nice": "0", "cache_dir": str(root / "cache"), "drain_timeout_s": "10",
        }  # fmt: skip
        repository = render_repository(source, root / "models", {n: parameters for n in models_with_parameter(source, "model_dir")})
        servers.append(TritonServer(repository, log_file=root / "server.log"))
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
    assert through_router.image == direct[0].edit(mask, "a vase", template_id=template_id).image


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
        assert "instgenie_router_ejections_total" in router.metrics.render()


def test_cancelling_through_the_router_frees_the_slot_on_the_instance(router: Router, instances) -> None:  # type: ignore[no-untyped-def]
    client = InstGenIEClient(f"127.0.0.1:{router.grpc_port}", timeout_s=120)
    template_id = client.register_template(png(template_image(34)), "a wall", seed=3, steps=40)
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


def test_http_clients_work_through_the_router(router: Router, instances) -> None:  # type: ignore[no-untyped-def]
    sse = SseInstGenIEClient(f"127.0.0.1:{router.http_port}", timeout_s=120)
    template_id = sse.register_template(png(template_image(35)), "a bench", seed=3, steps=STEPS)
    assert all(template_id in InstGenIEClient(s.grpc_url, timeout_s=60).list_templates() for s in instances)
    steps: list[int] = []
    mask = png(rect_mask(0.2, seed=35))
    result = sse.edit(mask, "a bag", template_id=template_id, on_progress=lambda p: steps.append(p.step))
    assert steps == list(range(1, STEPS + 1))  # server-sent events arrive through the router
    direct = InstGenIEClient(instances[0].grpc_url, timeout_s=60).edit(mask, "a bag", template_id=template_id)
    assert result.image == direct.image
    plain = httpclient.InferenceServerClient(f"127.0.0.1:{router.http_port}")
    try:
        assert plain.is_server_ready() and plain.is_model_ready("instgenie_edit")
        assert plain.get_model_metadata("instgenie_edit")["name"] == "instgenie_edit"
    finally:
        plain.close()
