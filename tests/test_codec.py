"""Prompt encoding and VAE work in a separate process give exactly the in-process results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import TEXT_LEN, png, rect_mask, template_image
from instgenie import Engine
from instgenie.codec import ProcessCodec


def test_process_codec_results_equal_local_codec(model_dirs: dict[str, Path]) -> None:
    engine = Engine.from_pretrained(str(model_dirs["flux-fill"]), max_sequence_length=TEXT_LEN)
    mask, image = png(rect_mask(0.3, seed=3)), png(template_image(31))
    local = engine.edit(mask, "a lamp", image=image, seed=4, steps=3)
    local_template = engine.register_template(image, "a room", seed=4, steps=3)

    engine.use_codec(ProcessCodec(engine.family, str(model_dirs["flux-fill"]), workers=1, nice=5))
    try:
        remote = engine.edit(mask, "a lamp", image=image, seed=4, steps=3)
        remote_template = engine.register_template(image, "a room", seed=4, steps=3)
        edited = engine.edit(mask, "a hat", template_id=remote_template.template_id)
    finally:
        engine.codec.close()
    assert torch.equal(local.latents, remote.latents)
    assert np.array_equal(np.asarray(local.image), np.asarray(remote.image))
    assert remote_template.template_id == local_template.template_id
    assert torch.equal(local_template.final_latents, remote_template.final_latents)
    assert edited.computed_tokens < edited.num_tokens
