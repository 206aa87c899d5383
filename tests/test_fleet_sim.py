"""The fleet simulation (bench/fleet.py): its instances keep the step loop's timing rules,
and it drives the router's real policies."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from fleet import Fleet, InstanceModel, SimRequest, simulate  # noqa: E402

CPU = InstanceModel(step_intercept_s=0.01, token_step_s=1e-4, text_tokens=10, image_tokens=1024,
                    prepare_s=0.2, finish_s=0.3, codec_shares_core=True)  # fmt: skip
GPU = InstanceModel(step_intercept_s=0.01, token_step_s=1e-4, text_tokens=10, image_tokens=1024,
                    prepare_s=0.2, finish_s=0.3, codec_shares_core=False)  # fmt: skip


def request(index: int, tokens: int, arrival: float = 0.0, steps: int = 4) -> SimRequest:
    return SimRequest(index, f"r{index}", "tpl", tokens, steps, arrival)


def test_a_lone_request_takes_prepare_its_steps_and_finish() -> None:
    done = Fleet([CPU], "least_requests").run([request(0, 100)])
    assert done[0].done_at == pytest.approx(0.2 + 4 * CPU.step_s([100]) + 0.3)


def test_a_request_joins_the_running_batch_at_the_next_step_and_leaves_alone() -> None:
    first, second = request(0, 100, steps=30), request(1, 50, arrival=0.25, steps=2)
    Fleet([GPU], "least_requests").run([first, second])
    # The second is prepared beside the loop (ready at 0.45), joins at the first step
    # boundary after that, takes 2 batched steps and is finished beside the loop.
    solo, both = GPU.step_s([100]), GPU.step_s([100, 50])
    solo_steps = math.ceil((0.45 - 0.2) / solo)
    joined = 0.2 + solo_steps * solo
    assert second.done_at == pytest.approx(joined + 2 * both + 0.3)
    assert first.done_at == pytest.approx(joined + 2 * both + (30 - solo_steps - 2) * solo + 0.3)


def test_mask_aware_routes_a_mix_of_large_and_tiny_masks_with_a_lower_p95_than_request_counting() -> None:
    # Overlapping pairs of one large and one tiny mask: equal request counts per
    # instance are not equal work; the real policies decide on the simulated state.
    requests = []
    for pair in range(8):
        requests += [request(2 * pair, 900, arrival=0.5 * pair, steps=8), request(2 * pair + 1, 5, arrival=0.5 * pair + 0.01, steps=8)]
    counting = simulate([GPU, GPU], "least_requests", requests)
    aware = simulate([GPU, GPU], "mask_aware", requests)
    assert counting["routed"] == [8, 8]
    assert aware["p95_s"] < 0.9 * counting["p95_s"]
    assert sum(aware["token_steps"]) == sum(counting["token_steps"]) == 8 * 8 * (900 + 5)
