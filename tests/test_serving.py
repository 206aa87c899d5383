"""The edit model on a real tritonserver: overlap, batching, exactness, errors, metrics, shutdown."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from conftest import SERVER_MAX_WAITING, TEXT_LEN, png, rect_mask, template_image
from serving_calls import Stream, baseline_png, metric, metrics, register, tensor

LONG_STEPS = 40  # a tiny-model step is ~10-20 ms: long enough to overlap with


def pixels(call) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(call.outputs["EDITED_IMAGE"][0])))


@pytest.fixture(scope="module")
def url(triton_server) -> str:
    return triton_server.grpc_url


@pytest.fixture(scope="module")
def templates(url: str) -> dict[str, str]:
    return {
        "short": register(url, png(template_image(21)), STEPS=4),
        "long": register(url, png(template_image(22)), STEPS=LONG_STEPS),
    }


def edit_fields(template_id: str, ratio: float, seed: int = 0, prompt: str = "a lamp", **extra) -> dict:
    return {"TEMPLATE_ID": template_id, "MASK": png(rect_mask(ratio, seed=seed)), "PROMPT": prompt, **extra}


def test_a_request_joins_the_running_loop_within_a_step_and_leaves_first(triton_server, url: str, templates: dict[str, str]) -> None:
    before = metrics(triton_server.metrics_url)
    stream = Stream(url)
    try:
        long_call = stream.send(edit_fields(templates["long"], 0.3, PROGRESS=True), "long")
        stream.pump(lambda: len(long_call.steps) >= 3)
        short_call = stream.send(edit_fields(templates["short"], 0.2, PROGRESS=True), "short")
        stream.wait(long_call, short_call)
    finally:
        stream.close()
    assert long_call.error is None and short_call.error is None
    long_times = [t for t, _ in long_call.steps]
    short_first = short_call.steps[0][0]
    # Joined while the long one ran: the long one's steps continue around it, and it left first.
    assert long_times[0] < short_first < long_times[-1]
    assert short_call.steps[-1][0] < long_times[-1]
    # Within one step of being ready (prepared): the loop's own count of the steps each
    # prepared request waited. From the client's side the wait also holds preparation.
    after = metrics(triton_server.metrics_url)
    joined = metric(after, "instgenie_join_wait_steps_count") - metric(before, "instgenie_join_wait_steps_count")
    within_one = metric(after, "instgenie_join_wait_steps_bucket", le="1") - metric(before, "instgenie_join_wait_steps_bucket", le="1")
    assert joined == 2 and within_one == 2
    steps_before_join = sum(short_call.sent_at < t < short_first for t in long_times)
    print(f"the long run stepped {steps_before_join} times between the short one's arrival and its first step")


def test_mixed_batch_equals_each_request_alone(url: str, templates: dict[str, str]) -> None:
    fields = [
        edit_fields(templates["short"], 0.1, seed=1),
        edit_fields(templates["short"], 0.4, seed=2, prompt="a cat"),
        edit_fields(templates["long"], 0.25, seed=3),
        {"IMAGE": png(template_image(23)), "MASK": png(rect_mask(0.3, seed=4)), "PROMPT": "a vase", "STEPS": 4},
    ]
    streams = [Stream(url) for _ in fields]
    try:
        together = [s.send(f, f"mixed-{i}") for i, (s, f) in enumerate(zip(streams, fields))]
        for stream, call in zip(streams, together):
            stream.wait(call)
        alone = [streams[0].call(f, f"alone-{i}") for i, f in enumerate(fields)]
    finally:
        for stream in streams:
            stream.close()
    for batched, solo in zip(together, alone):
        assert batched.error is None and solo.error is None
        # Batched CPU kernels round ~1e-6 differently from solo ones; after decoding that
        # is at most one grey level.
        assert np.abs(pixels(batched).astype(int) - pixels(solo).astype(int)).max() <= 1


def test_edit_equal_to_its_template_matches_the_baseline_full_computation(triton_server, url: str) -> None:
    image, mask = png(template_image(24)), png(rect_mask(0.3, seed=5))
    template_id = register(url, image, prompt="a chair", SEED=9, STEPS=3, MASK=mask)
    stream = Stream(url)
    try:
        masked = stream.call({"TEMPLATE_ID": template_id, "MASK": mask, "PROMPT": "a chair"}, "exact-masked")
        full = stream.call({"TEMPLATE_ID": template_id, "MASK": mask, "PROMPT": "a chair", "FULL_COMPUTE": True}, "exact-full")
    finally:
        stream.close()
    baseline = baseline_png(triton_server.http_url, {"IMAGE": image, "MASK": mask, "PROMPT": "a chair", "SEED": 9, "STEPS": 3}, "exact-baseline")
    assert masked.outputs["COMPUTED_TOKENS"][0] < masked.outputs["NUM_TOKENS"][0]
    assert masked.outputs["EDITED_IMAGE"][0] == full.outputs["EDITED_IMAGE"][0] == baseline


def test_sync_front_model_serves_plain_http_infer(triton_server, templates: dict[str, str]) -> None:
    client = httpclient.InferenceServerClient(triton_server.http_url)
    try:
        inputs = []
        for name, value in edit_fields(templates["short"], 0.2).items():
            infer_input = httpclient.InferInput(name, [1], "BYTES")
            infer_input.set_data_from_numpy(np.array([value], dtype=np.object_))
            inputs.append(infer_input)
        result = client.infer("instgenie_edit_sync", inputs, request_id="sync-1")
        with pytest.raises(Exception, match=r"\[request sync-2\] unknown_template"):
            client.infer("instgenie_edit_sync", inputs[1:] + [_http_bytes("TEMPLATE_ID", "tpl-missing")], request_id="sync-2")
    finally:
        client.close()
    assert result.as_numpy("EDITED_IMAGE")[0].startswith(b"\x89PNG")
    assert result.as_numpy("TEMPLATE")[0].decode() == templates["short"]


def _http_bytes(name: str, value: str) -> httpclient.InferInput:
    infer_input = httpclient.InferInput(name, [1], "BYTES")
    infer_input.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
    return infer_input


def _huge_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (3000, 3000)).save(buffer, format="PNG")  # 9 Mpx > the 4.2 Mpx limit, a few KB on the wire
    return buffer.getvalue()


BAD_REQUESTS = {
    "malformed image": ({"ACTION": "register", "IMAGE": b"\x89PNG garbage", "PROMPT": "x"}, "invalid_image"),
    "oversized image": ({"ACTION": "register", "IMAGE": "HUGE", "PROMPT": "x"}, "image_too_large"),
    "image off the 16-pixel grid": ({"ACTION": "register", "IMAGE": "ODD", "PROMPT": "x"}, "invalid_image"),
    "mask size mismatch": ({"TEMPLATE_ID": "SHORT", "MASK": "SMALL_MASK", "PROMPT": "x"}, "invalid_mask"),
    "malformed mask": ({"TEMPLATE_ID": "SHORT", "MASK": b"not an image", "PROMPT": "x"}, "invalid_mask"),
    "unknown template": ({"TEMPLATE_ID": "tpl-00000000000000000000", "MASK": "MASK", "PROMPT": "x"}, "unknown_template"),
    "steps out of range": ({"IMAGE": "IMAGE", "MASK": "MASK", "PROMPT": "x", "STEPS": 1000}, "invalid_input"),
    "zero steps": ({"ACTION": "register", "IMAGE": "IMAGE", "PROMPT": "x", "STEPS": 0}, "invalid_input"),
    "steps differ from the template": ({"TEMPLATE_ID": "SHORT", "MASK": "MASK", "PROMPT": "x", "STEPS": 7}, "template_mismatch"),
    "negative seed": ({"IMAGE": "IMAGE", "MASK": "MASK", "PROMPT": "x", "SEED": -1}, "invalid_input"),
    "guidance not finite": ({"IMAGE": "IMAGE", "MASK": "MASK", "PROMPT": "x", "GUIDANCE": float("nan")}, "invalid_input"),
    "missing mask": ({"TEMPLATE_ID": "SHORT", "PROMPT": "x"}, "invalid_input"),
    "missing prompt": ({"TEMPLATE_ID": "SHORT", "MASK": "MASK"}, "invalid_input"),
    "template id and image both given": ({"TEMPLATE_ID": "SHORT", "IMAGE": "IMAGE", "MASK": "MASK", "PROMPT": "x"}, "invalid_input"),
    "unknown action": ({"ACTION": "explode", "PROMPT": "x"}, "invalid_input"),
    "prompt not UTF-8": ({"TEMPLATE_ID": "SHORT", "MASK": "MASK", "PROMPT": b"\xff\xfe"}, "invalid_input"),
    "unknown output encoding": ({"TEMPLATE_ID": "SHORT", "MASK": "MASK", "PROMPT": "x", "OUTPUT_ENCODING": "hex"}, "invalid_input"),
}


def _materialize(fields: dict, templates: dict[str, str]) -> dict:
    stand_ins = {
        "HUGE": _huge_png(),
        "ODD": png(template_image(25, size=120)),
        "SMALL_MASK": png(rect_mask(0.3, size=64)),
        "MASK": png(rect_mask(0.3)),
        "IMAGE": png(template_image(26)),
        "SHORT": templates["short"],
    }
    return {k: stand_ins.get(v, v) if isinstance(v, str) else v for k, v in fields.items()}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_a_clear_error_and_the_stream_stays_usable(url: str, templates: dict[str, str], case: str) -> None:
    fields, reason = BAD_REQUESTS[case]
    stream = Stream(url)
    try:
        bad = stream.call(_materialize(fields, templates), f"bad-{case.replace(' ', '-')}")
        good = stream.call(edit_fields(templates["short"], 0.2), "good-after-bad")
    finally:
        stream.close()
    assert bad.error is not None, f"{case}: no error"
    assert bad.error.reason == reason, bad.error
    assert bad.error.request_id == bad.request_id and bad.error.message
    assert good.error is None and good.outputs["EDITED_IMAGE"][0].startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "infer_input",
    [
        pytest.param(lambda: tensor("SEED", 1.5, datatype="FP32"), id="wrong dtype"),
        pytest.param(lambda: tensor("PROMPT", [b"a", b"b"]), id="wrong shape"),
        pytest.param(lambda: tensor("NOT_AN_INPUT", b"x", datatype="BYTES"), id="unknown input"),
    ],
)
def test_tensor_contract_violations_are_refused_by_triton(url: str, templates: dict[str, str], infer_input) -> None:
    stream = Stream(url)
    try:
        fields = edit_fields(templates["short"], 0.2)
        inputs = [tensor(name, value) for name, value in fields.items() if name != "PROMPT"] + [infer_input()]
        if "PROMPT" not in [i.name() for i in inputs]:
            inputs.append(tensor("PROMPT", "x"))
        bad = stream.send(inputs, "contract")
        stream.wait(bad, timeout=30)
        good = stream.call(fields, "good-after-contract")
    finally:
        stream.close()
    assert bad.error is not None and bad.error.message
    assert good.error is None


def test_errors_leave_batch_mates_with_their_solo_result(url: str, templates: dict[str, str]) -> None:
    good_fields = edit_fields(templates["long"], 0.3, seed=8)
    stream = Stream(url)
    try:
        solo = stream.call(good_fields, "solo")
        good = stream.send(good_fields, "with-errors")
        bads = [stream.send(_materialize(BAD_REQUESTS[c][0], templates), f"noise-{i}") for i, c in enumerate(sorted(BAD_REQUESTS)[:6])]
        stream.wait(good, *bads)
    finally:
        stream.close()
    assert all(b.error is not None for b in bads)
    assert good.outputs["EDITED_IMAGE"][0] == solo.outputs["EDITED_IMAGE"][0]


def test_cancelled_stream_leaves_the_batch_and_is_counted(triton_server, url: str) -> None:
    template_id = register(url, png(template_image(22)), STEPS=LONG_STEPS)
    before = metric(metrics(triton_server.metrics_url), "instgenie_cancellations_total")
    doomed, survivor = Stream(url), Stream(url)
    try:
        call = doomed.send(edit_fields(template_id, 0.3, PROGRESS=True), "doomed")
        other = survivor.send(edit_fields(template_id, 0.2), "survivor")
        doomed.pump(lambda: len(call.steps) >= 2)
        doomed.close(cancel=True)
        survivor.wait(other)
    finally:
        survivor.close()
    assert other.error is None and other.outputs["EDITED_IMAGE"][0].startswith(b"\x89PNG")
    deadline = time.monotonic() + 10
    while metric(metrics(triton_server.metrics_url), "instgenie_cancellations_total") <= before:
        assert time.monotonic() < deadline, "cancellation never counted"
        time.sleep(0.05)
    assert call.finished_at is None or len(call.steps) < LONG_STEPS
    assert triton_server.alive()


def test_queue_full_is_immediate_and_nothing_is_dropped(url: str, templates: dict[str, str]) -> None:
    count = 4 + SERVER_MAX_WAITING + 4  # more than max_active=4 + max_waiting can hold
    streams = [Stream(url) for _ in range(count)]
    try:
        calls = [s.send(edit_fields(templates["long"], 0.3, seed=i), f"flood-{i}") for i, s in enumerate(streams)]
        for stream, call in zip(streams, calls):
            stream.wait(call)
    finally:
        for stream in streams:
            stream.close()
    refused = [c for c in calls if c.error is not None]
    served = [c for c in calls if c.error is None]
    assert refused and all(c.error.reason == "queue_full" for c in refused)
    # Arriving together, all are "waiting" (being prepared) at first: max_waiting are taken.
    assert len(served) >= SERVER_MAX_WAITING and all(c.outputs["EDITED_IMAGE"][0] for c in served)
    # Refused at once, not after waiting for a slot.
    assert max(c.finished_at - c.sent_at for c in refused) < min(c.finished_at - c.sent_at for c in served)


def test_metrics_are_labelled_and_move(triton_server, url: str, templates: dict[str, str]) -> None:
    before = metrics(triton_server.metrics_url)
    stream = Stream(url)
    try:
        metered = stream.call(edit_fields(templates["short"], 0.2), "metered")
        stream.call(edit_fields("tpl-11111111111111111111", 0.2), "metered-miss")
    finally:
        stream.close()
    after = metrics(triton_server.metrics_url)
    # The request's timeline: its phases in the response, their histograms on the metrics page.
    timeline = json.loads(metered.outputs["TIMELINE"][0])
    assert list(timeline) == ["prepare", "admission", "steps", "finish"] and timeline["steps"] > 0
    for phase in timeline:
        assert metric(after, "instgenie_request_phase_seconds_count", phase=phase) > metric(
            before, "instgenie_request_phase_seconds_count", phase=phase
        ), phase
    labels = {"model": "instgenie_edit", "version": "1", "instance": "instgenie_edit_0_0"}
    for name in ("instgenie_steps_total", "instgenie_requests_completed_total", "instgenie_step_duration_seconds_count",
                 "instgenie_request_duration_seconds_count", "instgenie_time_to_first_step_seconds_count",
                 "instgenie_request_steps_total"):
        assert metric(after, name, **labels) > metric(before, name, **labels), name
    assert metric(after, "instgenie_text_tokens", **labels) == TEXT_LEN  # the router adds these to every request's cost
    assert metric(after, "instgenie_pixels_per_token", **labels) == 16  # the token grid the router counts masks on
    assert metric(after, "instgenie_template_cache_lookups_total", result="hit") > metric(before, "instgenie_template_cache_lookups_total", result="hit")
    assert metric(after, "instgenie_template_cache_lookups_total", result="miss") > metric(before, "instgenie_template_cache_lookups_total", result="miss")
    assert metric(after, "instgenie_errors_total", reason="unknown_template") >= 1
    for gauge in ("instgenie_active_requests", "instgenie_waiting_requests", "instgenie_masked_tokens", "instgenie_outstanding_token_steps"):
        assert any(series.startswith(gauge + "{") for series in after.splitlines()), gauge
    assert not any(series.startswith("instgenie_gpu_") for series in after.splitlines())  # CPU: absent, not failing
    time.sleep(1.5)  # the cache series are mirrored from the store once a second
    cache = metrics(triton_server.metrics_url)
    assert metric(cache, "instgenie_cache_step_hits_total", **labels) > 0
    assert metric(cache, "instgenie_cache_written_bytes_total", **labels) > 0
    assert metric(cache, "instgenie_cache_host_bytes", **labels) > 0
    for name in ("instgenie_cache_load_stall_seconds_total", "instgenie_cache_evictions_total", "instgenie_cache_corrupt_total"):
        assert any(series.startswith(name + "{") for series in cache.splitlines()), name


def test_metrics_see_work_in_flight(triton_server, url: str, templates: dict[str, str]) -> None:
    stream = Stream(url)
    seen = {"active": 0.0, "outstanding": 0.0}
    try:
        call = stream.send(edit_fields(templates["long"], 0.3), "watched")
        def watch() -> bool:
            values = metrics(triton_server.metrics_url)
            seen["active"] = max(seen["active"], metric(values, "instgenie_active_requests"))
            seen["outstanding"] = max(seen["outstanding"], metric(values, "instgenie_outstanding_token_steps"))
            return call.finished_at is not None

        stream.pump(watch)
    finally:
        stream.close()
    assert seen["active"] >= 1 and seen["outstanding"] > 0


# -- shutdown and restart: a server of their own ---------------------------------------------


def _own_server(triton_server, tmp_path: Path):
    from instgenie_server.launcher import TritonServer

    return TritonServer(Path(triton_server.model_repository), log_file=tmp_path / "server.log")


def test_graceful_shutdown_finishes_in_flight_work_and_leaves_nothing_running(triton_server, tmp_path: Path) -> None:
    from instgenie_server.launcher import process_group_members

    server = _own_server(triton_server, tmp_path)
    with server:
        template_id = register(server.grpc_url, png(template_image(27)), STEPS=LONG_STEPS)
        streams = [Stream(server.grpc_url) for _ in range(2)]
        calls = [s.send(edit_fields(template_id, 0.3, seed=i), f"inflight-{i}") for i, s in enumerate(streams)]
        time.sleep(0.2)
        pgid = server.pid
        status: dict = {}
        stopper = threading.Thread(target=lambda: status.update(code=server.stop(drain_timeout_s=60)))
        stopper.start()
        for stream, call in zip(streams, calls):
            stream.wait(call)
            stream.close()
        stopper.join(60)
    assert all(c.error is None and c.outputs["EDITED_IMAGE"][0].startswith(b"\x89PNG") for c in calls)
    assert status.get("code") == 0
    assert not process_group_members(pgid)
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))


def test_restart_serves_templates_from_the_disk_tier_with_stable_ids(triton_server, tmp_path: Path) -> None:
    image = png(template_image(28))
    first = _own_server(triton_server, tmp_path / "a")
    (tmp_path / "a").mkdir()
    with first:
        template_id = register(first.grpc_url, image, STEPS=3)
        stream = Stream(first.grpc_url)
        try:
            before = stream.call(edit_fields(template_id, 0.2), "before-restart")
        finally:
            stream.close()
    assert not first.alive()
    (tmp_path / "b").mkdir()
    second = _own_server(triton_server, tmp_path / "b")
    with second:
        stream = Stream(second.grpc_url)
        try:
            after = stream.call(edit_fields(template_id, 0.2), "after-restart")  # not registered here
        finally:
            stream.close()
        again = register(second.grpc_url, image, STEPS=3)
        time.sleep(1.5)  # cache series are mirrored from the store once a second
        cache = metrics(second.metrics_url)
    assert before.error is None and after.error is None, after.error
    assert after.outputs["EDITED_IMAGE"][0] == before.outputs["EDITED_IMAGE"][0]
    assert again == template_id
    assert metric(cache, "instgenie_cache_step_hits_total") + metric(cache, "instgenie_cache_disk_loads_total") >= 3
