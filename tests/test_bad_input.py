"""Bad input: every malformed or hostile request gets a typed error with a message that
says what is wrong (never a crash, never a silently wrong image), and the engine keeps
serving afterwards."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conftest import TEXT_LEN, png, rect_mask, template_image
from instgenie import (
    Engine,
    EngineLimits,
    ImageTooLarge,
    InstGenIEError,
    InvalidImage,
    InvalidInput,
    InvalidMask,
    TemplateMismatch,
    TemplateRecord,
    UnknownTemplate,
    UnsupportedModel,
)

STEPS = 2
PROMPT = "a photo"
EDIT_PROMPT = "a red cat"


# -- helpers --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates(engines: dict[str, Engine]) -> dict[str, TemplateRecord]:
    """One registered 128x128 template per family (steps=2, seed=0)."""
    return {
        name: engine.register_template(png(template_image()), PROMPT, steps=STEPS, seed=0)
        for name, engine in engines.items()
    }


@pytest.fixture
def fill(engines: dict[str, Engine]) -> Engine:
    return engines["flux-fill"]


@pytest.fixture
def fill_template(templates: dict[str, TemplateRecord]) -> TemplateRecord:
    return templates["flux-fill"]


def sibling_engine(base: Engine, **kwargs) -> Engine:
    """A second engine over ``base``'s loaded pipeline (re-installs its attention processors)."""
    kwargs.setdefault("model_fingerprint", base.model_fingerprint)
    kwargs.setdefault("max_sequence_length", TEXT_LEN)
    fingerprint = kwargs.pop("model_fingerprint")
    return Engine(base.family.pipe, type(base.family), fingerprint, **kwargs)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of ``width`` x ``height`` black pixels.

    Built row by row with a streaming compressor, so the test never holds the decoded
    pixels either; all zeros deflate about 1000:1.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    compressor = zlib.compressobj(9)
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def grey_mask(values: np.ndarray) -> bytes:
    return png(Image.fromarray(values.astype(np.uint8), mode="L"))


# -- masks ------------------------------------------------------------------------------


def test_mask_size_differs_from_image_is_invalid_mask(fill: Engine, fill_template: TemplateRecord) -> None:
    mask = png(Image.new("L", (128, 96), 255))
    with pytest.raises(InvalidMask, match=r"mask is 128x96 but the image is 128x128"):
        fill.prepare_edit(mask, EDIT_PROMPT, template_id=fill_template.template_id)


def test_template_mask_size_differs_from_image_is_invalid_mask(fill: Engine) -> None:
    mask = png(Image.new("L", (96, 128), 255))
    with pytest.raises(InvalidMask, match=r"mask is 96x128 but the image is 128x128"):
        fill.prepare_template(png(template_image()), PROMPT, steps=STEPS, mask=mask)


def test_raw_image_edit_mask_size_differs_is_invalid_mask(fill: Engine) -> None:
    with pytest.raises(InvalidMask, match=r"mask is 64x64 but the image is 128x128"):
        fill.prepare_edit(png(rect_mask(0.5, size=64)), EDIT_PROMPT, image=png(template_image()), steps=STEPS)


def test_mask_of_lower_resolution_than_template_is_invalid_mask(fill: Engine, fill_template: TemplateRecord) -> None:
    """A 64x64 mask on a 128x128 template is never rescaled silently."""
    with pytest.raises(InvalidMask, match=r"64x64.*128x128"):
        fill.edit(png(rect_mask(1.0, size=64)), EDIT_PROMPT, template_id=fill_template.template_id)


_MASK_PNG = png(rect_mask(0.5))


@pytest.mark.parametrize(
    "mask, message",
    [
        pytest.param(b"this is not an image at all", "cannot be decoded", id="garbage-bytes"),
        pytest.param(b"", "empty", id="empty-bytes"),
        pytest.param(_MASK_PNG[: len(_MASK_PNG) // 2], "truncated or corrupt", id="truncated-png"),
        pytest.param("mask.png", "not bytes", id="a-path-string"),
        pytest.param(None, "not bytes", id="none"),
    ],
)
def test_undecodable_mask_is_invalid_mask(fill: Engine, fill_template: TemplateRecord, mask, message: str) -> None:
    with pytest.raises(InvalidMask, match=message) as info:
        fill.prepare_edit(mask, EDIT_PROMPT, template_id=fill_template.template_id)
    assert "mask" in str(info.value)
    assert info.value.reason == "invalid_mask"


# -- images -----------------------------------------------------------------------------

_PNG = png(template_image())


@pytest.mark.parametrize(
    "image, message",
    [
        pytest.param(b"\x00\x01garbage, not a picture" * 10, "cannot be decoded", id="garbage-bytes"),
        pytest.param(_PNG[: len(_PNG) // 2], "truncated or corrupt", id="truncated-png"),
        pytest.param(b"\x89PNG\r\n\x1a\n", "cannot be decoded", id="png-signature-only"),
        pytest.param(b"", "empty", id="empty-bytes"),
        pytest.param(12345, "not bytes", id="an-int"),
    ],
)
@pytest.mark.parametrize("path", ["register-template", "raw-image-edit"])
def test_undecodable_image_is_invalid_image(fill: Engine, image, message: str, path: str) -> None:
    with pytest.raises(InvalidImage, match=message) as info:
        if path == "register-template":
            fill.register_template(image, PROMPT, steps=STEPS)
        else:
            fill.edit(png(rect_mask(0.5)), EDIT_PROMPT, image=image, steps=STEPS)
    assert type(info.value) is InvalidImage  # not the ImageTooLarge subclass, not a mask error
    assert str(info.value).startswith("image")


def test_image_over_configured_pixel_limit_is_image_too_large(fill: Engine) -> None:
    limited = sibling_engine(fill, limits=EngineLimits(max_pixels=64 * 64))
    with pytest.raises(ImageTooLarge, match=r"128x128 = 16384 pixels; the limit is 4096"):
        limited.register_template(png(template_image()), PROMPT, steps=STEPS)
    with pytest.raises(ImageTooLarge, match=r"limit is 4096"):
        limited.edit(png(rect_mask(0.5)), EDIT_PROMPT, image=png(template_image()), steps=STEPS)
    # Exactly at the limit is fine.
    result = limited.edit(png(rect_mask(0.5, size=64)), EDIT_PROMPT, image=png(template_image(size=64)), steps=STEPS)
    assert result.image.size == (64, 64)
    assert torch.isfinite(result.latents).all()


@pytest.mark.parametrize(
    "size",
    [
        pytest.param((30000, 30000), id="30000x30000-over-pil-bomb-limit"),
        pytest.param((4096, 4096), id="4096x4096-over-engine-limit"),
    ],
)
def test_image_bomb_is_rejected_fast_without_decoding(
    fill: Engine, size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    width, height = size
    bomb = png_bomb(width, height)
    assert len(bomb) < 200_000  # small on disk ...
    with monkeypatch.context() as patch:  # ... but a genuine PNG whose header claims the full size
        patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        assert Image.open(io.BytesIO(bomb)).size == size

    loads: list[object] = []
    real_load = ImageFile.ImageFile.load

    def spy_load(self):
        loads.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"too large|the limit is"):
        fill.register_template(bomb, PROMPT, steps=STEPS)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"bomb took {elapsed:.2f} s to reject"
    assert loads == [], "the pixels of a bomb must never be decoded"
    # The same bomb as a mask is rejected the same way.
    with pytest.raises(ImageTooLarge, match=r"^mask .*(too large|the limit is)"):
        fill.edit(bomb, EDIT_PROMPT, image=png(template_image()), steps=STEPS)
    assert loads == [] or all(im.size != size for im in loads)


@pytest.mark.parametrize("size", [(120, 128), (128, 120), (136, 136)])
def test_size_off_the_16_pixel_grid_is_invalid_image(fill: Engine, size: tuple[int, int]) -> None:
    image = png(template_image().resize(size))
    width, height = size
    with pytest.raises(InvalidImage, match=rf"{width}x{height}.*multiples of 16 pixels"):
        fill.register_template(image, PROMPT, steps=STEPS)
    mask = png(Image.new("L", size, 255))
    with pytest.raises(InvalidImage, match=r"multiples of 16"):
        fill.edit(mask, EDIT_PROMPT, image=image, steps=STEPS)


# -- templates --------------------------------------------------------------------------


def test_unknown_template_id_is_unknown_template(fill: Engine) -> None:
    never_registered = "tpl-" + "e" * 20
    with pytest.raises(UnknownTemplate, match=re.escape(never_registered)) as info:
        fill.edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=never_registered)
    assert isinstance(info.value, KeyError)
    assert "register it" in str(info.value)
    assert info.value.reason == "unknown_template"


@pytest.mark.parametrize("template_id", ["tpl-does-not-exist", "/etc/passwd", "../../x", "tpl-" + "A" * 20, 7])
def test_a_malformed_template_id_is_unknown_template_and_not_repeated(fill: Engine, template_id: object) -> None:
    with pytest.raises(UnknownTemplate) as info:
        fill.edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=template_id)  # type: ignore[arg-type]
    assert "'tpl-' and 20 lowercase hex digits" in str(info.value) and str(template_id) not in str(info.value)


def test_steps_differ_from_template_is_template_mismatch(
    engine: Engine, family: str, templates: dict[str, TemplateRecord]
) -> None:
    record = templates[family]
    with pytest.raises(TemplateMismatch, match=r"recorded with 2 steps, the edit asks for 3"):
        engine.prepare_edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=record.template_id, steps=3)


def test_guidance_differs_from_template_is_template_mismatch(
    engine: Engine, family: str, templates: dict[str, TemplateRecord]
) -> None:
    record = templates[family]
    other = record.settings.guidance + 1.5
    with pytest.raises(TemplateMismatch, match=rf"recorded with guidance {record.settings.guidance}.*asks for {other}"):
        engine.prepare_edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=record.template_id, guidance=other)


@pytest.mark.parametrize("family", ["flux-inpaint", "sd3-inpaint"])
def test_seed_differs_from_template_is_template_mismatch_for_blending_pipelines(
    engine: Engine, family: str, templates: dict[str, TemplateRecord]
) -> None:
    assert engine.family.seed_must_match
    record = templates[family]
    with pytest.raises(TemplateMismatch, match=r"recorded with seed 0.*same seed \(got 7\)"):
        engine.prepare_edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=record.template_id, seed=7)
    # The template's own seed, given explicitly, is fine.
    state = engine.prepare_edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=record.template_id, seed=0)
    assert state.settings == record.settings


def test_seed_differs_from_template_is_allowed_for_flux_fill(fill: Engine, fill_template: TemplateRecord) -> None:
    assert not fill.family.seed_must_match
    mask_image = rect_mask(0.3)
    mask = png(mask_image)
    same = fill.edit(mask, EDIT_PROMPT, template_id=fill_template.template_id, seed=0)
    other = fill.edit(mask, EDIT_PROMPT, template_id=fill_template.template_id, seed=7)
    assert torch.isfinite(other.latents).all()
    assert other.computed_tokens == same.computed_tokens < other.num_tokens  # still served from the cache
    assert not torch.equal(same.latents, other.latents)
    edited = np.asarray(mask_image) >= 128
    same_pixels, other_pixels = np.asarray(same.image), np.asarray(other.image)
    assert not np.array_equal(same_pixels[edited], other_pixels[edited])
    # Outside the mask both are the template, byte for byte.
    template_pixels = np.asarray(fill_template.image)
    assert np.array_equal(other_pixels[~edited], template_pixels[~edited])
    assert np.array_equal(same_pixels[~edited], template_pixels[~edited])
    # A bad seed is still validated on this path.
    with pytest.raises(InvalidInput, match=r"seed must be a non-negative"):
        fill.prepare_edit(mask, EDIT_PROMPT, template_id=fill_template.template_id, seed=-1)


def test_template_of_another_model_is_template_mismatch(fill: Engine, fill_template: TemplateRecord) -> None:
    other = sibling_engine(fill, model_fingerprint="other")
    other.add_template(fill_template, fill_template.activations)
    with pytest.raises(TemplateMismatch, match=r"recorded with model .*this engine serves other") as info:
        other.edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=fill_template.template_id)
    assert "model" in str(info.value)


def test_template_of_another_text_length_is_template_mismatch(fill: Engine, fill_template: TemplateRecord) -> None:
    other = sibling_engine(fill, max_sequence_length=2 * TEXT_LEN)
    other.add_template(fill_template, fill_template.activations)
    with pytest.raises(TemplateMismatch, match=r"another text length"):
        other.edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=fill_template.template_id)


# -- model folders ----------------------------------------------------------------------


def _copy_model(model_dirs: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dirs["flux-fill"], tmp_path / "model"))


def test_model_folder_of_unsupported_pipeline_class_is_unsupported_model(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy_model(model_dirs, tmp_path)
    index = folder / "model_index.json"
    config = json.loads(index.read_text())
    config["_class_name"] = "StableDiffusionXLPipeline"
    index.write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=r"'StableDiffusionXLPipeline' is not supported") as info:
        Engine.from_pretrained(str(folder), max_sequence_length=TEXT_LEN)
    message = str(info.value)
    for supported in ("FluxFillPipeline", "FluxInpaintPipeline", "StableDiffusion3InpaintPipeline"):
        assert supported in message


def test_model_folder_without_model_index_is_unsupported_model(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy_model(model_dirs, tmp_path)
    (folder / "model_index.json").unlink()
    with pytest.raises(UnsupportedModel, match=r"not a diffusers pipeline folder \(no model_index.json\)"):
        Engine.from_pretrained(str(folder))
    with pytest.raises(UnsupportedModel, match=r"no model_index.json"):
        Engine.from_pretrained(str(tmp_path / "does-not-exist"))


def test_a_4_channel_unet_and_options_a_family_lacks_are_refused(model_dirs: dict[str, Path]) -> None:
    from instgenie.families import SDInpaintFamily
    from instgenie.loading import load_pipeline

    pipe, _, _ = load_pipeline(str(model_dirs["sd-inpaint"]), "cpu", torch.float32)
    pipe.unet.register_to_config(in_channels=4)  # a text-to-image UNet in an inpainting pipeline
    with pytest.raises(UnsupportedModel, match=r"4-channel UNet is not supported"):
        SDInpaintFamily(pipe, torch.device("cpu"), torch.float32)
    with pytest.raises(InvalidInput, match=r"sparse_convs"):
        Engine.from_pretrained(str(model_dirs["flux-fill"]), family_options={"sparse_convs": True})
    from instgenie_server.config import ModelParameters

    assert ModelParameters.from_strings({"model_dir": "m", "sparse_convs": "on"}).family_options == {"sparse_convs": True}
    assert ModelParameters.from_strings({"model_dir": "m"}).family_options == {}
    with pytest.raises(ValueError, match="sparse_convs must be on or off"):
        _ = ModelParameters.from_strings({"model_dir": "m", "sparse_convs": "maybe"}).family_options


def test_serving_thread_parameters_default_by_device_and_refuse_nonsense() -> None:
    from instgenie_server.config import ModelParameters

    def params(**raw: str) -> ModelParameters:
        return ModelParameters.from_strings({"model_dir": "m", **raw})

    # A CPU: the loop and the codec take turns; no outbox thread. A GPU: the opposite.
    assert (params().helper_turn_s, params().use_outbox) == (1.0, False)
    assert (params(device="cuda").helper_turn_s, params(device="cuda").use_outbox) == (0.0, True)
    assert params(yield_to_helpers_s="0.25").helper_turn_s == 0.25
    assert params(outbox="on").use_outbox is True and params(device="cuda", outbox="off").use_outbox is False
    for raw, match in (({"yield_to_helpers_s": "soon"}, "auto or seconds"), ({"yield_to_helpers_s": "-1"}, ">= 0")):
        with pytest.raises(ValueError, match=match):
            _ = params(**raw).helper_turn_s
    with pytest.raises(ValueError, match="outbox must be auto, on or off"):
        _ = params(outbox="sometimes").use_outbox
    # Round trips to the server: metric batches every 0.2 s, a cancellation query per 0.1 s.
    assert (params().metrics_flush_s, params().cancel_poll_s) == (0.2, 0.1)
    assert (params(metrics_flush_s="0", cancel_poll_s="0").metrics_flush_s, params(cancel_poll_s="0").cancel_poll_s) == (0.0, 0.0)
    for name in ("metrics_flush_s", "cancel_poll_s"):
        with pytest.raises(ValueError, match=f"{name} must be >= 0 seconds"):
            params(**{name: "-0.5"})


@pytest.mark.parametrize("content", ["{not json", "{}", "[]", "null", '"FluxFillPipeline"'])
def test_model_index_without_a_pipeline_class_is_unsupported_model(
    model_dirs: dict[str, Path], tmp_path: Path, content: str
) -> None:
    folder = _copy_model(model_dirs, tmp_path)
    (folder / "model_index.json").write_text(content)
    with pytest.raises(UnsupportedModel, match=r"model_index.json"):
        Engine.from_pretrained(str(folder))


# -- masks that are valid but unusual ------------------------------------------------------


@pytest.mark.parametrize("family", ["flux-fill", "flux-inpaint", "sd3-inpaint"])
def test_empty_mask_returns_template_unchanged_without_computing(
    engine: Engine, family: str, templates: dict[str, TemplateRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = templates[family]
    black = png(Image.new("L", (128, 128), 0))
    state = engine.prepare_edit(black, EDIT_PROMPT, template_id=record.template_id)
    assert state.done and state.step_index == state.total_steps == STEPS
    assert state.computed_tokens == 0
    assert not state.pixel_mask.any()

    def never(*args, **kwargs):
        raise AssertionError("an empty-mask edit must not run the transformer or the VAE decoder")

    monkeypatch.setattr(engine.family, "predict", never)
    monkeypatch.setattr(engine.family, "decode", never)
    engine.step([state])  # a no-op for a finished state
    assert state.step_index == STEPS
    result = engine.finish_edit(state)
    engine.release(state)
    assert result.computed_tokens == 0
    assert result.template_id == record.template_id
    assert np.array_equal(np.asarray(result.image), np.asarray(record.image))
    assert np.array_equal(np.asarray(result.image), np.asarray(template_image()))
    assert torch.equal(result.latents, record.final_latents)


@pytest.mark.parametrize("family", ["flux-fill", "flux-inpaint", "sd3-inpaint"])
def test_soft_grey_mask_edits_only_pixels_at_least_half_white(
    engine: Engine, family: str, templates: dict[str, TemplateRecord]
) -> None:
    record = templates[family]
    values = np.full((128, 128), 100, np.uint8)
    values[40:88, 16:64] = 200
    values[0:16, 112:128] = 127  # just below the cut
    values[112:128, 0:16] = 128  # exactly at the cut
    mask = grey_mask(values)

    state = engine.prepare_edit(mask, EDIT_PROMPT, template_id=record.template_id)
    edited = values >= 128
    assert np.array_equal(state.pixel_mask, edited)
    assert 0 < state.computed_tokens < state.num_tokens  # not all of it, not none of it
    engine.run([state])
    result = engine.finish_edit(state)
    engine.release(state)

    out, template = np.asarray(result.image), np.asarray(record.image)
    assert np.array_equal(out[~edited], template[~edited])  # grey < 128 is kept, byte for byte
    assert not np.array_equal(out[edited], template[edited])  # grey >= 128 is edited
    assert torch.isfinite(result.latents).all()


def test_sixteen_bit_mask_is_thresholded_at_half_of_its_range() -> None:
    from instgenie.imaging import decode_mask

    values = np.array([[0, 1000, 30000, 40000, 65535]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")  # a 16-bit greyscale PNG
    assert decode_mask(buffer.getvalue(), (5, 1)).tolist() == [[False, False, False, True, True]]


# -- request fields ---------------------------------------------------------------------


@pytest.mark.parametrize("steps", [0, -1, 101, 1000, 2.5, True, "2"])
@pytest.mark.parametrize("path", ["register-template", "raw-image-edit"])
def test_steps_out_of_range_is_invalid_input(fill: Engine, steps, path: str) -> None:
    with pytest.raises(InvalidInput, match=r"steps must be an integer in \[1, 100\]"):
        if path == "register-template":
            fill.prepare_template(png(template_image()), PROMPT, steps=steps)
        else:
            fill.prepare_edit(png(rect_mask(0.5)), EDIT_PROMPT, image=png(template_image()), steps=steps)


@pytest.mark.parametrize("guidance", [math.nan, math.inf, -math.inf, "3.5"])
@pytest.mark.parametrize("path", ["register-template", "raw-image-edit"])
def test_guidance_not_finite_is_invalid_input(fill: Engine, guidance, path: str) -> None:
    with pytest.raises(InvalidInput, match=r"guidance must be a finite number"):
        if path == "register-template":
            fill.prepare_template(png(template_image()), PROMPT, steps=STEPS, guidance=guidance)
        else:
            fill.prepare_edit(png(rect_mask(0.5)), EDIT_PROMPT, image=png(template_image()), steps=STEPS, guidance=guidance)


@pytest.mark.parametrize("guidance", [-1.0, 101.0])
def test_guidance_out_of_range_is_invalid_input(fill: Engine, guidance: float) -> None:
    with pytest.raises(InvalidInput, match=r"guidance must be in \[0, 100.0\]"):
        fill.prepare_template(png(template_image()), PROMPT, steps=STEPS, guidance=guidance)


@pytest.mark.parametrize("guidance", ["abc", [30.0]])
def test_guidance_not_a_number_on_template_edit_is_invalid_input(
    fill: Engine, fill_template: TemplateRecord, guidance
) -> None:
    with pytest.raises(InstGenIEError):
        fill.prepare_edit(png(rect_mask(0.5)), EDIT_PROMPT, template_id=fill_template.template_id, guidance=guidance)


@pytest.mark.parametrize("prompt", [None, 42, b"a photo", ["a photo"]])
def test_prompt_not_a_string_is_invalid_input(fill: Engine, fill_template: TemplateRecord, prompt) -> None:
    expected = rf"prompt must be a string, got {type(prompt).__name__}"
    with pytest.raises(InvalidInput, match=expected):
        fill.prepare_edit(png(rect_mask(0.5)), prompt, template_id=fill_template.template_id)
    with pytest.raises(InvalidInput, match=expected):
        fill.prepare_template(png(template_image()), prompt, steps=STEPS)


def test_both_template_id_and_image_is_invalid_input(fill: Engine, fill_template: TemplateRecord) -> None:
    with pytest.raises(InvalidInput, match=r"exactly one of template_id and image"):
        fill.prepare_edit(
            png(rect_mask(0.5)), EDIT_PROMPT, template_id=fill_template.template_id, image=png(template_image())
        )


def test_neither_template_id_nor_image_is_invalid_input(fill: Engine) -> None:
    with pytest.raises(InvalidInput, match=r"exactly one of template_id and image"):
        fill.prepare_edit(png(rect_mask(0.5)), EDIT_PROMPT)


def test_states_of_different_resolutions_cannot_share_a_step(fill: Engine) -> None:
    small = fill.prepare_edit(png(rect_mask(1.0, size=64)), EDIT_PROMPT, image=png(template_image(size=64)), steps=STEPS)
    large = fill.prepare_edit(png(rect_mask(1.0)), EDIT_PROMPT, image=png(template_image()), steps=STEPS)
    with pytest.raises(InvalidInput, match=r"different resolutions"):
        fill.step([small, large])
    assert small.step_index == large.step_index == 0  # neither was advanced
    fill.run([small])
    fill.run([large])
    assert small.done and large.done


# -- recovery ---------------------------------------------------------------------------


def test_engine_still_serves_a_normal_edit_after_bad_requests(
    fill: Engine, fill_template: TemplateRecord
) -> None:
    mask = png(rect_mask(0.25, seed=3))
    before = fill.edit(mask, EDIT_PROMPT, template_id=fill_template.template_id)
    shared_scheduler = fill.family.pipe.scheduler
    templates_before = fill.template_ids()

    bad_requests = [
        (InvalidMask, lambda: fill.edit(b"garbage", EDIT_PROMPT, template_id=fill_template.template_id)),
        (InvalidMask, lambda: fill.edit(png(rect_mask(0.5, size=64)), EDIT_PROMPT, template_id=fill_template.template_id)),
        (UnknownTemplate, lambda: fill.edit(mask, EDIT_PROMPT, template_id="tpl-nope")),
        (TemplateMismatch, lambda: fill.edit(mask, EDIT_PROMPT, template_id=fill_template.template_id, steps=5)),
        (InvalidImage, lambda: fill.register_template(_PNG[: len(_PNG) // 2], PROMPT, steps=STEPS)),
        (ImageTooLarge, lambda: fill.register_template(png_bomb(30000, 30000), PROMPT, steps=STEPS)),
        (InvalidInput, lambda: fill.edit(mask, None, template_id=fill_template.template_id)),
        (InvalidInput, lambda: fill.register_template(png(template_image()), PROMPT, steps=0)),
    ]
    for error, request in bad_requests:
        with pytest.raises(error):
            request()

    assert fill.family.pipe.scheduler is shared_scheduler
    assert fill.template_ids() == templates_before
    after = fill.edit(mask, EDIT_PROMPT, template_id=fill_template.template_id)
    assert after.computed_tokens == before.computed_tokens < after.num_tokens
    assert torch.isfinite(after.latents).all()
    assert torch.equal(after.latents, before.latents)
    assert np.array_equal(np.asarray(after.image), np.asarray(before.image))
