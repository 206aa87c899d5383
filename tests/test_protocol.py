"""The wire protocol in plain Python: request parsing, error wording and statuses, metrics text."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from conftest import png, rect_mask
from instgenie.errors import InvalidInput
from instgenie.token_grid import StepCost
from instgenie_protocol import (
    ServerError,
    decode_blob,
    error_code,
    error_message,
    http_status,
    image_token_count,
    image_work,
    mask_token_count,
    mask_work,
    parse_request,
    parse_samples,
    sample_sum,
    step_cost_from_metrics,
)


def getter(**values: object):
    arrays = {name: value if isinstance(value, np.ndarray) else np.array([value], dtype=object) for name, value in values.items()}
    return arrays.get


def test_an_edit_is_read_with_its_blobs_raw_or_base64() -> None:
    mask = png(rect_mask(0.3))
    parsed = parse_request(
        getter(TEMPLATE_ID=b"tpl-0123456789abcdef0123", MASK=base64.b64encode(mask), PROMPT=b"a hat",
               STEPS=np.array([4], np.int32), PROGRESS=np.array([True]), OUTPUT_ENCODING=b"base64"),  # fmt: skip
        "r1",
    )
    assert parsed.action == "edit" and parsed.progress and parsed.base64_output
    request = parsed.request
    assert request.mask == mask and request.template_id == "tpl-0123456789abcdef0123" and request.steps == 4
    assert decode_blob(mask) == mask and decode_blob(b"not an image!") == b"not an image!"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"ACTION": b"explode", "PROMPT": b"x"}, "ACTION must be one of"),
        ({"PROMPT": np.array([b"a", b"b"], dtype=object)}, "exactly one element"),
        ({"PROMPT": b"x", "STEPS": np.array([1.5], np.float32)}, "STEPS must be INT32"),
        ({"PROMPT": b"\xff\xfe"}, "not valid UTF-8"),
        ({"MASK": b"x"}, "edit needs PROMPT"),
        ({"PROMPT": b"x", "OUTPUT_ENCODING": b"hex"}, "OUTPUT_ENCODING"),
    ],
)
def test_a_malformed_request_is_invalid_input(values: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_request(getter(**values), "r2")


def test_each_reason_has_one_triton_status_and_one_http_status() -> None:
    assert (error_code("invalid_mask"), http_status("invalid_mask")) == ("INVALID_ARG", 400)
    assert (error_code("queue_full"), http_status("queue_full")) == ("UNAVAILABLE", 503)
    assert (error_code("internal"), http_status("internal")) == ("INTERNAL", 500)
    assert (error_code("timeout"), http_status("timeout")) == ("DEADLINE_EXCEEDED", 504)
    text = error_message("r3", "unknown_template", "register it first")
    assert ServerError.parse(text) == ServerError("r3", "unknown_template", "register it first")
    assert ServerError.parse("Stub process is not healthy").reason == "server_error"


def test_a_masks_token_cost_follows_the_token_grid() -> None:
    mask = np.zeros((64, 64), bool)
    mask[0:16, 0:16] = True
    mask[20, 40] = True  # one pixel touches one more token
    assert mask_token_count(mask, 16) == 2
    assert mask_token_count(mask, 8) == 5  # a UNet-like grid: 4 tokens + 1
    assert image_token_count(64, 48, 16) == 12 and image_token_count(64, 48, 8) == 48


def test_a_unet_step_cost_pools_the_mask_to_each_level_and_counts_its_dense_part() -> None:
    cost = StepCost(dense=0.5, levels=((0, 1.0), (1, 2.0), (2, 4.0)))
    mask = np.zeros((40, 40), bool)
    mask[8:16, 8:16] = True  # one token of a 5x5 grid (8 pixels per token)
    # dense: 0.5 x 25 tokens; depth 0: 1 token; depth 1 (3x3, odd sides round up): 1; depth 2 (2x2): 1
    assert mask_work(mask, 8, cost) == 12.5 + 1.0 + 2.0 + 4.0
    assert image_work(40, 40, 8, cost) == 12.5 + 25 * 1.0 + 9 * 2.0 + 4 * 4.0
    assert mask_work(mask, 8) == 1.0  # the DiT cost: masked tokens
    published = "\n".join(
        [
            "# TYPE instgenie_step_cost_dense gauge",
            'instgenie_step_cost_dense{model="m"} 0.5',
            *(f'instgenie_step_cost_weight{{model="m",depth="{d}"}} {w}' for d, w in cost.levels),
        ]
    )
    assert step_cost_from_metrics(published) == cost
    assert step_cost_from_metrics("instgenie_text_tokens 77") is None


def test_the_metrics_parser_reads_labels_values_and_skips_the_rest() -> None:
    text = "\n".join(
        [
            "# HELP instgenie_steps_total Steps",
            "# TYPE instgenie_steps_total counter",
            'instgenie_steps_total{model="a",instance="i0"} 3',
            'instgenie_steps_total{model="b",instance="i 1"} 4 1700000000000',
            'nv_inference_count{model="a",reason="say \\"hi\\""} 7',
            "instgenie_text_tokens 32",
            "garbage line without a value",
        ]
    )
    samples = list(parse_samples(text))
    assert [s.name for s in samples] == ["instgenie_steps_total", "instgenie_steps_total", "nv_inference_count", "instgenie_text_tokens"]
    assert samples[1].labels == {"model": "b", "instance": "i 1"} and samples[1].value == 4
    assert samples[2].labels["reason"] == 'say "hi"'
    assert sample_sum(text, "instgenie_steps_total") == 7 and sample_sum(text, "instgenie_steps_total", model="a") == 3
    assert sample_sum(text, "instgenie_steps") == 0  # a prefix of a name is not the name
