"""The loading planner on synthetic costs."""

from __future__ import annotations

import numpy as np
import pytest

from instgenie.cache.planner import CostModel, LinearCost, plan_blocks, plan_prefix, simulate


@pytest.mark.parametrize("seed", range(50))
def test_plan_is_never_slower_than_all_load_or_all_recompute(seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = int(rng.integers(1, 60))
    full = rng.uniform(1.0, 3.0, blocks)
    masked = full * rng.uniform(0.05, 0.9, blocks)
    load = rng.uniform(0.0, 6.0, blocks) * rng.choice([0.1, 1.0, 3.0])
    plan = plan_blocks(full, masked, load)
    assert plan.predicted_s <= plan.all_load_s + 1e-12
    assert plan.predicted_s <= plan.all_recompute_s + 1e-12
    assert plan.predicted_s == pytest.approx(simulate(plan.use_cache, full, masked, load))


def test_free_loads_use_the_cache_everywhere() -> None:
    plan = plan_blocks([2.0] * 10, [0.5] * 10, [0.0] * 10)
    assert all(plan.use_cache) and plan.predicted_s == pytest.approx(5.0)


def test_loads_that_hide_behind_compute_use_the_cache_everywhere() -> None:
    # Compute-bound: each load (0.4) is shorter than a masked block (0.5).
    plan = plan_blocks([2.0] * 10, [0.5] * 10, [0.4] * 10)
    assert all(plan.use_cache)
    assert plan.predicted_s == pytest.approx(0.4 + 10 * 0.5)  # only the first load is exposed


def test_when_loading_dominates_it_recomputes_enough_blocks_to_hide_the_loads() -> None:
    blocks = 12
    full, masked, load = [1.0] * blocks, [0.2] * blocks, [1.5] * blocks  # a load costs more than a full block
    plan = plan_blocks(full, masked, load)
    assert 0 < plan.recomputed < blocks
    assert plan.predicted_s < 0.8 * plan.all_load_s and plan.predicted_s < 0.9 * plan.all_recompute_s
    # Close to the best of all 2^12 plans, and compute rarely waits on a load.
    best = min(simulate([bool(p >> i & 1) for i in range(blocks)], full, masked, load) for p in range(2**blocks))
    assert plan.predicted_s <= 1.05 * best
    idle = plan.predicted_s - sum(m if use else f for use, f, m in zip(plan.use_cache, full, masked))
    assert idle <= 0.25 * plan.predicted_s


def test_double_buffering_limits_how_far_loads_run_ahead() -> None:
    # With one buffer a load waits for the previous block's compute; with two it overlaps.
    one = simulate([True] * 4, [9.0] * 4, [1.0] * 4, [1.0] * 4, buffers=1)
    two = simulate([True] * 4, [9.0] * 4, [1.0] * 4, [1.0] * 4, buffers=2)
    assert one == pytest.approx(8.0) and two == pytest.approx(5.0)


def test_linear_fit_and_cost_model_round_trip(tmp_path) -> None:
    fit = LinearCost.fit([100, 200, 400, 800], [0.011, 0.021, 0.041, 0.081])
    assert fit.slope_s == pytest.approx(1e-4) and fit.intercept_s == pytest.approx(0.001) and fit.r2 > 0.999
    model = CostModel(block_compute=fit, load=LinearCost(0.0005, 1e-9))
    model.save(tmp_path / "costs.json")
    assert CostModel.read(tmp_path / "costs.json") == model
    plan = model.plan(blocks=19, all_tokens=4096 + 512, masked_tokens=400 + 512, block_bytes=64 * 2**20)
    assert len(plan.use_cache) == 19
    with pytest.raises(ValueError):
        LinearCost.fit([1, 1], [0.1, 0.2])


# -- the executable plan: recomputed blocks first ----------------------------------------
@pytest.mark.parametrize("seed", range(30))
def test_prefix_plan_is_the_best_prefix_and_never_slower_than_either_extreme(seed: int) -> None:
    rng = np.random.default_rng(seed)
    blocks = int(rng.integers(1, 20))
    full = list(rng.uniform(1.0, 3.0, blocks))
    masked = [f * rng.uniform(0.1, 0.9) for f in full]
    load = list(rng.uniform(0.0, 4.0, blocks))
    plan = plan_prefix(full, masked, load)
    k = plan.recomputed
    assert plan.use_cache == (False,) * k + (True,) * (blocks - k)  # a prefix
    prefixes = [simulate((False,) * j + (True,) * (blocks - j), full, masked, load) for j in range(blocks + 1)]
    assert plan.predicted_s == pytest.approx(min(prefixes))
    assert plan.predicted_s <= min(plan.all_load_s, plan.all_recompute_s) + 1e-12
    assert plan.predicted_s >= plan_blocks(full, masked, load).predicted_s - 1e-12  # the constraint only costs


def test_prefix_plan_recomputes_leading_blocks_while_the_copies_run_ahead() -> None:
    # 12 equal blocks whose loads (8) take longer than their masked compute (3):
    # all-load waits on the copy stream; recomputing the first blocks (10 each)
    # lets the copies of the later blocks land meanwhile.
    plan = plan_prefix([10.0] * 12, [3.0] * 12, [8.0] * 12)
    assert 0 < plan.recomputed < 12
    assert plan.predicted_s < plan.all_load_s and plan.predicted_s < plan.all_recompute_s
    # Free loads: nothing to hide, every block loads.
    assert plan_prefix([10.0] * 12, [3.0] * 12, [0.0] * 12).recomputed == 0


def test_cost_model_plans_prefixes_from_token_and_byte_counts() -> None:
    costs = CostModel(block_compute=LinearCost(0.0, 1e-3), load=LinearCost(0.0, 1e-6))
    # 1000 full tokens (1 s per block) vs 100 masked (0.1 s); 0.5 s loads.
    plan = costs.plan_prefix(8, 1000, 100, 500_000)
    assert plan.use_cache[plan.recomputed :] == (True,) * (8 - plan.recomputed)
    assert plan.predicted_s <= min(plan.all_load_s, plan.all_recompute_s)
    assert costs.plan_prefix(8, 1000, 100, 0).recomputed == 0
