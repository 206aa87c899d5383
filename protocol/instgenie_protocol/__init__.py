"""The wire between InstGenIE's processes: what server, clients and router agree on.

One small layer above the engine and below everything that talks over the network:
model and tensor names (:mod:`.names`) and reading them (:mod:`.requests`), error reasons with their Triton and HTTP status
codes and their message format (:mod:`.errors`), the template-id form
(:mod:`.template_ids`), server-sent events (:mod:`.sse`), the latent-token cost of a mask (:mod:`.tokens`) and the
Prometheus text the instances publish (:mod:`.prometheus`). It imports no torch, no
Triton and no gRPC, so a client or the router stays light.
"""

from .errors import ERROR_CODES, HTTP_STATUS, ServerError, error_code, error_message, http_status
from .names import ACTIONS, BASELINE_MODEL, EDIT_MODEL, INPUTS, OUTPUTS, SYNC_MODEL
from .prometheus import Sample, parse_samples, sample_sum
from .requests import ParsedRequest, decode_blob, parse_request
from .sse import json_error_text, sse_data, sse_event
from .template_ids import check_template_id, is_template_id
from .tokens import (
    DEFAULT_PIXELS_PER_TOKEN,
    PIXELS_PER_TOKEN_METRIC,
    STEP_COST_DENSE_METRIC,
    STEP_COST_WEIGHT_METRIC,
    StepCost,
    image_token_count,
    image_work,
    mask_token_count,
    mask_work,
    step_cost_from_metrics,
    token_mask,
)

__all__ = [
    "ACTIONS",
    "BASELINE_MODEL",
    "DEFAULT_PIXELS_PER_TOKEN",
    "EDIT_MODEL",
    "ERROR_CODES",
    "HTTP_STATUS",
    "INPUTS",
    "OUTPUTS",
    "ParsedRequest",
    "PIXELS_PER_TOKEN_METRIC",
    "STEP_COST_DENSE_METRIC",
    "STEP_COST_WEIGHT_METRIC",
    "SYNC_MODEL",
    "StepCost",
    "Sample",
    "ServerError",
    "check_template_id",
    "decode_blob",
    "error_code",
    "error_message",
    "http_status",
    "image_token_count",
    "image_work",
    "is_template_id",
    "json_error_text",
    "mask_token_count",
    "mask_work",
    "parse_request",
    "parse_samples",
    "sample_sum",
    "sse_data",
    "sse_event",
    "step_cost_from_metrics",
    "token_mask",
]
