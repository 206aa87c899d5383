"""The UNet families (SDXL, SD 1.5 inpainting) served end to end by a real tritonserver.

One server per family (SDXL in design (b), SD 1.5 in design (c)), started from the same model repository as the DiT server
(``instgenie serve --model FOLDER`` renders it the same way): registration, a
continuous batch of mixed masks, the exactness invariant against the baseline model
serving the same folder, a bad input, and the token grid the router counts on.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import TEXT_LEN, family_of, png, rect_mask, template_image
from instgenie_protocol import step_cost_from_metrics
from serving_calls import Stream, baseline_png, metric, metrics, perf_analyzer_inputs, register, run_perf_analyzer

# SDXL in design (b), SD 1.5 in (c), set by the model parameter sparse_convs.
UNET_VARIANTS = ("sdxl-inpaint+b", "sd-inpaint")


@pytest.fixture(scope="module", params=UNET_VARIANTS)
def unet_family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def unet_server(unet_family: str, engines, model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    from instgenie_server.launcher import TritonServer, default_model_repository, models_with_parameter, render_repository

    source = default_model_repository()
    parameters = {
        "model_dir": str(model_dirs[family_of(unet_family)]),
        "sparse_convs": "on" if engines[unet_family].family.sparse_convs else "off",
        "max_sequence_length": str(TEXT_LEN),
        "max_active": "4",
        "codec_nice": "0",
    }
    root = tmp_path_factory.mktemp(f"triton-{family_of(unet_family)}")
    repository = render_repository(source, root / "models", {name: parameters for name in models_with_parameter(source, "model_dir")})
    with TritonServer(repository, log_file=root / "server.log") as server:
        yield server


def _pixels(call) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(call.outputs["EDITED_IMAGE"][0])))


def test_unet_edit_equal_to_its_template_matches_the_baseline(unet_server) -> None:
    image, mask = png(template_image(31)), png(rect_mask(0.3, seed=6))
    template_id = register(unet_server.grpc_url, image, "a chair", SEED=9, STEPS=3, MASK=mask)
    stream = Stream(unet_server.grpc_url)
    try:
        masked = stream.call({"TEMPLATE_ID": template_id, "MASK": mask, "PROMPT": "a chair"}, "unet-masked")
        full = stream.call({"TEMPLATE_ID": template_id, "MASK": mask, "PROMPT": "a chair", "FULL_COMPUTE": True}, "unet-full")
    finally:
        stream.close()
    baseline = baseline_png(unet_server.http_url, {"IMAGE": image, "MASK": mask, "PROMPT": "a chair", "SEED": 9, "STEPS": 3}, "unet-baseline")
    assert masked.error is None and full.error is None, (masked.error, full.error)
    assert masked.outputs["COMPUTED_TOKENS"][0] < masked.outputs["NUM_TOKENS"][0]
    # The exactness invariant through the server: masked == full == the stock pipeline's PNG.
    assert masked.outputs["EDITED_IMAGE"][0] == full.outputs["EDITED_IMAGE"][0] == baseline


def test_unet_mixed_masks_batch_like_alone_and_bad_input_is_refused(unet_server, unet_family: str, engines) -> None:
    url = unet_server.grpc_url
    template_id = register(url, png(template_image(32)), STEPS=6)
    fields = [
        {"TEMPLATE_ID": template_id, "MASK": png(rect_mask(0.1, seed=1)), "PROMPT": "a lamp"},
        {"TEMPLATE_ID": template_id, "MASK": png(rect_mask(0.4, seed=2)), "PROMPT": "a cat"},
        {"IMAGE": png(template_image(33)), "MASK": png(rect_mask(0.3, seed=4)), "PROMPT": "a vase", "STEPS": 4},
    ]
    streams = [Stream(url) for _ in fields]
    try:
        together = [s.send(f, f"unet-mixed-{i}") for i, (s, f) in enumerate(zip(streams, fields))]
        for stream, call in zip(streams, together):
            stream.wait(call)
        alone = [streams[0].call(f, f"unet-alone-{i}") for i, f in enumerate(fields)]
        wrong_size = streams[1].call({"TEMPLATE_ID": template_id, "MASK": png(rect_mask(0.2, size=64)), "PROMPT": "x"}, "unet-bad")
        after = streams[1].call(fields[0], "unet-after-bad")
    finally:
        for stream in streams:
            stream.close()
    for batched, solo in zip(together, alone):
        assert batched.error is None and solo.error is None, (batched.error, solo.error)
        # Batched CPU kernels round ~1e-6 differently from solo ones; decoded, at most one grey level.
        assert np.abs(_pixels(batched).astype(int) - _pixels(solo).astype(int)).max() <= 1
    assert wrong_size.error is not None and "mask" in str(wrong_size.error).lower()
    assert after.error is None  # the stream stays usable
    text = metrics(unet_server.metrics_url)
    labels = {"model": "instgenie_edit", "version": "1", "instance": "instgenie_edit_0_0"}
    assert metric(text, "instgenie_pixels_per_token", **labels) == 8  # one token per latent pixel
    assert metric(text, "instgenie_text_tokens", **labels) == 77  # CLIP's length, whatever max_sequence_length
    assert metric(text, "instgenie_steps_total", **labels) > 0
    # The step cost the router prices masks with: the engine's own (dense ResNets in (b), none in (c)).
    published = step_cost_from_metrics(text)
    family = engines[unet_family].family
    assert published is not None and published.dense == pytest.approx(family.step_cost.dense)
    assert (published.dense > 0) == (not family.sparse_convs)
    assert [d for d, _ in published.levels] == [d for d, _ in family.step_cost.levels]


def test_perf_analyzer_loads_the_unet_server_with_prepared_input_files(unet_server, tmp_path: Path) -> None:
    """bench/perf_analyzer/prepare.py writes input files for any family's server; Triton's
    perf_analyzer drives the decoupled edit model with them."""
    binary = perf_analyzer_inputs(unet_server.grpc_url, tmp_path, steps=3, entries=4)
    run_perf_analyzer(binary, unet_server.grpc_url, tmp_path, entries=4, concurrency=2)
