"""The OpenAI Images API on the router, spoken by the real ``openai`` package, in front
of the session's real tritonserver (tiny flux-fill).

Every comparison of two images here is of requests run one after the other on one
server, alone (after the instance's background recordings of raw images, too):
identical kernels, so identical pixels, except where a test says why not.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from instgenie_client import InstGenIEClient
from instgenie_router.service import Router, RouterConfig

from conftest import SIZE, png, rect_mask, template_image
from serving_calls import metric, metrics, register

STEPS = 3


def _spec(server) -> str:  # type: ignore[no-untyped-def]
    return f"127.0.0.1:{server.grpc_port}:{server.http_port}:{server.metrics_port}"


@pytest.fixture(scope="module")
def router(triton_server):  # type: ignore[no-untyped-def]
    config = RouterConfig([_spec(triton_server)], grpc_port=0, http_port=0, metrics_port=0, scrape_interval_s=0.2,
                          max_upload_bytes=4 * 1024 * 1024)  # fmt: skip
    with Router(config) as running:
        yield running


def _client(router: Router, timeout_s: float = 120) -> openai.OpenAI:
    # No retries: a test sees each answer as the router gave it.
    return openai.OpenAI(base_url=f"http://127.0.0.1:{router.http_port}/v1", api_key="unused", max_retries=0, timeout=timeout_s)


def _pixels(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).astype(int)


def _alpha_mask(white_mask: Image.Image) -> bytes:
    """The OpenAI convention for the same region: transparent where ours is white."""
    region = np.asarray(white_mask.convert("L")) > 127
    rgba = np.zeros((*region.shape, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(region, 0, 255)
    return png(Image.fromarray(rgba, "RGBA"))


def _idle(server, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        text = metrics(server.metrics_url)
        if metric(text, "instgenie_active_requests") + metric(text, "instgenie_waiting_requests") == 0:
            return
        assert time.monotonic() < deadline, "the instance still runs the request"
        time.sleep(0.1)


def test_models_lists_the_edit_model(router: Router) -> None:
    assert [model.id for model in _client(router).models.list()] == ["instgenie_edit"]


def test_an_edit_of_a_template_equals_the_same_edit_over_grpc(router: Router, triton_server) -> None:  # type: ignore[no-untyped-def]
    template_id = register(f"127.0.0.1:{router.grpc_port}", png(template_image(61)), "a shelf", SEED=4, STEPS=STEPS)
    mask = png(rect_mask(0.25, seed=61))
    answer = _client(router).images.edit(
        image=("unused.png", png(template_image(61))), mask=("mask.png", mask), prompt="a red vase",
        response_format="b64_json", extra_body={"template_id": template_id},
    )  # fmt: skip
    direct = InstGenIEClient(triton_server.grpc_url, timeout_s=60).edit(mask, "a red vase", template_id=template_id)
    assert len(answer.data) == 1 and answer.size == f"{SIZE}x{SIZE}" and answer.output_format == "png"
    assert np.array_equal(_pixels(answer.data[0].b64_json), _pixels(direct.image))
    item = answer.data[0].model_dump()
    assert item["template_id"] == template_id and 0 < item["computed_tokens"] < item["num_tokens"]
    # The browser playground's template list: what was registered through the router.
    listed = _get_json(router, "/v1/templates")["data"]
    assert {"id": template_id, "object": "template", "width": SIZE, "height": SIZE} in listed
    picture = urllib.request.urlopen(f"http://127.0.0.1:{router.http_port}/v1/templates/{template_id}/image", timeout=10).read()
    assert np.array_equal(_pixels(picture), np.asarray(template_image(61).convert("RGB")).astype(int))


def test_both_mask_conventions_and_the_images_own_transparency_edit_the_same_region(router: Router, triton_server) -> None:  # type: ignore[no-untyped-def]
    image, mask = template_image(62), rect_mask(0.3, seed=62)
    client = _client(router)

    def edit(seed: int, **files: object) -> np.ndarray:
        _idle(triton_server)  # alone: not batched with the instance's background recording of an earlier image
        answer = client.images.edit(prompt="a plant", extra_body={"seed": seed, "steps": STEPS}, **files)  # type: ignore[arg-type]
        return _pixels(answer.data[0].b64_json)

    # Each pair is one image's first and second edit: both computed in full (a third
    # would use the template the instance records on the second sight).
    ours = edit(5, image=("image.png", png(image)), mask=("mask.png", png(mask)))
    theirs = edit(5, image=("image.png", png(image)), mask=("mask.png", _alpha_mask(mask)))
    assert np.array_equal(ours, theirs)
    # A browser canvas writes RGBA with every pixel opaque: its colours are the mask.
    opaque = edit(13, image=("image.png", png(image)), mask=("mask.png", png(mask.convert("RGBA"))))
    assert np.array_equal(opaque, edit(13, image=("image.png", png(image)), mask=("mask.png", png(mask))))
    region = np.asarray(mask) > 127
    rgba = np.dstack([np.asarray(image.convert("RGB")), np.where(region, 0, 255).astype(np.uint8)])
    own_alpha = edit(9, image=("image.png", png(Image.fromarray(rgba, "RGBA"))))
    # The transparent pixels' colours are the image's here, so the same request reaches the instance.
    assert np.array_equal(own_alpha, edit(9, image=("image.png", png(image)), mask=("mask.png", png(mask))))
    _idle(triton_server)  # leave no recording running into the next test's comparisons
    outside = ~region
    assert np.array_equal(ours[outside], np.asarray(image.convert("RGB")).astype(int)[outside])


def test_n_2_returns_two_different_images_seeded_apart(router: Router) -> None:
    image, mask = png(template_image(63)), png(rect_mask(0.3, seed=63))
    client = _client(router)
    two = client.images.edit(image=("i.png", image), mask=("m.png", mask), prompt="a lamp", n=2,
                             extra_body={"seed": 7, "steps": STEPS})  # fmt: skip
    assert len(two.data) == 2
    first, second = (_pixels(item.b64_json) for item in two.data)
    assert not np.array_equal(first, second)
    again = client.images.edit(image=("i.png", image), mask=("m.png", mask), prompt="a lamp", extra_body={"seed": 8, "steps": STEPS})
    # Image 1 is seed + 1; n=2 may have run both in one batch: batched-kernel rounding.
    assert np.abs(_pixels(again.data[0].b64_json) - second).max() <= 1


def test_a_streamed_edit_reports_every_step_then_the_image(router: Router) -> None:
    stream = _client(router).images.edit(
        image=("i.png", png(template_image(64))), mask=("m.png", png(rect_mask(0.2, seed=64))), prompt="a cup",
        stream=True, extra_body={"seed": 2, "steps": 4},
    )  # fmt: skip
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == ["image_edit.progress"] * 4 + ["image_edit.completed"]
    assert [event.step for event in events[:4]] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert all(event.total_steps == 4 for event in events[:4])  # type: ignore[attr-defined]
    done = events[-1]
    assert done.size == f"{SIZE}x{SIZE}" and done.usage.output_tokens > 0
    assert _pixels(done.b64_json).shape == (SIZE, SIZE, 3)


def test_a_bad_mask_is_a_400_naming_the_mask_streamed_or_not(router: Router) -> None:
    client = _client(router)
    wrong_size = png(rect_mask(0.3, size=SIZE // 2))
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("i.png", png(template_image(65))), mask=("m.png", wrong_size), prompt="x")
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "mask" and caught.value.body["code"] == "invalid_mask"  # type: ignore[index]
    assert "must be equal" in caught.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.APIError) as streamed:
        list(client.images.edit(image=("i.png", png(template_image(65))), mask=("m.png", wrong_size), prompt="x", stream=True))
    assert streamed.value.body["code"] == "invalid_mask"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as garbage:
        client.images.edit(image=("i.png", png(template_image(65))), mask=("m.png", b"not an image"), prompt="x")
    assert garbage.value.body["param"] == "mask"  # type: ignore[index]


def test_oversized_images_and_bodies_are_refused_before_any_instance_sees_them(router: Router, triton_server) -> None:  # type: ignore[no-untyped-def]
    client = _client(router)
    before = metric(metrics(triton_server.metrics_url), "instgenie_requests_total")
    huge = png(Image.new("RGB", (4096, 4096)))  # compresses to kilobytes; 16 M pixels decoded
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("i.png", huge), mask=("m.png", huge), prompt="x")
    assert caught.value.body["code"] == "image_too_large" and caught.value.body["param"] == "image"  # type: ignore[index]
    noise = np.random.default_rng(0).integers(0, 256, (1400, 1400, 3), dtype=np.uint8)  # ~5.9 MB as PNG: over the 4 MiB limit
    with pytest.raises(openai.APIStatusError) as too_big:
        client.images.edit(image=("i.png", png(Image.fromarray(noise))), prompt="x")
    assert too_big.value.status_code == 413 and too_big.value.body["code"] == "request_too_large"  # type: ignore[index]
    assert metric(metrics(triton_server.metrics_url), "instgenie_requests_total") == before


def test_client_mistakes_are_4xx_in_the_apis_shape(router: Router) -> None:
    client = _client(router)
    image, mask = ("i.png", png(template_image(66))), ("m.png", png(rect_mask(0.3)))
    cases = [
        (dict(response_format="url"), openai.BadRequestError, "response_format"),
        (dict(size="512x512"), openai.BadRequestError, "size"),
        (dict(model="dall-e-2"), openai.NotFoundError, "model"),
        (dict(extra_body={"template_id": "../../etc/passwd"}), openai.BadRequestError, "template_id"),
        (dict(extra_body={"steps": "many"}), openai.BadRequestError, "steps"),
        (dict(n=99), openai.BadRequestError, "n"),
    ]
    for fields, error, param in cases:
        with pytest.raises(error) as caught:
            client.images.edit(image=image, mask=mask, prompt="x", **fields)  # type: ignore[arg-type]
        body = caught.value.body
        assert body["param"] == param and body["type"] == "invalid_request_error" and body["message"], (fields, body)  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as no_mask:  # an opaque image and no mask: nothing says where to edit
        client.images.edit(image=image, prompt="x")
    assert no_mask.value.body["param"] == "mask"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.images.edit(image=image, mask=mask, prompt="x", extra_body={"template_id": "tpl-" + "0" * 20})
    assert unknown.value.body["code"] == "unknown_template"  # type: ignore[index]


def test_a_cancelled_stream_cancels_the_edit_on_the_instance(router: Router, triton_server) -> None:  # type: ignore[no-untyped-def]
    _idle(triton_server)
    before = metric(metrics(triton_server.metrics_url), "instgenie_cancellations_total")
    stream = _client(router).images.edit(
        image=("i.png", png(template_image(67))), mask=("m.png", png(rect_mask(0.3, seed=67))), prompt="a clock",
        stream=True, extra_body={"steps": 100},
    )  # fmt: skip
    first = next(iter(stream))
    assert first.type == "image_edit.progress" and first.total_steps == 100  # type: ignore[attr-defined]
    stream.close()
    started = time.monotonic()
    _idle(triton_server, timeout_s=30)
    assert time.monotonic() - started < 30
    deadline = time.monotonic() + 10
    while metric(metrics(triton_server.metrics_url), "instgenie_cancellations_total") <= before:
        assert time.monotonic() < deadline, "the instance never counted the cancellation"
        time.sleep(0.1)
    assert all(not instance.in_flight for instance in router.pool.instances)


def test_a_client_that_hangs_up_on_a_plain_answer_cancels_too(router: Router, triton_server) -> None:  # type: ignore[no-untyped-def]
    _idle(triton_server)
    before = metric(metrics(triton_server.metrics_url), "instgenie_cancellations_total")
    client = _client(router, timeout_s=1.0)  # gives up (and closes its connection) long before 100 steps at 512x512 end
    with pytest.raises(openai.APITimeoutError):
        client.images.edit(image=("i.png", png(template_image(68, size=512))),
                           mask=("m.png", png(rect_mask(0.3, size=512, seed=68))), prompt="a clock",
                           extra_body={"steps": 100})  # fmt: skip
    deadline = time.monotonic() + 30
    while metric(metrics(triton_server.metrics_url), "instgenie_cancellations_total") <= before:
        assert time.monotonic() < deadline, "the edit kept running after its client hung up"
        time.sleep(0.1)
    _idle(triton_server)


def test_a_full_router_answers_429_and_no_instance_503(triton_server) -> None:  # type: ignore[no-untyped-def]
    config = RouterConfig([_spec(triton_server)], grpc_port=0, http_port=0, metrics_port=0, max_in_flight=1)
    image, mask = ("i.png", png(template_image(69))), ("m.png", png(rect_mask(0.3, seed=69)))
    with Router(config) as full:
        client = _client(full)
        stream = client.images.edit(image=image, mask=mask, prompt="x", stream=True, extra_body={"steps": 100})
        next(iter(stream))  # the one slot is taken
        try:
            with pytest.raises(openai.RateLimitError) as caught:
                client.images.edit(image=image, mask=mask, prompt="x")
            assert caught.value.body["type"] == "rate_limit_error" and caught.value.body["code"] == "router_full"  # type: ignore[index]
        finally:
            stream.close()
    _idle(triton_server)
    dead = RouterConfig(["127.0.0.1:1:2:3"], grpc_port=0, http_port=0, metrics_port=0, scrape_interval_s=0.1)
    with Router(dead) as nowhere:
        deadline = time.monotonic() + 10
        while nowhere.pool.healthy():  # the scraper finds the instance unreachable
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(openai.InternalServerError) as caught:
            _client(nowhere).images.edit(image=image, mask=mask, prompt="x")
    assert caught.value.status_code == 503 and caught.value.body["type"] == "server_error"  # type: ignore[index]


def test_not_a_form_and_unknown_fields_are_refused(router: Router) -> None:
    url = f"http://127.0.0.1:{router.http_port}/v1/images/edits"
    request = urllib.request.Request(url, data=b'{"prompt": "x"}', headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400 and "multipart" in _error_body(caught.value)["message"]
    with pytest.raises(openai.BadRequestError) as unknown:
        _client(router).images.edit(image=("i.png", png(template_image(70))), prompt="x", extra_body={"strength": 0.5})
    assert unknown.value.body["param"] == "strength"  # type: ignore[index]


def _get_json(router: Router, path: str) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{router.http_port}{path}", timeout=10).read())


def _error_body(error: urllib.error.HTTPError) -> dict:
    return json.loads(error.read())["error"]



def test_stopping_the_router_cancels_its_open_streams_and_tells_their_clients(triton_server) -> None:  # type: ignore[no-untyped-def]
    _idle(triton_server)
    before = metric(metrics(triton_server.metrics_url), "instgenie_cancellations_total")
    config = RouterConfig([_spec(triton_server)], grpc_port=0, http_port=0, metrics_port=0)
    router = Router(config).start()
    try:
        stream = _client(router).images.edit(
            image=("i.png", png(template_image(71, size=512))), mask=("m.png", png(rect_mask(0.3, size=512, seed=71))),
            prompt="a clock", stream=True, extra_body={"steps": 100},
        )  # fmt: skip
        events = iter(stream)
        assert next(events).type == "image_edit.progress"
        started = time.monotonic()
        router.stop(grace_s=0.5)
        assert time.monotonic() - started < 10
        with pytest.raises(openai.APIError) as caught:
            for _ in events:  # the progress already on its way, then the error
                pass
        assert caught.value.body["code"] == "shutting_down"  # type: ignore[index]
    finally:
        router.stop(grace_s=0)
    deadline = time.monotonic() + 30
    while metric(metrics(triton_server.metrics_url), "instgenie_cancellations_total") <= before:
        assert time.monotonic() < deadline, "the edit kept running after the router stopped"
        time.sleep(0.1)
    _idle(triton_server)
