"""The diffusers baseline: stock pipeline, request-level batching, the engine's answers."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SIZE, TEXT_LEN, family_of, png, rect_mask, template_image
from instgenie import Engine, EngineLimits, InstGenIEError
from instgenie.baseline import BaselinePipeline
from instgenie.families import FluxFillFamily
from instgenie.imaging import encode_png
from instgenie.step_loop import EditRequest, JobOutcome

STEPS = 2


@pytest.fixture(scope="module")
def baselines(model_dirs: dict[str, Path]) -> dict[str, BaselinePipeline]:
    return {
        family: BaselinePipeline.from_pretrained(
            str(path), device="cpu", dtype=torch.float32, max_sequence_length=TEXT_LEN, limits=EngineLimits()
        )
        for family, path in model_dirs.items()
    }


@pytest.fixture
def baseline(baselines: dict[str, BaselinePipeline], family: str) -> BaselinePipeline:
    return baselines[family_of(family)]


def edit(request_id: str, image_seed: int, mask_seed: int, **kwargs: Any) -> EditRequest:
    fields: dict[str, Any] = dict(prompt="a blue car", seed=5, steps=STEPS)
    fields.update(kwargs)
    return EditRequest(
        request_id, image=png(template_image(image_seed)), mask=png(rect_mask(0.3, seed=mask_seed)), **fields
    )


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def test_single_request_is_byte_identical_to_the_engine_full_computation(
    baseline: BaselinePipeline, engine: Engine
) -> None:
    request = edit("r1", 2, 2)
    ours = engine.edit(request.mask, request.prompt, image=request.image, seed=5, steps=STEPS)

    [outcome] = baseline.run([request])

    assert isinstance(outcome, JobOutcome)
    assert outcome.png == encode_png(ours.image)
    assert torch.equal(outcome.latents, ours.latents)
    assert (outcome.request_id, outcome.template_id) == ("r1", None)
    assert outcome.computed_tokens == outcome.num_tokens == ours.num_tokens
    assert outcome.total_steps == STEPS


def test_batched_requests_get_what_they_get_alone(baseline: BaselinePipeline, family: str) -> None:
    requests = [
        edit("a", 3, 3, prompt="a hat"),
        edit("b", 4, 4, prompt="a long red scarf", seed=9),  # same settings as "a": one pipeline call
        edit("c", 5, 5, prompt="a ball", steps=STEPS + 1),  # other steps: its own call
    ]
    together = baseline.run(requests)
    alone = [baseline.run([r])[0] for r in requests]

    differences = []
    for request, batched, single in zip(requests, together, alone):
        assert isinstance(batched, JobOutcome) and isinstance(single, JobOutcome)
        assert batched.request_id == request.request_id
        differences.append(int(np.abs(pixels(batched.png) - pixels(single.png)).max()))
        keep = np.asarray(Image.open(io.BytesIO(request.mask))) < 128
        assert np.array_equal(pixels(batched.png)[keep], pixels(request.image)[keep])
    assert together[2].total_steps == STEPS + 1
    # Batched CPU kernels round slightly differently from solo ones.
    print(f"{family}: max |batched - alone| PNG difference per request (of 255) = {differences}")
    assert max(differences) <= 2


def test_bad_requests_fail_alone(baselines: dict[str, BaselinePipeline]) -> None:
    baseline = baselines["flux-fill"]
    good = edit("good", 6, 6)
    requests = [
        good,
        EditRequest("bad-mask", prompt="x", image=good.image, mask=b"not a png", steps=STEPS),
        EditRequest("bad-image", prompt="x", image=b"\x89PNG garbage", mask=good.mask, steps=STEPS),
        EditRequest("small-mask", prompt="x", image=good.image, mask=png(rect_mask(0.3, size=64)), steps=STEPS),
        EditRequest("odd-size", prompt="x", image=png(template_image(1, size=120)), mask=png(rect_mask(0.3, size=120))),
        edit("bad-steps", 6, 6, steps=0),
        edit("bad-guidance", 6, 6, guidance=float("nan")),
        edit("bad-seed", 6, 6, seed=-1),
        edit("bad-prompt", 6, 6, prompt=None),
        EditRequest("no-mask", prompt="x", image=good.image),
        EditRequest("register", action="register", prompt="x", image=good.image),
        edit("also-good", 7, 7),
    ]
    results = baseline.run(requests)

    reasons = {r.request_id: (o.reason if isinstance(o, InstGenIEError) else "ok") for r, o in zip(requests, results)}
    assert reasons == {
        "good": "ok",
        "bad-mask": "invalid_mask",
        "bad-image": "invalid_image",
        "small-mask": "invalid_mask",
        "odd-size": "invalid_image",
        "bad-steps": "invalid_input",
        "bad-guidance": "invalid_input",
        "bad-seed": "invalid_input",
        "bad-prompt": "invalid_input",
        "no-mask": "invalid_input",
        "register": "invalid_input",
        "also-good": "ok",
    }
    # The survivors ran as if the bad ones had never been there: bit-exact against the same
    # batch without them (identical call shapes). Against a solo run only up to
    # batched-kernel rounding: CPU GEMMs are not batch-invariant (blocking depends on the
    # batch size and the ISA), the bound of test_batched_requests_get_what_they_get_alone.
    clean = baseline.run([good, requests[-1]])
    assert [results[0].png, results[-1].png] == [outcome.png for outcome in clean]
    assert int(np.abs(pixels(results[0].png) - pixels(baseline.run([good])[0].png)).max()) <= 2


def test_template_id_is_refused(baselines: dict[str, BaselinePipeline]) -> None:
    request = EditRequest("t", prompt="x", mask=png(rect_mask(0.3)), template_id="tpl-0123")

    [error] = baselines["flux-fill"].run([request])

    assert isinstance(error, InstGenIEError) and error.reason == "invalid_input"
    assert "IMAGE" in str(error)


class _FailingPipeline:
    """A stand-in pipeline that fails every call, counting them."""

    def __init__(self) -> None:
        self.calls = 0

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        pass

    def __call__(self, **kwargs: Any) -> Any:
        self.calls += 1
        raise RuntimeError("out of memory")


def test_empty_mask_returns_the_image_without_the_pipeline_and_a_failing_call_fails_its_group() -> None:
    pipe = _FailingPipeline()
    baseline = BaselinePipeline(pipe, FluxFillFamily, max_sequence_length=TEXT_LEN)
    image = png(template_image(8))
    requests = [
        EditRequest("empty", prompt="x", image=image, mask=png(rect_mask(0.0)), steps=STEPS),
        EditRequest("one", prompt="x", image=image, mask=png(rect_mask(0.3)), steps=STEPS),
        EditRequest("two", prompt="y", image=image, mask=png(rect_mask(0.5)), steps=STEPS),
        EditRequest("other", prompt="z", image=image, mask=png(rect_mask(0.5)), steps=STEPS + 1),
    ]

    empty, *failed = baseline.run(requests)

    assert isinstance(empty, JobOutcome)
    assert np.array_equal(pixels(empty.png), pixels(image))
    assert (empty.computed_tokens, empty.num_tokens, empty.latents) == (0, (SIZE // 16) ** 2, None)
    assert pipe.calls == 2  # one per group; none for the empty mask
    assert [e.reason for e in failed] == ["internal"] * 3  # type: ignore[union-attr]


def test_an_engine_pipeline_is_not_a_baseline(engines: dict[str, Engine]) -> None:
    engine = engines["sd3-inpaint"]
    with pytest.raises(ValueError, match="stock"):
        BaselinePipeline(engine.family.pipe, type(engine.family))


@pytest.mark.parametrize("family", ["flux-fill", "sd3-inpaint"])
def test_an_engine_hands_its_pipeline_back_untouched(model_dirs: dict[str, Path], family: str) -> None:
    from instgenie.attention import HOOK_PREFIX, is_installed
    from instgenie.loading import load_pipeline

    stock_pipe, _, _ = load_pipeline(str(model_dirs[family]), "cpu", torch.float32)
    stock = {name: type(p) for name, p in stock_pipe.transformer.attn_processors.items()}
    engine = Engine.from_pretrained(str(model_dirs[family]), max_sequence_length=TEXT_LEN)
    pipe = engine.family.pipe
    with pytest.raises(ValueError, match="masked attention processors or hooks"):
        BaselinePipeline(pipe, type(engine.family), max_sequence_length=TEXT_LEN)

    engine.family.uninstall()
    assert not is_installed(pipe.transformer)
    assert {name: type(p) for name, p in pipe.transformer.attn_processors.items()} == stock
    hooks = [name for m in pipe.transformer.modules() for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})]
    assert not [name for name in hooks if name.startswith(HOOK_PREFIX)]
    baseline = BaselinePipeline(pipe, type(engine.family), max_sequence_length=TEXT_LEN)
    # The handed-back pipeline computes what a freshly loaded one does (same kernels, same bits).
    request = edit("back", 3, 4, steps=2)
    again = BaselinePipeline(stock_pipe, type(engine.family), max_sequence_length=TEXT_LEN)
    assert baseline.run([request])[0].png == again.run([request])[0].png
