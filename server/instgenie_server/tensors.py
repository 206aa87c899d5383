"""Engine outcomes -> response tensors, without Triton (so it is tested in plain Python).

Reading a request's tensors is the protocol's (:func:`instgenie_protocol.parse_request`).
"""

from __future__ import annotations

import base64
import json

import numpy as np

from instgenie.step_loop import JobOutcome

__all__ = ["bytes_tensor", "outcome_outputs", "progress_outputs", "template_list_outputs"]


def bytes_tensor(value: bytes | str) -> np.ndarray:
    return np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)


def progress_outputs(request_id: str, step: int, total_steps: int) -> dict[str, np.ndarray]:
    return {
        "STEP": np.array([step], np.int32),
        "TOTAL_STEPS": np.array([total_steps], np.int32),
        "REQUEST_ID": bytes_tensor(request_id),
    }


def outcome_outputs(outcome: JobOutcome, base64_output: bool) -> dict[str, np.ndarray]:
    """The final response's tensors."""
    outputs = progress_outputs(outcome.request_id, outcome.total_steps, outcome.total_steps)
    outputs["COMPUTED_TOKENS"] = np.array([outcome.computed_tokens], np.int32)
    outputs["NUM_TOKENS"] = np.array([outcome.num_tokens], np.int32)
    if outcome.template_id is not None:
        outputs["TEMPLATE"] = bytes_tensor(outcome.template_id)
    if outcome.png is not None:
        outputs["EDITED_IMAGE"] = bytes_tensor(base64.b64encode(outcome.png) if base64_output else outcome.png)
    if outcome.timeline is not None:
        outputs["TIMELINE"] = bytes_tensor(json.dumps({phase: round(s, 6) for phase, s in outcome.timeline.items()}))
    return outputs


def template_list_outputs(request_id: str, template_ids: list[str]) -> dict[str, np.ndarray]:
    return {
        "TEMPLATES": np.array([t.encode() for t in template_ids], dtype=np.object_).reshape(-1),
        "REQUEST_ID": bytes_tensor(request_id),
    }
